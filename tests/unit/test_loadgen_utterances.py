"""funchat.loadgen.utterances: speech found in audio, the real recording cut at its pauses, and
sentences synthesised with the real espeak-ng (cached)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import soundfile as sf

from funchat.loadgen.utterances import (INPUT_RATE, UtteranceError, from_recording, speech_segments, synthesize,
                                        to_16k_mono)


def tone(seconds: float, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * INPUT_RATE)) / INPUT_RATE
    return (amplitude * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def quiet(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * INPUT_RATE), np.float32)


def test_speech_is_cut_at_long_pauses_only():
    audio = np.concatenate([quiet(0.3), tone(0.5), quiet(0.2), tone(0.4), quiet(0.6), tone(0.8), quiet(0.5)])
    segments = [(s / INPUT_RATE, e / INPUT_RATE) for s, e in speech_segments(audio, min_pause_s=0.4)]
    # the 0.2 s gap stays inside the first piece; the 0.6 s pause cuts; 50 ms margins on both sides
    assert segments == [pytest.approx((0.25, 1.45), abs=0.011), pytest.approx((1.95, 2.85), abs=0.011)]


def test_clicks_and_silence_are_not_speech():
    audio = np.concatenate([quiet(0.5), tone(0.05), quiet(1.0), tone(0.6), quiet(0.5)])
    assert len(speech_segments(audio)) == 1
    assert speech_segments(quiet(1.0)) == [] and speech_segments(np.zeros(10, np.float32)) == []


def test_audio_is_brought_to_16k_mono():
    t = np.arange(48000) / 48000
    left = 0.5 * np.sin(2 * np.pi * 440 * t)
    out = to_16k_mono(np.stack([left, np.zeros_like(left)], axis=1), 48000)  # 1 s of stereo at 48 kHz
    assert out.dtype == np.float32 and out.ndim == 1 and len(out) == INPUT_RATE
    assert np.abs(out[1000:-1000]).max() == pytest.approx(0.25, abs=0.01)  # the channels' mean


def test_the_recording_becomes_its_spoken_pieces(example_wav, tmp_path):
    pieces = from_recording(example_wav)
    # 6 s: a short phrase, a ~0.6 s pause, the rest of the question (tests/integration uses the same pause)
    assert len(pieces) == 2
    assert 1.0 < pieces[0].duration_s < 2.0 and 2.5 < pieces[1].duration_s < 4.0
    assert all(p.audio.dtype == np.float32 for p in pieces)
    silent = tmp_path / "silent.wav"
    sf.write(silent, quiet(1.0), INPUT_RATE)
    with pytest.raises(UtteranceError, match="holds no speech"):
        from_recording(silent)
    with pytest.raises(UtteranceError, match="cannot read the recording"):
        from_recording(tmp_path / "missing.wav")


def test_espeak_sentences_are_synthesised_once_then_read_from_the_cache(tmp_path, monkeypatch):
    first = synthesize("Please set a timer for ten minutes", tmp_path)
    assert first.name == "espeak:Please set a timer for ten minutes"
    assert 1.0 < first.duration_s < 4.0
    lead = speech_segments(first.audio, min_pause_s=10.0)[0][0]
    assert lead <= 0.06 * INPUT_RATE  # trimmed: the speech starts at once
    cached = list(tmp_path.glob("espeak-*.wav"))
    assert len(cached) == 1 and sf.info(str(cached[0])).samplerate == INPUT_RATE
    monkeypatch.setenv("PATH", "")  # no espeak-ng any more: the second time must come from the cache
    again = synthesize("Please set a timer for ten minutes", tmp_path)
    assert np.array_equal(again.audio, first.audio)
    with pytest.raises(UtteranceError, match="espeak-ng is not installed"):
        synthesize("A sentence not in the cache", tmp_path)


def test_espeak_is_installed_here():
    """make setup installs it (APT_PACKAGES); the load test's callers need it."""
    assert shutil.which("espeak-ng", path=os.environ.get("PATH")), "espeak-ng is missing: run make setup"
