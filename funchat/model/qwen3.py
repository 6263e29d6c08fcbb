"""Qwen3 dense decoder with a batched KV cache.

Used twice: as the shared 5 Hz LLM (`language_model`) and as the Speech Refined Head's 25 Hz
`crq_transformer`. Parameter names follow the Hugging Face Qwen3 layout so checkpoints load by name.

Shapes: B batch, T new positions, S cached positions, D hidden, H query heads, K kv heads, d head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from funchat.model.config import Qwen3Config


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the weight dtype, as the reference does.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


@dataclass
class CacheWrite:
    """Where one forward writes its new positions in a KVCache (`KVCache.plan_write`)."""

    start: int | None  # the position every row starts at, or None when rows differ
    end: int  # time-axis positions attended after the write (the longest row's new length)
    index: torch.Tensor | None  # rows that differ: each row's new positions [B, 1, T, 1]


class KVCache:
    """Keys and values of every layer for a batch of sequences of (possibly) different lengths.

    Row b holds its positions 0..lengths[b]-1 at the start of the time axis. New positions are
    written at lengths[b] onwards; anything beyond a row's length is stale and never attended to.
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, capacity: int = 64):
        shape = (batch, n_kv_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)  # [B]

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def max_length(self) -> int:
        return int(self.lengths.max()) if self.batch else 0

    def reserve(self, need: int) -> None:
        """Room for `need` positions on the time axis, doubling it when it grows (fewer copies)."""
        if need > self.capacity:
            self.ensure_capacity(max(need, 2 * self.capacity))

    def ensure_capacity(self, capacity: int) -> None:
        """Grow the time axis to at least `capacity` positions (contents kept)."""
        grow = capacity - self.capacity
        if grow <= 0:
            return
        for store in (self.k, self.v):
            for i, t in enumerate(store):
                pad = t.new_zeros(t.shape[0], t.shape[1], grow, t.shape[3])
                store[i] = torch.cat([t, pad], dim=2)

    def plan_write(self, t: int) -> "CacheWrite":
        """Where a forward of t new positions per row writes, computed once for all its layers:
        the one host read of the rows' lengths (on a GPU, a device sync) per forward, not per layer.
        Grows the time axis first when the longest row would outgrow it."""
        starts = self.lengths.tolist()
        self.reserve(max(starts, default=0) + t)
        if len(set(starts)) <= 1:
            start = starts[0] if starts else 0
            return CacheWrite(start=start, end=start + t, index=None)
        positions = self.lengths[:, None] + torch.arange(t, device=self.lengths.device)[None]  # [B, T]
        return CacheWrite(start=None, end=max(starts) + t, index=positions[:, None, :, None])  # [B, 1, T, 1]

    def write(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor,
              where: "CacheWrite") -> tuple[torch.Tensor, torch.Tensor]:
        """Store k_new/v_new [B, K, T, d] after each row's length; return views [B, K, S, d]."""
        t = k_new.shape[2]
        if where.index is None:  # every row starts at the same position: one slice
            self.k[layer][:, :, where.start:where.start + t] = k_new
            self.v[layer][:, :, where.start:where.start + t] = v_new
        else:  # rows of different lengths: one scatter along the time axis, no per-row loop
            index = where.index.expand(-1, k_new.shape[1], -1, k_new.shape[3])  # [B, K, T, d]
            self.k[layer].scatter_(2, index, k_new)
            self.v[layer].scatter_(2, index, v_new)
        return self.k[layer][:, :, :where.end], self.v[layer][:, :, :where.end]

    def advance(self, new_lens: torch.Tensor) -> None:
        self.lengths = self.lengths + new_lens

    def select(self, rows: list[int], width: int | None = None) -> "KVCache":
        """A cache holding only the given rows (for splitting or reordering a batch), with a time
        axis of `width` positions (default: this cache's capacity). Positions past this cache's
        capacity are zeros; positions past `width` are not copied, so a caller that knows how far
        its rows reach copies only that much."""
        out = KVCache.__new__(KVCache)
        idx = torch.tensor(rows, dtype=torch.long, device=self.lengths.device)
        width = self.capacity if width is None else width
        copied = min(width, self.capacity)

        def pick(t: torch.Tensor) -> torch.Tensor:  # [B_all, K, C, d] -> [B, K, width, d]
            kept = t[:, :, :copied].index_select(0, idx)
            if width == copied:
                return kept
            return torch.cat([kept, kept.new_zeros(kept.shape[0], kept.shape[1], width - copied, kept.shape[3])], dim=2)

        out.k = [pick(t) for t in self.k]
        out.v = [pick(t) for t in self.v]
        out.lengths = self.lengths.index_select(0, idx)
        return out


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))  # [d/2]


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta), persistent=False)  # [d/2]

    def _apply(self, fn, recurse=True):
        # `.to(bfloat16)` would round the frequencies; keep them float32 like the reference does.
        super()._apply(fn, recurse)
        if self.inv_freq.device.type != "meta":
            self.inv_freq = rope_inv_freq(self.head_dim, self.theta).to(self.inv_freq.device)
        return self

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions [B, T] -> cos, sin [B, T, d] (computed in float32, then cast)
        freqs = positions[..., None].float() * self.inv_freq.float()  # [B, T, d/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [B, heads, T, d]; cos/sin [B, T, d]
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


