"""Whisper log-mel front end: 16 kHz mono waveform -> [n_mels, frames] at 100 frames/s.

Matches, to float32 rounding, what the Fun-Audio-Chat reference processor gets from
`transformers.WhisperFeatureExtractor(feature_size=128)` called with
`padding="max_length", return_attention_mask=True` and then cut to the frames whose
attention mask is 1 (ceil(n_samples / 160) frames). The reference:

1. zero-pads the waveform to 30 s (480000 samples);
2. runs `torch.stft` (n_fft 400, hop 160, periodic Hann, center=True with reflect padding
   at the ends of the *padded* signal) and drops the last STFT frame;
3. power spectrum -> Slaney mel filter bank -> log10 (clamped at 1e-10);
4. floors at `max - 8` (max over all 3000 frames) and maps with `(x + 4) / 4`.

We reproduce that without computing 30 s of mostly silence: the waveform is zero-padded on
the right by n_fft samples (or up to exactly 30 s, whichever is shorter), so every frame
that touches real audio sees the same samples as in the reference, zeros included. The
reference frames we skip contain only zero padding, sit at log10(1e-10) = -10 and can never
be the max, so the `max - 8` floor is the same.

Deliberate difference: audio longer than 30 s is NOT truncated (the reference truncates to
30 s). We compute over the whole clip, with zero padding after its end, and take the max
over the whole clip. Windowing the mel into 30 s pieces, if a model needs it, is the
caller's job.
"""

from __future__ import annotations

import numpy as np
import torch

from funchat.encoder_windows import HALF_FFT, HOP_LENGTH, N_FFT
from funchat.errors import AudioInputError

SAMPLE_RATE = 16000
# The reference pads (and truncates) every clip to 30 s.
REFERENCE_SAMPLES = 30 * SAMPLE_RATE

# Filter banks are pure constants of n_mels; built once each, in float64 like the reference.
_FILTER_CACHE: dict[int, torch.Tensor] = {}


