"""What every Triton `model.py` adapter shares: parameters, reading inputs, errors, metrics, batching.

Free of Triton imports: a `model.py` passes in its `triton_python_backend_utils` module (`pb_utils`),
so this module is importable and unit-testable anywhere. An adapter is then three steps:

    start_tracing("llm")                                    # initialize(): FUNCHAT_TRACING_* settings
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
its own (NOT_FOUND for an unknown call, UNAVAILABLE for a full pool, INTERNAL and logged for a
forward that failed: the stateful engines run a failed batch's requests again one by one, so only
the request that fails on its own is answered so, and its sequence is ended, its KV slot freed);
an input problem (InputError, any FunchatError, a ValueError while parsing) is INVALID_ARG;
anything else raised while running the batch is INTERNAL and logged.

Tracing. `start_tracing(service)` in initialize() traces the model instance as funchat-<service>
when FUNCHAT_TRACING_ENDPOINT is set (a bad FUNCHAT_TRACING_* setting fails the load, naming the
variable); it records only what the orchestrator sampled. A request whose Triton parameters carry
a sampled `traceparent` (the orchestrator sends one with an encode, a sequence's start and every
vocoder push) gets one SERVER span, a child of the caller's, named "<model> <kind>": for a
sequence request "prefill" at its START and "step" after, else the execute's kind ("encode",
"chunk"). Its attributes: funchat.model, funchat.kind, funchat.batch_size (the requests run
together), funchat.correlation_id (sequences) and, for a request answered with an error,
funchat.status (the Triton code: INVALID_ARG, NOT_FOUND, INTERNAL, ...) with the span's status
ERROR. It covers the execute() that answered the request (answer_each: that request's own
handling). Requests without a traceparent cost nothing: parameters are read only while tracing
is on, and a malformed one is ignored, never failing its request.
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

from funchat import tracing
from funchat.errors import FunchatError
from funchat.turn.sampling import GREEDY, SamplingParams

DEFAULT_CHECKPOINT = "checkpoints/tiny"
DEFAULT_DEVICE = "cpu"
DEFAULT_DTYPE = "float32"
DEFAULT_THREADS = 0  # torch's own default


class InputError(FunchatError):
    """A request input that is missing, of the wrong size or out of range; answered INVALID_ARG."""


class RequestCancelled(Exception):
    """A request its caller gave up on (its deadline passed or it hung up) before it ran. It is
    answered CANCELLED and not run: under overload, work nobody waits for any more would otherwise
    keep the service busy and its queue growing."""

    status = "CANCELLED"

    def __init__(self, model: str):
        super().__init__(f"{model}: the caller cancelled this request (or its deadline passed) before it ran; "
                         f"it was not run")


def cancelled(request) -> bool:
    """Whether Triton marked the request cancelled (Python backend 23.10+: request.is_cancelled());
    False where that cannot be asked."""
    try:
        return bool(request.is_cancelled())
    except Exception:  # an older backend, or a request object without it
        return False


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


# ---- tracing ----

def start_tracing(service: str) -> bool:
    """initialize(): trace this model instance (its own process) as funchat-<service> when
    FUNCHAT_TRACING_ENDPOINT is set, joining only traces the orchestrator sampled and sent. Raises
    TracingConfigError naming the variable, so a misconfigured service fails at load, not later."""
    return tracing.configure_from_env(f"funchat-{service}", record_new_traces=False)


def stop_tracing() -> None:
    """finalize(): send the spans still queued (bounded by tracing.EXPORT_TIMEOUT_S)."""
    tracing.shutdown()


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

    def status(self, exc: BaseException, internal: bool = False) -> str:
        """The name of exc's Triton code: SequenceError -> its status; input problems ->
        INVALID_ARG; internal=True (a failure while running) -> INTERNAL."""
        if internal:
            return "INTERNAL"
        name = getattr(exc, "status", "INVALID_ARG")
        return name if isinstance(name, str) and hasattr(self.pb.TritonError, name) else "INVALID_ARG"

    def error(self, exc: BaseException, internal: bool = False):
        """exc as an error response, with the code `status(exc, internal)` names."""
        message = f"{self.model} failed: {type(exc).__name__}: {exc}" if internal else str(exc)
        code = getattr(self.pb.TritonError, self.status(exc, internal))
        return self.pb.InferenceResponse(output_tensors=[], error=self.pb.TritonError(message, code))

    def log_error(self, exc: BaseException) -> None:
        self.pb.Logger.log_error(f"{self.model}: {type(exc).__name__}: {exc}")

    # -- tracing --

    def trace_parent(self, request) -> Any:
        """The caller's span context from the request's `traceparent` parameter (request.parameters()
        is a JSON object), or None: tracing off, no parameter, or a malformed one. Never raises: a
        bad trace header must not fail the request it came with."""
        if not tracing.enabled():
            return None
        try:
            raw = request.parameters()
            params = json.loads(raw) if raw else None
            return tracing.extract(params) if isinstance(params, dict) else None
        except Exception:
            return None

    def trace_parents(self, requests: list) -> dict[int, Any]:
        """{index: parent} of the requests that carry a traceparent; {} at once while tracing is off."""
        if not tracing.enabled():
            return {}
        parents = {}
        for i, request in enumerate(requests):
            parent = self.trace_parent(request)
            if parent is not None:
                parents[i] = parent
        return parents

    def record_trace(self, request, parent, kind: str, start_ns: int, end_ns: int, batch_size: int,
                     failure: tuple[BaseException, str] | None = None) -> None:
        """One SERVER span for a traced request: "<model> <kind>", a sequence request's kind taken
        from its own START (prefill / step) rather than from its batch's. failure: (exception,
        status name) when it was answered with an error. An unsampled parent records nothing."""
        try:
            attributes: dict[str, Any] = {"funchat.model": self.model, "funchat.batch_size": batch_size}
            if self.optional(request, "CORRID") is not None:  # a sequence model's request
                cid, start, _ = self.sequence(request)
                kind = "prefill" if start else "step"
                attributes["funchat.correlation_id"] = cid
            attributes["funchat.kind"] = kind
            error = None
            if failure is not None:
                error, attributes["funchat.status"] = failure
            tracing.record_span(f"{self.model} {kind}", start_ns, end_ns, parent, attributes,
                                kind=tracing.SpanKind.SERVER, error=error)
        except Exception as exc:  # tracing must not fail a request already answered
            self.log_error(exc)

    # -- the two execute() shapes --

    def answer_batch(self, requests: list, parse: Callable[[Any], Any], run: Callable[[list], list],
                     outputs: Callable[[Any, Any], Mapping[str, np.ndarray]], metrics: "ServiceMetrics",
                     kind: Callable[[list], str]) -> list:
        """Parse every request on its own (a bad one is answered alone), run the parsed ones as one
        batch (`run(items)` -> one result per item, an exception instance for an item that failed),
        and answer each with `outputs(request, result)`. Timed under metrics kind `kind(items)`; a
        traced request gets its span (`record_trace`), covering this whole execute()."""
        start_ns = time.time_ns()
        parents = self.trace_parents(requests)
        responses: list = [None] * len(requests)
        failures: dict[int, tuple[BaseException, str]] = {}  # index -> (exception, status) of an error answer

        def fail(i: int, exc: BaseException, internal: bool = False) -> None:
            responses[i] = self.error(exc, internal)
            failures[i] = (exc, self.status(exc, internal))

        items, where = [], []
        for i, request in enumerate(requests):
            if cancelled(request):
                fail(i, RequestCancelled(self.model))
                metrics.cancelled.increment(1)
                continue
            try:
                items.append(parse(request))
                where.append(i)
            except Exception as exc:  # a malformed request
                fail(i, exc)
        batch_kind = kind(items) if items else "refused"  # all refused: a traced one's span is "<model> refused"
        if items:
            try:
                with metrics.timed(batch_kind, len(items)):
                    results = run(items)
            except Exception as exc:  # a bug or the device: fail these requests, keep serving
                self.log_error(exc)
                for i in where:
                    fail(i, exc, internal=True)
            else:
                for i, result in zip(where, results):
                    try:
                        if isinstance(result, Exception):
                            if self.status(result) == "INTERNAL":  # the engine caught a failure of its own
                                self.log_error(result)
                            fail(i, result)
                        else:
                            responses[i] = self.response(outputs(requests[i], result))
                    except Exception as exc:
                        self.log_error(exc)
                        fail(i, exc, internal=True)
        if parents:
            end_ns = time.time_ns()
            for i, parent in parents.items():
                self.record_trace(requests[i], parent, batch_kind, start_ns, end_ns, len(items), failures.get(i))
        return responses

    def answer_each(self, requests: list, handle: Callable[[Any], Mapping[str, np.ndarray]],
                    metrics: "ServiceMetrics", kind: str) -> list:
        """One request at a time: `handle(request)` -> its outputs. An input problem (FunchatError)
        answers INVALID_ARG, any other failure INTERNAL; the others are still served. A traced
        request's span covers its own handling."""
        parents = self.trace_parents(requests)
        responses = []
        with metrics.timed(kind, len(requests)):
            for i, request in enumerate(requests):
                start_ns, failure = time.time_ns(), None
                try:
                    if cancelled(request):
                        metrics.cancelled.increment(1)
                        raise RequestCancelled(self.model)
                    responses.append(self.response(handle(request)))
                except RequestCancelled as exc:
                    responses.append(self.error(exc))
                    failure = (exc, self.status(exc))
                except FunchatError as exc:
                    responses.append(self.error(exc))
                    failure = (exc, self.status(exc))
                except Exception as exc:
                    self.log_error(exc)
                    responses.append(self.error(exc, internal=True))
                    failure = (exc, "INTERNAL")
                if i in parents:
                    self.record_trace(request, parents[i], kind, start_ns, time.time_ns(), len(requests), failure)
        return responses


