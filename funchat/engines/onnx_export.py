"""ONNX export of the shared LLM (`language_model`) as two graphs, prefill and step, for TensorRT.

Both graphs run the Qwen3 layers of `funchat.model.qwen3` (their weights, their RMSNorm, MLP and
rotary modules); only the attention is rewritten here with plain ops (MatMul with broadcasting for
grouped-query attention, Where masks, the softmax in float32 unless `fp32_softmax=False`) so
that the TorchScript exporter (opset 17) and TensorRT's ONNX parser take it without custom ops.
The KV cache is an explicit input/output.

Shapes: B batch, T new positions, S cached positions, E hidden, V vocabulary, L layers,
K kv heads, d head dim. The model dtype (float32 or float16) is `dt`.

`llm_prefill.onnx` (from an empty cache, right-padded batch):
    inputs_embeds  [B, T, E] dt       prompt embeddings, row b real in 0..lengths[b]-1
    lengths        [B]       int64    real positions per row, 1 <= lengths[b] <= T
 -> logits_last    [B, V]    float32  lm_head at each row's last real position (lengths[b]-1)
    hidden         [B, T, E] dt       final-normed hidden states (padding rows: finite, meaningless)
    present_keys   [L, B, K, T, d] dt keys after RoPE and k_norm; zero at positions >= lengths[b]
    present_values [L, B, K, T, d] dt

`llm_step.onnx` (one new position per row, rows of different cached lengths):
    inputs_embeds  [B, 1, E]       dt
    past_keys      [L, B, K, S, d] dt   row b valid in 0..past_lengths[b]-1, anything after is ignored
    past_values    [L, B, K, S, d] dt
    past_lengths   [B]             int64 0 <= past_lengths[b] <= S
 -> logits         [B, V]          float32
    hidden         [B, 1, E]       dt
    present_keys   [L, B, K, S+1, d] dt  = past with the new key written at index past_lengths[b]
                                        (after it: stale, index S may hold a copy of the new key)
    present_values [L, B, K, S+1, d] dt

Cache layout (the same as `KVCache`): row b holds its positions 0..n_b-1 left-aligned on the time
axis; what lies after n_b is stale and masked (it must be finite: allocate buffers with zeros, since
a masked NaN would still reach the output through 0 * NaN in probs @ V). The step writes the new
entry at n_b (not at S), so `present[..., :n_b+1, :]` is the row's whole history and rows stay
left-aligned for the next step.
A serving engine keeps one fixed-capacity buffer [L, rows, K, C, d] and per step passes
`past = buffer[:, batch_rows, :, :S]` for any S with max(n_b) <= S <= C-1 (the batch's longest row,
rounded up to a bucket, or always C-1 for fixed shapes/CUDA graphs); afterwards it copies back
either `present[:, :, :, :S+1]` or only the new column `present[:, b, :, n_b]` of each row, and
sets n_b += 1. A prefill's `present[:, b, :, :lengths[b]]` goes to the start of the row's buffer.

`step_kv="new"` exports the step with `new_keys`/`new_values [L, B, K, 1, d]` instead of the two
present outputs: the graph attends over past ++ new and returns only the new entry, which the
engine writes at index n_b of its buffer itself. Then S may equal the capacity C (the buffer
can be bound as is) and a step writes O(B) instead of copying the whole cache.

Weights: small graphs embed them; large ones (or `external_data=True`) reference one shared file
`llm_weights.bin` (tensors deduplicated by content across both graphs, 4 KiB aligned), which
must stay in the same directory as the .onnx files.

CLI: python -m funchat.engines.onnx_export --checkpoint DIR --out DIR [--dtype float32|float16] [--check]
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from funchat.model.qwen3 import Qwen3ForCausalLM, Qwen3Layer, apply_rotary

OPSET = 17
PREFILL_FILE, STEP_FILE, META_FILE, WEIGHTS_FILE = "llm_prefill.onnx", "llm_step.onnx", "llm_onnx.json", "llm_weights.bin"
PREFILL_INPUTS = ("inputs_embeds", "lengths")
PREFILL_OUTPUTS = ("logits_last", "hidden", "present_keys", "present_values")
STEP_INPUTS = ("inputs_embeds", "past_keys", "past_values", "past_lengths")
STEP_OUTPUTS = ("logits", "hidden", "present_keys", "present_values")
STEP_NEW_KV_OUTPUTS = ("logits", "hidden", "new_keys", "new_values")  # step_kv="new"
STEP_KV_MODES = ("present", "new")
EXTERNAL_DATA_AUTO_BYTES = 1 << 30  # graphs above 1 GiB of weights use the shared external file

ONNX_DTYPES = {torch.float32: "float32", torch.float16: "float16"}
TORCH_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}


def _language_model(model: nn.Module) -> Qwen3ForCausalLM:
    """Accept a FunAudioChat (its `language_model`) or a Qwen3ForCausalLM."""
    lm = getattr(model, "language_model", model)
    if not isinstance(lm, Qwen3ForCausalLM):
        raise TypeError(f"expected FunAudioChat or Qwen3ForCausalLM, got {type(model).__name__}")
    return lm


class _LlmGraph(nn.Module):
    """Shared forward pieces over the Qwen3 layers of `lm` (weights are shared, not copied)."""

    def __init__(self, lm: Qwen3ForCausalLM, fp32_softmax: bool = True):
        super().__init__()
        self.lm = lm
        self.fp32_softmax = fp32_softmax
        cfg = lm.cfg
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.groups = self.n_heads // self.n_kv
        self.scale = self.head_dim ** -0.5

    def _qkv(self, layer: Qwen3Layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, T, E] (normed) -> q [B, K, G, T, d] (pre-scaled), k/v [B, K, T, d]."""
        attn = layer.self_attn
        b, t, _ = x.shape
        q = attn.q_norm(attn.q_proj(x).view(b, t, self.n_heads, self.head_dim)).transpose(1, 2)  # [B, H, T, d]
        k = attn.k_norm(attn.k_proj(x).view(b, t, self.n_kv, self.head_dim)).transpose(1, 2)  # [B, K, T, d]
        v = attn.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)  # [B, K, T, d]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q = (q * self.scale).reshape(b, self.n_kv, self.groups, t, self.head_dim)  # [B, K, G, T, d]
        return q, k, v

    def _attend(self, layer: Qwen3Layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                visible: torch.Tensor) -> torch.Tensor:
        """q [B, K, G, T, d], k/v [B, K, S, d], visible bool broadcastable to [B, 1, 1, T, S] -> [B, T, E]."""
        b, _, _, t, _ = q.shape
        scores = torch.matmul(q, k[:, :, None].transpose(-1, -2))  # [B, K, G, T, S] (GQA by broadcast)
        if self.fp32_softmax:
            scores = scores.float()
        masked = torch.tensor(torch.finfo(scores.dtype).min, dtype=scores.dtype, device=scores.device)
        scores = torch.where(visible, scores, masked)  # a scalar constant, no ConstantOfShape
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        out = torch.matmul(probs, v[:, :, None])  # [B, K, G, T, d]
        out = out.reshape(b, self.n_heads, t, self.head_dim).transpose(1, 2)  # [B, T, H, d]
        return layer.self_attn.o_proj(out.reshape(b, t, self.n_heads * self.head_dim))

    def _mlp(self, layer: Qwen3Layer, x: torch.Tensor) -> torch.Tensor:
        return x + layer.mlp(layer.post_attention_layernorm(x))


