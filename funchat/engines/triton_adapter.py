"""What every Triton `model.py` adapter shares: parameters, reading inputs, errors, metrics, batching.

Free of Triton imports: a `model.py` passes in its `triton_python_backend_utils` module (`pb_utils`),
so this module is importable and unit-testable anywhere. An adapter is then three steps:

    params = ServiceParams.from_args(args, "llm")           # initialize(): config parameters
    io = TritonIO(pb_utils, "llm")
    responses = io.answer_batch(requests, parse, engine.run, outputs, metrics, kind)   # execute()

Parameters. Each config.pbtxt `parameters { key: ... value: { string_value: ... } }` entry is read
with one default, defined next to the code that uses it (common ones here; `max_sequences` and
`idle_timeout_s` in funchat.engines.slot_pool; the llm's engine choice in
funchat.engines.llm_engines). A relative path (`checkpoint`, `tensorrt_plans`) is taken from the
tritonserver process's working directory, never from where the source checkout is; the dev
launcher (`python -m funchat.dev.tritonserver`) writes absolute ones.

Errors. A request's problem answers that request alone, with a status: a SequenceError carries
its own (NOT_FOUND for an unknown call, UNAVAILABLE for a full pool, ...); an input problem
(InputError, any FunchatError, a ValueError while parsing) is INVALID_ARG; anything else raised
while running the batch is INTERNAL and logged.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from funchat.errors import FunchatError
from funchat.turn.sampling import GREEDY, SamplingParams

DEFAULT_CHECKPOINT = "checkpoints/tiny"
DEFAULT_DEVICE = "cpu"
DEFAULT_DTYPE = "float32"
DEFAULT_THREADS = 0  # torch's own default


class InputError(FunchatError):
    """A request input that is missing, of the wrong size or out of range; answered INVALID_ARG."""


# ---- parameters ----

@dataclass(frozen=True)
class ServiceParams:
    """One model instance's config parameters, as Triton gives them to `initialize(args)`."""

    service: str
    values: Mapping[str, str]  # every `parameters` entry as written ("" when empty)
    instance_kind: str = "CPU"  # KIND_GPU instances: "GPU"
    instance_device_id: int = 0
    max_batch_size: int = 0  # config `max_batch_size`: the largest batch Triton hands execute()

    @classmethod
    def from_args(cls, args: Mapping[str, Any], service: str) -> "ServiceParams":
        config = json.loads(args["model_config"])
        values = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        return cls(service, values, str(args.get("model_instance_kind") or "CPU"),
                   int(args.get("model_instance_device_id") or 0), int(config.get("max_batch_size") or 0))

    def text(self, key: str, default: str) -> str:
        return (self.values.get(key) or "").strip() or default

    def integer(self, key: str, default: int, minimum: int = 0) -> int:
        raw = self.text(key, str(default))
        try:
            value = int(raw)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise ValueError(f"{self.service} parameter {key}={raw!r} is not accepted: use an integer >= {minimum}")
        return value

    def number(self, key: str, default: float) -> float:
        raw = self.text(key, str(default))
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{self.service} parameter {key}={raw!r} is not accepted: use a positive number")
        return value

    def path(self, key: str, default: str) -> Path:
        """An absolute path; a relative one is taken from the tritonserver process's working directory."""
        return Path(self.text(key, default)).absolute()

    @property
    def checkpoint(self) -> Path:
        return self.path("checkpoint", DEFAULT_CHECKPOINT)

    @property
    def device(self) -> str:
        """The `device` parameter for this instance: "cuda" on a KIND_GPU instance becomes the
        instance's own GPU (cuda:<model_instance_device_id>)."""
        name = self.text("device", DEFAULT_DEVICE)
        if name == "cuda" and self.instance_kind == "GPU":
            return f"cuda:{self.instance_device_id}"
        return name

    @property
    def dtype(self) -> str:
        return self.text("dtype", DEFAULT_DTYPE)

    def apply_threads(self) -> None:
        """The `threads` parameter (torch intra-op threads; 0 = torch's default). On small CPU
        machines running several services, 1 keeps the services from fighting over the cores."""
        threads = self.integer("threads", DEFAULT_THREADS)
        if threads > 0:
            import torch
            torch.set_num_threads(threads)


