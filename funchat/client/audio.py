"""Caller audio to the API's bytes, and the API's reply audio (24 kHz PCM16, or the call's
output_audio_format) back to samples."""

from __future__ import annotations

import numpy as np

from funchat import g711
from funchat.api import pb
from funchat.client.config import ENCODINGS, OUTPUT_SAMPLE_RATE, SAMPLE_BYTES


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


def decode_audio(data: bytes, encoding: str = "pcm16") -> np.ndarray:
    """Little-endian bytes in `encoding` ("pcm16", "float32", "pcmu", "pcma") -> float32 samples,
    the inverse of encode_audio (G.711 through its 16-bit PCM, scaled by 1/32768 as PCM16)."""
    if encoding not in SAMPLE_BYTES:
        raise ValueError(f"unknown audio encoding {encoding!r}; use one of {sorted(ENCODINGS)}")
    if len(data) % SAMPLE_BYTES[encoding]:
        raise ValueError(f"{len(data)} bytes is not a whole number of {encoding} samples")
    if encoding == "pcm16":
        return decode_pcm16(data)
    if encoding == "float32":
        return np.frombuffer(data, dtype="<f4").astype(np.float32)
    pcm = g711.ulaw_to_pcm16(data) if encoding == "pcmu" else g711.alaw_to_pcm16(data)
    return pcm.astype(np.float32) / np.float32(32768.0)


def delta_format(delta: pb.AudioDelta) -> tuple[str, int]:
    """(encoding name, sample rate) of a reply audio chunk: `pcm16` at 24 kHz, the default, or its
    `audio` bytes in the call's output_audio_format (AudioDelta.encoding, sample_rate_hz)."""
    if not delta.audio:
        return "pcm16", delta.sample_rate_hz or OUTPUT_SAMPLE_RATE
    name = next((n for n, v in ENCODINGS.items() if v == delta.encoding), "pcm16")  # UNSPECIFIED is PCM16
    return name, delta.sample_rate_hz or OUTPUT_SAMPLE_RATE


def decode_delta(delta: pb.AudioDelta) -> tuple[np.ndarray, int]:
    """A reply audio chunk in any output format -> (float32 samples, sample rate)."""
    encoding, rate = delta_format(delta)
    return decode_audio(delta.audio if delta.audio else delta.pcm16, encoding), rate