class PrefillGraph(_LlmGraph):
    """(inputs_embeds [B, T, E], lengths [B]) -> (logits_last [B, V] f32, hidden [B, T, E],
    present_keys/values [L, B, K, T, d]); see the module docstring."""

    def forward(self, inputs_embeds: torch.Tensor, lengths: torch.Tensor):
        x = inputs_embeds
        b, t, e = x.shape
        steps = torch.arange(t, device=x.device)  # [T]
        cos, sin = self.lm.model.rotary(steps[None], x.dtype)  # [1, T, d], the same for every row
        causal = (steps[None, :] <= steps[:, None])[None, None, None]  # [1, 1, 1, T, S=T]
        real = (steps[None, :] < lengths[:, None]).to(x.dtype)[:, None, :, None]  # [B, 1, T, 1]: 1 real, 0 padding
        keys, values = [], []
        for layer in self.lm.model.layers:
            q, k, v = self._qkv(layer, layer.input_layernorm(x), cos, sin)
            x = x + self._attend(layer, q, k, v, causal)
            x = self._mlp(layer, x)
            keys.append(k * real)  # zero at padding positions
            values.append(v * real)
        hidden = self.lm.model.norm(x)  # [B, T, E]
        last = (lengths - 1)[:, None, None].expand(b, 1, e)  # [B, 1, E] (lengths >= 1)
        logits = self.lm.lm_head(torch.gather(hidden, 1, last)[:, 0]).float()  # [B, V]
        return logits, hidden, torch.stack(keys), torch.stack(values)