class Qwen3Attention(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                causal: bool, cache: KVCache | None, layer: int, where: CacheWrite | None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.n_heads, self.head_dim)).transpose(1, 2)  # [B, H, T, d]
        k = self.k_norm(self.k_proj(x).view(b, t, self.n_kv, self.head_dim)).transpose(1, 2)  # [B, K, T, d]
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)  # [B, K, T, d]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.write(layer, k, v, where)  # [B, K, S, d]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                             enable_gqa=self.n_heads != self.n_kv)  # [B, H, T, d]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class Qwen3MLP(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3Layer(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.self_attn = Qwen3Attention(cfg)
        self.mlp = Qwen3MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, causal, cache, layer, where):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, causal, cache, layer, where)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Model(nn.Module):
    """Decoder stack + final norm. `embed_tokens` only where the checkpoint has one (not the SRH)."""

    def __init__(self, cfg: Qwen3Config, with_embeddings: bool = True):
        super().__init__()
        self.cfg = cfg
        if with_embeddings:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen3Layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        # New positions per forward when it needs an attention mask (None: any number). A masked
        # forward materialises queries x keys per head and the mask; a longer one runs in blocks of
        # this many, each attending over the cache so far, bounding that transient by the block.
        self.masked_block: int | None = None

    def new_cache(self, batch: int, capacity: int = 64) -> KVCache:
        p = self.norm.weight
        return KVCache(self.cfg.num_hidden_layers, batch, self.cfg.num_key_value_heads, self.cfg.head_dim,
                       p.dtype, p.device, capacity)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None,
                new_lens: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, D] input embeddings -> [B, T, D] final-normed hidden states.

        With a cache, row b's T new positions continue after its cached length; `new_lens` [B]
        says how many of them are real (the rest is right padding, computed but not kept).
        Without a cache, it is one causal forward from position 0.
        """
        b, t, _ = x.shape
        device = x.device
        steps = torch.arange(t, device=device)
        if cache is None:
            positions = steps[None].expand(b, t)
            mask, causal, where = None, True, None
        else:
            where = cache.plan_write(t)  # the forward's only read of the lengths on the host (grows the cache)
            positions = cache.lengths[:, None] + steps[None]  # [B, T]
            if where.start == 0:
                mask, causal = None, True  # plain causal prefill
            elif where.start is not None and t == 1:
                mask, causal = None, False  # one new position sees everything cached
            elif self.masked_block and t > self.masked_block:
                return self._forward_in_blocks(x, cache, new_lens)
            else:
                keys = torch.arange(where.end, device=device)
                mask = keys[None, None, :] <= positions[:, :, None]  # [B, T, S]
                mask, causal = mask[:, None], False  # [B, 1, T, S]
        cos, sin = self.rotary(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, causal, cache, i, where)
        if cache is not None:
            cache.advance(new_lens if new_lens is not None else torch.full((b,), t, device=device))
        return self.norm(x)

    def _forward_in_blocks(self, x: torch.Tensor, cache: KVCache, new_lens: torch.Tensor | None) -> torch.Tensor:
        """A masked forward of x [B, T, D] as blocks of `masked_block` positions -> [B, T, D], the one
        forward's values to float rounding. A row's real positions continue block after block; once
        they end, its later blocks are padding (computed, not kept)."""
        b, t, _ = x.shape
        new_lens = new_lens if new_lens is not None else torch.full((b,), t, device=x.device)
        outs = []
        for start in range(0, t, self.masked_block):
            stop = min(t, start + self.masked_block)
            outs.append(self.forward(x[:, start:stop], cache, (new_lens - start).clamp(0, stop - start)))
        return torch.cat(outs, dim=1)


class Qwen3ForCausalLM(nn.Module):
    """`language_model`: Qwen3Model under `model.` and an untied (by default) `lm_head`."""

    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.cfg = cfg
        self.model = Qwen3Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)