def num_mel_frames(n_samples: int) -> int:
    """Frames for a clip of n_samples at 16 kHz: ceil(n_samples / 160), as the reference's mask."""
    return -(-int(n_samples) // HOP_LENGTH)


def _hz_to_mel(freq: np.ndarray) -> np.ndarray:
    # Slaney scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above. np.log, not
    # math.log, for the constant: they differ by one ulp and we want the reference's bits.
    freq = np.asarray(freq, dtype=np.float64)
    log_step = 27.0 / np.log(6.4)
    linear = 3.0 * freq / 200.0
    logarithmic = 15.0 + np.log(np.maximum(freq, 1e-12) / 1000.0) * log_step
    return np.where(freq >= 1000.0, logarithmic, linear)


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    mels = np.asarray(mels, dtype=np.float64)
    log_step = np.log(6.4) / 27.0
    linear = 200.0 * mels / 3.0
    logarithmic = 1000.0 * np.exp(log_step * (mels - 15.0))
    return np.where(mels >= 15.0, logarithmic, linear)


def slaney_mel_filters(n_mels: int, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Slaney-normalised triangular mel filters, float64, shape [n_fft // 2 + 1, n_mels]."""
    n_freqs = n_fft // 2 + 1
    fft_freqs = np.linspace(0, sample_rate // 2, n_freqs)  # [n_freqs] Hz
    # n_mels + 2 edge/centre points, evenly spaced in mel between 0 Hz and 8 kHz.
    mel_points = np.linspace(_hz_to_mel(0.0), _hz_to_mel(8000.0), n_mels + 2)
    edges = _mel_to_hz(mel_points)  # [n_mels + 2] Hz
    widths = np.diff(edges)  # [n_mels + 1]
    offsets = edges[None, :] - fft_freqs[:, None]  # [n_freqs, n_mels + 2]
    rising = -offsets[:, :-2] / widths[:-1]  # [n_freqs, n_mels]
    falling = offsets[:, 2:] / widths[1:]  # [n_freqs, n_mels]
    filters = np.maximum(0.0, np.minimum(rising, falling))  # [n_freqs, n_mels]
    # Slaney norm: each triangle has (roughly) constant area, i.e. equal energy per channel.
    filters *= (2.0 / (edges[2 : n_mels + 2] - edges[:n_mels]))[None, :]
    return filters


def _mel_filters(n_mels: int) -> torch.Tensor:
    """Cached float32 filter bank, shape [n_mels, n_freqs] (ready to left-multiply a spectrum)."""
    filters = _FILTER_CACHE.get(n_mels)
    if filters is None:
        filters = torch.from_numpy(slaney_mel_filters(n_mels).T.astype(np.float32)).contiguous()
        _FILTER_CACHE[n_mels] = filters
    return filters


def _log10_mel(wave: torch.Tensor, n_mels: int) -> torch.Tensor:
    """Frames of an already padded float32 waveform (the STFT not centred) -> log10 mel power,
    not yet floored: [n_mels, 1 + (len - n_fft) // 160]."""
    window = torch.hann_window(N_FFT, device=wave.device)  # periodic, as in the reference
    stft = torch.stft(wave, N_FFT, HOP_LENGTH, window=window, center=False, return_complex=True)  # [n_freqs, frames]
    power = (stft.abs() ** 2).contiguous()  # [n_freqs, frames]
    mel = _mel_filters(n_mels).to(wave.device) @ power  # [n_mels, frames]
    return torch.clamp(mel, min=1e-10).log10()  # [n_mels, frames]


def _centre_left(wave: torch.Tensor) -> torch.Tensor:
    """The clip's start mirrored in, as torch.stft(center=True) does."""
    return torch.nn.functional.pad(wave[None, None], (HALF_FFT, 0), mode="reflect")[0, 0]


def floor_and_scale(log10_mel: torch.Tensor, top: torch.Tensor | float) -> torch.Tensor:
    """Whisper's last step: values below (top - 8) raised to it, then (x + 4) / 4."""
    floored = torch.maximum(log10_mel, torch.as_tensor(top, dtype=log10_mel.dtype, device=log10_mel.device) - 8.0)
    return (floored + 4.0) / 4.0


def _checked_wave(audio: np.ndarray | torch.Tensor, what: str) -> torch.Tensor:
    wave = torch.as_tensor(audio)
    if wave.ndim != 1:
        raise AudioInputError(f"{what} expects 1-D mono audio, got shape {tuple(wave.shape)}")
    if wave.shape[0] == 0:
        raise AudioInputError(f"{what} got empty audio (0 samples)")
    # The reference casts to float32 before the STFT; doing the same keeps rounding identical.
    return wave.to(torch.float32)


def clip_log10_mel(audio: np.ndarray | torch.Tensor, n_mels: int = 128) -> tuple[torch.Tensor, int]:
    """A whole clip's log10 mel before the floor -> ([n_mels, F + tail], F = ceil(n / 160)): the tail
    frames (past the clip's frames, still touching its last samples) count for the max only."""
    return clip_end_log10_mel(audio, 0, n_mels)


def clip_end_log10_mel(audio: np.ndarray | torch.Tensor, start: int, n_mels: int = 128) -> tuple[torch.Tensor, int]:
    """The end of a clip, from sample `start` (n_fft / 2 before the first mel frame wanted, a
    multiple of 160 minus n_fft / 2; 0: the whole clip) -> its log10 mel before the floor
    ([n_mels, frames from that one on, tail frames included], how many of them are the clip's),
    the same values as those frames of the whole clip's."""
    wave = _checked_wave(audio, "log_mel_spectrogram")
    if start and (start + HALF_FFT) % HOP_LENGTH:
        raise AudioInputError(f"the end of a clip must start n_fft / 2 before a frame, not at sample {start}")
    n_samples = start + wave.shape[0]  # the whole clip's
    # Right zero padding: at least n_fft so the last frames touching audio see zeros (as in
    # the 30 s reference) and the reflect padding of torch.stft mirrors zeros. For clips
    # within a few hundred samples of 30 s, pad to exactly 30 s instead: there the reference
    # reflects real audio back in at the 30 s boundary and we must do the same.
    padded_len = n_samples + N_FFT
    if n_samples <= REFERENCE_SAMPLES:
        padded_len = min(padded_len, REFERENCE_SAMPLES)
    wave = torch.nn.functional.pad(wave, (0, padded_len - n_samples))  # [padded_len - start]
    # centred: the clip's ends mirrored in (only the end, for the end of a clip: its first frame
    # reads n_fft / 2 real samples before its centre)
    wave = torch.nn.functional.pad(wave[None, None], (0 if start else HALF_FFT, HALF_FFT), mode="reflect")[0, 0]
    # Drop the last frame as the reference does (it keeps exactly 3000 frames for 30 s).
    first_frame = (start + HALF_FFT) // HOP_LENGTH if start else 0
    return _log10_mel(wave, n_mels)[:, :-1], num_mel_frames(n_samples) - first_frame


def log_mel_spectrogram(audio: np.ndarray | torch.Tensor, n_mels: int = 128) -> torch.Tensor:
    """Whisper log-mel of a 1-D 16 kHz waveform: float32 tensor [n_mels, ceil(n / 160)].

    A torch tensor is processed on its own device; a numpy array on the CPU. Clips longer
    than 30 s are not truncated (see the module docstring).
    """
    log10_mel, frames = clip_log10_mel(audio, n_mels)
    # Every frame with real audio is in log10_mel, and frames we did not compute are pure
    # padding at -10, so this max equals the reference's max over its 3000 frames.
    return floor_and_scale(log10_mel, log10_mel.max())[:, :frames].contiguous()  # [n_mels, ceil(n / 160)]


def window_log10_mel(segment: np.ndarray | torch.Tensor, at_clip_start: bool, n_mels: int = 128) -> torch.Tensor:
    """One encoder window's log10 mel before the floor, from the samples its frames read
    (`EncoderWindows.segment`) -> [n_mels, the window's frames]. With at_clip_start the segment
    begins at the clip's first sample, which is mirrored in as the whole clip's STFT mirrors it.
    The same values as those frames of `clip_log10_mel`, to float rounding."""
    wave = _checked_wave(segment, "window_log10_mel")
    if at_clip_start:
        wave = _centre_left(wave)
    return _log10_mel(wave, n_mels)
