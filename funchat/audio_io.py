"""Audio in: read files or check caller arrays, and hand back 1-D float32 mono at 16 kHz.

Everything the model sees goes through here, so every way audio can be unusable (missing,
not audio, empty, NaN/inf, wrong shape or dtype) becomes an AudioInputError that names the
source and the problem, instead of a numpy or libsndfile error deep inside the model.
"""

from __future__ import annotations

import os

import numpy as np
import soundfile as sf
import soxr

from funchat.errors import AudioInputError

SAMPLE_RATE = 16000
# A 2-D caller array is read as [samples, channels]; more than this many "channels" almost
# always means a transposed [channels, samples] array or a batch, not a surround recording.
MAX_CHANNELS = 8
# Sample rates accepted anywhere (caller arrays, files, targets). Outside this range soxr's ratio
# gets absurd: from 1 Hz, 100 000 samples become 1.6e9 (6 GB, half a minute); from 2**60 Hz it
# never returns. Real audio lies well inside.
MIN_RATE, MAX_RATE = 1000, 768000

# Integer PCM is scaled by its full-scale value, as soundfile does, giving floats in [-1, 1).
_INT_FULL_SCALE = {np.dtype(np.int16): 32768.0, np.dtype(np.int32): 2147483648.0}


def _check_rate(rate: int, what: str) -> int:
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise AudioInputError(f"{what} must be a positive integer number of Hz, got {rate!r}")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise AudioInputError(f"{what} must be {MIN_RATE}..{MAX_RATE} Hz, got {rate}")
    return int(rate)


def _to_float32(samples: np.ndarray, source: str) -> np.ndarray:
    dtype = samples.dtype
    if dtype in _INT_FULL_SCALE:
        return samples.astype(np.float32) / np.float32(_INT_FULL_SCALE[dtype])
    if np.issubdtype(dtype, np.floating):
        # float64 values beyond float32 range become inf here and are caught as non-finite.
        with np.errstate(over="ignore"):
            return samples.astype(np.float32)
    raise AudioInputError(
        f"{source}: unsupported sample dtype {dtype}; pass float32 in [-1, 1] or int16/int32 PCM"
    )


def _check_samples(samples: np.ndarray, source: str) -> None:
    """Reject empty and non-finite audio (any shape; counts are over all samples)."""
    if samples.size == 0:
        raise AudioInputError(f"{source} is empty (0 samples)")
    finite = np.isfinite(samples)
    if not finite.all():
        n_nan = int(np.isnan(samples).sum())
        n_inf = int(samples.size - finite.sum() - n_nan)
        if n_nan + n_inf == samples.size:
            raise AudioInputError(
                f"{source} has no finite samples: all {samples.size} are NaN or inf ({n_nan} NaN, {n_inf} inf)"
            )
        raise AudioInputError(
            f"{source} has non-finite samples: {n_nan} NaN and {n_inf} inf out of {samples.size}"
        )


def _mix_down(samples: np.ndarray) -> np.ndarray:
    """[n] or [n, channels] -> [n]: mean of the channels."""
    if samples.ndim == 2:
        samples = samples[:, 0] if samples.shape[1] == 1 else samples.mean(axis=1, dtype=np.float32)
    return np.ascontiguousarray(samples, dtype=np.float32)


def _resample(samples: np.ndarray, rate: int, target_rate: int, source: str) -> np.ndarray:
    """Resample, and check what comes out: a few samples can resample to none, and samples near
    float32's limit (no range check holds them to [-1, 1]) overflow the filter to inf."""
    if rate == target_rate:
        return samples
    out = np.ascontiguousarray(soxr.resample(samples, rate, target_rate, quality="HQ"), dtype=np.float32)
    if out.size == 0:
        raise AudioInputError(f"{source} is too short: {samples.size} samples at {rate} Hz give none at "
                              f"{target_rate} Hz")
    if not np.isfinite(out).all():
        raise AudioInputError(f"{source} overflowed when resampled from {rate} Hz (samples of magnitude up to "
                              f"{float(np.abs(samples).max()):.3g}); pass audio in [-1, 1]")
    return out


def validate_audio(
    samples: np.ndarray, sample_rate: int = SAMPLE_RATE, *, source: str = "audio input"
) -> np.ndarray:
    """Check a caller's waveform and return it as 1-D float32 mono at 16 kHz.

    Accepts [n] or [n, channels] (channels <= 8, mixed down by averaging), float or
    int16/int32 PCM (scaled to [-1, 1)), at any sample rate (resampled with soxr HQ).
    `source` names the audio in error messages.
    """
    rate = _check_rate(sample_rate, f"{source}: sample rate")
    try:
        array = np.asarray(samples)
    except Exception as exc:  # ragged lists and the like
        raise AudioInputError(f"{source}: cannot be read as an array of samples: {exc}") from exc
    if array.ndim == 2 and not 1 <= array.shape[1] <= MAX_CHANNELS:
        raise AudioInputError(
            f"{source} has shape {array.shape}: a 2-D array must be [samples, channels] with 1 to "
            f"{MAX_CHANNELS} channels (is it transposed, or a batch?)"
        )
    if array.ndim not in (1, 2):
        raise AudioInputError(
            f"{source} has shape {array.shape}: expected 1-D [samples] or 2-D [samples, channels]"
        )
    array = _to_float32(array, source)
    _check_samples(array, source)
    return _resample(_mix_down(array), rate, SAMPLE_RATE, source)


def load_audio(path: str | os.PathLike, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read a WAV/FLAC (or any format libsndfile knows) as 1-D float32 mono at target_rate.

    Integer and float encodings are read as float32 (ints scaled to [-1, 1)); channels are
    averaged; other sample rates are resampled with soxr HQ.
    """
    target_rate = _check_rate(target_rate, "target_rate")
    source = f"audio file {os.fspath(path)!r}"
    if not os.path.exists(path):
        raise AudioInputError(f"{source} does not exist")
    if not os.path.isfile(path):
        raise AudioInputError(f"{source} is not a regular file")
    try:
        # always_2d: [frames, channels] whatever the channel count.
        data, rate = sf.read(path, dtype="float32", always_2d=True)
    except (RuntimeError, OSError, ValueError) as exc:  # sf.LibsndfileError is a RuntimeError
        raise AudioInputError(f"{source} could not be read as audio: {exc}") from exc
    _check_samples(data, source)
    rate = _check_rate(rate, f"{source}: sample rate")
    return _resample(_mix_down(data), rate, target_rate, source)
