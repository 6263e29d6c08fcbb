"""The llm service's engines, chosen by the Triton model parameter `engine`.

- `torch` (default): `LlmEngine` (funchat.engines.llm). Prefills run eagerly. On a CUDA
  device the single-token steps run through a `CudaGraphStepRunner`: one fixed-shape step function
  per (batch size bucket, context bucket), captured once as a CUDA graph and replayed. With
  `cuda_graphs` = "false" the same fixed-shape function runs without capture (any device; this is
  how its numerics are tested on CPU). On CPU with `cuda_graphs` = "auto" the engine is the eager
  one, unchanged.
- `tensorrt`: `TensorRtLlmEngine` runs the prefill and step plans that
  services/tensorrt/build_engines.sh builds from funchat.engines.onnx_export's graphs, through the
  TensorRT Python runtime. Unverified here (no TensorRT, no GPU): see services/tensorrt/README.md.

Shapes: B calls in a batch, N bucket rows (B real + padding), T new positions, S attended cache
positions, C cache capacity (max_context), E LLM width, V vocabulary, L layers, K kv heads,
H query heads, d head dim, R cache rows (max_sequences, + 1 scratch row for the runner).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
from safetensors import safe_open
from torch import nn

from funchat.errors import CheckpointError
from funchat.model.checkpoint import load_model, tensor_index
from funchat.model.config import FunAudioChatConfig
from funchat.model.qwen3 import KVCache
from funchat.engines.fixed_steps import (CUDA_GRAPHS, FixedShapeSteps, batch_buckets,  # noqa: F401
                                        check_cuda_graphs, context_buckets, decode_position)
from funchat.engines.llm import LlmEngine
from funchat.engines.slot_pool import DEFAULT_IDLE_TIMEOUT_S, DEFAULT_KEEP_TIMEOUT_S, DEFAULT_MAX_SEQUENCES, SlotPool
from funchat.engines.triton_adapter import ServiceParams
from funchat.turn.prompt import CONTEXT_TOKENS

ENGINES = ("torch", "tensorrt")
DEFAULT_MAX_CONTEXT = CONTEXT_TOKENS  # the reference's context (prompt + reply)
DEFAULT_TENSORRT_PLANS = "build/llm_trt"  # build_engines.sh --out (services/tensorrt/README.md), from the server's cwd

TENSORRT_HELP = ("engine=tensorrt needs NVIDIA's Triton image with TensorRT; "
                 "plans from services/tensorrt/build_engines.sh")
# build_engines.sh's default model names; each folder holds 1/model.plan
PREFILL_MODEL, STEP_MODEL = "llm_trt_prefill", "llm_trt_step"


class EngineUnavailableError(RuntimeError):
    """The requested engine cannot run here (missing package, plans or device); the message says why."""


# ---- parameters ----

@dataclass(frozen=True)
class LlmEngineSettings:
    """The llm service's engine parameters (config.pbtxt `parameters`), validated."""

    engine: str = "torch"
    cuda_graphs: str = "auto"
    max_context: int = DEFAULT_MAX_CONTEXT
    tensorrt_plans: str = DEFAULT_TENSORRT_PLANS

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> "LlmEngineSettings":
        """ValueError names the parameter and its accepted values; checked before any weight is read."""
        engine = (params.get("engine") or "torch").strip().lower()
        if engine not in ENGINES:
            raise ValueError(f"llm parameter engine={params.get('engine')!r} is not accepted: "
                             f"use one of {', '.join(ENGINES)}")
        graphs = check_cuda_graphs("llm", params.get("cuda_graphs") or "auto")
        raw = (params.get("max_context") or str(DEFAULT_MAX_CONTEXT)).strip()
        max_context = int(raw) if raw.isdigit() else 0
        if max_context < 1:
            raise ValueError(f"llm parameter max_context={raw!r} is not accepted: use a positive number of positions")
        return cls(engine, graphs, max_context, params.get("tensorrt_plans") or DEFAULT_TENSORRT_PLANS)


# ---- torch: fixed-shape steps, optionally as CUDA graphs ----

