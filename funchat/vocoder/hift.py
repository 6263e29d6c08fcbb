"""Causal HiFT vocoder of CosyVoice 3: 80-bin mel at 50 Hz -> 24 kHz waveform.

A re-implementation of the reference `CausalHiFTGenerator` (public FunAudioLLM/CosyVoice at
2db78e7, `cosyvoice/hifigan/generator.py`, with `CausalConvRNNF0Predictor` from
`cosyvoice/hifigan/f0_predictor.py`). Parameter names equal the reference's, so its `hift.pt`
loads strictly (see `load_hift_state_dict` for the other weight-norm layouts).

Data flow (sizes for the real model; every size comes from `HiftConfig`)::

    mel [1, 80, T] --f0 predictor--> f0 [1, T] Hz --NSF source--> source [1, T*480, 1]
    source --STFT (n_fft 16, hop 4)--> [1, 18, T*120 + 1]  (real and imaginary halves)
    mel --conv_pre--> [1, 512, T] --3 x (leaky ReLU, nearest x u, conv, + downsampled source
        spectrum through a ResBlock, mean of 3 ResBlocks)--> [1, 64, T*120] --reflection pad,
        leaky ReLU 0.01, conv_post--> [1, 18, T*120 + 1] -> magnitude exp(.) <= 100, phase sin(.)
        --iSTFT--> [1, T*480] --clamp +-0.99--> wav

Receptive field, layer by layer (a "step" is one time position at that layer's rate: mel frame
= 480 samples, after ups.0 = 60 samples, after ups.1 = 12, after ups.2 = 4 = one STFT hop)::

    layer                         rate            left reach          right reach
    f0_predictor.condnet.0        frame (k=4)     0                   3 frames
    f0_predictor.condnet.2..8     frame (k=3)     2 frames each = 8   0
    NSF source phase              frame           all history (a running sum; see below)
    NSF source noise              sample          none: indexed by absolute sample number
    source STFT (centered)        4 samples       8 samples           7 samples
    conv_pre                      frame (k=5)     0                   conv_pre_look_right = 4
    ups.i (nearest x u_i, conv)   step_i          k_i - 1 steps       0
    source_downs.i (k=2u, /u)     STFT frames     u - 1 frames        u frames
    ResBlocks (dilated, causal)   step_i          sum_d (k-1)(d+1)    0
    reflection pad (1, 0)         4 samples       1 step (shift)      0
    conv_post (k=7)               4 samples       6 steps             0
    iSTFT (centered)              4 samples       8 samples           7 samples

Everything is left-causal except the f0 predictor's first conv, conv_pre and the two
centred transforms. `left_context_samples` is the longest chain of left reaches (the source
phase aside, which is a running sum): for the CosyVoice 3 sizes 17524 samples = 37 frames
(`left_context_frames`), through f0 history (8 frames) -> source spectrum -> source_downs.0
-> source ResBlock 0 -> ResBlocks 0 -> later stages; the mel-only path is 10200 samples. An
incremental mode keeps per-layer caches of those reaches (or re-runs that much history with
the phase carried). `lookahead_frames` (8) is what the reference withholds at the end of a
non-final call.

Reference behaviours reproduced on purpose:
- f0 predictor runs in float32 (the design notes; the golden f0 agrees).
- The source phase is integrated per *frame*, not per sample: for harmonic h the frame's
  increment is (h * f0 / sr) mod 1, accumulated (in float64, which is what CPU `cumsum` does
  for float32), then times 2*pi*480 and held constant for the frame's 480 samples (the
  reference's linear downsampling + nearest upsampling amounts to exactly that). The
  reference also adds a random initial phase to the *first sample* only, which its
  downsampling never reads: no effect, so not modelled. An incremental mode carries the
  float64 running sums (9 numbers) as state.
- Noise is the fixed uniform buffer U[0, 1) (not zero-mean), scaled by 0.003 where voiced
  (f0 > 10 Hz) and 0.1/3 where not. Nothing is drawn at inference (see `noise.FixedNoise`).
- Non-final calls (`finalize=False`): the f0 predictor uses the last 3 mel frames as its
  look-ahead and drops them; decoding then uses the last 4 of the remaining frames as
  conv_pre's look-ahead and drops them, cuts the source spectrum to match, and drops the
  last 480 output samples. T mel frames give (T - 8) * 480 samples, and those samples equal
  the first (T - 8) * 480 of a final call over any longer mel with the same prefix (to float
  rounding), which is what lets the streaming driver emit only new samples.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from funchat.errors import CheckpointError

# The reference's leaky ReLU before conv_post uses torch's default slope, not lrelu_slope.
POST_LRELU_SLOPE = 0.01
# Snake's guard against alpha = 0.
SNAKE_EPS = 1e-9


def _listify(x: Any) -> Any:
    return [_listify(v) for v in x] if isinstance(x, (list, tuple)) else x


@dataclass
class HiftConfig:
    """Every size and setting of the causal HiFT (names follow the reference constructor)."""

    in_channels: int = 80
    base_channels: int = 512
    nb_harmonics: int = 8
    sampling_rate: int = 24000
    nsf_alpha: float = 0.1  # sine amplitude
    nsf_sigma: float = 0.003  # noise std where voiced
    nsf_voiced_threshold: float = 10.0  # Hz; voiced if f0 > threshold
    upsample_rates: list[int] = field(default_factory=lambda: [8, 5, 3])
    upsample_kernel_sizes: list[int] = field(default_factory=lambda: [16, 11, 7])
    n_fft: int = 16
    hop_len: int = 4
    resblock_kernel_sizes: list[int] = field(default_factory=lambda: [3, 7, 11])
    resblock_dilation_sizes: list[list[int]] = field(default_factory=lambda: [[1, 3, 5]] * 3)
    source_resblock_kernel_sizes: list[int] = field(default_factory=lambda: [7, 7, 11])
    source_resblock_dilation_sizes: list[list[int]] = field(default_factory=lambda: [[1, 3, 5]] * 3)
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    conv_pre_look_right: int = 4
    f0_cond_channels: int = 512  # f0 predictor width (also decides the source noise, see noise.py)

    def __post_init__(self) -> None:
        for name in ("upsample_rates", "upsample_kernel_sizes", "resblock_kernel_sizes",
                     "resblock_dilation_sizes", "source_resblock_kernel_sizes",
                     "source_resblock_dilation_sizes"):
            setattr(self, name, _listify(getattr(self, name)))
        stages = len(self.upsample_rates)
        if len(self.upsample_kernel_sizes) != stages:
            raise ValueError("upsample_rates and upsample_kernel_sizes differ in length")
        if len(self.source_resblock_kernel_sizes) != stages or len(self.source_resblock_dilation_sizes) != stages:
            raise ValueError("one source ResBlock per upsampling stage is required")
        if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes):
            raise ValueError("resblock_kernel_sizes and resblock_dilation_sizes differ in length")
        if self.base_channels % (2 ** stages):
            raise ValueError(f"base_channels {self.base_channels} must be divisible by 2**{stages}")
        if self.sampling_rate == 22050:
            # The reference switches to its non-causal SineGen (random at inference) at 22.05 kHz.
            raise ValueError("sampling_rate 22050 selects the reference's non-causal sine generator")
        if self.conv_pre_look_right < 1:
            raise ValueError("conv_pre_look_right must be >= 1")

    # -- derived sizes -------------------------------------------------------------------
    @property
    def samples_per_frame(self) -> int:
        """Waveform samples per mel frame (480 = 8 * 5 * 3 * hop 4)."""
        return math.prod(self.upsample_rates) * self.hop_len

    @property
    def source_channels(self) -> int:
        """Sine harmonics incl. the fundamental (9): width of the source noise buffer."""
        return self.nb_harmonics + 1

    # -- (de)serialisation ---------------------------------------------------------------
    @classmethod
    def from_constructor_args(cls, d: dict[str, Any]) -> "HiftConfig":
        """From the golden `config.json`: the whole file, its `constructor_args`, or the `hift` part."""
        if "constructor_args" in d:
            d = d["constructor_args"]
        if "hift" in d:
            d = d["hift"]
        klass = d.get("__class__", "cosyvoice.hifigan.generator.CausalHiFTGenerator")
        if not klass.endswith("CausalHiFTGenerator"):
            raise CheckpointError(f"hift class {klass!r} is not supported (only CausalHiFTGenerator)")
        f0 = d.get("f0_predictor") or {}
        f0_class = f0.get("__class__", "CausalConvRNNF0Predictor")
        if not f0_class.endswith("CausalConvRNNF0Predictor"):
            raise CheckpointError(f"f0 predictor class {f0_class!r} is not supported")
        if int(f0.get("num_class", 1)) != 1:
            raise CheckpointError("f0 predictor num_class must be 1")
        in_channels = int(d.get("in_channels", 80))
        if int(f0.get("in_channels", in_channels)) != in_channels:
            raise CheckpointError("f0 predictor in_channels must equal hift in_channels (both read the mel)")
        istft = d.get("istft_params") or {}
        defaults = cls()
        try:
            return cls(
                in_channels=in_channels,
                base_channels=int(d.get("base_channels", defaults.base_channels)),
                nb_harmonics=int(d.get("nb_harmonics", defaults.nb_harmonics)),
                sampling_rate=int(d.get("sampling_rate", defaults.sampling_rate)),
                nsf_alpha=float(d.get("nsf_alpha", defaults.nsf_alpha)),
                nsf_sigma=float(d.get("nsf_sigma", defaults.nsf_sigma)),
                nsf_voiced_threshold=float(d.get("nsf_voiced_threshold", defaults.nsf_voiced_threshold)),
                upsample_rates=list(d.get("upsample_rates", defaults.upsample_rates)),
                upsample_kernel_sizes=list(d.get("upsample_kernel_sizes", defaults.upsample_kernel_sizes)),
                n_fft=int(istft.get("n_fft", defaults.n_fft)),
                hop_len=int(istft.get("hop_len", defaults.hop_len)),
                resblock_kernel_sizes=list(d.get("resblock_kernel_sizes", defaults.resblock_kernel_sizes)),
                resblock_dilation_sizes=d.get("resblock_dilation_sizes", defaults.resblock_dilation_sizes),
                source_resblock_kernel_sizes=list(d.get("source_resblock_kernel_sizes",
                                                        defaults.source_resblock_kernel_sizes)),
                source_resblock_dilation_sizes=d.get("source_resblock_dilation_sizes",
                                                     defaults.source_resblock_dilation_sizes),
                lrelu_slope=float(d.get("lrelu_slope", defaults.lrelu_slope)),
                audio_limit=float(d.get("audio_limit", defaults.audio_limit)),
                conv_pre_look_right=int(d.get("conv_pre_look_right", defaults.conv_pre_look_right)),
                f0_cond_channels=int(f0.get("cond_channels", defaults.f0_cond_channels)),
            )
        except ValueError as e:
            raise CheckpointError(f"hift constructor arguments: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HiftConfig":
        return cls(**d)

    @classmethod
    def full(cls) -> "HiftConfig":
        """The released CosyVoice 3 HiFT (examples/libritts/cosyvoice3/conf/cosyvoice3.yaml)."""
        return cls()

    @classmethod
    def tiny(cls) -> "HiftConfig":
        """The golden tiny checkpoint: base and f0 widths 64, everything else as `full()`."""
        return cls(base_channels=64, f0_cond_channels=64)


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


class OneSidedConv1d(nn.Conv1d):
    """Conv1d padded on one side only, so output length = input length (stride 1).

    side="left": causal, looks `pad` steps back. side="right": looks `pad` steps ahead. The
    zero padding can be replaced by real frames (`context`): past frames for an incremental
    mode, future frames for a non-final call.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, side: str = "left",
                 dilation: int = 1, stride: int = 1, pad: int | None = None):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, dilation=dilation)
        if side not in ("left", "right"):
            raise ValueError(f"side must be 'left' or 'right', not {side!r}")
        self.side = side
        self.pad = (kernel_size - 1) * dilation if pad is None else pad

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        # x [B, C, T]; context [B, C, pad] or None (zeros)
        if context is None:
            x = F.pad(x, (self.pad, 0) if self.side == "left" else (0, self.pad))
        else:
            assert context.shape[2] == self.pad, f"context of {context.shape[2]} steps, need {self.pad}"
            x = torch.cat([context, x] if self.side == "left" else [x, context], dim=2)
        return super().forward(x)