# ---- requests and responses ----

SAMPLING_INPUTS = {"greedy": "GREEDY", "temperature": "TEMPERATURE", "top_p": "TOP_P", "top_k": "TOP_K",
                   "repetition_penalty": "REPETITION_PENALTY"}  # SamplingParams field -> request input


class TritonIO:
    """Reads a model's requests and writes its responses through `pb_utils`."""

    def __init__(self, pb_utils, model: str):
        self.pb = pb_utils
        self.model = model

    # -- inputs --

    def optional(self, request, name: str) -> np.ndarray | None:
        tensor = self.pb.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()

    def required(self, request, name: str) -> np.ndarray:
        value = self.optional(request, name)
        if value is None:
            raise InputError(f"input {name} is missing")
        return value

    def scalar(self, request, name: str, default: Any = None) -> Any:
        """A one-value input ([1] or [1, 1]) as a Python number or bool; `default` when absent."""
        value = self.optional(request, name)
        if value is None:
            return default
        if value.size != 1:
            raise InputError(f"{name} must hold one value, got {value.size}")
        return value.reshape(-1)[0].item()

    def raw_bytes(self, request, name: str) -> bytes:
        """A one-value BYTES input as bytes (b"" when absent)."""
        value = self.optional(request, name)
        if value is None:
            return b""
        if value.size != 1:
            raise InputError(f"{name} must hold one value, got {value.size}")
        raw = value.reshape(-1)[0]
        return raw if isinstance(raw, bytes) else bytes(raw)

    def text(self, request, name: str) -> str | None:
        """A one-value BYTES input as utf-8 text (None when absent or empty)."""
        raw = self.raw_bytes(request, name)
        try:
            return raw.decode("utf-8") or None
        except UnicodeDecodeError:
            raise InputError(f"{name} is not utf-8 text") from None

    def sequence(self, request) -> tuple[int, bool, bool]:
        """The sequence controls Triton sets: (correlation id, start, end)."""
        return (int(self.scalar(request, "CORRID", 0)), bool(self.scalar(request, "START", 0)),
                bool(self.scalar(request, "END", 0)))

    def sampling(self, request) -> tuple[SamplingParams, int]:
        """The optional START inputs GREEDY, TEMPERATURE, TOP_P, TOP_K, REPETITION_PENALTY, SEED ->
        (settings, seed). Absent GREEDY (or true) is argmax; absent values take SamplingParams'."""
        seed = int(self.scalar(request, "SEED", 0))
        if self.scalar(request, "GREEDY", True):
            return GREEDY, seed
        given = {}
        for field, name in SAMPLING_INPUTS.items():
            value = self.scalar(request, name)
            if value is None or field == "greedy":
                continue
            if not math.isfinite(value):
                raise InputError(f"{name} is {value}: send a finite number")
            given[field] = value
        try:
            return SamplingParams(greedy=False, **given), seed
        except ValueError as exc:  # its message starts with the field's name
            field = next((f for f in SAMPLING_INPUTS if str(exc).startswith(f + " ")), "")
            raise InputError(f"{SAMPLING_INPUTS.get(field, 'sampling input')}: {exc}") from None

    def requested(self, request) -> set[str] | None:
        """The output names the client asked for, or None when it asked for all (named none)."""
        names = request.requested_output_names() if hasattr(request, "requested_output_names") else None
        return set(names) if names else None

    # -- responses --

    def response(self, outputs: Mapping[str, np.ndarray]):
        return self.pb.InferenceResponse(output_tensors=[self.pb.Tensor(name, np.ascontiguousarray(array))
                                                         for name, array in outputs.items()])

    def error(self, exc: BaseException, internal: bool = False):
        """exc as an error response: SequenceError -> its status; input problems -> INVALID_ARG;
        internal=True (a failure while running) -> INTERNAL."""
        codes = self.pb.TritonError
        if internal:
            code, message = codes.INTERNAL, f"{self.model} failed: {type(exc).__name__}: {exc}"
        else:
            code, message = getattr(codes, getattr(exc, "status", "INVALID_ARG"), codes.INVALID_ARG), str(exc)
        return self.pb.InferenceResponse(output_tensors=[], error=self.pb.TritonError(message, code))

    def log_error(self, exc: BaseException) -> None:
        self.pb.Logger.log_error(f"{self.model}: {type(exc).__name__}: {exc}")

    # -- the two execute() shapes --

    def answer_batch(self, requests: list, parse: Callable[[Any], Any], run: Callable[[list], list],
                     outputs: Callable[[Any, Any], Mapping[str, np.ndarray]], metrics: "ServiceMetrics",
                     kind: Callable[[list], str]) -> list:
        """Parse every request on its own (a bad one is answered alone), run the parsed ones as one
        batch (`run(items)` -> one result per item, an exception instance for an item that failed),
        and answer each with `outputs(request, result)`. Timed under metrics kind `kind(items)`."""
        responses: list = [None] * len(requests)
        items, where = [], []
        for i, request in enumerate(requests):
            try:
                items.append(parse(request))
                where.append(i)
            except Exception as exc:  # a malformed request
                responses[i] = self.error(exc)
        if not items:
            return responses
        try:
            with metrics.timed(kind(items), len(items)):
                results = run(items)
        except Exception as exc:  # a bug or the device: fail these requests, keep serving
            self.log_error(exc)
            return [r if r is not None else self.error(exc, internal=True) for r in responses]
        for i, result in zip(where, results):
            try:
                responses[i] = self.error(result) if isinstance(result, Exception) else \
                    self.response(outputs(requests[i], result))
            except Exception as exc:
                self.log_error(exc)
                responses[i] = self.error(exc, internal=True)
        return responses

    def answer_each(self, requests: list, handle: Callable[[Any], Mapping[str, np.ndarray]],
                    metrics: "ServiceMetrics", kind: str) -> list:
        """One request at a time: `handle(request)` -> its outputs. An input problem (FunchatError)
        answers INVALID_ARG, any other failure INTERNAL; the others are still served."""
        responses = []
        with metrics.timed(kind, len(requests)):
            for request in requests:
                try:
                    responses.append(self.response(handle(request)))
                except FunchatError as exc:
                    responses.append(self.error(exc))
                except Exception as exc:
                    self.log_error(exc)
                    responses.append(self.error(exc, internal=True))
        return responses


