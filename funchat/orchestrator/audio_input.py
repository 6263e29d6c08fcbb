"""Caller audio as the API receives it: PCM16, float32 or G.711 (μ-law, A-law) bytes at 8..48 kHz ->
16 kHz float32.

Decoding errors raise `AudioFormatError` with a message saying what to fix; the orchestrator turns
it into INVALID_ARGUMENT for that event only. A call's chunks go through one `InputAudioStream`,
whose resampler keeps its filter state across chunks (no clicks at chunk joins).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import soxr

from funchat import g711
from funchat.api import pb
from funchat.audio_io import SAMPLE_RATE

MIN_RATE, MAX_RATE = 8000, 48000
ENCODINGS = {pb.AUDIO_ENCODING_UNSPECIFIED: ("pcm16", 2), pb.AUDIO_ENCODING_PCM16: ("pcm16", 2),
             pb.AUDIO_ENCODING_FLOAT32: ("float32", 4), pb.AUDIO_ENCODING_PCMU: ("pcmu", 1),
             pb.AUDIO_ENCODING_PCMA: ("pcma", 1)}
G711_DECODERS = {"pcmu": g711.ulaw_to_pcm16, "pcma": g711.alaw_to_pcm16}
ENCODING_VALUES = {"pcm16": pb.AUDIO_ENCODING_PCM16, "float32": pb.AUDIO_ENCODING_FLOAT32,
                   "pcmu": pb.AUDIO_ENCODING_PCMU, "pcma": pb.AUDIO_ENCODING_PCMA}  # name -> the API's value


class AudioFormatError(ValueError):
    """Audio bytes or a format the orchestrator cannot use."""


@dataclass(frozen=True)
class InputFormat:
    encoding: str  # "pcm16" | "float32" | "pcmu" | "pcma"
    sample_rate: int
    bytes_per_sample: int

    @classmethod
    def from_proto(cls, fmt: pb.AudioFormat) -> "InputFormat":
        if fmt.encoding not in ENCODINGS:
            raise AudioFormatError(f"unknown input audio encoding {fmt.encoding}; use AUDIO_ENCODING_PCM16, "
                                   "AUDIO_ENCODING_FLOAT32, AUDIO_ENCODING_PCMU or AUDIO_ENCODING_PCMA")
        rate = fmt.sample_rate_hz or SAMPLE_RATE
        if not MIN_RATE <= rate <= MAX_RATE:
            raise AudioFormatError(f"input sample rate {rate} Hz is not supported; use {MIN_RATE}..{MAX_RATE} Hz "
                                   "(16000 needs no resampling)")
        name, width = ENCODINGS[fmt.encoding]
        return cls(name, rate, width)

    def duration_ms(self, n_bytes: int) -> float:
        return n_bytes / self.bytes_per_sample * 1000.0 / self.sample_rate

    def decode(self, data: bytes) -> np.ndarray:
        """Bytes in this format -> float32 samples at this format's rate (checked)."""
        if len(data) % self.bytes_per_sample:
            raise AudioFormatError(f"{len(data)} bytes is not a whole number of {self.encoding} samples "
                                   f"({self.bytes_per_sample} bytes each): the audio cannot be decoded")
        if self.encoding == "pcm16":
            samples = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
        elif self.encoding in G711_DECODERS:
            samples = G711_DECODERS[self.encoding](data).astype(np.float32) / 32768.0
        else:
            samples = np.frombuffer(data, dtype="<f4").astype(np.float32)
            if not np.isfinite(samples).all():
                raise AudioFormatError("the audio holds NaN or infinite samples")
            if samples.size and float(np.abs(samples).max()) > 1.0 + 1e-6:
                raise AudioFormatError("float32 audio must lie in [-1, 1] (got a sample of magnitude "
                                       f"{float(np.abs(samples).max()):.3g})")
        return samples


def decode_utterance(data: bytes, fmt: InputFormat) -> np.ndarray:
    """A whole utterance -> 16 kHz float32, never empty: a turn of no samples (or of so few that
    resampling leaves none, e.g. 1 sample at 48 kHz) would only fail later, in a model service."""
    samples = fmt.decode(data)
    if fmt.sample_rate != SAMPLE_RATE and samples.size:
        samples = soxr.resample(samples, fmt.sample_rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
    if not samples.size:
        raise AudioFormatError(f"the utterance is too short: {len(data)} bytes of {fmt.encoding} at "
                               f"{fmt.sample_rate} Hz give no samples at {SAMPLE_RATE} Hz")
    return samples


class InputAudioStream:
    """A call's audio chunks -> 16 kHz float32, with a size limit per chunk."""

    def __init__(self, fmt: InputFormat, max_chunk_ms: int):
        self.fmt = fmt
        self.max_chunk_ms = max_chunk_ms
        self.resampler = None if fmt.sample_rate == SAMPLE_RATE else \
            soxr.ResampleStream(fmt.sample_rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")

    def push(self, data: bytes) -> np.ndarray:
        ms = self.fmt.duration_ms(len(data))
        if ms > self.max_chunk_ms:
            raise AudioFormatError(f"audio chunk of {ms:.0f} ms is over the {self.max_chunk_ms} ms limit; "
                                   "send smaller chunks (20-200 ms is typical)")
        samples = self.fmt.decode(data)
        if self.resampler is not None:
            samples = self.resampler.resample_chunk(samples).astype(np.float32)
        return samples

    def flush(self) -> np.ndarray:
        """At the end of a turn: the samples the resampler still holds (its delay, up to ~0.1 s at
        8 kHz), and a fresh stream for the next turn. Without it a manual turn loses its last
        samples to the start of the next one."""
        if self.resampler is None:
            return np.zeros(0, np.float32)
        tail = self.resampler.resample_chunk(np.zeros(0, np.float32), last=True).astype(np.float32)
        self.resampler = soxr.ResampleStream(self.fmt.sample_rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
        return tail
