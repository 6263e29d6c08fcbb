"""Voice-activity detection and server-side turn detection for full-duplex calls.

`SileroVad` runs the Silero VAD ONNX model (shipped in the `silero-vad` package) with onnxruntime,
one 32 ms window (512 samples at 16 kHz) at a time, keeping the model's recurrent state between
calls. `TurnDetector` turns a stream of caller audio into `SpeechStarted` / `SpeechStopped` events,
like the OpenAI Realtime "server_vad" turn detection:

- the stream is cut into 512-sample windows at fixed positions (multiples of 512 samples from the
  start of the stream), so the events do not depend on how the caller chunks the audio;
- a window with probability >= `threshold` starts a *candidate*; the candidate becomes speech
  (and `SpeechStarted` is emitted, with the candidate's start) once `min_speech_ms` of consecutive
  windows with probability >= `threshold - 0.15` (the hysteresis "negative" threshold, as in
  Silero's own `neg_threshold`) have been seen; a window below the negative threshold before that
  drops the candidate silently (nothing was emitted, so the caller has nothing to undo);
- speech ends after `silence_duration_ms` of consecutive windows below the negative threshold:
  `SpeechStopped` carries the utterance audio from `prefix_padding_ms` before the speech start up
  to the point where the stop was decided, i.e. the speech *plus* the trailing silence that was
  observed (`silence_duration_ms`, rounded up to whole windows);
- an utterance longer than `max_utterance_s` is force-stopped (`SpeechStopped(forced=True)`); if
  the caller keeps talking, a new turn starts with the next speech window.

Audio returned by successive `SpeechStopped` events never overlaps: after a stop the history is
cleared, so the next utterance's prefix padding does not reach back into audio already returned.
"""

from __future__ import annotations

import functools
import importlib.util
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

SAMPLE_RATE = 16000
WINDOW_SAMPLES = 512      # the model's window at 16 kHz: 32 ms
CONTEXT_SAMPLES = 64      # the model sees the last 64 samples of the previous window before each window
STATE_SHAPE = (2, 1, 128)  # LSTM (h, c) x batch 1 x 128 units
HYSTERESIS = 0.15         # speech continues while probability >= threshold - HYSTERESIS


def silero_model_path() -> Path:
    """The `silero_vad.onnx` file inside the installed `silero-vad` package.

    Located with `importlib.util.find_spec`, which finds the package directory without executing
    its `__init__` (that imports torch, about a second, and torch is not needed here). The package
    declares torch as a dependency, so a torch-free orchestrator installs it with `--no-deps`.
    """
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the silero-vad package (the VAD's ONNX model) is not installed: "
                           "pip install --no-deps silero-vad==6.2.3 (--no-deps: it would pull in torch)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.onnx"
    if not path.is_file():
        raise RuntimeError(f"the Silero VAD model is missing at {path}")
    return path


@functools.lru_cache(maxsize=4)
def _session(path: str) -> ort.InferenceSession:
    # One session per model file, shared by every SileroVad: InferenceSession.run is thread-safe
    # and keeps no state between runs (the recurrent state is an explicit input/output), so each
    # call only needs its own state arrays. One thread each: many calls run side by side.
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


class SileroVad:
    """Streaming Silero VAD at 16 kHz: `probability(window)` for consecutive 512-sample windows.

    The ONNX model's contract (silero_vad.onnx, opset 16):
      inputs  `input` float32 [1, 64 + 512]: the previous window's last 64 samples, then the window;
              `state` float32 [2, 1, 128]: recurrent state, zeros at the start of a stream;
              `sr`    int64 scalar: the sample rate (16000);
      outputs `output` float32 [1, 1]: speech probability of the window;
              `stateN` float32 [2, 1, 128]: the state to pass with the next window.
    """

    sample_rate = SAMPLE_RATE
    window_samples = WINDOW_SAMPLES

    def __init__(self, model_path: str | Path | None = None) -> None:
        self._session = _session(str(model_path or silero_model_path()))
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)
        self.reset()

    def reset(self) -> None:
        """Start a new stream: zero recurrent state and zero context."""
        self._state = np.zeros(STATE_SHAPE, dtype=np.float32)          # [2, 1, 128]
        self._context = np.zeros(CONTEXT_SAMPLES, dtype=np.float32)    # [64]

    def probability(self, window: np.ndarray) -> float:
        """Speech probability of the next 512-sample window (float32, 16 kHz, [-1, 1])."""
        window = np.asarray(window, dtype=np.float32)
        if window.shape != (WINDOW_SAMPLES,):
            raise ValueError(f"SileroVad expects windows of shape ({WINDOW_SAMPLES},), got {window.shape}")
        x = np.concatenate([self._context, window])[None, :]              # [1, 576]
        out, state = self._session.run(["output", "stateN"],
                                       {"input": x, "state": self._state, "sr": self._sr})
        self._state = state                                                # [2, 1, 128]
        self._context = window[-CONTEXT_SAMPLES:].copy()                   # [64]
        return float(out[0, 0])                                            # out: [1, 1]


