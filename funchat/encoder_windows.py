"""Where the audio encoder's windows lie in a caller's turn, in samples (no torch: the orchestrator
uses it too).

The encoder cuts the Whisper log-mel (100 frames/s, one frame per 160 samples) into windows of
2 * n_window frames (200: 2 s) and encodes each on its own (`funchat.model.encoder`); a window
gives 2 * n_window / 4 frames at 25 Hz, that is n_window / (2 * group_size) LLM positions (10).
So a window's rows depend only on its own mel frames, and mel frame i depends only on the samples
within n_fft / 2 of sample 160 * i (the STFT is centred; the clip's start is mirrored). Window w
can therefore be encoded as soon as the caller's turn reaches sample 160 * (200 w + 199) + 200,
from a segment of the turn that starts n_fft / 2 samples before the window (or at the turn's
start), and nothing that comes later changes it, except the log-mel floor: every value is clamped
at (the turn's largest log-mel value - 8), so the audio tokenizer checks at the end of the turn
whether a window encoded early would have been clamped differently (`funchat.model.mel`).
"""

from __future__ import annotations

from dataclasses import dataclass

N_FFT = 400  # Whisper's STFT: 25 ms windows
HOP_LENGTH = 160  # 10 ms hop: 100 mel frames per second
HALF_FFT = N_FFT // 2


@dataclass(frozen=True)
class EncoderWindows:
    n_window: int  # the checkpoint's audio_config.n_window: a window is 2 * n_window mel frames
    group_size: int  # 25 Hz frames per LLM position

    @property
    def mel_frames(self) -> int:
        return 2 * self.n_window

    @property
    def samples(self) -> int:
        """Samples one window covers (32000: 2 s)."""
        return self.mel_frames * HOP_LENGTH

    @property
    def groups(self) -> int:
        """LLM positions one whole window gives (conv stride 2, then pooling by 2, then groups)."""
        return self.mel_frames // 4 // self.group_size

    def segment(self, window: int) -> tuple[int, int]:
        """The samples [start, end) of the turn that window `window`'s mel frames read."""
        start = window * self.samples
        return max(0, start - HALF_FFT), start + (self.mel_frames - 1) * HOP_LENGTH + HALF_FFT

    def ready(self, n_samples: int) -> int:
        """How many leading windows a turn of n_samples so far can encode for good."""
        reach = (self.mel_frames - 1) * HOP_LENGTH + HALF_FFT  # samples past a window's start it reads
        return 0 if n_samples < reach else (n_samples - reach) // self.samples + 1
