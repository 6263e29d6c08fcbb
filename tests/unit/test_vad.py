"""Silero VAD (ONNX, streaming) and server-side turn detection, on the real example recording."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from funchat.orchestrator.vad import (
    SileroVad,
    SpeechStarted,
    SpeechStopped,
    TurnDetector,
    silero_model_path,
)

SR = 16000
WIN = 512
WIN_MS = 32


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(round(seconds * SR)), dtype=np.float32)


def run(audio: np.ndarray, chunk: int = 512, **kwargs) -> list:
    """All events of one stream: `audio` fed in `chunk`-sample pieces, then flush()."""
    detector = TurnDetector(**kwargs)
    events = []
    for i in range(0, len(audio), chunk):
        events += detector.feed(audio[i:i + chunk])
    return events + detector.flush()


def kinds(events: list) -> list[str]:
    return [type(e).__name__ for e in events]


def window_probs(audio: np.ndarray) -> np.ndarray:
    vad = SileroVad()
    return np.array([vad.probability(audio[i:i + WIN]) for i in range(0, len(audio) - WIN + 1, WIN)])


@pytest.fixture(scope="module")
def recording(example_wav) -> np.ndarray:
    audio, sr = sf.read(example_wav, dtype="float32")
    assert sr == SR and audio.ndim == 1
    return audio


@pytest.fixture(scope="module")
def energy_span(recording) -> tuple[int, int]:
    """(first, last) sample of the recording's speech by frame energy, independent of the VAD:
    32 ms frames with RMS above 10 % of the loudest frame."""
    frames = recording[:len(recording) // WIN * WIN].reshape(-1, WIN)  # [n_frames, 512]
    rms = np.sqrt((frames ** 2).mean(axis=1))                           # [n_frames]
    loud = np.flatnonzero(rms > 0.1 * rms.max())
    return int(loud[0]) * WIN, int(loud[-1] + 1) * WIN


@pytest.fixture(scope="module")
def speech_run(recording) -> tuple[int, int]:
    """(start, end) samples of the longest run of windows the VAD calls speech (p >= 0.5)."""
    speech = window_probs(recording) >= 0.5
    best, start = (0, 0), None
    for i, s in enumerate(np.append(speech, False)):
        if s and start is None:
            start = i
        elif not s and start is not None:
            if i - start > best[1] - best[0]:
                best = (start, i)
            start = None
    assert best[1] - best[0] >= 30, "expected at least ~1 s of continuous speech in the recording"
    return best[0] * WIN, best[1] * WIN


# -- SileroVad ------------------------------------------------------------------------------


def test_model_file_found_without_importing_the_package():
    assert silero_model_path().is_file()
    # The silero_vad package imports torch (about a second); the VAD must not need it.
    code = ("import sys; from funchat.orchestrator.vad import SileroVad; SileroVad(); "
            "assert 'silero_vad' not in sys.modules and 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_probabilities_high_in_speech_low_in_silence(recording, speech_run):
    probs = window_probs(np.concatenate([silence(1.0), recording]))
    assert probs[:31].max() < 0.1                       # the 1 s of silence (31 whole windows)
    start, end = speech_run
    inside = probs[31:][start // WIN + 2:end // WIN - 2]  # well inside the longest speech run
    assert inside.min() > 0.5 and inside.mean() > 0.9


def test_state_is_kept_between_calls_and_reset(recording):
    vad = SileroVad()
    windows = recording[:20 * WIN].reshape(20, WIN)
    first = [vad.probability(w) for w in windows]
    again = [vad.probability(w) for w in windows]  # same audio, but after 20 windows of history
    vad.reset()
    fresh = [vad.probability(w) for w in windows]
    assert first == fresh
    assert first != again
    with pytest.raises(ValueError, match="512"):
        vad.probability(np.zeros(256, dtype=np.float32))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # silero's loader uses importlib.resources.path
def test_matches_the_silero_package_reference(recording):
    """Streaming usage (context + state) agrees with silero's own ONNX wrapper (both are pinned
    dependencies: a missing one fails here rather than skipping)."""
    import silero_vad
    import torch
    reference = silero_vad.load_silero_vad(onnx=True)
    vad = SileroVad()
    audio = np.concatenate([silence(0.5), recording[:3 * SR]])
    for i in range(0, len(audio) - WIN + 1, WIN):
        window = audio[i:i + WIN]
        expected = float(reference(torch.from_numpy(window.copy()), SR))
        assert vad.probability(window) == pytest.approx(expected, abs=1e-5)


# -- TurnDetector ---------------------------------------------------------------------------


def test_silence_gives_no_events_and_bounded_memory():
    detector = TurnDetector(prefix_padding_ms=300)
    chunk = silence(0.1)
    for _ in range(100):  # 10 s
        assert detector.feed(chunk) == []
        # prefix padding (4800 samples) rounded up to whole windows, plus a partial window
        assert detector.buffered_samples <= 4800 + 2 * WIN
    assert detector.flush() == []
    assert detector.position_ms == 10_000 and not detector.in_speech


def test_low_level_white_noise_does_not_trigger():
    rng = np.random.default_rng(0)
    for level in (0.003, 0.01, 0.03):
        noise = rng.normal(0.0, level, 4 * SR).astype(np.float32)
        assert run(noise) == []


def test_clicks_and_noise_bursts_do_not_trigger():
    rng = np.random.default_rng(1)
    audio = silence(4.0)
    audio[SR] = 0.9                                                          # a single-sample click
    audio[2 * SR:2 * SR + 80] = rng.normal(0.0, 0.5, 80)                     # 5 ms burst
    audio[3 * SR:3 * SR + 800] = rng.normal(0.0, 0.3, 800)                   # 50 ms burst
    assert run(audio) == []


def test_recording_is_one_turn(recording, energy_span):
    # The recording has a natural ~0.5 s pause mid-sentence, so allow 0.8 s of silence for one turn.
    lead = SR  # 1 s of silence before, 1.5 s after
    audio = np.concatenate([silence(1.0), recording, silence(1.5)])
    detector = TurnDetector(silence_duration_ms=800, prefix_padding_ms=300)
    events, stopped_at = [], None
    for i in range(0, len(audio), 1000):
        new = detector.feed(audio[i:i + 1000])
        if any(isinstance(e, SpeechStopped) for e in new):
            stopped_at = detector.position_ms
        events += new
        assert detector.in_speech == (len(events) == 1)
    events += detector.flush()
    assert kinds(events) == ["SpeechStarted", "SpeechStopped"]
    started, stopped = events

    speech_start_ms = (lead + energy_span[0]) * 1000 // SR
    speech_end_ms = (lead + energy_span[1]) * 1000 // SR
    assert abs(started.audio_start_ms - speech_start_ms) <= 200
    assert stopped.audio_start_ms == started.audio_start_ms and not stopped.forced
    assert abs(stopped.audio_end_ms - speech_end_ms) <= 200
    # Decided after 800 ms of silence (whole windows), within the 1000-sample chunk that completed it.
    assert 800 <= stopped_at - stopped.audio_end_ms <= 800 + WIN_MS + 1000 * 1000 // SR

    # audio = 300 ms prefix padding + speech + the observed trailing silence, exactly as fed.
    assert stopped.audio_offset_ms == stopped.audio_start_ms - 300
    offset = stopped.audio_offset_ms * SR // 1000
    assert stopped.audio.dtype == np.float32
    np.testing.assert_array_equal(stopped.audio, audio[offset:offset + len(stopped.audio)])
    end_of_audio_ms = (offset + len(stopped.audio)) * 1000 // SR
    assert end_of_audio_ms - stopped.audio_end_ms == 800 + (-800) % WIN_MS  # silence rounded up to windows


@pytest.mark.parametrize("chunk", [160, 3000])
def test_events_do_not_depend_on_chunk_size(recording, chunk):
    audio = np.concatenate([silence(0.7), recording, silence(1.0), recording[:SR], silence(0.3)])
    reference = run(audio, chunk=512)
    events = run(audio, chunk=chunk)
    assert len(reference) >= 2
    assert events == reference  # positions and flags (audio is not part of ==)
    for a, b in zip(events, reference):
        if isinstance(a, SpeechStopped):
            np.testing.assert_array_equal(a.audio, b.audio)


def test_irregular_chunks_give_the_same_events(recording):
    audio = np.concatenate([silence(1.0), recording, silence(1.0)])
    rng = np.random.default_rng(2)
    detector, events, i = TurnDetector(), [], 0
    while i < len(audio):
        n = int(rng.integers(0, 2000))  # empty chunks included
        events += detector.feed(audio[i:i + n])
        i += n
    events += detector.flush()
    assert events == run(audio)


def test_two_utterances_make_two_turns(recording):
    audio = np.concatenate([silence(1.0), recording, silence(1.2), recording, silence(1.5)])
    events = run(audio, silence_duration_ms=800)
    assert kinds(events) == ["SpeechStarted", "SpeechStopped"] * 2
    first, second = events[1], events[3]
    # The second utterance starts one recording + 1.2 s after the first (window resolution).
    gap_ms = (len(recording) + int(1.2 * SR)) * 1000 // SR
    assert abs(second.audio_start_ms - first.audio_start_ms - gap_ms) <= WIN_MS
    # Both get their full prefix padding, and the returned audio never overlaps.
    assert first.audio_offset_ms == first.audio_start_ms - 300
    assert second.audio_offset_ms == second.audio_start_ms - 300
    assert first.audio_offset_ms + len(first.audio) * 1000 // SR <= second.audio_offset_ms


def test_short_pause_does_not_split_a_turn(recording, speech_run):
    # Cut the longest continuous speech run in two and insert a 300 ms pause.
    start, end = speech_run
    middle = (start + end) // 2
    audio = np.concatenate([silence(1.0), recording[start:middle], silence(0.3), recording[middle:end],
                            silence(1.0)])
    assert kinds(run(audio, silence_duration_ms=500)) == ["SpeechStarted", "SpeechStopped"]
    # ... while a silence duration shorter than the pause does split it.
    assert kinds(run(audio, silence_duration_ms=150)) == ["SpeechStarted", "SpeechStopped"] * 2


def test_speech_shorter_than_min_speech_is_dropped(recording, speech_run):
    # 64 ms of real speech, placed on window boundaries (2 windows).
    start = (speech_run[0] + speech_run[1]) // 2 // WIN * WIN
    audio = np.concatenate([silence(1.024), recording[start:start + 2 * WIN], silence(1.0)])
    assert run(audio, min_speech_ms=250) == []
    # The same blip is speech to the VAD: without the minimum it is a turn.
    assert kinds(run(audio, min_speech_ms=0)) == ["SpeechStarted", "SpeechStopped"]


def test_flush_ends_the_turn_mid_speech(recording, speech_run):
    start, end = speech_run
    cut = (start + end) // 2 + 100  # mid-speech, not on a window boundary
    audio = np.concatenate([silence(1.0), recording[start:cut]])
    detector = TurnDetector()
    events = detector.feed(audio)
    assert kinds(events) == ["SpeechStarted"] and detector.in_speech
    flushed = detector.flush()
    assert kinds(flushed) == ["SpeechStopped"] and not flushed[0].forced
    stopped = flushed[0]
    assert stopped.audio_end_ms == detector.position_ms == len(audio) * 1000 // SR
    offset = stopped.audio_offset_ms * SR // 1000
    np.testing.assert_array_equal(stopped.audio, audio[offset:])  # everything up to the last sample fed
    assert not detector.in_speech
    assert detector.flush() == []
    # The timeline goes on after a flush.
    detector.feed(silence(0.5))
    assert detector.position_ms == (len(audio) + SR // 2) * 1000 // SR


def test_long_utterance_is_force_stopped(recording, speech_run):
    start, end = speech_run
    audio = np.concatenate([silence(1.0), recording[start:end], silence(1.0)])
    detector = TurnDetector(max_utterance_s=1.0, prefix_padding_ms=300)
    events = []
    for i in range(0, len(audio), 800):
        events += detector.feed(audio[i:i + 800])
        # prefix + 1 s utterance, rounded up to windows, plus a partial window
        assert detector.buffered_samples <= int(1.3 * SR) + 3 * WIN
    events += detector.flush()
    assert kinds(events)[:2] == ["SpeechStarted", "SpeechStopped"]
    forced = events[1]
    assert forced.forced
    assert 1000 <= forced.audio_end_ms - forced.audio_start_ms < 1000 + WIN_MS
    assert len(forced.audio) == (forced.audio_end_ms - forced.audio_offset_ms) * SR // 1000
    # The speech goes on (the run is > 1 s): a new turn starts right away, without re-sending audio.
    assert isinstance(events[2], SpeechStarted)
    assert events[2].audio_start_ms == forced.audio_end_ms
    stops = [e for e in events if isinstance(e, SpeechStopped)]
    assert stops[-1].forced is False
    assert all(a.audio_offset_ms + len(a.audio) * 1000 // SR <= b.audio_offset_ms for a, b in zip(stops, stops[1:]))


def test_reset_starts_a_new_stream(recording):
    audio = np.concatenate([silence(1.0), recording[:2 * SR]])
    detector = TurnDetector()
    first = detector.feed(audio)
    assert detector.in_speech
    detector.reset()
    assert detector.position_ms == 0 and not detector.in_speech and detector.buffered_samples == 0
    assert detector.feed(audio) == first


@pytest.mark.parametrize("kwargs, message", [
    ({"threshold": 0.0}, "threshold"),
    ({"threshold": 1.0}, "threshold"),
    ({"threshold": -0.2}, "threshold"),
    ({"prefix_padding_ms": -1}, "prefix_padding_ms"),
    ({"silence_duration_ms": -10}, "silence_duration_ms"),
    ({"min_speech_ms": -1}, "min_speech_ms"),
    ({"sample_rate": 8000}, "sample_rate"),
    ({"max_utterance_s": 0}, "max_utterance_s"),
])
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TurnDetector(**kwargs)


def test_feed_rejects_non_mono_audio():
    with pytest.raises(ValueError, match="mono"):
        TurnDetector().feed(np.zeros((2, 512), dtype=np.float32))


@pytest.mark.parametrize("chunk", [320, 1000])
def test_the_utterance_in_progress_is_how_its_speech_stopped_audio_begins(recording, chunk):
    """What `utterance` gives while the caller speaks (followed from sample to sample, as the
    orchestrator encodes the turn window by window) is where the turn's audio begins, for every turn."""
    audio = np.concatenate([silence(1.0), recording, silence(1.5), recording, silence(1.5)])
    detector = TurnDetector(silence_duration_ms=800)
    followed: dict[int, list[np.ndarray]] = {}  # utterance start -> its samples, as followed
    stops = []
    for i in range(0, len(audio), chunk):
        stops += [e for e in detector.feed(audio[i:i + chunk]) if isinstance(e, SpeechStopped)]
        assert detector.utterance() is None or detector.in_speech
        now = detector.utterance()
        if now is not None:
            offset, _ = now
            parts = followed.setdefault(offset, [])
            _, more = detector.utterance(sum(len(p) for p in parts))
            parts.append(more)
    assert len(stops) == 2 and len(followed) == 2
    for stop, (offset, parts) in zip(stops, sorted(followed.items())):
        assert offset * 1000 // SR == stop.audio_offset_ms
        spoken = np.concatenate(parts)
        assert 0 < len(spoken) <= len(stop.audio)
        np.testing.assert_array_equal(stop.audio[:len(spoken)], spoken)
