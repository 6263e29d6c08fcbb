"""What the integration tests send as audio: the recording as PCM16 bytes, and the samples the
server decodes from them (what the oracle must hear for its tokens to match the cluster's)."""

from __future__ import annotations

import numpy as np


def pcm16_bytes(samples: np.ndarray) -> bytes:
    """float samples in [-1, 1] -> little-endian PCM16 bytes, as the client sends them."""
    return (np.clip(samples, -1, 1) * 32767.0).round().astype("<i2").tobytes()


def pcm16_samples(samples: np.ndarray) -> np.ndarray:
    """What the server decodes from pcm16_bytes(samples)."""
    return np.frombuffer(pcm16_bytes(samples), dtype="<i2").astype(np.float32) / 32768.0