# ---- metrics ----

LATENCY_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64]


class ServiceMetrics:
    """Per-model Prometheus metrics on Triton's metrics port, named funchat_<service>_<thing>_<unit>:
    forward latency (one histogram per kind, e.g. prefill / step), batch size (histogram), and for
    the stateful services the live calls (gauge)."""

    def __init__(self, pb_utils, service: str, kinds: tuple[str, ...] = ("prefill", "step"), stateful: bool = True):
        histogram = pb_utils.MetricFamily.HISTOGRAM
        self._latency_family = pb_utils.MetricFamily(
            name=f"funchat_{service}_forward_seconds", description=f"{service}: seconds per batched forward",
            kind=histogram)
        self._batch_family = pb_utils.MetricFamily(
            name=f"funchat_{service}_batch_size", description=f"{service}: calls batched into one execute",
            kind=histogram)
        self.latency = {kind: self._latency_family.Metric(labels={"kind": kind}, buckets=LATENCY_BUCKETS)
                        for kind in kinds}
        self.batch = self._batch_family.Metric(labels={}, buckets=BATCH_BUCKETS)
        self.live = None
        if stateful:
            self._live_family = pb_utils.MetricFamily(
                name=f"funchat_{service}_live_sequences", description=f"{service}: calls holding a KV cache row",
                kind=pb_utils.MetricFamily.GAUGE)
            self.live = self._live_family.Metric(labels={})

    @contextmanager
    def timed(self, kind: str, requests: int) -> Iterator[None]:
        """Time one execute()'s work of `kind` and record its batch size."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.latency[kind].observe(time.perf_counter() - t0)
            self.batch.observe(requests)

    def set_live(self, calls: int) -> None:
        if self.live is not None:
            self.live.set(calls)
