"""What the simulated callers say: a real recording cut at its pauses, and sentences synthesised
with espeak-ng (cached), all as 16 kHz mono float32 trimmed to the speech.

Trimming matters for the measurements: a caller's turn then ends where its speech ends, and a
barge-in starts speaking with its first chunk, so neither delay includes silence baked into a file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

INPUT_RATE = 16000  # the API's default caller format, what the model hears
FRAME_S = 0.01      # energy frames for finding speech

# Short questions and requests of the kind a voice assistant hears; no commas, so that espeak's
# pauses stay well under the server VAD's end-of-turn silence and each sentence is one turn.
DEFAULT_PHRASES = (
    "What is the weather like in Paris tomorrow",
    "Can you tell me a short story about a lighthouse",
    "Please set a timer for ten minutes",
    "How far is the moon from the earth",
    "Read me the latest news about football",
    "What should I cook tonight with rice and beans",
    "Translate good morning into Spanish",
    "Remind me to call my sister at six",
)


class UtteranceError(RuntimeError):
    """An utterance could not be loaded or synthesised (the message says why)."""


@dataclass(frozen=True)
class Utterance:
    name: str
    audio: np.ndarray  # 16 kHz mono float32, speech only (trimmed)

    @property
    def duration_s(self) -> float:
        return len(self.audio) / INPUT_RATE


def to_16k_mono(audio: np.ndarray, rate: int) -> np.ndarray:
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    if rate != INPUT_RATE:
        audio = soxr.resample(audio, rate, INPUT_RATE)
    return np.ascontiguousarray(audio, dtype=np.float32)


def speech_segments(audio: np.ndarray, min_pause_s: float = 0.4, floor_db: float = -40.0,
                    margin_s: float = 0.05, min_speech_s: float = 0.3) -> list[tuple[int, int]]:
    """(start, end) sample ranges of speech in 16 kHz audio: 10 ms frames louder than floor_db below
    the loudest frame, split where min_pause_s or more of quieter frames lie between them, each
    widened by margin_s; pieces shorter than min_speech_s are dropped (clicks, breaths)."""
    hop = int(INPUT_RATE * FRAME_S)
    n = len(audio) // hop
    if n == 0:
        return []
    rms = np.sqrt(np.mean(audio[:n * hop].reshape(n, hop).astype(np.float64) ** 2, axis=1))
    if rms.max() <= 0:
        return []
    loud = np.flatnonzero(20 * np.log10(rms / rms.max() + 1e-12) > floor_db)
    # runs of loud frames separated by fewer than min_pause_s quiet frames belong together
    breaks = np.flatnonzero(np.diff(loud) > round(min_pause_s / FRAME_S))
    firsts = np.concatenate([[loud[0]], loud[breaks + 1]])
    lasts = np.concatenate([loud[breaks], [loud[-1]]])
    margin = int(margin_s * INPUT_RATE)
    out = []
    for first, last in zip(firsts, lasts):
        start, end = max(0, first * hop - margin), min(len(audio), (last + 1) * hop + margin)
        if end - start >= min_speech_s * INPUT_RATE:
            out.append((int(start), int(end)))
    return out


def from_recording(path: str | Path, min_pause_s: float = 0.4) -> list[Utterance]:
    """A recording (any rate, mono or stereo) cut at its pauses into utterances."""
    path = Path(path)
    try:
        audio, rate = sf.read(str(path), dtype="float32", always_2d=False)
    except Exception as exc:  # noqa: BLE001 - soundfile raises several types for unreadable files
        raise UtteranceError(f"cannot read the recording {path}: {exc}") from None
    audio = to_16k_mono(audio, rate)
    pieces = [Utterance(f"{path.name}[{s / INPUT_RATE:.1f}-{e / INPUT_RATE:.1f}s]", audio[s:e])
              for s, e in speech_segments(audio, min_pause_s)]
    if not pieces:
        raise UtteranceError(f"the recording {path} holds no speech")
    return pieces


def default_cache_dir() -> Path:
    if os.environ.get("FUNCHAT_UTTERANCE_CACHE"):
        return Path(os.environ["FUNCHAT_UTTERANCE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "funchat" / "utterances"


def synthesize(text: str, cache_dir: str | Path | None = None, voice: str = "en-us", words_per_minute: int = 160
               ) -> Utterance:
    """`espeak-ng -w` of text, resampled to 16 kHz and trimmed; cached as a PCM16 WAV named by a hash
    of (voice, speed, text), so each sentence is synthesised once per machine."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = hashlib.sha256(f"{voice}|{words_per_minute}|{text}".encode()).hexdigest()[:20]
    path = cache / f"espeak-{key}.wav"
    if not path.exists():
        espeak = shutil.which("espeak-ng")
        if espeak is None:
            raise UtteranceError("espeak-ng is not installed (Debian: apt-get install espeak-ng); it synthesises "
                                 "the callers' sentences")
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            raw = Path(tmp) / "espeak.wav"
            proc = subprocess.run([espeak, "-v", voice, "-s", str(words_per_minute), "-w", str(raw), text],
                                  capture_output=True, text=True, timeout=60)
            if proc.returncode != 0 or not raw.exists():
                raise UtteranceError(f"espeak-ng failed on {text!r}: {proc.stderr.strip() or proc.returncode}")
            audio, rate = sf.read(str(raw), dtype="float32", always_2d=False)
            audio = to_16k_mono(audio, rate)
            segments = speech_segments(audio, min_pause_s=10.0)  # one piece: only the edges are trimmed
            if not segments:
                raise UtteranceError(f"espeak-ng produced no audible speech for {text!r}")
            start, end = segments[0]
            out = Path(tmp) / "out.wav"
            sf.write(str(out), audio[start:end], INPUT_RATE, subtype="PCM_16")
            os.replace(out, path)  # atomic: concurrent load-test workers never read half a file
    audio, _ = sf.read(str(path), dtype="float32", always_2d=False)
    return Utterance(f"espeak:{text}", np.ascontiguousarray(audio, dtype=np.float32))


def load_utterances(recording: str | Path | None = None, phrases: tuple[str, ...] | list[str] = DEFAULT_PHRASES,
                    cache_dir: str | Path | None = None) -> list[Utterance]:
    """The callers' repertoire: the recording's pieces (when given) and the synthesised phrases."""
    out: list[Utterance] = []
    if recording:
        out += from_recording(recording)
    out += [synthesize(text, cache_dir) for text in phrases]
    if not out:
        raise UtteranceError("no utterances: give a recording or some phrases")
    return out
