"""DiT velocity estimator of the CosyVoice 3 flow (`decoder.estimator` in the reference's names).

Given the noisy mel x_t, the token condition mu, the prompt condition cond, the speaker vector and
the time t, it predicts the flow velocity dx/dt. Module and parameter names follow the reference
checkpoint so its state dict loads as is; the layout is that of an F5-TTS style DiT:

    [x | cond | mu | spk] -> Linear -> + causal conv position embedding
    -> depth x (AdaLN-zero attention block with partial rotary, AdaLN-zero tanh-GELU MLP)
    -> AdaLN (scale, shift) -> Linear -> velocity

Shapes: B batch (two rows per utterance under CFG), T mel frames, C mel bins (80), D model width,
H heads, Dh head width. The public entry point takes and returns channels-first [B, C, T] tensors
like the reference's estimator; everything inside runs frames-first [B, T, D].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# The reference normalises with this eps and no affine parameters (AdaLN supplies scale/shift).
LAYER_NORM_EPS = 1e-6


def sinusoidal_time_features(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """[B] flow times in [0, 1] -> [B, dim] features: sin of every frequency, then cos.

    Times are scaled by 1000 first so the 0..1 range covers the frequencies the way integer
    diffusion steps would. The operation order copies the reference's for bit-level agreement.
    """
    half = dim // 2
    step = math.log(10000) / (half - 1)
    freqs = torch.exp(torch.arange(half, device=t.device).float() * -step)  # [half]
    args = scale * t.unsqueeze(1) * freqs.unsqueeze(0)  # [B, half]
    return torch.cat((args.sin(), args.cos()), dim=-1)  # [B, dim]


class TimestepEmbedding(nn.Module):
    """[B] times -> [B, D] conditioning vector shared by every AdaLN of the network."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.time_mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        feats = sinusoidal_time_features(t, self.freq_dim).to(t.dtype)  # [B, freq_dim]
        return self.time_mlp(feats)  # [B, D]


class CausalConvPositionEmbedding(nn.Module):
    """Two grouped convs with Mish, padded on the left only: a frame sees itself and the past.

    Causality matters for streaming: a frame's embedding must not change when later frames are
    appended. Returns only the convolution branch; the caller adds its input back.
    """

    def __init__(self, dim: int, kernel_size: int = 31, groups: int = 16):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"conv position kernel must be odd, got {kernel_size}")
        self.kernel_size = kernel_size
        self.conv1 = nn.Sequential(nn.Conv1d(dim, dim, kernel_size, groups=groups), nn.Mish())
        self.conv2 = nn.Sequential(nn.Conv1d(dim, dim, kernel_size, groups=groups), nn.Mish())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.transpose(1, 2)  # [B, D, T]
        y = self.conv1(F.pad(y, (self.kernel_size - 1, 0)))  # [B, D, T]
        y = self.conv2(F.pad(y, (self.kernel_size - 1, 0)))  # [B, D, T]
        return y.transpose(1, 2)  # [B, T, D]


class InputEmbedding(nn.Module):
    """Concatenate noisy mel, prompt condition, token condition and speaker; project to width D."""

    def __init__(self, mel_dim: int, mu_dim: int, spk_dim: int, dim: int, conv_kernel: int, conv_groups: int):
        super().__init__()
        self.proj = nn.Linear(2 * mel_dim + mu_dim + spk_dim, dim)
        self.conv_pos_embed = CausalConvPositionEmbedding(dim, conv_kernel, conv_groups)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, mu: torch.Tensor, spk: torch.Tensor) -> torch.Tensor:
        # x, cond: [B, T, C]; mu: [B, T, Cmu]; spk: [B, S]. The order x, cond, mu, spk is the
        # reference's (its `text_embed` slot is mu) and fixes the meaning of proj's input columns.
        spk = spk.unsqueeze(1).expand(-1, x.shape[1], -1)  # [B, T, S]
        h = self.proj(torch.cat((x, cond, mu, spk), dim=-1))  # [B, T, D]
        return self.conv_pos_embed(h) + h