class CudaGraphStepRunner(FixedShapeSteps):
    """Single-token steps of the shared LLM on fixed shapes (FixedShapeSteps), optionally as CUDA graphs."""

    def step(self, embeds: torch.Tensor, rows: list[int], positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """embeds [B, 1, E], each call's cache row and cached length -> (hidden [B, 1, E], logits [B, V] float32).
        Writes each row's new key/value at its position and sets its length to position + 1."""
        hidden, logits = self._in_pieces(embeds, rows, positions)
        return hidden, logits

    def _static_step(self, n: int, context: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (hidden [n, 1, E], logits [n, V] float32) of the first n buffer rows."""
        lm = self.model.language_model.model
        hidden = decode_position(lm, self.x_buf[:n], self.rows_buf[:n], self.pos_buf[:n], self.cache,
                                 self.key_index, context)  # [n, 1, E]
        logits = self.model.language_model.lm_head(hidden[:, 0]).float()  # [n, V]
        return hidden, logits


# ---- tensorrt: the plans of services/tensorrt/build_engines.sh ----

def tensorrt_plan_paths(plans_dir: str | Path) -> tuple[Path, Path]:
    """(prefill plan, step plan) inside build_engines.sh's output folder."""
    root = Path(plans_dir)
    return root / PREFILL_MODEL / "1" / "model.plan", root / STEP_MODEL / "1" / "model.plan"


class TrtPlan:
    """One deserialized TensorRT plan and an execution context (TensorRT 10 name-based I/O API)."""

    TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16,
                    "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool}

    def __init__(self, trt, path: Path, device: torch.device):
        self.path = path
        self.device = device
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)  # must outlive the engine
        with torch.cuda.device(device):
            self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise EngineUnavailableError(f"{TENSORRT_HELP}: {path} could not be deserialized (built by another "
                                         f"TensorRT version or for another GPU? TensorRT's log above says)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [name for name in names if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT]
        self.outputs = [name for name in names if name not in self.inputs]
        self.dtypes = {name: self.TORCH_DTYPES[self.engine.get_tensor_dtype(name).name] for name in names}

    def profile_max(self, name: str) -> tuple[int, ...]:
        """The largest shape of input `name` the plan's (first) optimization profile accepts."""
        return tuple(self.engine.get_tensor_profile_shape(name, 0)[2])

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inputs by name (cast to the plan's types) -> outputs by name, on the current torch stream."""
        with torch.cuda.device(self.device):
            keep = {}  # the inputs as bound, alive until the plan ran (same stream, so freeing later is safe)
            for name in self.inputs:
                tensor = feeds[name].to(device=self.device, dtype=self.dtypes[name]).contiguous()
                keep[name] = tensor
                if not self.context.set_input_shape(name, tuple(tensor.shape)):
                    raise RuntimeError(f"{self.path}: input {name} of shape {list(tensor.shape)} is outside the "
                                       f"plan's profile (max {list(self.profile_max(name))})")
                self.context.set_tensor_address(name, tensor.data_ptr())
            outputs = {}
            for name in self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
                self.context.set_tensor_address(name, outputs[name].data_ptr())
            if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
                raise RuntimeError(f"{self.path}: TensorRT execution failed (see TensorRT's log)")
            return outputs


def _load_text_embeddings(checkpoint: Path, cfg: FunAudioChatConfig, dtype: torch.dtype,
                          device: torch.device) -> nn.Embedding:
    """Only `language_model.model.embed_tokens` of the LLM: the plans hold the rest of its weights."""
    name = "language_model.model.embed_tokens.weight"
    stored = tensor_index(checkpoint)
    expected = (cfg.text.vocab_size, cfg.text.hidden_size)
    if name not in stored or tuple(stored[name][1]) != expected:
        got = list(stored[name][1]) if name in stored else "missing"
        raise CheckpointError(f"{checkpoint}: tensor {name} is {got}, the config implies {list(expected)}")
    with safe_open(str(stored[name][0]), framework="pt", device="cpu") as handle:
        weight = handle.get_tensor(name)
    return nn.Embedding.from_pretrained(weight.to(device=device, dtype=dtype), freeze=True)


class TensorRtLlmEngine(LlmEngine):
    """LlmEngine whose forwards are TensorRT plans (prefill, step); request checks, embeddings,
    slots and the KV cache buffer stay in torch.

    The cache is one buffer per keys/values in the plans' layout [L, R, K, C, d] (zeros, so masked
    positions stay finite); the SlotPool's per-layer views point into it. A prefill writes
    present[:, b, :, :T] at the start of the row; a step passes the rows' first S = max(length)
    positions and writes back either present[..., :S+1] (step_kv "present") or the new column at
    each row's length (step_kv "new"). Batches above a plan's profile maximum run in pieces.
    Unverified here: see services/tensorrt/README.md.
    """

    def __init__(self, checkpoint: str | Path, plans_dir: str | Path, device: str | torch.device = "cuda",
                 max_sequences: int = DEFAULT_MAX_SEQUENCES, idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
                 max_context: int = DEFAULT_MAX_CONTEXT,
                 clock: Callable[[], float] = time.monotonic, plans: tuple | None = None):
        """plans: (prefill, step) stand-ins with TrtPlan's interface (inputs, outputs, dtypes,
        profile_max, run) instead of the plan files; the tests pass the ONNX graphs run by onnxruntime."""
        device = torch.device(device)
        if plans is None:
            # Everything that can be missing is reported at once, before any weight is read.
            paths = tensorrt_plan_paths(plans_dir)
            problems = [f"{p} not found" for p in paths if not p.is_file()]
            try:
                import tensorrt as trt
            except ImportError as exc:
                trt = None
                problems.append(f"the tensorrt Python package cannot be imported ({exc})")
            if device.type != "cuda" or not torch.cuda.is_available():
                problems.append(f"TensorRT plans run on a CUDA device; device is {device}"
                                + ("" if torch.cuda.is_available() else " and no CUDA device is visible"))
            if problems:
                raise EngineUnavailableError(f"{TENSORRT_HELP}: " + "; ".join(problems))
            plans = (TrtPlan(trt, paths[0], device), TrtPlan(trt, paths[1], device))

        self.device = device
        self.plans_dir = Path(plans_dir)
        self.prefill_plan, self.step_plan = plans
        self.new_kv_only = "new_keys" in self.step_plan.outputs  # exported with --step-kv new
        prefill_max = self.prefill_plan.profile_max("inputs_embeds")  # [B, T, E]
        step_max = self.step_plan.profile_max("past_keys")  # [L, B, K, S, d]
        if max_context > prefill_max[1] or max_context - 1 > step_max[3]:
            raise EngineUnavailableError(
                f"max_context {max_context} does not fit the plans' profiles (prefill up to {prefill_max[1]} "
                f"positions, step up to {step_max[3]} cached): rebuild with larger --seq/--past or lower max_context")
        self.prefill_batch, self.step_batch = prefill_max[0], step_max[1]

        dtype = self.step_plan.dtypes["inputs_embeds"]
        checkpoint = Path(checkpoint)
        # Torch holds only what runs outside the plans: the text embedding table and audio_tower
        # (speech-group fusion); the rest of the LLM stays on the meta device.
        model = load_model(checkpoint, dtype=dtype, device=device, prefixes=("audio_tower",))
        model.language_model.model.embed_tokens = _load_text_embeddings(checkpoint, model.cfg, dtype, device)
        self.model = model
        self.step_runner = None
        self.max_context = max_context
        cfg = model.cfg.text
        cache_dtype = self.step_plan.dtypes["past_keys"]
        shape = (cfg.num_hidden_layers, max_sequences, cfg.num_key_value_heads, max_context, cfg.head_dim)
        self.keys = torch.zeros(shape, dtype=cache_dtype, device=device)  # [L, R, K, C, d]
        self.values = torch.zeros(shape, dtype=cache_dtype, device=device)
        self.pool = SlotPool(self._new_cache, max_sequences, idle_timeout_s, max_context, clock)

    def _new_cache(self, rows: int, capacity: int) -> KVCache:
        """The SlotPool's cache: per-layer views [R, K, C, d] of the plans' buffers, and the lengths."""
        cache = KVCache.__new__(KVCache)
        cache.k = list(self.keys.unbind(0))
        cache.v = list(self.values.unbind(0))
        cache.lengths = torch.zeros(rows, dtype=torch.long, device=self.device)  # [R]
        return cache

    def _forward(self, is_prefill: bool, embeds: torch.Tensor, lengths: torch.Tensor,
                 rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        run = self._prefill if is_prefill else self._step
        size = self.prefill_batch if is_prefill else self.step_batch
        hidden, logits = [], []
        with self.pool.lock:
            for start in range(0, len(rows), size):
                end = start + size
                h, lg = run(embeds[start:end], lengths[start:end], rows[start:end])
                hidden.append(h)
                logits.append(lg)
        return torch.cat(hidden), torch.cat(logits)

    def _prefill(self, embeds: torch.Tensor, lengths: torch.Tensor, rows: list[int]):
        out = self.prefill_plan.run({"inputs_embeds": embeds, "lengths": lengths})  # embeds [B, T, E], lengths [B]
        t = embeds.shape[1]
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.keys[:, idx, :, :t] = out["present_keys"]  # [L, B, K, T, d], zero past each row's length
        self.values[:, idx, :, :t] = out["present_values"]
        self.pool.cache.lengths[idx] = lengths
        return out["hidden"], out["logits_last"]  # [B, T, E], [B, V]

    def _step(self, embeds: torch.Tensor, lengths: torch.Tensor, rows: list[int]):
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        past = self.pool.cache.lengths[idx]  # [B] cached positions per row (>= 1: every call was prefilled)
        s = int(past.max())  # the rows' first S positions; shorter rows are masked by past_lengths
        out = self.step_plan.run({"inputs_embeds": embeds,  # [B, 1, E]
                                  "past_keys": self.keys[:, idx, :, :s],  # [L, B, K, S, d]
                                  "past_values": self.values[:, idx, :, :s],
                                  "past_lengths": past})
        if self.new_kv_only:
            # (row, position) pairs select [B, L, K, d] (advanced indices go first): new_keys [L, B, K, 1, d] transposed
            self.keys[:, idx, :, past] = out["new_keys"][:, :, :, 0].transpose(0, 1)
            self.values[:, idx, :, past] = out["new_values"][:, :, :, 0].transpose(0, 1)
        else:
            # present [L, B, K, S+1, d]: the new entry sits at each row's length (S < C by max_context)
            self.keys[:, idx, :, :s + 1] = out["present_keys"]
            self.values[:, idx, :, :s + 1] = out["present_values"]
        self.pool.cache.lengths[idx] = past + 1
        return out["hidden"], out["logits"]  # [B, 1, E], [B, V]

    def describe(self) -> str:
        return (f"TensorRT plans {self.plans_dir}, step_kv "
                f"{'new' if self.new_kv_only else 'present'}, max_context {self.max_context}")


# ---- building the engine from the service's parameters ----

def build_llm_engine(settings: LlmEngineSettings, checkpoint: str | Path, device: str = "cpu",
                     dtype: str = "float32", max_sequences: int = DEFAULT_MAX_SEQUENCES,
                     idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S, max_batch: int = 16,
                     plans_dir: str | Path | None = None) -> LlmEngine:
    """The llm service's engine for these settings (see the module docstring).
    max_batch: the largest batch of requests Triton hands the model (config `max_batch_size`)."""
    on_cuda = torch.device(device).type == "cuda"
    if settings.engine == "tensorrt":
        return TensorRtLlmEngine(checkpoint, plans_dir or settings.tensorrt_plans, device, max_sequences,
                                 idle_timeout_s, settings.max_context)
    if settings.cuda_graphs == "true" and not on_cuda:
        raise ValueError(f"llm parameter cuda_graphs=true needs device cuda, got {device!r}: use auto or false")
    model = load_model(checkpoint, dtype=dtype, device=device)
    if settings.cuda_graphs == "auto" and not on_cuda:
        return LlmEngine(model, max_sequences, idle_timeout_s, capacity=settings.max_context)  # eager
    runner = CudaGraphStepRunner(model, max_batch, use_graphs=settings.cuda_graphs != "false")
    engine = LlmEngine(model, max_sequences, idle_timeout_s, capacity=settings.max_context, step_runner=runner)
    runner.capture_all()  # at load, not during the first calls (nothing to do without graphs)
    return engine


def describe_engine(engine: LlmEngine) -> str:
    """One line for the service's log."""
    if isinstance(engine, TensorRtLlmEngine):
        return engine.describe()
    if engine.step_runner is not None:
        return f"torch on {engine.device}, steps with {engine.step_runner.describe()}"
    return f"torch on {engine.device}, eager"


def load_llm_engine(params: ServiceParams) -> LlmEngine:
    """The llm service's engine from its config parameters: `engine`, `cuda_graphs`, `max_context`,
    `tensorrt_plans` (LlmEngineSettings), `checkpoint`, `device`, `dtype`, `threads`,
    `max_sequences`, `idle_timeout_s`, `keep_timeout_s`. Bad values raise ValueError before any
    weight is read."""
    settings = LlmEngineSettings.from_params(params.values)
    max_sequences = params.integer("max_sequences", DEFAULT_MAX_SEQUENCES, minimum=1)
    idle_timeout_s = params.number("idle_timeout_s", DEFAULT_IDLE_TIMEOUT_S)
    keep_timeout_s = params.number("keep_timeout_s", DEFAULT_KEEP_TIMEOUT_S)
    params.apply_threads()
    engine = build_llm_engine(settings, params.checkpoint, device=params.device, dtype=params.dtype,
                              max_sequences=max_sequences, idle_timeout_s=idle_timeout_s,
                              max_batch=max(1, params.max_batch_size),
                              plans_dir=params.path("tensorrt_plans", settings.tensorrt_plans))
    engine.pool.keep_timeout_s = keep_timeout_s
    return engine