@dataclass(frozen=True)
class VadEvent:
    """Base class of the events `TurnDetector` emits."""


@dataclass(frozen=True)
class SpeechStarted(VadEvent):
    # Where the speech starts, ms from the start of the stream (the first speech window). Emitted
    # once min_speech_ms of speech has been confirmed, so it reaches the caller up to that much later.
    audio_start_ms: int


@dataclass(frozen=True)
class SpeechStopped(VadEvent):
    audio_start_ms: int   # where the speech started (same as the SpeechStarted before it)
    audio_end_ms: int     # where the speech ended (start of the trailing silence; the stop point if forced)
    audio_offset_ms: int  # stream position of audio[0]: audio_start_ms - prefix padding (or later, see module doc)
    # The utterance: prefix padding + speech + the trailing silence observed before the stop was
    # decided, float32 16 kHz mono [n]. Not compared by ==, so events compare by their positions.
    audio: np.ndarray = field(repr=False, compare=False)
    forced: bool = False  # True when cut at max_utterance_s while still speaking (flush() gives False)


_IDLE, _CANDIDATE, _SPEECH = "idle", "candidate", "speech"


class TurnDetector:
    """Server-side turn detection over a stream of 16 kHz float32 mono audio (see the module doc)."""

    def __init__(self, threshold: float = 0.5, prefix_padding_ms: int = 300, silence_duration_ms: int = 500,
                 min_speech_ms: int = 100, sample_rate: int = SAMPLE_RATE, vad: SileroVad | None = None,
                 max_utterance_s: float = 60.0) -> None:
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        for name, value in (("prefix_padding_ms", prefix_padding_ms), ("silence_duration_ms", silence_duration_ms),
                            ("min_speech_ms", min_speech_ms)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if sample_rate != SAMPLE_RATE:
            raise ValueError(f"sample_rate must be {SAMPLE_RATE} (the VAD runs at 16 kHz only), got {sample_rate}")
        if not max_utterance_s > 0:
            raise ValueError(f"max_utterance_s must be > 0, got {max_utterance_s}")
        self.threshold = threshold
        # Same floor as Silero's own iterator, so a low threshold keeps a usable hysteresis band.
        self.neg_threshold = max(threshold - HYSTERESIS, 0.01)
        self.sample_rate = sample_rate
        self._prefix = self._samples(prefix_padding_ms)
        self._silence = self._samples(silence_duration_ms)
        self._min_speech = self._samples(min_speech_ms)
        self._max_utterance = int(round(max_utterance_s * sample_rate))
        self._vad = vad if vad is not None else SileroVad()
        self.reset()

    def _samples(self, ms: float) -> int:
        return int(round(ms * self.sample_rate / 1000))

    def _ms(self, samples: int) -> int:
        return samples * 1000 // self.sample_rate

    def reset(self) -> None:
        """Forget everything: a new stream starting at position 0."""
        self._vad.reset()
        self._pending = np.zeros(0, dtype=np.float32)  # [< 512] fed samples not yet run through the VAD
        self._fed = 0               # samples fed so far (the stream position)
        self._next = 0              # stream index of the next window's first sample (a multiple of 512 until a flush)
        # Windows kept for the utterance audio, in stream order; the last one ends at self._next.
        # Idle: trimmed to about prefix_padding worth. Candidate / speech: everything since the prefix.
        self._history: deque[np.ndarray] = deque()
        self._history_start = 0     # stream index of the first sample of self._history
        self._history_len = 0       # samples in self._history
        self._state = _IDLE
        self._start = 0             # stream index where the candidate / speech started
        self._run = 0               # candidate: samples of consecutive speech; speech: samples of consecutive silence

    @property
    def in_speech(self) -> bool:
        """True between SpeechStarted and SpeechStopped."""
        return self._state == _SPEECH

    @property
    def position_ms(self) -> int:
        """Milliseconds of audio fed so far (since the start or the last reset)."""
        return self._ms(self._fed)

    @property
    def buffered_samples(self) -> int:
        """Samples held in memory (history + the partial window): bounded while nobody speaks."""
        return self._history_len + len(self._pending)

    def utterance(self, since: int = 0) -> tuple[int, np.ndarray] | None:
        """While in speech: (the stream index of the utterance's first sample, its samples from the
        `since`-th on, as far as the VAD has judged them). The `SpeechStopped` that ends it carries
        the same samples first. None when not in speech."""
        if self._state != _SPEECH:
            return None
        offset = max(self._history_start, self._start - self._prefix)
        need = self._next - offset - since
        parts: list[np.ndarray] = []
        for chunk in reversed(self._history):  # newest first: only the tail is wanted
            if need <= 0:
                break
            parts.append(chunk[-need:] if len(chunk) > need else chunk)
            need -= len(parts[-1])
        return offset, (np.concatenate(parts[::-1]) if parts else np.zeros(0, dtype=np.float32))

    def feed(self, samples: np.ndarray) -> list[VadEvent]:
        """Feed the next chunk (any length) of 16 kHz float32 mono audio; returns the events it caused."""
        samples = np.asarray(samples, dtype=np.float32)
        if samples.ndim != 1:
            raise ValueError(f"TurnDetector expects mono audio of shape (n,), got {samples.shape}")
        self._fed += len(samples)
        buffer = np.concatenate([self._pending, samples])  # [pending + n]
        events: list[VadEvent] = []
        whole = len(buffer) - len(buffer) % WINDOW_SAMPLES
        for i in range(0, whole, WINDOW_SAMPLES):
            # copy: the window outlives `buffer` in the history, and a view would keep all of it alive
            events.extend(self._window(buffer[i:i + WINDOW_SAMPLES].copy()))
        self._pending = buffer[whole:].copy()  # [< 512]
        return events

    def flush(self) -> list[VadEvent]:
        """End of stream: if in speech, emit SpeechStopped with the audio there is (including the
        partial last window, which the VAD does not judge); an unconfirmed candidate is dropped.

        The position keeps counting (later audio continues the same timeline), but the VAD state
        and the history are cleared, as the partial window is not run through the model.
        """
        events: list[VadEvent] = []
        if self._state == _SPEECH:
            self._append(self._pending)
            # If the speech was already in a silence run, it ended where that run began.
            end = self._next - self._run if self._run > 0 else self._fed
            events.append(self._stop(end, forced=False))
        self._vad.reset()
        self._pending = np.zeros(0, dtype=np.float32)
        self._next = self._fed
        self._clear_history()
        self._state = _IDLE
        self._run = 0
        return events

    # -- internals -------------------------------------------------------------------------

    def _append(self, samples: np.ndarray) -> None:
        if len(samples):
            self._history.append(samples)
            self._history_len += len(samples)

    def _clear_history(self) -> None:
        self._history.clear()
        self._history_start = self._next
        self._history_len = 0

    def _trim_idle_history(self) -> None:
        # Keep at least prefix_padding of audio before the next window (whole windows, so up to one
        # window more): that is all a future utterance can reach back to.
        while self._history and self._history_len - len(self._history[0]) >= self._prefix:
            dropped = self._history.popleft()
            self._history_start += len(dropped)
            self._history_len -= len(dropped)

    def _window(self, window: np.ndarray) -> list[VadEvent]:
        """Run one 512-sample window (at stream index self._next) through the VAD and the state machine."""
        p = self._vad.probability(window)
        start = self._next
        self._next += WINDOW_SAMPLES
        self._append(window)

        if self._state == _IDLE:
            if p >= self.threshold:
                self._state, self._start, self._run = _CANDIDATE, start, 0
            else:
                self._trim_idle_history()
                return []

        if self._state == _CANDIDATE:
            if p >= self.neg_threshold:
                self._run += WINDOW_SAMPLES
                if self._run >= self._min_speech:
                    self._state, self._run = _SPEECH, 0
                    return [SpeechStarted(audio_start_ms=self._ms(self._start))]
            else:
                # Too short to be speech (a click, a cough): forget it; its audio stays in the
                # history, where it may become prefix padding of a later utterance.
                self._state, self._run = _IDLE, 0
                self._trim_idle_history()
            return []

        # _SPEECH
        self._run = self._run + WINDOW_SAMPLES if p < self.neg_threshold else 0
        if self._run > 0 and self._run >= self._silence:
            return [self._stop(self._next - self._run, forced=False)]
        if self._next - self._start >= self._max_utterance:
            return [self._stop(self._next - self._run, forced=True)]
        return []

    def _stop(self, end: int, forced: bool) -> SpeechStopped:
        """SpeechStopped for the current utterance with all history up to now; back to idle."""
        offset = max(self._history_start, self._start - self._prefix)
        audio = np.concatenate(list(self._history)) if self._history else np.zeros(0, dtype=np.float32)
        audio = audio[offset - self._history_start:]  # [prefix + speech + trailing silence]
        event = SpeechStopped(audio_start_ms=self._ms(self._start), audio_end_ms=self._ms(end),
                              audio_offset_ms=self._ms(offset), audio=audio, forced=forced)
        self._state, self._run = _IDLE, 0
        # The next utterance's prefix must not repeat audio just returned.
        self._history_start += self._history_len
        self._history.clear()
        self._history_len = 0
        return event
