"""`continuous_audio_tower`: the windowed Whisper-shaped audio encoder (Qwen2-Audio style).

Log-mel [n_mels, F] at 100 Hz is cut into windows of 2*n_window frames; each window goes through
conv1 (k3) + GELU and conv2 (k3, stride 2) + GELU (-> 50 Hz), gets sinusoidal positions that
restart per window, and attends only inside itself. The windows of a clip are then joined,
average-pooled by 2 (-> 25 Hz), layer-normed and projected to the LLM width.

Shapes: W windows, L frames per window (after the convs), C d_model, E output_dim.
"""

from __future__ import annotations


import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from funchat.model.config import AudioConfig


def sinusoid_positions(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """[length, channels] table: sin in the first half, cos in the second (Whisper's layout)."""
    increment = np.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-increment * torch.arange(channels // 2).float())
    scaled_time = torch.arange(length)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled_time), torch.cos(scaled_time)], dim=1)


def cnn_output_length(frames: int) -> int:
    """Frames after the stride-2 conv for one window of `frames` mel frames."""
    return (frames - 1) // 2 + 1


def encoder_output_length(mel_frames: int, n_window: int) -> int:
    """25 Hz frames the encoder produces for a clip of `mel_frames` mel frames."""
    window = 2 * n_window
    full, rest = divmod(mel_frames, window)
    after_cnn = full * cnn_output_length(window) + (cnn_output_length(rest) if rest else 0)
    return after_cnn // 2 if after_cnn >= 2 else after_cnn


class EncoderAttention(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.n_heads = cfg.encoder_attention_heads
        self.head_dim = cfg.d_model // self.n_heads
        self.k_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=True)
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=True)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=True)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        # x [W, L, C]; key_mask [W, 1, 1, L] bool (True = a real frame of that window)
        w, l, c = x.shape
        q = self.q_proj(x).view(w, l, self.n_heads, self.head_dim).transpose(1, 2)  # [W, h, L, d]
        k = self.k_proj(x).view(w, l, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(w, l, self.n_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # [W, h, L, d]
        return self.out_proj(out.transpose(1, 2).reshape(w, l, c))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.self_attn = EncoderAttention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, cfg.d_model)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), key_mask)
        x = x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))
        if x.dtype == torch.float16:  # keep fp16 activations finite, as the reference does
            limit = torch.finfo(x.dtype).max - 1000
            x = x.clamp(-limit, limit)
        return x


class AudioEncoder(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.cfg = cfg
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, cfg.d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(cfg.d_model, cfg.d_model, kernel_size=3, stride=2, padding=1)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.ln_post = nn.LayerNorm(cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.output_dim)
        # Stored in the checkpoint but unused at inference; kept so every tensor loads by name.
        self.audio_bos_eos_token = nn.Embedding(2, cfg.output_dim)
        self.register_buffer("positional_embedding",
                             sinusoid_positions(cfg.max_source_positions, cfg.d_model), persistent=False)

    def forward(self, mels: list[torch.Tensor]) -> list[torch.Tensor]:
        """mels: per clip [n_mels, F_i] -> per clip [encoder_output_length(F_i), E] at 25 Hz."""
        window = 2 * self.cfg.n_window
        dtype = self.conv1.weight.dtype
        chunks: list[torch.Tensor] = []
        windows_per_clip: list[int] = []
        for mel in mels:
            pieces = list(torch.split(mel, window, dim=1))  # each [n_mels, <=window]
            chunks.extend(pieces)
            windows_per_clip.append(len(pieces))
        lengths = torch.tensor([c.shape[1] for c in chunks], device=mels[0].device)  # [W]
        max_len = int(lengths.max())
        padded = mels[0].new_zeros((len(chunks), self.cfg.num_mel_bins, max_len), dtype=dtype)  # [W, n_mels, Lm]
        for i, c in enumerate(chunks):
            padded[i, :, : c.shape[1]] = c
        frame_ids = torch.arange(max_len, device=padded.device)
        in_mask = (frame_ids[None, :] < lengths[:, None]).to(dtype)[:, None, :]  # [W, 1, Lm]

        # Zero the padded frames after conv1 so conv2 sees the same zeros as an unpadded window.
        x = F.gelu(self.conv1(padded)) * in_mask
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # [W, L, C]
        x = x + self.positional_embedding[: x.shape[1]].unsqueeze(0).to(x.dtype)
        out_lengths = (lengths - 1) // 2 + 1  # [W]
        valid = torch.arange(x.shape[1], device=x.device)[None, :] < out_lengths[:, None]  # [W, L]
        key_mask = valid[:, None, None, :]  # [W, 1, 1, L]
        for layer in self.layers:
            x = layer(x, key_mask)

        outputs: list[torch.Tensor] = []
        start = 0
        for n in windows_per_clip:
            frames = x[start:start + n][valid[start:start + n]]  # [sum of window lengths, C]
            start += n
            if frames.shape[0] >= 2:
                frames = F.avg_pool1d(frames.T[None], kernel_size=2, stride=2)[0].T  # [N//2, C]
            outputs.append(frames)
        joined = self.proj(self.ln_post(torch.cat(outputs, dim=0)))  # [sum, E]
        return list(torch.split(joined, [o.shape[0] for o in outputs], dim=0))