class StepGraph(_LlmGraph):
    """(inputs_embeds [B, 1, E], past_keys/values [L, B, K, S, d], past_lengths [B]) ->
    (logits [B, V] f32, hidden [B, 1, E], present_keys/values [L, B, K, S+1, d]); see the module docstring.

    With `new_kv_only`, the last two outputs are new_keys/new_values [L, B, K, 1, d] instead: the
    caller writes them at index past_lengths[b] of its own buffer (no copy of the cache per step).
    """

    def __init__(self, lm: Qwen3ForCausalLM, fp32_softmax: bool = True, new_kv_only: bool = False):
        super().__init__(lm, fp32_softmax)
        self.new_kv_only = new_kv_only

    def forward(self, inputs_embeds: torch.Tensor, past_keys: torch.Tensor, past_values: torch.Tensor,
                past_lengths: torch.Tensor):
        x = inputs_embeds
        s = past_keys.shape[3]
        positions = past_lengths[:, None]  # [B, 1]
        cos, sin = self.lm.model.rotary(positions, x.dtype)  # [B, 1, d]
        key_index = torch.arange(s + 1, device=x.device)[None, :]  # [1, S+1]
        if self.new_kv_only:  # keys = past ++ new (new at index S): the row's first n_b and the last
            visible = (key_index < past_lengths[:, None]) | (key_index == s)  # [B, S+1]
        else:  # keys = past with the new entry written at index n_b: the row's first n_b + 1
            slot = (key_index == past_lengths[:, None])[:, None, :, None]  # [B, 1, S+1, 1]: where the new entry goes
            visible = key_index <= past_lengths[:, None]  # [B, S+1]
        visible = visible[:, None, None, None]  # [B, 1, 1, 1, S+1]
        keys, values = [], []
        for i, layer in enumerate(self.lm.model.layers):
            q, k_new, v_new = self._qkv(layer, layer.input_layernorm(x), cos, sin)  # k_new [B, K, 1, d]
            if self.new_kv_only:
                k = torch.cat([past_keys[i], k_new], dim=2)  # [B, K, S+1, d]
                v = torch.cat([past_values[i], v_new], dim=2)
                keys.append(k_new)
                values.append(v_new)
            else:
                # past ++ new, then the new entry also at index n_b (index S keeps a stale copy when n_b < S)
                k = torch.where(slot, k_new, torch.cat([past_keys[i], k_new], dim=2))  # [B, K, S+1, d]
                v = torch.where(slot, v_new, torch.cat([past_values[i], v_new], dim=2))
                keys.append(k)
                values.append(v)
            x = x + self._attend(layer, q, k, v, visible)
            x = self._mlp(layer, x)
        hidden = self.lm.model.norm(x)  # [B, 1, E]
        logits = self.lm.lm_head(hidden[:, 0]).float()  # [B, V]
        return logits, hidden, torch.stack(keys), torch.stack(values)


# ---- export ----

