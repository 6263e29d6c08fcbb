"""The mel front end against the reference: transformers' WhisperFeatureExtractor (128 bins).

transformers is a test-only dependency, imported inside the tests: the package must not need it.
"""

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from funchat.errors import AudioInputError
from funchat.model.mel import log_mel_spectrogram, num_mel_frames

SHARED = Path(os.environ.get("FUNCHAT_SHARED", Path(__file__).resolve().parents[2].parent / "shared"))
EXAMPLE_WAV = SHARED / "data" / "fun-audio-chat-example-16k-f32.wav"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def reference_mel():
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(feature_size=128)

    def compute(wave: np.ndarray) -> np.ndarray:
        # Called exactly as the Fun-Audio-Chat processor calls it, then cut to the real frames.
        out = extractor(wave, sampling_rate=16000, return_attention_mask=True, padding="max_length")
        mask = out["attention_mask"][0].astype(bool)  # [3000]
        return out["input_features"][0][:, mask]  # [128, frames]

    return compute


def _assert_matches(reference_mel, wave: np.ndarray) -> float:
    expected = reference_mel(wave)
    got = log_mel_spectrogram(wave)
    assert got.dtype == torch.float32
    assert tuple(got.shape) == expected.shape == (128, num_mel_frames(len(wave)))
    diff = float(np.abs(got.numpy() - expected).max())
    assert diff < TOLERANCE, f"max abs difference {diff}"
    return diff


def test_real_recording_matches_reference(reference_mel):
    assert EXAMPLE_WAV.is_file(), f"shared example recording missing: {EXAMPLE_WAV} (set FUNCHAT_SHARED)"
    wave, rate = sf.read(EXAMPLE_WAV, dtype="float32")
    assert rate == 16000 and wave.ndim == 1
    _assert_matches(reference_mel, wave)


def _synthetic(name: str) -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.arange(24000) / 16000
    signals = {
        "one_sample": np.array([0.5]),
        "shorter_than_window": 0.1 * rng.standard_normal(150),
        "not_multiple_of_hop": 0.1 * rng.standard_normal(16000 + 77),
        "tone_440hz": 0.3 * np.sin(2 * np.pi * 440 * t),
        "near_silence": 1e-6 * rng.standard_normal(8000),
        "digital_silence": np.zeros(3000),
        # Loudest content in the last samples: the frames past the end decide the max.
        "click_at_end": np.concatenate([1e-4 * rng.standard_normal(10000), np.ones(30)]),
        # Within 200 samples of 30 s the reference reflects real audio at its 30 s boundary.
        "just_under_30s": 0.1 * rng.standard_normal(480000 - 150),
        "exactly_30s": 0.1 * rng.standard_normal(480000),
    }
    return signals[name].astype(np.float32)


@pytest.mark.parametrize(
    "name",
    [
        "one_sample",
        "shorter_than_window",
        "not_multiple_of_hop",
        "tone_440hz",
        "near_silence",
        "digital_silence",
        "click_at_end",
        "just_under_30s",
        "exactly_30s",
    ],
)
def test_synthetic_matches_reference(reference_mel, name):
    _assert_matches(reference_mel, _synthetic(name))


def test_torch_and_float64_inputs_give_the_same_result():
    wave = _synthetic("tone_440hz")
    expected = log_mel_spectrogram(wave)
    assert torch.equal(log_mel_spectrogram(torch.from_numpy(wave)), expected)
    assert torch.equal(log_mel_spectrogram(wave.astype(np.float64)), expected)


def test_longer_than_30s_is_not_truncated():
    n = 31 * 16000 + 5
    wave = (0.1 * np.random.default_rng(1).standard_normal(n)).astype(np.float32)
    mel = log_mel_spectrogram(wave)
    assert tuple(mel.shape) == (128, -(-n // 160)) == (128, 3101)
    assert torch.isfinite(mel).all()
    # The tail past 30 s holds real audio (noise), not padding at the floor.
    assert float(mel[:, 3000:].mean()) > float(mel.min()) + 0.5


def test_num_mel_frames():
    assert [num_mel_frames(n) for n in (1, 159, 160, 161, 96000)] == [1, 1, 1, 2, 600]


def test_n_mels_80():
    assert tuple(log_mel_spectrogram(_synthetic("tone_440hz"), n_mels=80).shape) == (80, 150)


@pytest.mark.parametrize("bad", [np.zeros(0, np.float32), np.zeros((2, 100), np.float32)])
def test_rejects_empty_and_non_1d(bad):
    with pytest.raises(AudioInputError, match="empty|1-D"):
        log_mel_spectrogram(bad)
