"""Shared test fixtures: where ../shared is, and a tiny checkpoint written once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    return Path(os.environ.get("FUNCHAT_SHARED", REPO.parent / "shared")).resolve()


@pytest.fixture(scope="session")
def shared() -> Path:
    path = shared_dir()
    assert path.is_dir(), f"the shared folder is missing at {path} (set FUNCHAT_SHARED)"
    return path


@pytest.fixture(scope="session")
def example_wav(shared: Path) -> Path:
    return shared / "data" / "fun-audio-chat-example-16k-f32.wav"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from funchat.model.init_checkpoint import init_checkpoint

    return init_checkpoint("tiny", tmp_path_factory.mktemp("tiny-ckpt"), seed=0)


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_checkpoint):
    from funchat.oracle.pipeline import ReferencePipeline

    return ReferencePipeline(tiny_checkpoint)
