"""Caller audio to the API's bytes, and the API's PCM16 reply audio back to samples."""

from __future__ import annotations

import numpy as np

from funchat import g711
from funchat.client.config import ENCODINGS


def encode_audio(samples: np.ndarray, encoding: str = "pcm16") -> bytes:
    """Mono float samples in [-1, 1] -> little-endian bytes ("pcm16", "float32", or G.711 "pcmu" /
    "pcma": PCM16 first, then the G.711 encoder).

    Samples are clipped to [-1, 1] first: the server refuses float32 beyond it, and PCM16 would wrap."""
    x = np.asarray(samples, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"audio must be 1-D mono samples, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("audio holds NaN or infinite samples")
    x = np.clip(x, -1.0, 1.0)
    if encoding in ("pcm16", "pcmu", "pcma"):
        # Scale by 32768 as soundfile and the server's decoder do, so PCM16 values round-trip exactly.
        pcm = np.clip(np.round(x * 32768.0), -32768, 32767).astype("<i2")
        if encoding == "pcmu":
            return g711.pcm16_to_ulaw(pcm)
        return g711.pcm16_to_alaw(pcm) if encoding == "pcma" else pcm.tobytes()
    if encoding == "float32":
        return x.astype("<f4").tobytes()
    raise ValueError(f"unknown audio encoding {encoding!r}; use one of {sorted(ENCODINGS)}")


def decode_pcm16(data: bytes) -> np.ndarray:
    """PCM16 little-endian bytes -> float32 samples in [-1, 1)."""
    if len(data) % 2:
        raise ValueError(f"{len(data)} bytes is not a whole number of PCM16 samples")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / np.float32(32768.0)