# ---- metrics ----

LATENCY_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64]


class ServiceMetrics:
    """Per-model Prometheus metrics on Triton's metrics port, named funchat_<service>_<thing>_<unit>:
    forward latency (one histogram per kind, e.g. prefill / step), batch size (histogram), requests
    skipped because their caller had given up (counter), and for the stateful services the live
    calls (gauge)."""

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
        self._cancelled_family = pb_utils.MetricFamily(
            name=f"funchat_{service}_cancelled_requests_total",
            description=f"{service}: requests not run because their caller had given up (deadline or hang-up)",
            kind=pb_utils.MetricFamily.COUNTER)
        self.cancelled = self._cancelled_family.Metric(labels={})
        self.live = None
        if stateful:
            gauge = pb_utils.MetricFamily.GAUGE
            self._live_family = pb_utils.MetricFamily(
                name=f"funchat_{service}_live_sequences", description=f"{service}: calls holding a KV cache row",
                kind=gauge)
            self.live = self._live_family.Metric(labels={})
            self._kept_family = pb_utils.MetricFamily(
                name=f"funchat_{service}_kept_prefixes",
                description=f"{service}: conversations whose KV cache row is kept for their next turn", kind=gauge)
            self.kept = self._kept_family.Metric(labels={})
            self._events_family = pb_utils.MetricFamily(
                name=f"funchat_{service}_kept_prefix_events_total",
                description=f"{service}: kept prefixes reused (prefix_hits), gone when asked for (prefix_misses), "
                            f"evicted for a new call (kept_evicted), freed after keep_timeout_s (kept_expired)",
                kind=pb_utils.MetricFamily.COUNTER)
            self.events: dict[str, Any] = {}
            self._exported: dict[str, int] = {}

    @contextmanager
    def timed(self, kind: str, requests: int) -> Iterator[None]:
        """Time one execute()'s work of `kind` and record its batch size."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.latency[kind].observe(time.perf_counter() - t0)
            self.batch.observe(requests)

    def set_pool(self, pool) -> None:
        """A stateful service's `SlotPool` after an execute(): live calls and kept prefixes (gauges),
        and what the pool's cumulative counts added since the last call (counters)."""
        if self.live is None:
            return
        self.live.set(pool.live)
        self.kept.set(len(pool.kept))
        for event, total in pool.counts.items():
            added = total - self._exported.get(event, 0)
            if added > 0:
                if event not in self.events:
                    self.events[event] = self._events_family.Metric(labels={"event": event})
                self.events[event].increment(added)
                self._exported[event] = total