class UpsampleConv1d(OneSidedConv1d):
    """Nearest-neighbour upsampling by `rate`, then a causal conv: [B, Cin, T] -> [B, Cout, T*rate]."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, rate: int):
        super().__init__(in_channels, out_channels, kernel_size, side="left")
        self.rate = rate

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x.repeat_interleave(self.rate, dim=2), context)


class Snake(nn.Module):
    """x + sin^2(alpha x) / alpha, per channel (alpha on a linear scale)."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha[None, :, None]  # [1, C, 1] against x [B, C, T]
        return x + (1.0 / (alpha + SNAKE_EPS)) * torch.sin(x * alpha).pow(2)


class ResBlock(nn.Module):
    """Residual stack: per dilation d, Snake -> causal conv(k, d) -> Snake -> causal conv(k, 1)."""

    def __init__(self, channels: int, kernel_size: int, dilations: list[int]):
        super().__init__()
        self.convs1 = nn.ModuleList(
            weight_norm(OneSidedConv1d(channels, channels, kernel_size, dilation=d)) for d in dilations)
        self.convs2 = nn.ModuleList(
            weight_norm(OneSidedConv1d(channels, channels, kernel_size)) for _ in dilations)
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    @staticmethod
    def left_reach(kernel_size: int, dilations: list[int]) -> int:
        """Steps of history one output depends on."""
        return sum((kernel_size - 1) * (d + 1) for d in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [B, C, T] -> [B, C, T]
        for act1, conv1, act2, conv2 in zip(self.activations1, self.convs1, self.activations2, self.convs2):
            x = x + conv2(act2(conv1(act1(x))))
        return x


class CausalF0Predictor(nn.Module):
    """mel [B, 80, T] -> |f0| [B, T] Hz: conv k=4 looking 3 frames ahead, 4 causal convs k=3, ELUs, linear."""

    def __init__(self, in_channels: int, cond_channels: int, layers: int = 5):
        super().__init__()
        convs: list[nn.Module] = [weight_norm(OneSidedConv1d(in_channels, cond_channels, 4, side="right"))]
        for _ in range(layers - 1):
            convs += [nn.ELU(), weight_norm(OneSidedConv1d(cond_channels, cond_channels, 3))]
        convs.append(nn.ELU())
        # Sequential only for the reference's parameter names (condnet.0, condnet.2, ...).
        self.condnet = nn.Sequential(*convs)
        self.classifier = nn.Linear(cond_channels, 1)

    @property
    def lookahead(self) -> int:
        return self.condnet[0].pad

    @property
    def left_reach(self) -> int:
        return sum(m.pad for m in list(self.condnet)[1:] if isinstance(m, OneSidedConv1d))

    def forward(self, mel: torch.Tensor, finalize: bool = True) -> torch.Tensor:
        # mel [B, 80, T] -> f0 [B, T] (finalize) or [B, T - lookahead] (the tail is look-ahead only)
        first = self.condnet[0]
        if finalize:
            x = first(mel)
        else:
            x = first(mel[:, :, : -first.pad], context=mel[:, :, -first.pad:])
        for layer in list(self.condnet)[1:]:
            x = layer(x)
        return self.classifier(x.transpose(1, 2)).squeeze(-1).abs()


class SineSource(nn.Module):
    """Harmonic NSF source: f0 [B, T] + fixed noise -> merged excitation [B, T*480, 1] in (-1, 1)."""

    def __init__(self, cfg: HiftConfig):
        super().__init__()
        self.harmonics = cfg.source_channels
        self.sampling_rate = cfg.sampling_rate
        self.samples_per_frame = cfg.samples_per_frame
        self.sine_amp = cfg.nsf_alpha
        self.noise_std = cfg.nsf_sigma
        self.voiced_threshold = cfg.nsf_voiced_threshold
        self.l_linear = nn.Linear(self.harmonics, 1)  # merges the harmonics

    def phase_increments(self, f0: torch.Tensor) -> torch.Tensor:
        """Per-frame phase step in cycles, wrapped to [0, 1): f0 [B, T] -> [B, T, H]."""
        multiples = torch.arange(1, self.harmonics + 1, dtype=f0.dtype, device=f0.device)
        return (f0[:, :, None] * multiples / self.sampling_rate) % 1

    def forward(self, f0: torch.Tensor, noise: torch.Tensor,
                phase_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """f0 [B, T] Hz, noise [1, >= T*480, H] U[0,1), phase_state [B, 1, H] float64 running sum
        (None = start of utterance) -> (source [B, T*480, 1], new phase_state [B, 1, H])."""
        cycles = self.cycles(f0, phase_state)
        return self.excite(f0, cycles, noise), cycles[:, -1:]

    def cycles(self, f0: torch.Tensor, phase_state: torch.Tensor | None = None) -> torch.Tensor:
        """Running phase in cycles per frame and harmonic: f0 [B, T] -> [B, T, H] float64,
        continued from phase_state [B, 1, H] (the running sum before the first frame)."""
        steps = self.phase_increments(f0).double()  # [B, T, H]
        if phase_state is None:
            phase_state = torch.zeros_like(steps[:, :1])
        # Sequential float64 sum, continued from the state exactly as one long cumsum would be
        # (CPU cumsum of float32 accumulates in float64 and rounds each output).
        return torch.cumsum(torch.cat([phase_state, steps], dim=1), dim=1)[:, 1:]

    def excite(self, f0: torch.Tensor, cycles: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """f0 [B, T], running phase [B, T, H] (float64), noise [1, >= T*480, H] -> source [B, T*480, 1]."""
        spf = self.samples_per_frame
        samples = f0.shape[1] * spf
        if noise.shape[1] < samples or noise.shape[2] != self.harmonics:
            raise ValueError(f"noise {tuple(noise.shape)} too short or wrong width for {samples} samples "
                             f"x {self.harmonics} harmonics")
        # Same float32 operation order as the reference: ((c * 2) * pi) * 480.
        phase = cycles.float() * 2 * math.pi * spf
        sines = torch.sin(phase) * self.sine_amp  # [B, T, H], constant over each frame's samples
        voiced = (f0 > self.voiced_threshold).to(f0.dtype)[:, :, None]  # [B, T, 1]
        noise_amp = voiced * self.noise_std + (1 - voiced) * self.sine_amp / 3  # [B, T, 1]
        # Expand frames to samples: [B, T, .] -> [B, T*480, .]
        sines = sines.repeat_interleave(spf, dim=1)
        voiced = voiced.repeat_interleave(spf, dim=1)
        noise_amp = noise_amp.repeat_interleave(spf, dim=1)
        excitation = sines * voiced + noise_amp * noise[:, :samples].to(f0)  # [B, S, H]
        return torch.tanh(self.l_linear(excitation))


# ---------------------------------------------------------------------------------------------
# The generator
# ---------------------------------------------------------------------------------------------


class Hift(nn.Module):
    """Causal HiFT generator. Parameter names (and their order) equal the reference's `hift.pt`."""

    def __init__(self, cfg: HiftConfig):
        super().__init__()
        self.cfg = cfg
        rates = cfg.upsample_rates
        spectrum = cfg.n_fft + 2  # real + imaginary halves of n_fft/2 + 1 bins
        widths = [cfg.base_channels // 2 ** (i + 1) for i in range(len(rates))]

        # Attribute order mirrors the reference so state_dict keys come out in its order too.
        self.m_source = SineSource(cfg)
        self.conv_pre = weight_norm(OneSidedConv1d(cfg.in_channels, cfg.base_channels,
                                                   cfg.conv_pre_look_right + 1, side="right"))
        self.ups = nn.ModuleList(
            weight_norm(UpsampleConv1d(cfg.base_channels // 2 ** i, widths[i], k, u))
            for i, (u, k) in enumerate(zip(rates, cfg.upsample_kernel_sizes)))
        # Stage i sees the source spectrum (one column per hop) downsampled to its own rate.
        self.source_downs = nn.ModuleList()
        for i in range(len(rates)):
            down = math.prod(rates[i + 1:])
            if down == 1:
                self.source_downs.append(OneSidedConv1d(spectrum, widths[i], 1))
            else:
                self.source_downs.append(OneSidedConv1d(spectrum, widths[i], 2 * down, stride=down, pad=down - 1))
        self.source_resblocks = nn.ModuleList(
            ResBlock(widths[i], k, d)
            for i, (k, d) in enumerate(zip(cfg.source_resblock_kernel_sizes, cfg.source_resblock_dilation_sizes)))
        self.resblocks = nn.ModuleList(
            ResBlock(widths[i], k, d)
            for i in range(len(rates))
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes))
        self.conv_post = weight_norm(OneSidedConv1d(widths[-1], spectrum, 7))
        self.f0_predictor = CausalF0Predictor(cfg.in_channels, cfg.f0_cond_channels)
        # Periodic Hann window (scipy get_window("hann", n, fftbins=True)); not a parameter.
        window = torch.hann_window(cfg.n_fft, periodic=True, dtype=torch.float64).float()
        self.register_buffer("stft_window", window, persistent=False)

    # -- receptive field -----------------------------------------------------------------
    @property
    def f0_lookahead_frames(self) -> int:
        """Mel frames the f0 predictor's first conv looks ahead (3)."""
        return self.f0_predictor.lookahead

    @property
    def conv_pre_lookahead_frames(self) -> int:
        """Mel frames conv_pre looks ahead (4)."""
        return self.cfg.conv_pre_look_right

    @property
    def lookahead_frames(self) -> int:
        """Mel frames a non-final call withholds: T frames give (T - lookahead_frames) * 480 samples (8).

        f0 look-ahead + conv_pre look-ahead + one frame of samples held back because the
        centred STFT/iSTFT at the (provisional) end are still to change.
        """
        return self.f0_lookahead_frames + self.conv_pre_lookahead_frames + 1

    @property
    def left_context_samples(self) -> int:
        """Longest chain of left (past) dependencies, in output samples, excluding the source
        phase (a running sum, carried as state): the worst of the mel path and of each source
        path (f0 history -> source spectrum -> stage i) joined with everything after it."""
        cfg = self.cfg
        hop = cfg.hop_len
        steps = [cfg.samples_per_frame // math.prod(cfg.upsample_rates[: i + 1]) for i in range(len(self.ups))]
        blocks = [max(ResBlock.left_reach(k, d) for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes))
                  * s for s in steps]
        ups = [(k - 1) * s for k, s in zip(cfg.upsample_kernel_sizes, steps)]
        tail = (1 + 6) * hop + cfg.n_fft // 2  # reflection shift + conv_post + iSTFT half window
        after = [sum(ups[j] + blocks[j] for j in range(i + 1, len(steps))) + tail for i in range(len(steps))]
        mel_path = sum(ups) + sum(blocks) + tail
        source_paths = []
        for i in range(len(steps)):
            down = self.source_downs[i]
            source_reach = ResBlock.left_reach(cfg.source_resblock_kernel_sizes[i],
                                               cfg.source_resblock_dilation_sizes[i]) * steps[i]
            source_paths.append(self.f0_predictor.left_reach * cfg.samples_per_frame + cfg.n_fft // 2
                                + down.pad * hop + source_reach + blocks[i] + after[i])
        return max([mel_path, *source_paths])

    @property
    def left_context_frames(self) -> int:
        """`left_context_samples` in whole mel frames (rounded up)."""
        return -(-self.left_context_samples // self.cfg.samples_per_frame)

    # -- forward pieces ------------------------------------------------------------------
    def predict_f0(self, mel: torch.Tensor, finalize: bool = True) -> torch.Tensor:
        """mel [1, 80, T] -> f0 [1, T] Hz (finalize) or [1, T - 3] (last frames are look-ahead only)."""
        with torch.no_grad():
            return self.f0_predictor(mel.float(), finalize=finalize)

    def source(self, f0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """f0 [1, T] Hz + fixed noise [1, >= T*480, 9] -> merged sine source [1, T*480, 1]."""
        with torch.no_grad():
            return self.m_source(f0, noise)[0]

    def _spectrum(self, source: torch.Tensor) -> torch.Tensor:
        # source [1, S, 1] -> [1, n_fft + 2, S / hop + 1]: real bins then imaginary bins
        cfg = self.cfg
        spec = torch.stft(source[:, :, 0], cfg.n_fft, cfg.hop_len, cfg.n_fft, window=self.stft_window,
                          return_complex=True)
        return torch.cat([spec.real, spec.imag], dim=1)

    def decode(self, mel: torch.Tensor, source: torch.Tensor, finalize: bool = True) -> torch.Tensor:
        """mel [1, 80, T] + source [1, T*480, 1] -> wav [1, T*480] (finalize) or [1, (T - 5) * 480]
        (the last conv_pre_look_right frames are look-ahead only, and one more frame is held back)."""
        cfg = self.cfg
        spf = cfg.samples_per_frame
        s_spec = self._spectrum(source)  # [1, 18, T*120 + 1]
        look = cfg.conv_pre_look_right
        if finalize:
            x = self.conv_pre(mel)  # [1, C, T]
        else:
            x = self.conv_pre(mel[:, :, :-look], context=mel[:, :, -look:])  # [1, C, T - look]
            s_spec = s_spec[:, :, : -(spf // cfg.hop_len) * look]
        kernels = len(cfg.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, cfg.lrelu_slope))  # [1, C_i, T * prod(rates[:i+1])]
            if i == len(self.ups) - 1:
                # One extra column so the iSTFT frames line up with the source spectrum's.
                x = F.pad(x, (1, 0), mode="reflect")
            x = x + self.source_resblocks[i](self.source_downs[i](s_spec))
            mixed = self.resblocks[i * kernels](x)
            for j in range(1, kernels):
                mixed = mixed + self.resblocks[i * kernels + j](x)
            x = mixed / kernels
        x = self.conv_post(F.leaky_relu(x, POST_LRELU_SLOPE))  # [1, n_fft + 2, frames]
        bins = cfg.n_fft // 2 + 1
        magnitude = torch.exp(x[:, :bins]).clamp(max=1e2)
        phase = torch.sin(x[:, bins:])  # the reference's sin, redundant but kept for its values
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        wav = torch.istft(spec, cfg.n_fft, cfg.hop_len, cfg.n_fft, window=self.stft_window)  # [1, frames*hop - hop]
        if not finalize:
            wav = wav[:, :-spf]  # the end of a provisional iSTFT still changes
        return wav.clamp(-cfg.audio_limit, cfg.audio_limit)

    def inference(self, mel: torch.Tensor, noise: torch.Tensor, finalize: bool = True) -> torch.Tensor:
        """mel [1, 80, T] + fixed noise [1, >= T*480, 9] -> wav [1, T*480] (finalize) or
        [1, (T - lookahead_frames) * 480], as the reference's `CausalHiFTGenerator.inference`."""
        if mel.dim() != 3 or mel.shape[0] != 1 or mel.shape[1] != self.cfg.in_channels:
            raise ValueError(f"mel must be [1, {self.cfg.in_channels}, T], got {tuple(mel.shape)}")
        need = 1 if finalize else self.lookahead_frames + 1
        if mel.shape[2] < need:
            kind = "final" if finalize else "non-final"
            raise ValueError(f"{mel.shape[2]} mel frames; a {kind} call needs >= {need}")
        mel = mel.float()
        with torch.no_grad(), parametrize.cached():
            f0 = self.predict_f0(mel, finalize=finalize)  # [1, T] or [1, T - 3]
            source = self.source(f0, noise)  # [1, f0 frames * 480, 1]
            if not finalize:
                mel = mel[:, :, : f0.shape[1]]  # the f0 look-ahead frames are not decoded either
            return self.decode(mel, source, finalize=finalize)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def normalize_hift_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the layouts a CosyVoice HiFT checkpoint comes in onto `Hift`'s parameter names.

    - a `generator.` prefix (the released model's training wrapper) is dropped;
    - old-style weight norm `X.weight_g` / `X.weight_v` -> `X.parametrizations.weight.original0/1`;
    - parametrization names pass through unchanged.
    (`load_hift_state_dict` also accepts plain `X.weight` where weight norm was removed.)
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("generator."):
            key = key[len("generator."):]
        if key.endswith(".weight_g"):
            key = key[: -len(".weight_g")] + ".parametrizations.weight.original0"
        elif key.endswith(".weight_v"):
            key = key[: -len(".weight_v")] + ".parametrizations.weight.original1"
        out[key] = value
    return out


def load_hift_state_dict(model: Hift, state: dict[str, torch.Tensor]) -> None:
    """Strictly load a reference HiFT state dict (any layout `normalize_hift_state_dict` knows)."""
    state = normalize_hift_state_dict(state)
    expected = set(model.state_dict())
    for key in sorted(expected - set(state)):
        # Weight norm removed: w = g * v / |v| holds with v = w, g = |w| (norm over all but dim 0).
        prefix = key[: -len(".parametrizations.weight.original0")]
        if key.endswith(".parametrizations.weight.original0") and prefix + ".weight" in state:
            weight = state.pop(prefix + ".weight")
            state[key] = torch.linalg.vector_norm(weight, dim=tuple(range(1, weight.dim())), keepdim=True)
            state[prefix + ".parametrizations.weight.original1"] = weight
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(f"hift state dict does not match the config: missing {missing[:5]} "
                              f"(of {len(missing)}), unexpected {unexpected[:5]} (of {len(unexpected)})")
    for key, tensor in model.state_dict().items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise CheckpointError(f"hift {key}: shape {tuple(state[key].shape)}, config expects {tuple(tensor.shape)}")
    model.load_state_dict(state, strict=True)


def load_hift(checkpoint_dir: str | Path, cfg: HiftConfig | None = None) -> Hift:
    """`Hift` from a directory holding `hift.pt` (and `config.json` unless `cfg` is given), in eval mode."""
    path = Path(checkpoint_dir)
    if cfg is None:
        cfg = HiftConfig.from_constructor_args(json.loads((path / "config.json").read_text()))
    model = Hift(cfg)
    load_hift_state_dict(model, torch.load(path / "hift.pt", map_location="cpu", weights_only=True))
    return model.eval()