def _signatures(cfg, dtype: torch.dtype, step_kv: str = "present") -> dict[str, Any]:
    dt = ONNX_DTYPES[dtype]
    L, K, d, E, V = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size, cfg.vocab_size
    return {
        "prefill": {
            "file": PREFILL_FILE,
            "inputs": {"inputs_embeds": {"shape": ["batch", "seq", E], "dtype": dt},
                       "lengths": {"shape": ["batch"], "dtype": "int64"}},
            "outputs": {"logits_last": {"shape": ["batch", V], "dtype": "float32"},
                        "hidden": {"shape": ["batch", "seq", E], "dtype": dt},
                        "present_keys": {"shape": [L, "batch", K, "seq", d], "dtype": dt},
                        "present_values": {"shape": [L, "batch", K, "seq", d], "dtype": dt}},
        },
        "step": {
            "file": STEP_FILE,
            "inputs": {"inputs_embeds": {"shape": ["batch", 1, E], "dtype": dt},
                       "past_keys": {"shape": [L, "batch", K, "past", d], "dtype": dt},
                       "past_values": {"shape": [L, "batch", K, "past", d], "dtype": dt},
                       "past_lengths": {"shape": ["batch"], "dtype": "int64"}},
            "outputs": {"logits": {"shape": ["batch", V], "dtype": "float32"},
                        "hidden": {"shape": ["batch", 1, E], "dtype": dt},
                        "present_keys": {"shape": [L, "batch", K, "past_plus_1", d], "dtype": dt},
                        "present_values": {"shape": [L, "batch", K, "past_plus_1", d], "dtype": dt}}
            if step_kv == "present" else
            {"logits": {"shape": ["batch", V], "dtype": "float32"},
             "hidden": {"shape": ["batch", 1, E], "dtype": dt},
             "new_keys": {"shape": [L, "batch", K, 1, d], "dtype": dt},
             "new_values": {"shape": [L, "batch", K, 1, d], "dtype": dt}},
        },
    }


def _dynamic_axes(graph: str) -> dict[str, dict[int, str]]:
    if graph == "prefill":
        return {"inputs_embeds": {0: "batch", 1: "seq"}, "lengths": {0: "batch"}, "logits_last": {0: "batch"},
                "hidden": {0: "batch", 1: "seq"}, "present_keys": {1: "batch", 3: "seq"},
                "present_values": {1: "batch", 3: "seq"}}
    return {"inputs_embeds": {0: "batch"}, "past_keys": {1: "batch", 3: "past"}, "past_values": {1: "batch", 3: "past"},
            "past_lengths": {0: "batch"}, "logits": {0: "batch"}, "hidden": {0: "batch"},
            "present_keys": {1: "batch", 3: "past_plus_1"}, "present_values": {1: "batch", 3: "past_plus_1"},
            "new_keys": {1: "batch"}, "new_values": {1: "batch"}}


def _example_inputs(lm: Qwen3ForCausalLM, dtype: torch.dtype, device) -> dict[str, tuple[torch.Tensor, ...]]:
    """Tracing inputs: batch 2, T 5, S 6, different lengths per row (shapes stay symbolic)."""
    cfg = lm.cfg
    gen = torch.Generator().manual_seed(0)
    e = torch.randn(2, 5, cfg.hidden_size, generator=gen).to(device=device, dtype=dtype)
    past = torch.randn(cfg.num_hidden_layers, 2, cfg.num_key_value_heads, 6, cfg.head_dim,
                       generator=gen).to(device=device, dtype=dtype)
    return {
        "prefill": (e, torch.tensor([5, 3], device=device)),
        "step": (e[:, :1], past, past.clone(), torch.tensor([6, 4], device=device)),
    }


def _annotate(proto, signature: dict[str, Any]) -> None:
    """Write the documented shapes onto the graph's inputs and outputs (the exporter's shape
    inference leaves some static dims symbolic, e.g. the head dim after a Where)."""
    for value in list(proto.graph.input) + list(proto.graph.output):
        spec = signature["inputs"].get(value.name) or signature["outputs"].get(value.name)
        if spec is None:
            continue
        shape = value.type.tensor_type.shape
        del shape.dim[:]
        for size in spec["shape"]:
            dim = shape.dim.add()
            if isinstance(size, int):
                dim.dim_value = size
            else:
                dim.dim_param = size


