"""The caller's turn while they speak: its audio so far and the encoder windows already encoded.

The audio tokenizer encodes window w once the turn reaches the samples its mel frames read
(`funchat.encoder_windows`), floored at the turn's log-mel max so far (`top`) minus 8. When a later
window raises the max, a window encoded earlier is stale if the new floor would change one of its
values (its own min is below it); those are encoded again, so that every window held is what the
turn's current max gives. At the end of the turn the tokenizer encodes the rest of the turn and
says the whole turn's max (`funchat.engines.audio_tokenizer`); the held windows that max makes
stale are encoded again then (`raise_top`).

Pure bookkeeping (no I/O): `CallerTurn` (converse) drives it.

Shapes: n samples, E the LLM width; a window holds `EncoderWindows.groups` rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from funchat.encoder_windows import EncoderWindows

FLOOR_RANGE = np.float32(8.0)  # Whisper floors the log-mel at max - 8 (float32, as the service computes it)


@dataclass(frozen=True)
class EncodedWindow:
    rows: np.ndarray  # [groups, E] float32
    low: float  # the window's log-mel min before the floor
    floor_top: float  # the max it was floored at


class TurnWindows:
    def __init__(self, geometry: EncoderWindows | None):
        self.geometry = geometry
        self._chunks: list[np.ndarray] = []
        self._joined: np.ndarray | None = None
        self.samples = 0
        self.windows: list[EncodedWindow] = []
        self.top = -math.inf  # the log-mel max of the windows encoded so far
        self.version = 0  # counts the windows' changes
        self.broken = False  # a request failed: the windows held may be stale (not to be used)

    def append(self, samples: np.ndarray) -> None:
        if len(samples):
            self._chunks.append(np.asarray(samples, dtype=np.float32))
            self.samples += len(samples)
            self._joined = None

    def audio(self) -> np.ndarray:
        """The turn so far [n] float32."""
        if self._joined is None:
            self._joined = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.float32)
            self._chunks = [self._joined]
        return self._joined

    def segment(self, window: int) -> np.ndarray:
        start, end = self.geometry.segment(window)
        return self.audio()[start:end]

    def next_window(self) -> int | None:
        """The next window ready to encode (None: the turn does not reach one yet)."""
        return len(self.windows) if self.geometry.ready(self.samples) > len(self.windows) else None

    def add(self, window: int, rows: np.ndarray, own_top: float, low: float, floor_top: float) -> list[int]:
        """Window `window` encoded (new, or encoded again) with the floor at max(floor_top, its own
        max) - 8 -> the windows that the max it brings made stale (to encode again with `self.top`)."""
        encoded = EncodedWindow(rows, low, max(floor_top, own_top))
        self.version += 1
        if window == len(self.windows):
            self.windows.append(encoded)
        else:
            self.windows[window] = encoded
        return self.raise_top(own_top)

    def raise_top(self, top: float) -> list[int]:
        """A log-mel max seen (a window's, or at the end the whole turn's) -> the windows it makes
        stale (to encode again with it)."""
        if top <= self.top:
            return []
        self.top = top
        return [w for w, e in enumerate(self.windows) if self.stale(e)]

    def stale(self, e: EncodedWindow) -> bool:
        """Would the current floor change one of the window's values?"""
        return e.floor_top != self.top and np.float32(e.low) < np.float32(self.top) - FLOOR_RANGE

    def consistent(self) -> bool:
        """Every window held is what the current max gives (none stale)."""
        return not any(self.stale(e) for e in self.windows)

    def rows(self, windows: int) -> np.ndarray:
        """The first `windows` windows' rows [windows * groups, E]."""
        return np.concatenate([e.rows for e in self.windows[:windows]], axis=0)