class RotaryEmbedding(nn.Module):
    """Rotary angles for interleaved channel pairs (0,1), (2,3), ... of a `dim`-wide slice.

    `inv_freq` is a persistent buffer because the reference checkpoint carries it.
    """

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))  # [dim/2]
        self.register_buffer("inv_freq", inv_freq)

    def forward(self, seq_len: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (cos, sin), each [T, dim], for positions offset .. offset+T-1."""
        pos = torch.arange(offset, offset + seq_len, device=self.inv_freq.device).type_as(self.inv_freq)
        angles = torch.einsum("i,j->ij", pos, self.inv_freq)  # [T, dim/2]
        angles = torch.stack((angles, angles), dim=-1).flatten(-2)  # [T, dim]: each angle twice, adjacent
        return angles.cos(), angles.sin()


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): the 90-degree turn of each adjacent pair."""
    pairs = x.unflatten(-1, (-1, 2))  # [..., n/2, 2]
    a, b = pairs.unbind(-1)
    return torch.stack((-b, a), dim=-1).flatten(-2)


def apply_partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] channels of x [B, T, H*Dh]; pass the rest through.

    The reference applies the rotary embedding before splitting heads, with a table as wide as one
    head, so only the first head's channels get positions; the other heads are position-free.
    """
    n = cos.shape[-1]
    rot, rest = x[..., :n], x[..., n:]
    rot = rot * cos + rotate_pairs(rot) * sin  # [B, T, n]
    return torch.cat((rot, rest), dim=-1)


class Attention(nn.Module):
    """Multi-head self-attention with biases; `to_out` is a list so the reference names load."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        # The reference's slot 1 is a dropout (identity at inference); only slot 0 has weights.
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor, frame_mask: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        # x: [B, T, D]; attn_mask: [B, 1, T, T] bool (True = may attend); frame_mask: [B, T, 1] bool.
        b, t, _ = x.shape
        cos, sin = rope
        q = apply_partial_rotary(self.to_q(x), cos, sin)  # [B, T, H*Dh]
        k = apply_partial_rotary(self.to_k(x), cos, sin)  # [B, T, H*Dh]
        v = self.to_v(x)  # [B, T, H*Dh]
        q, k, v = (y.view(b, t, self.heads, self.dim_head).transpose(1, 2) for y in (q, k, v))  # [B, H, T, Dh]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [B, H, T, Dh]
        out = out.transpose(1, 2).reshape(b, t, self.heads * self.dim_head)  # [B, T, H*Dh]
        out = self.to_out[0](out)  # [B, T, D]
        # Padded frames output zero, as in the reference.
        return out.masked_fill(~frame_mask, 0.0)


