"""G.711 telephony audio (ITU-T G.711): μ-law (PCMU) and A-law (PCMA), one byte per sample, with
16-bit linear PCM, as telephone networks and SIP trunks carry speech at 8 kHz. numpy only (the
client imports it too).

Decoding is a 256-entry table; encoding follows the standard's reference encoder (14-bit μ-law,
13-bit A-law magnitudes, the segment that holds the sample, truncated within it): the tests check
both directions against CPython's `audioop` for every 16-bit value and every byte.
"""

from __future__ import annotations

import numpy as np

ULAW_BIAS = 0x84  # 132: the μ-law bias (on 16-bit magnitudes)


def _ulaw_decode_table() -> np.ndarray:
    code = ~np.arange(256, dtype=np.int32) & 0xFF  # the bits are sent inverted
    exponent, mantissa = (code >> 4) & 0x07, code & 0x0F
    magnitude = (((mantissa << 3) + ULAW_BIAS) << exponent) - ULAW_BIAS
    return np.where(code & 0x80, -magnitude, magnitude).astype(np.int16)  # [256]


def _alaw_decode_table() -> np.ndarray:
    code = np.arange(256, dtype=np.int32) ^ 0x55  # every other bit is sent inverted
    exponent, mantissa = (code >> 4) & 0x07, code & 0x0F
    magnitude = np.where(exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0))
    return np.where(code & 0x80, magnitude, -magnitude).astype(np.int16)  # [256]; sign bit set: positive


ULAW_TO_PCM16 = _ulaw_decode_table()
ALAW_TO_PCM16 = _alaw_decode_table()


# The standard's segment ends: μ-law on 14-bit magnitudes (after its bias), A-law on 13-bit ones.
ULAW_SEGMENT_ENDS = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])
ALAW_SEGMENT_ENDS = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF])
ULAW_BIAS_14 = 0x21  # the bias on 14-bit samples (0x84 >> 2)
ULAW_CLIP_14 = 8159


def pcm16_to_ulaw(pcm: np.ndarray) -> bytes:
    """int16 samples -> μ-law bytes."""
    v = np.asarray(pcm, dtype=np.int32) >> 2  # 14 bits (the shift floors negatives, as the standard's C)
    mask = np.where(v < 0, 0x7F, 0xFF)
    v = np.minimum(np.abs(v), ULAW_CLIP_14) + ULAW_BIAS_14
    segment = np.searchsorted(ULAW_SEGMENT_ENDS, v)  # the first segment whose end is >= v; 8: beyond
    code = np.where(segment >= 8, 0x7F, (segment << 4) | ((v >> (segment + 1)) & 0x0F))
    return ((code ^ mask) & 0xFF).astype(np.uint8).tobytes()


def pcm16_to_alaw(pcm: np.ndarray) -> bytes:
    """int16 samples -> A-law bytes."""
    v = np.asarray(pcm, dtype=np.int32) >> 3  # 13 bits
    mask = np.where(v >= 0, 0xD5, 0x55)
    v = np.where(v >= 0, v, -v - 1)
    segment = np.searchsorted(ALAW_SEGMENT_ENDS, v)
    mantissa = np.where(segment < 2, v >> 1, v >> np.maximum(segment, 1)) & 0x0F
    code = np.where(segment >= 8, 0x7F, (segment << 4) | mantissa)
    return ((code ^ mask) & 0xFF).astype(np.uint8).tobytes()


def ulaw_to_pcm16(data: bytes) -> np.ndarray:
    """μ-law bytes -> int16 samples."""
    return ULAW_TO_PCM16[np.frombuffer(data, dtype=np.uint8)]


def alaw_to_pcm16(data: bytes) -> np.ndarray:
    """A-law bytes -> int16 samples."""
    return ALAW_TO_PCM16[np.frombuffer(data, dtype=np.uint8)]