def _externalize(model_proto, seen: dict, data_file, location: str, threshold: int = 1024) -> None:
    """Move the proto's large initializers into `data_file` (shared, deduplicated by content)."""
    import onnx

    for tensor in model_proto.graph.initializer:
        raw = tensor.raw_data
        if not raw or len(raw) < threshold:
            continue
        key = (tensor.data_type, tuple(tensor.dims), hashlib.sha256(raw).digest())
        if key not in seen:
            offset = data_file.tell()
            pad = (-offset) % 4096
            data_file.write(b"\0" * pad)
            data_file.write(raw)
            seen[key] = (offset + pad, len(raw))
        offset, length = seen[key]
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        del tensor.external_data[:]
        for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = k, v


def export_llm(model: nn.Module, out_dir: str | Path, dtype: torch.dtype | str = torch.float32,
               opset: int = OPSET, external_data: bool | None = None, step_kv: str = "present",
               fp32_softmax: bool = True) -> dict[str, Path]:
    """Write llm_prefill.onnx, llm_step.onnx (+ llm_weights.bin when external) and llm_onnx.json.

    `model` is a FunAudioChat or its `language_model`; it is used as is when it already has
    `dtype`, else a converted copy is exported. `external_data=None` chooses by size.
    `step_kv`: "present" (the step returns the whole cache, S+1 positions) or "new" (only the
    new entry, [L, B, K, 1, d], for engines that write it into their own buffer).
    `fp32_softmax`: attention scores and softmax in float32 (False: in the model dtype).
    Returns {"prefill", "step", "meta"[, "weights"]} -> paths.
    """
    import onnx

    dtype = TORCH_DTYPES[dtype] if isinstance(dtype, str) else dtype
    if step_kv not in STEP_KV_MODES:
        raise ValueError(f"step_kv={step_kv!r}: use one of {', '.join(STEP_KV_MODES)}")
    if dtype not in ONNX_DTYPES:
        raise ValueError(f"dtype {dtype} is not supported: use float32 or float16")
    lm = _language_model(model)
    if lm.lm_head.weight.dtype != dtype:
        lm = copy.deepcopy(lm).to(dtype)
    lm = lm.eval()
    device = lm.lm_head.weight.device
    cfg = lm.cfg
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.parameters())
    if external_data is None:
        external_data = weight_bytes > EXTERNAL_DATA_AUTO_BYTES
    if not external_data and weight_bytes >= 2**31 - 2**26:
        raise ValueError(f"{weight_bytes / 2**30:.1f} GiB of weights do not fit in one ONNX file (2 GiB protobuf "
                         f"limit): use external_data=True")
    examples = _example_inputs(lm, dtype, device)
    signatures = _signatures(cfg, dtype, step_kv)
    step_outputs = STEP_OUTPUTS if step_kv == "present" else STEP_NEW_KV_OUTPUTS
    graphs = {"prefill": (PrefillGraph(lm, fp32_softmax), PREFILL_FILE, PREFILL_INPUTS, PREFILL_OUTPUTS),
              "step": (StepGraph(lm, fp32_softmax, step_kv == "new"), STEP_FILE, STEP_INPUTS, step_outputs)}
    paths: dict[str, Path] = {}
    seen: dict = {}
    data_path = out / WEIGHTS_FILE
    if data_path.exists():
        data_path.unlink()
    data_file = open(data_path, "wb") if external_data else None
    try:
        for name, (module, fname, inputs, outputs) in graphs.items():
            with tempfile.TemporaryDirectory(dir=out, prefix=f".{name}-") as tmp:
                tmp_path = Path(tmp) / fname
                with warnings.catch_warnings(), torch.no_grad():
                    warnings.simplefilter("ignore")  # tracer and deprecation warnings of the TorchScript exporter
                    torch.onnx.export(module, examples[name], str(tmp_path), dynamo=False, opset_version=opset,
                                      input_names=list(inputs), output_names=list(outputs),
                                      dynamic_axes={k: v for k, v in _dynamic_axes(name).items()
                                                    if k in inputs or k in outputs},
                                      do_constant_folding=True)
                proto = onnx.load(str(tmp_path))  # also reads external data the exporter wrote (> 2 GB)
            proto.producer_name, proto.doc_string = "funchat.engines.onnx_export", f"funchat shared LLM, {name} graph"
            _annotate(proto, signatures[name])
            if data_file is not None:
                _externalize(proto, seen, data_file, WEIGHTS_FILE)
            onnx.save_model(proto, str(out / fname))
            del proto
            paths[name] = out / fname
    finally:
        if data_file is not None:
            data_file.close()
    if external_data:
        paths["weights"] = data_path
    meta = {
        "format": "funchat-llm-onnx/1",
        "opset": opset,
        "dtype": ONNX_DTYPES[dtype],
        "step_kv": step_kv,
        "fp32_softmax": fp32_softmax,
        "external_data": WEIGHTS_FILE if external_data else None,
        "weight_bytes": weight_bytes,
        "config": cfg.to_dict(),
        "dims": {"batch": "rows in the call", "seq": "prompt positions (prefill T)",
                 "past": "cached positions S passed to the step", "past_plus_1": "S + 1"},
        "graphs": signatures,
        "cache_layout": ("row b holds positions 0..n_b-1 left-aligned on the time axis (axis 3); after n_b "
                         "is stale and masked; " + (
                             "the step writes the new entry at index past_lengths[b] of present (S+1 "
                             "positions), so present[..., :n_b+1, :] is the row's history"
                             if step_kv == "present" else
                             "the step returns only the new entry (new_keys/new_values [L, B, K, 1, d]); the "
                             "caller stores it at index past_lengths[b] of its buffer (S may equal the capacity)")),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    paths["meta"] = out / META_FILE
    return paths


# ---- numerical check against the torch path (Qwen3Model + KVCache) ----

def _sessions(out_dir: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return (ort.InferenceSession(str(out_dir / PREFILL_FILE), opts, providers=["CPUExecutionProvider"]),
            ort.InferenceSession(str(out_dir / STEP_FILE), opts, providers=["CPUExecutionProvider"]))


def run_step(session, step_kv: str, inputs_embeds: np.ndarray, past_keys: np.ndarray, past_values: np.ndarray,
             past_lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One step through an onnxruntime session of llm_step.onnx -> (logits, hidden, present_keys,
    present_values), present [L, B, K, S+1, d] in both step_kv modes ("new": written here, as a
    serving engine would, at index past_lengths[b])."""
    logits, hidden, keys, values = session.run(None, {"inputs_embeds": inputs_embeds, "past_keys": past_keys,
                                                      "past_values": past_values, "past_lengths": past_lengths})
    if step_kv == "present":
        return logits, hidden, keys, values
    pad = np.zeros_like(past_keys[:, :, :, :1])
    present_k = np.concatenate([past_keys, pad], axis=3)
    present_v = np.concatenate([past_values, pad], axis=3)
    rows = np.arange(past_keys.shape[1])
    present_k[:, rows, :, past_lengths] = keys[:, :, :, 0].transpose(1, 0, 2, 3)  # [B, L, K, d] by advanced indexing
    present_v[:, rows, :, past_lengths] = values[:, :, :, 0].transpose(1, 0, 2, 3)
    return logits, hidden, present_k, present_v


def _max_diff(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max()) if a.size else 0.0


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


@torch.no_grad()
def check_with_onnxruntime(model: nn.Module, out_dir: str | Path, lengths: tuple[int, ...] = (7, 3, 5),
                           steps: int = 4, seed: int = 0, big_batch: int = 5, big_past: int = 40) -> dict[str, float]:
    """Run the exported graphs with onnxruntime (CPU) next to the torch path and compare.

    1. Prefill a right-padded batch of prompts of `lengths` (random token embeddings), then
       `steps` greedy steps, each side feeding its own argmax token back. Compares logits, hidden
       (real positions) and every row's valid cache positions after each call.
    2. One step on a larger batch and longer cache than at export (`big_batch`, `big_past`),
       random cache contents and lengths, against a KVCache holding the same values.

    Returns max abs differences by "prefill/<output>", "step/<output>" (max over steps),
    "dynamic/<output>" (present_* compared on each row's valid positions, also for step_kv="new"),
    plus "prefill/padding_is_zero" (largest |key| the prefill left at padding positions, 0 expected)
    and "greedy_mismatches" (differing greedy tokens, a count).
    `model` must have the dtype the graphs were exported with.
    """
    out = Path(out_dir)
    meta = json.loads((out / META_FILE).read_text())
    step_kv = meta.get("step_kv", "present")
    lm = _language_model(model).eval()
    cfg = lm.cfg
    dtype = lm.lm_head.weight.dtype
    device = lm.lm_head.weight.device
    if ONNX_DTYPES.get(dtype) != meta["dtype"]:
        raise ValueError(f"the graphs in {out} are {meta['dtype']} but the model is {dtype}: convert the model first")
    ndt = {torch.float32: np.float32, torch.float16: np.float16}[dtype]
    prefill, step = _sessions(out)
    gen = torch.Generator().manual_seed(seed)
    diffs: dict[str, float] = {}

    def record(key: str, value: float) -> None:
        diffs[key] = max(diffs.get(key, 0.0), value)

    def cache_diff(prefix: str, cache, keys: np.ndarray, values: np.ndarray, valid: list[int]) -> None:
        for layer in range(cfg.num_hidden_layers):
            for b, n in enumerate(valid):
                record(f"{prefix}/present_keys", _max_diff(keys[layer, b, :, :n], _np(cache.k[layer][b, :, :n])))
                record(f"{prefix}/present_values", _max_diff(values[layer, b, :, :n], _np(cache.v[layer][b, :, :n])))

    # 1. prefill + greedy steps
    lens = torch.tensor(lengths, dtype=torch.long, device=device)
    b, t = len(lengths), max(lengths)
    ids = torch.randint(0, cfg.vocab_size, (b, t), generator=gen).to(device)
    embeds = lm.embed(ids) * (torch.arange(t, device=device)[None] < lens[:, None])[..., None]  # [B, T, E] right-padded
    cache = lm.model.new_cache(b, capacity=t + steps + 1)
    hidden_t = lm.model(embeds, cache, lens)
    logits_t = lm.lm_head(hidden_t[torch.arange(b, device=device), lens - 1]).float()
    logits_o, hidden_o, keys_o, values_o = prefill.run(None, {"inputs_embeds": _np(embeds).astype(ndt),
                                                              "lengths": _np(lens)})
    record("prefill/logits_last", _max_diff(logits_o, _np(logits_t)))
    for row, n in enumerate(lengths):
        record("prefill/hidden", _max_diff(hidden_o[row, :n], _np(hidden_t[row, :n])))
    cache_diff("prefill", cache, keys_o, values_o, list(lengths))
    record("prefill/padding_is_zero", float(max(np.abs(keys_o[:, row, :, n:]).max(initial=0.0)
                                                for row, n in enumerate(lengths))))

    mismatches = 0
    tok_t = logits_t.argmax(-1)
    tok_o = torch.from_numpy(logits_o).argmax(-1).to(device)
    mismatches += int((tok_t != tok_o).sum())
    past_lengths = lens.clone()
    for _ in range(steps):
        hidden_t = lm.model(lm.embed(tok_t)[:, None], cache)
        logits_t = lm.lm_head(hidden_t[:, 0]).float()
        logits_o, hidden_o, keys_o, values_o = run_step(step, step_kv, _np(lm.embed(tok_o)[:, None]).astype(ndt),
                                                        keys_o, values_o, _np(past_lengths))
        past_lengths = past_lengths + 1
        record("step/logits", _max_diff(logits_o, _np(logits_t)))
        record("step/hidden", _max_diff(hidden_o, _np(hidden_t)))
        cache_diff("step", cache, keys_o, values_o, past_lengths.tolist())
        tok_t = logits_t.argmax(-1)
        tok_o = torch.from_numpy(logits_o).argmax(-1).to(device)
        mismatches += int((tok_t != tok_o).sum())
    diffs["greedy_mismatches"] = float(mismatches)

    # 2. larger batch and longer cache than the tracing example (dynamic axes)
    L, K, d = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    past_k = torch.randn(L, big_batch, K, big_past, d, generator=gen).to(device=device, dtype=dtype)
    past_v = torch.randn(L, big_batch, K, big_past, d, generator=gen).to(device=device, dtype=dtype)
    past_len = torch.randint(0, big_past + 1, (big_batch,), generator=gen).to(device)
    past_len[0] = big_past  # one row exactly full
    cache = lm.model.new_cache(big_batch, capacity=big_past + 1)
    for layer in range(L):
        cache.k[layer][:, :, :big_past] = past_k[layer]
        cache.v[layer][:, :, :big_past] = past_v[layer]
    cache.lengths = past_len.clone()
    x = lm.embed(torch.randint(0, cfg.vocab_size, (big_batch,), generator=gen).to(device))[:, None]
    hidden_t = lm.model(x, cache)
    logits_t = lm.lm_head(hidden_t[:, 0]).float()
    logits_o, hidden_o, keys_o, values_o = run_step(step, step_kv, _np(x).astype(ndt), _np(past_k), _np(past_v),
                                                    _np(past_len))
    if keys_o.shape[3] != big_past + 1:
        raise AssertionError(f"step present_keys has {keys_o.shape[3]} positions, expected {big_past + 1}")
    record("dynamic/logits", _max_diff(logits_o, _np(logits_t)))
    record("dynamic/hidden", _max_diff(hidden_o, _np(hidden_t)))
    cache_diff("dynamic", cache, keys_o, values_o, (past_len + 1).tolist())
    return diffs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m funchat.engines.onnx_export",
                                     description="Export the shared LLM to ONNX (prefill + step graphs with an explicit KV cache).")
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="output directory for the .onnx files and llm_onnx.json")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    parser.add_argument("--opset", type=int, default=OPSET)
    parser.add_argument("--external-data", choices=["auto", "yes", "no"], default="auto",
                        help="weights in one shared llm_weights.bin (auto: above 1 GiB)")
    parser.add_argument("--step-kv", choices=STEP_KV_MODES, default="present",
                        help="present: the step returns the cache with the new entry (S+1 positions); "
                             "new: only the new entry [L, B, K, 1, d]")
    parser.add_argument("--softmax-in-model-dtype", action="store_true",
                        help="attention softmax in the model dtype instead of float32")
    parser.add_argument("--check", action="store_true", help="compare onnxruntime (CPU) against torch afterwards")
    args = parser.parse_args(argv)

    from funchat.errors import FunchatError
    from funchat.model.checkpoint import load_model

    try:
        model = load_model(args.checkpoint, dtype=args.dtype)
    except FunchatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    external = {"auto": None, "yes": True, "no": False}[args.external_data]
    paths = export_llm(model, args.out, dtype=args.dtype, opset=args.opset, external_data=external,
                       step_kv=args.step_kv, fp32_softmax=not args.softmax_in_model_dtype)
    for name, path in paths.items():
        print(f"{name:8s} {path}  ({path.stat().st_size / 1e6:.1f} MB)")
    if args.check:
        diffs = check_with_onnxruntime(model, args.out)
        width = max(len(k) for k in diffs)
        for key, value in diffs.items():
            print(f"{key:{width}s}  {value:.3g}")
        if diffs["greedy_mismatches"]:
            print("error: greedy tokens differ between torch and onnxruntime", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