class FeedForward(nn.Module):
    """Linear -> tanh-approximated GELU -> Linear, nested as the reference's `ff.ff.0.0` / `ff.ff.2`."""

    def __init__(self, dim: int, mult: float):
        super().__init__()
        inner = int(dim * mult)
        # nn.Identity stands in for the reference's dropout so the second Linear keeps index 2.
        self.ff = nn.Sequential(
            nn.Sequential(nn.Linear(dim, inner), nn.GELU(approximate="tanh")),
            nn.Identity(),
            nn.Linear(inner, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff(x)


class AdaLayerNormZero(nn.Module):
    """Time-conditioned LayerNorm for a block: six modulation vectors, in the order
    shift, scale, gate (attention) then shift, scale, gate (MLP)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 6 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor, temb: torch.Tensor):
        # x: [B, T, D]; temb: [B, D]
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = self.linear(F.silu(temb)).chunk(6, dim=1)  # 6 x [B, D]
        x = self.norm(x) * (1 + scale[:, None]) + shift[:, None]  # [B, T, D]
        return x, gate, shift_mlp, scale_mlp, gate_mlp


class AdaLayerNormFinal(nn.Module):
    """Time-conditioned LayerNorm before the output projection. Its chunk order is scale then
    shift, the reverse of the blocks' (shift first): the checkpoint's rows are laid out that way."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(temb)).chunk(2, dim=1)  # 2 x [B, D]
        return self.norm(x) * (1 + scale)[:, None, :] + shift[:, None, :]  # [B, T, D]


class DiTBlock(nn.Module):
    """Pre-norm transformer block; AdaLN-zero modulates both sub-layers and gates their residuals."""

    def __init__(self, dim: int, heads: int, dim_head: int, ff_mult: float):
        super().__init__()
        self.attn_norm = AdaLayerNormZero(dim)
        self.attn = Attention(dim, heads, dim_head)
        self.ff_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=LAYER_NORM_EPS)
        self.ff = FeedForward(dim, ff_mult)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, attn_mask: torch.Tensor, frame_mask: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        normed, gate, shift_mlp, scale_mlp, gate_mlp = self.attn_norm(x, temb)
        x = x + gate.unsqueeze(1) * self.attn(normed, attn_mask, frame_mask, rope)  # [B, T, D]
        normed = self.ff_norm(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return x + gate_mlp.unsqueeze(1) * self.ff(normed)  # [B, T, D]


def attention_mask(frame_mask: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[B, T] bool valid frames -> [B, 1, T, T] bool (query row, key column; True = may attend).

    chunk_size <= 0: every query sees every valid key. chunk_size > 0 (the reference's streaming
    mode, `static_chunk_size`): frames are grouped in chunks of chunk_size and a query sees every
    valid key up to the end of its own chunk, all earlier chunks included (the reference's chunk
    mask ignores `num_decoding_left_chunks`).
    """
    b, t = frame_mask.shape
    mask = frame_mask[:, None, :].expand(b, t, t)  # [B, Tq, Tk]
    if chunk_size > 0:
        pos = torch.arange(t, device=frame_mask.device)
        chunk_end = (pos // chunk_size + 1) * chunk_size  # [Tq]
        mask = mask & (pos[None, :] < chunk_end[:, None])[None]  # [B, Tq, Tk]
    return mask.unsqueeze(1)


class DiT(nn.Module):
    """The velocity estimator. Sizes are explicit arguments; `funchat.vocoder.flow.FlowConfig`
    holds them for a checkpoint."""

    def __init__(self, *, dim: int, depth: int, heads: int, dim_head: int, ff_mult: float, mel_dim: int,
                 mu_dim: int, spk_dim: int, conv_pos_kernel: int = 31, conv_pos_groups: int = 16,
                 time_freq_dim: int = 256, rope_base: float = 10000.0):
        super().__init__()
        self.time_embed = TimestepEmbedding(dim, time_freq_dim)
        self.input_embed = InputEmbedding(mel_dim, mu_dim, spk_dim, dim, conv_pos_kernel, conv_pos_groups)
        self.rotary_embed = RotaryEmbedding(dim_head, rope_base)
        self.transformer_blocks = nn.ModuleList(DiTBlock(dim, heads, dim_head, ff_mult) for _ in range(depth))
        self.norm_out = AdaLayerNormFinal(dim)
        # The reference projects to mel_dim (its `out_channels` argument is stored but unused).
        self.proj_out = nn.Linear(dim, mel_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, t: torch.Tensor, spks: torch.Tensor,
                cond: torch.Tensor, chunk_size: int = 0) -> torch.Tensor:
        """x, cond: [B, C, T]; mask: [B, 1, T] (nonzero = valid frame); mu: [B, Cmu, T]; t: [B];
        spks: [B, S]; chunk_size: see `attention_mask`. -> velocity [B, C, T]."""
        seq_len = x.shape[2]
        frame_mask = mask[:, 0, :].bool()  # [B, T]
        temb = self.time_embed(t)  # [B, D]
        h = self.input_embed(x.transpose(1, 2), cond.transpose(1, 2), mu.transpose(1, 2), spks)  # [B, T, D]
        rope = self.rotary_embed(seq_len)  # 2 x [T, Dh]
        attn_mask = attention_mask(frame_mask, chunk_size)  # [B, 1, T, T]
        out_mask = frame_mask.unsqueeze(-1)  # [B, T, 1]
        for block in self.transformer_blocks:
            h = block(h, temb, attn_mask, out_mask, rope)
        h = self.norm_out(h, temb)  # [B, T, D]
        return self.proj_out(h).transpose(1, 2)  # [B, C, T]
