"""Steps of one new position per call on fixed shapes over a pool's KV cache, in place, optionally
captured as CUDA graphs: the machinery the llm's step runner (`llm_engines.CudaGraphStepRunner`)
and the refined_head's (`refined_head.SrhStepRunner`) share.

Shapes: n bucket rows (B real + padding), E width, S attended cache positions, C cache capacity,
R cache rows, K kv heads, H query heads, d head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from funchat.model.funaudiochat import FunAudioChat
from funchat.model.qwen3 import KVCache, Qwen3Model, apply_rotary


CUDA_GRAPHS = ("auto", "true", "false")  # the llm's and refined_head's `cuda_graphs` parameter


def check_cuda_graphs(service: str, value: str) -> str:
    """A `cuda_graphs` parameter value, lowercased; ValueError names it and the accepted values."""
    graphs = (value or "auto").strip().lower()
    if graphs not in CUDA_GRAPHS:
        raise ValueError(f"{service} parameter cuda_graphs={value!r} is not accepted: "
                         f"use one of {', '.join(CUDA_GRAPHS)}")
    return graphs


def batch_buckets(max_batch: int) -> list[int]:
    """Batch sizes that get a graph: powers of two below max_batch, then max_batch (16 -> 1, 2, 4, 8, 16)."""
    sizes, n = [], 1
    while n < max_batch:
        sizes.append(n)
        n *= 2
    return sizes + [max_batch]


def context_buckets(capacity: int, smallest: int = 256) -> list[int]:
    """Attended cache lengths that get a graph: doubling from `smallest`, then the capacity
    (2048 -> 256, 512, 1024, 2048). A step attends over the smallest one that holds its rows."""
    sizes, n = [], smallest
    while n < capacity:
        sizes.append(n)
        n *= 2
    return sizes + [capacity]


def decode_position(lm: Qwen3Model, x: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, cache: KVCache,
                    key_index: torch.Tensor, context: int) -> torch.Tensor:
    """One new position per batch row through a Qwen3 stack, over a pool cache in place.

    x [n, 1, E] inputs; rows [n] cache rows; pos [n] each row's new position (its cached length);
    key_index [>= S] = arange. Each layer writes the new key/value at (row, position), gathers the
    rows' first `context` (S) positions and attends with a mask (key index <= position), so rows
    of different lengths share one shape: no host sync and no data-dependent shape, so it can be
    captured. -> final-normed hidden [n, 1, E]. Does not touch cache.lengths.
    """
    n = x.shape[0]
    cos, sin = lm.rotary(pos[:, None], x.dtype)  # [n, 1, d]
    visible = key_index[None, :context] <= pos[:, None]  # [n, S]: the row's cached keys and the new one
    mask = visible[:, None, None, :]  # [n, 1, 1, S], broadcast over heads
    for i, layer in enumerate(lm.layers):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = attn.q_norm(attn.q_proj(h).view(n, 1, attn.n_heads, attn.head_dim)).transpose(1, 2)  # [n, H, 1, d]
        k = attn.k_norm(attn.k_proj(h).view(n, 1, attn.n_kv, attn.head_dim)).transpose(1, 2)  # [n, K, 1, d]
        v = attn.v_proj(h).view(n, 1, attn.n_kv, attn.head_dim).transpose(1, 2)  # [n, K, 1, d]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        store_k, store_v = cache.k[i], cache.v[i]  # [R, K, C, d]
        # (row, position) pairs select [n, K, d]; padding rows all write the scratch row's position 0
        store_k[rows, :, pos] = k[:, :, 0]
        store_v[rows, :, pos] = v[:, :, 0]
        keys = store_k[:, :, :context].index_select(0, rows)  # [n, K, S, d]
        values = store_v[:, :, :context].index_select(0, rows)  # [n, K, S, d]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                             enable_gqa=attn.n_heads != attn.n_kv)  # [n, H, 1, d]
        x = x + attn.o_proj(out.transpose(1, 2).reshape(n, 1, attn.n_heads * attn.head_dim))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return lm.norm(x)  # [n, 1, E]


class FixedShapeSteps:
    """One new position per call on fixed shapes, reading and writing a pool's KV cache in place;
    the shared machinery of the llm's and the refined_head's step runners.

    The step function (`_static_step`, a subclass's) reads only static buffers: the inputs
    x [N, 1, E], each batch row's cache row and position, and the cache tensors themselves (R rows
    of C positions, never reallocated). For a batch of B rows it takes the smallest batch bucket
    N >= B and the smallest context bucket S that holds every row's new position, and fills rows
    B..N-1 with padding: zero input, position 0 and the scratch row, so their cache writes land in
    a row no call owns and their outputs are dropped.

    use_graphs: capture each (N, S) function once as a CUDA graph and replay it (CUDA only);
    False runs the very same function eagerly (any device: the path the CPU tests compare).
    """

    def __init__(self, model: FunAudioChat, max_batch: int = 16, use_graphs: bool | None = None,
                 context_sizes: list[int] | None = None):
        self.model = model
        self.device = model.device
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        if self.use_graphs and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, it is on {self.device}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.batch_sizes = batch_buckets(max_batch)
        self.requested_context_sizes = context_sizes
        self.cache: KVCache | None = None
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]] = {}

    def attach(self, cache: KVCache, scratch_row: int) -> None:
        """Bind the engine's cache (its tensors must never be replaced afterwards: graphs hold their
        addresses) and the row that padding rows may write."""
        self.cache = cache
        self.scratch_row = scratch_row
        self.capacity = cache.capacity
        sizes = sorted(set(self.requested_context_sizes or context_buckets(self.capacity)))
        if sizes[0] < 1 or sizes[-1] != self.capacity:
            raise ValueError(f"context sizes {sizes} must be positive and end at the cache capacity {self.capacity}")
        self.context_sizes = sizes
        n = self.batch_sizes[-1]
        width = self.model.cfg.text.hidden_size
        self.x_buf = torch.zeros(n, 1, width, dtype=self.model.dtype, device=self.device)  # [N, 1, E]
        self.rows_buf = torch.full((n,), scratch_row, dtype=torch.long, device=self.device)  # [N] cache row
        self.pos_buf = torch.zeros(n, dtype=torch.long, device=self.device)  # [N] new position (cached length)
        self.key_index = torch.arange(self.capacity, device=self.device)  # [C]
        self.graphs.clear()
        self.graph_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._bound = list(cache.k) + list(cache.v)

    def describe(self) -> str:
        mode = "CUDA graphs" if self.use_graphs else "fixed shapes, no capture"
        return (f"{mode}: batch buckets {self.batch_sizes}, context buckets {self.context_sizes}, "
                f"capacity {self.capacity}")

    def _check_attached(self) -> None:
        if self.cache is None:
            raise RuntimeError(f"{type(self).__name__}.attach(cache, scratch_row) was not called")
        if any(a is not b for a, b in zip(list(self.cache.k) + list(self.cache.v), self._bound)):
            raise RuntimeError(f"the KV cache was reallocated after {type(self).__name__}.attach; "
                               "its capacity must stay fixed")

    def _in_pieces(self, inputs: torch.Tensor, rows: list[int], positions: list[int]) -> tuple[torch.Tensor, ...]:
        """inputs [B, 1, E] -> the step's outputs for all B rows (a batch above the largest bucket
        runs in pieces); writes each row's new key/value and sets its length to position + 1."""
        self._check_attached()
        largest = self.batch_sizes[-1]
        pieces = [self._run_bucket(inputs[a:a + largest], rows[a:a + largest], positions[a:a + largest])
                  for a in range(0, len(rows), largest)]
        return tuple(torch.cat(parts) for parts in zip(*pieces))

    def _run_bucket(self, inputs: torch.Tensor, rows: list[int], positions: list[int]) -> tuple[torch.Tensor, ...]:
        b = len(rows)
        n = next(size for size in self.batch_sizes if size >= b)
        need = max(positions) + 1
        if need > self.capacity:
            raise ValueError(f"a row would hold {need} positions, more than the cache capacity {self.capacity}")
        context = next(size for size in self.context_sizes if size >= need)
        if self.use_graphs:
            # Capture first: its warm-up runs overwrite the buffers filled below.
            graph, outputs = self.graphs.get((n, context)) or self._capture(n, context)
        self.x_buf[:b].copy_(inputs)
        self.x_buf[b:n].zero_()
        self.rows_buf[:b].copy_(torch.tensor(rows, dtype=torch.long))
        self.rows_buf[b:n].fill_(self.scratch_row)
        self.pos_buf[:b].copy_(torch.tensor(positions, dtype=torch.long))
        self.pos_buf[b:n].zero_()
        if self.use_graphs:
            graph.replay()
        else:
            outputs = self._static_step(n, context)
        self.cache.lengths[self.rows_buf[:b]] = self.pos_buf[:b] + 1
        # Copies: the graph's output buffers are overwritten by the next replay.
        return tuple(out[:b].clone() for out in outputs)

    def _static_step(self, n: int, context: int) -> tuple[torch.Tensor, ...]:
        """The step of the first n buffer rows over `context` cache positions; a subclass's."""
        raise NotImplementedError

    @torch.inference_mode()
    def _capture(self, n: int, context: int):
        """Capture the (n, context) step as a CUDA graph; -> (graph, its static outputs)."""
        with torch.cuda.device(self.device):
            # Warm-up on a side stream first, as torch.cuda.graph asks (lazy cuBLAS/kernel setup).
            # Every buffer row points at the scratch row, so these runs write nothing a call owns.
            self.x_buf.zero_()
            self.rows_buf.fill_(self.scratch_row)
            self.pos_buf.zero_()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._static_step(n, context)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # One memory pool for all graphs: they replay one at a time, so intermediates can share it.
            with torch.cuda.graph(graph, pool=self.graph_pool):
                outputs = self._static_step(n, context)
        self.graphs[(n, context)] = (graph, outputs)
        return graph, outputs

    def capture_all(self) -> None:
        """Capture every (batch bucket, context bucket) graph now, largest first, so that no call
        pays for a capture and the shared pool is sized by the largest graph."""
        if not self.use_graphs:
            return
        for context in reversed(self.context_sizes):
            for n in reversed(self.batch_sizes):
                if (n, context) not in self.graphs:
                    self._capture(n, context)
