"""load_audio / validate_audio: every encoding comes back as 16 kHz mono float32; bad input is named."""

import re

import numpy as np
import pytest
import soundfile as sf

from funchat.audio_io import SAMPLE_RATE, load_audio, validate_audio
from funchat.errors import AudioInputError

FREQ = 440.0
DURATION = 0.5


def _sine(rate: int, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * DURATION)) / rate
    return amplitude * np.sin(2 * np.pi * FREQ * t)


def _assert_sine_16k(out: np.ndarray, amplitude: float = 0.5) -> None:
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(len(out) - int(SAMPLE_RATE * DURATION)) <= 1
    expected = _sine(SAMPLE_RATE, amplitude)[: len(out)]
    # Skip the resampler's edge transients; the body must be the same sine.
    body = slice(200, len(out) - 200)
    assert np.abs(out[body] - expected[body]).max() < 1e-2


@pytest.mark.parametrize(
    "rate, subtype, fmt, suffix",
    [
        (16000, "PCM_16", "WAV", ".wav"),
        (16000, "FLOAT", "WAV", ".wav"),
        (16000, "DOUBLE", "WAV", ".wav"),
        (16000, "PCM_32", "WAV", ".wav"),
        (8000, "PCM_16", "WAV", ".wav"),
        (44100, "FLOAT", "WAV", ".wav"),
        (48000, "PCM_16", "FLAC", ".flac"),
        (44100, "PCM_24", "FLAC", ".flac"),
    ],
)
def test_load_mono(tmp_path, rate, subtype, fmt, suffix):
    path = tmp_path / f"sine{suffix}"
    sf.write(path, _sine(rate), rate, subtype=subtype, format=fmt)
    _assert_sine_16k(load_audio(path))


def test_load_stereo_is_mean_of_channels(tmp_path):
    path = tmp_path / "stereo.wav"
    # Left: the sine; right: silence. The mean is the sine at half amplitude.
    stereo = np.stack([_sine(48000), np.zeros(int(48000 * DURATION))], axis=1)
    sf.write(path, stereo, 48000, subtype="FLOAT")
    _assert_sine_16k(load_audio(path), amplitude=0.25)


def test_load_16k_float_is_bit_exact(tmp_path):
    path = tmp_path / "exact.wav"
    wave = _sine(16000).astype(np.float32)
    sf.write(path, wave, 16000, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(path), wave)


def test_load_other_target_rate(tmp_path):
    path = tmp_path / "sine.wav"
    sf.write(path, _sine(16000), 16000, subtype="PCM_16")
    assert abs(len(load_audio(path, target_rate=24000)) - 12000) <= 1


def test_missing_file(tmp_path):
    path = tmp_path / "nope.wav"
    with pytest.raises(AudioInputError, match=r"nope\.wav.*does not exist"):
        load_audio(path)


def test_directory(tmp_path):
    with pytest.raises(AudioInputError, match="not a regular file"):
        load_audio(tmp_path)


@pytest.mark.parametrize(
    "name, content",
    [
        ("garbage.wav", np.random.default_rng(0).bytes(4096)),
        ("notes.txt", b"this is a text file, not audio\n" * 20),
        ("zero_bytes.wav", b""),
    ],
)
def test_not_audio(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(AudioInputError, match=re.escape(name) + ".*could not be read as audio"):
        load_audio(path)


def test_empty_wav(tmp_path):
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros(0, np.float32), 16000, subtype="PCM_16")
    with pytest.raises(AudioInputError, match=r"empty\.wav.*empty \(0 samples\)"):
        load_audio(path)


def test_all_nan_wav(tmp_path):
    path = tmp_path / "nan.wav"
    sf.write(path, np.full(1600, np.nan, np.float32), 16000, subtype="FLOAT")
    with pytest.raises(AudioInputError, match=r"nan\.wav.*no finite samples.*1600 NaN"):
        load_audio(path)


def test_some_inf_wav(tmp_path):
    path = tmp_path / "inf.wav"
    wave = _sine(16000).astype(np.float32)
    wave[[10, 20]] = np.inf
    sf.write(path, wave, 16000, subtype="FLOAT")
    with pytest.raises(AudioInputError, match=r"inf\.wav.*0 NaN and 2 inf"):
        load_audio(path)


# --- validate_audio: arrays from callers ---


def test_validate_float32_passthrough():
    wave = _sine(16000).astype(np.float32)
    out = validate_audio(wave)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, wave)


def test_validate_int16_scaled():
    out = validate_audio(np.array([-32768, 0, 16384, 32767], dtype=np.int16))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.array([-1.0, 0.0, 0.5, 32767 / 32768], np.float32))
    assert out.min() >= -1.0 and out.max() < 1.0


def test_validate_stereo_and_resample():
    stereo = np.stack([_sine(44100), _sine(44100)], axis=1)  # [n, 2] float64
    _assert_sine_16k(validate_audio(stereo, sample_rate=44100))


@pytest.mark.parametrize(
    "bad, pattern",
    [
        (np.zeros((4, 100, 2), np.float32), r"shape \(4, 100, 2\)"),
        (np.zeros((2, 16000), np.float32), r"shape \(2, 16000\).*transposed"),
        (np.float32(0.5), r"shape \(\)"),
        (np.zeros(0, np.float32), r"empty \(0 samples\)"),
        (np.zeros((0, 2), np.float32), r"empty \(0 samples\)"),
        (np.full(100, np.nan, np.float32), r"no finite samples.*100 NaN"),
        (np.array([0.1, np.nan, np.inf, -np.inf], np.float32), r"1 NaN and 2 inf out of 4"),
        (np.array([0.0, 1e300]), r"0 NaN and 1 inf"),  # float64 overflowing float32
        (np.array(["a", "b"]), "unsupported sample dtype"),
        (np.array([True, False]), "unsupported sample dtype"),
        (np.array([1 + 1j, 0j]), "unsupported sample dtype"),
        (np.array([1, 2, 3], dtype=np.int64), "unsupported sample dtype"),
    ],
)
def test_validate_rejects(bad, pattern):
    with pytest.raises(AudioInputError, match=pattern):
        validate_audio(bad)


@pytest.mark.parametrize("rate", [0, -16000, 16000.0, None])
def test_validate_rejects_bad_rate(rate):
    with pytest.raises(AudioInputError, match="sample rate"):
        validate_audio(np.zeros(10, np.float32), sample_rate=rate)
