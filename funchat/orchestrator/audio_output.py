"""Reply audio as the API sends it: the vocoder's 24 kHz float32 -> the call's output format.

The default (PCM16 at 24 kHz) goes out in `AudioDelta.pcm16`, exactly as before output formats
existed. Any other format (PCM16 / FLOAT32 / G.711 μ-law / A-law at 8..48 kHz) goes out in
`AudioDelta.audio` with its `encoding`. One `OutputAudioStream` per reply: its resampler keeps its
filter state across the vocoder's chunks, so the chunks joined equal the whole reply resampled at
once (no clicks at chunk joins), and the reply's last chunk flushes what the filter still holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import soxr

from funchat import g711
from funchat.api import pb
from funchat.orchestrator.audio_input import ENCODING_VALUES, ENCODINGS, MAX_RATE, MIN_RATE, AudioFormatError

VOCODER_RATE = 24000  # what the vocoder makes; also the default output rate
# soxr's HQ filter, as the caller audio uses: flat to 3.6 kHz at 8 kHz (-3 dB at 3.8 kHz), aliases
# below -120 dB. Its cost is a delay: a chunk's last ~59 ms at 8 kHz (~16 ms at 48 kHz) come out
# with the next chunk (vocoder chunks are 600 ms) or the reply's final flush.
QUALITY = "HQ"


def pcm16(samples: np.ndarray) -> bytes:
    """float32 [-1, 1] -> PCM16 little-endian bytes (the reply audio's scaling since the start)."""
    return (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


ENCODERS = {
    "pcm16": pcm16,
    "float32": lambda x: np.clip(x, -1.0, 1.0).astype("<f4").tobytes(),
    # G.711 from the same PCM16 the default format sends (the standard's encoders take 16-bit PCM)
    "pcmu": lambda x: g711.pcm16_to_ulaw(np.frombuffer(pcm16(x), "<i2")),
    "pcma": lambda x: g711.pcm16_to_alaw(np.frombuffer(pcm16(x), "<i2")),
}


@dataclass(frozen=True)
class OutputFormat:
    encoding: str = "pcm16"  # "pcm16" | "float32" | "pcmu" | "pcma"
    sample_rate: int = VOCODER_RATE

    @classmethod
    def from_proto(cls, fmt: pb.AudioFormat) -> "OutputFormat":
        """SessionConfig.output_audio_format -> OutputFormat; an unset field is the default."""
        if fmt.encoding not in ENCODINGS:
            raise AudioFormatError(f"output_audio_format.encoding {fmt.encoding} is unknown; use "
                                   "AUDIO_ENCODING_PCM16, AUDIO_ENCODING_FLOAT32, AUDIO_ENCODING_PCMU or "
                                   "AUDIO_ENCODING_PCMA")
        rate = fmt.sample_rate_hz or VOCODER_RATE
        if not MIN_RATE <= rate <= MAX_RATE:
            raise AudioFormatError(f"output_audio_format.sample_rate_hz {rate} is not supported; use "
                                   f"{MIN_RATE}..{MAX_RATE} Hz (0 = {VOCODER_RATE}, the vocoder's rate; "
                                   "8000 for telephony)")
        return cls(ENCODINGS[fmt.encoding][0], rate)

    @property
    def is_default(self) -> bool:
        """24 kHz PCM16: sent in AudioDelta.pcm16 as before output formats existed."""
        return self.encoding == "pcm16" and self.sample_rate == VOCODER_RATE

    @property
    def bytes_per_sample(self) -> int:
        return {"pcm16": 2, "float32": 4, "pcmu": 1, "pcma": 1}[self.encoding]


DEFAULT_OUTPUT = OutputFormat()


def delta_samples(delta: pb.AudioDelta) -> tuple[int, int]:
    """(samples, rate) of an AudioDelta in any output format: what playback positions count."""
    if delta.audio:
        width = ENCODINGS.get(delta.encoding, ("pcm16", 2))[1]
        return len(delta.audio) // width, delta.sample_rate_hz
    return len(delta.pcm16) // 2, delta.sample_rate_hz or VOCODER_RATE


class OutputAudioStream:
    """One reply's 24 kHz float32 chunks -> AudioDelta fields in the output format.

    Positions (`start_ms`) count the samples sent in the output format, so they are what the caller
    plays back, and its PlaybackAck / truncate positions mean the same milliseconds."""

    def __init__(self, fmt: OutputFormat = DEFAULT_OUTPUT):
        self.fmt = fmt
        self.resampler = None if fmt.sample_rate == VOCODER_RATE else \
            soxr.ResampleStream(VOCODER_RATE, fmt.sample_rate, 1, dtype="float32", quality=QUALITY)
        self.samples = 0  # output samples sent so far

    def push(self, audio24k: np.ndarray, last: bool = False) -> dict | None:
        """A vocoder chunk (last: the reply's final one, which also flushes the resampler) -> the
        AudioDelta's audio fields, or None when the resampler holds everything back so far."""
        x = np.asarray(audio24k, dtype=np.float32)
        if self.resampler is not None:
            x = self.resampler.resample_chunk(x, last=last).astype(np.float32, copy=False)
        if not x.size:
            return None
        start_ms = self.samples * 1000 // self.fmt.sample_rate
        self.samples += int(x.size)
        if self.fmt.is_default:
            return {"pcm16": pcm16(x), "sample_rate_hz": VOCODER_RATE, "start_ms": start_ms}
        return {"audio": ENCODERS[self.fmt.encoding](x), "encoding": ENCODING_VALUES[self.fmt.encoding],
                "sample_rate_hz": self.fmt.sample_rate, "start_ms": start_ms}
