"""Fixtures of the vocoder unit tests: the reference CosyVoice 3 token2wav golden set
(../shared/golden/cosyvoice3-token2wav-tiny-a: a tiny random checkpoint and its reference outputs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

TOKEN2WAV_GOLDEN = "golden/cosyvoice3-token2wav-tiny-a"


@pytest.fixture(scope="session")
def golden_dir(shared):
    """The golden set's vocoder checkpoint folder (reference weights)."""
    return shared / TOKEN2WAV_GOLDEN / "checkpoint"


@pytest.fixture(scope="session")
def xvec(shared) -> torch.Tensor:
    """The golden set's speaker x-vector [192]."""
    with np.load(shared / TOKEN2WAV_GOLDEN / "expected.npz") as f:
        return torch.from_numpy(f["in_spk"][0].copy())
