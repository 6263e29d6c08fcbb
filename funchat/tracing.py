"""OpenTelemetry tracing, shared by the orchestrator and the model services; off unless an OTLP
endpoint is set.

    tracing.configure("funchat-orchestrator", TracingConfig.from_env())   # once per process
    with tracing.tracer().start_as_current_span("funchat.turn"):
        params = tracing.inject()          # {"traceparent": ...} for a Triton request's parameters
    parent = tracing.extract(params)       # in the model service: the span that sent the request

Settings, the same environment variables for every process (the orchestrator reads them through
its settings, `funchat.orchestrator.settings`; a model service with `TracingConfig.from_env`):

    FUNCHAT_TRACING_ENDPOINT      the OTLP/gRPC collector: host:port (plaintext), http://host:port
                                  (plaintext) or https://host:port (TLS); empty = no tracing (default)
    FUNCHAT_TRACING_HEADERS       key=value,key2=value2 sent with every export (a vendor's API key):
                                  a secret, never logged
    FUNCHAT_TRACING_SAMPLE_RATIO  the share of new traces recorded, 0..1 (default 1). A trace started by
                                  the caller (a `traceparent` in the RPC's metadata) follows the
                                  caller's decision; a model service records only what the
                                  orchestrator sampled and sent it.

Export never slows or fails a call: spans wait in a bounded queue (MAX_QUEUE_SPANS; beyond it the
oldest are dropped) and a background thread sends them in batches, each export given
EXPORT_TIMEOUT_S. A collector that is down costs one failed export in that thread; then, for
COLLECTOR_DOWN_S, batches are dropped without trying (`_CollectorBreaker`), so the queue never
backs up, the log gets one warning per pause rather than one per span, and a process that ends
is not held up flushing into nothing.

Propagation is W3C trace context (`traceparent`, `tracestate`): in gRPC metadata from a caller to
the public API, and in Triton request parameters from the orchestrator to a model service.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Mapping

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

ENDPOINT_ENV = "FUNCHAT_TRACING_ENDPOINT"
HEADERS_ENV = "FUNCHAT_TRACING_HEADERS"
SAMPLE_RATIO_ENV = "FUNCHAT_TRACING_SAMPLE_RATIO"

MAX_QUEUE_SPANS = 4096     # spans waiting for export; a down collector drops beyond this, never blocks
MAX_EXPORT_BATCH = 512
EXPORT_DELAY_MS = 500      # how often the queue is sent
EXPORT_TIMEOUT_S = 5.0     # one export (its retries included)
COLLECTOR_DOWN_S = 10.0    # after a failed export, drop batches for this long before trying again
PROPAGATED_KEYS = ("traceparent", "tracestate")
INSTRUMENTATION = "funchat"

_propagator = TraceContextTextMapPropagator()
log = logging.getLogger(__name__)


class TracingConfigError(ValueError):
    """A tracing setting that cannot be used; the message names the variable."""


@dataclass(frozen=True)
class TracingConfig:
    endpoint: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    sample_ratio: float = 1.0

    @property
    def enabled(self) -> bool:
        return bool(self.endpoint)

    def __post_init__(self):
        if not (isinstance(self.sample_ratio, (int, float)) and math.isfinite(self.sample_ratio)
                and 0.0 <= self.sample_ratio <= 1.0):
            raise TracingConfigError(f"{SAMPLE_RATIO_ENV}={self.sample_ratio!r}: use a number from 0 to 1")
        if self.endpoint and "://" in self.endpoint and not self.endpoint.startswith(("http://", "https://")):
            raise TracingConfigError(f"{ENDPOINT_ENV}={self.endpoint!r}: use host:port, http://host:port or "
                                     "https://host:port (OTLP over gRPC)")

    def __repr__(self) -> str:  # the headers may hold a key
        return (f"TracingConfig(endpoint={self.endpoint!r}, headers=<{len(self.headers)} hidden>, "
                f"sample_ratio={self.sample_ratio})")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TracingConfig:
        env = os.environ if environ is None else environ
        raw_ratio = env.get(SAMPLE_RATIO_ENV, "").strip() or "1"
        try:
            ratio = float(raw_ratio)
        except ValueError:
            raise TracingConfigError(f"{SAMPLE_RATIO_ENV}={raw_ratio!r}: use a number from 0 to 1") from None
        return cls(endpoint=env.get(ENDPOINT_ENV, "").strip(), headers=parse_headers(env.get(HEADERS_ENV, "")),
                   sample_ratio=ratio)


def parse_headers(text: str) -> tuple[tuple[str, str], ...]:
    """"key=value,key2=value2" (OTLP's header list) -> ((key, value), ...); keys lower-cased, as
    gRPC metadata requires. The message of a malformed entry names the entry's key, not its value."""
    headers = []
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or not key:
            raise TracingConfigError(f"{HEADERS_ENV}: an entry without key=value (entry {len(headers) + 1}); "
                                     "write key=value,key2=value2")
        headers.append((key, value.strip()))
    return tuple(headers)


# ---- the process's tracer ----

_provider: TracerProvider | None = None
_NOOP = trace.NoOpTracer()


def configure(service: str, config: TracingConfig | None = None, *, exporter: SpanExporter | None = None,
              record_new_traces: bool = True) -> bool:
    """Trace this process as `service` (the resource's service.name). Spans go to `exporter` when
    given (synchronously: tests, with an in-memory exporter), else over OTLP to config.endpoint in
    the background; neither: tracing stays off. record_new_traces=False records only spans whose
    parent was sampled elsewhere (a model service follows the orchestrator). A second call replaces
    the first. -> whether spans are recorded."""
    global _provider
    shutdown()
    config = config or TracingConfig()
    processor: SpanProcessor
    if exporter is not None:
        processor = SimpleSpanProcessor(exporter)
    elif config.enabled:
        processor = BatchSpanProcessor(_otlp_exporter(config), max_queue_size=MAX_QUEUE_SPANS,
                                       schedule_delay_millis=EXPORT_DELAY_MS, max_export_batch_size=MAX_EXPORT_BATCH,
                                       export_timeout_millis=int(EXPORT_TIMEOUT_S * 1000))
    else:
        return False
    root = TraceIdRatioBased(config.sample_ratio) if record_new_traces else ALWAYS_OFF
    resource = Resource.create({"service.name": service, "service.namespace": "funchat",
                                "service.instance.id": f"{socket.gethostname()}:{os.getpid()}"})
    # shutdown_on_exit: the queue is flushed when the process ends (bounded by EXPORT_TIMEOUT_S)
    _provider = TracerProvider(sampler=ParentBased(root), resource=resource)
    _provider.add_span_processor(processor)
    return True


def _otlp_exporter(config: TracingConfig) -> SpanExporter:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    endpoint = config.endpoint
    insecure = not endpoint.startswith("https://")
    return _CollectorBreaker(OTLPSpanExporter(endpoint=endpoint, insecure=insecure,
                                              headers=dict(config.headers) or None, timeout=EXPORT_TIMEOUT_S),
                             endpoint)


class _CollectorBreaker(SpanExporter):
    """An exporter that stops trying for COLLECTOR_DOWN_S after a failed export: the batches in
    between are dropped at once (and counted), the collector is tried again after the pause."""

    def __init__(self, inner: SpanExporter, endpoint: str, down_s: float = COLLECTOR_DOWN_S,
                 clock=time.monotonic):
        self.inner, self.endpoint, self.down_s, self.clock = inner, endpoint, down_s, clock
        self.down_until = 0.0
        self.dropped = 0  # spans dropped while the collector was down
        self._lock = threading.Lock()
        self._closed = False

    def export(self, spans) -> SpanExportResult:
        if self._closed or self.clock() < self.down_until:
            with self._lock:
                self.dropped += len(spans)
            return SpanExportResult.FAILURE
        try:
            result = self.inner.export(spans)
        except Exception:  # an exporter bug must not kill the export thread
            log.exception("tracing: export to %s failed", self.endpoint)
            result = SpanExportResult.FAILURE
        if result is not SpanExportResult.SUCCESS:
            self.down_until = self.clock() + self.down_s
            with self._lock:
                self.dropped += len(spans)
            log.warning("tracing: the collector at %s did not take %d spans; dropping spans for %.0f s "
                        "(%d dropped so far)", self.endpoint, len(spans), self.down_s, self.dropped)
        return result

    def shutdown(self) -> None:
        self._closed = self.clock() < self.down_until  # a collector known down gets no final flush
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


def configure_from_env(service: str, record_new_traces: bool = True) -> bool:
    """`configure` with the FUNCHAT_TRACING_* variables (a model service's start)."""
    return configure(service, TracingConfig.from_env(), record_new_traces=record_new_traces)


def enabled() -> bool:
    return _provider is not None


def shutdown() -> None:
    """Flush what is queued (bounded) and stop tracing in this process."""
    global _provider
    provider, _provider = _provider, None
    if provider is not None:
        provider.shutdown()


def tracer() -> trace.Tracer:
    """The process's tracer: a no-op one while tracing is off, so call sites need no checks."""
    return _provider.get_tracer(INSTRUMENTATION) if _provider is not None else _NOOP


@contextlib.contextmanager
def child_span(name: str | None, attributes: Mapping[str, object] | None = None,
               kind: SpanKind = SpanKind.INTERNAL):
    """A span under the current one, made current; only when the current span is recording (work
    outside a traced turn makes no stray one-span traces) and a name is given (None: untraced
    work). Yields the span, or None."""
    if name is None or not trace.get_current_span().is_recording():
        yield None
        return
    with tracer().start_as_current_span(name, kind=kind, attributes=dict(attributes or {})) as span:
        yield span


def within(span: Span):
    """Make `span` current for a block without ending it there (`with tracing.within(span): ...`)."""
    return trace.use_span(span, end_on_exit=False)


def in_span(span: Span | None) -> otel_context.Context | None:
    """A context whose current span is `span` (the parent to give work started elsewhere)."""
    return None if span is None else trace.set_span_in_context(span)


# ---- propagation ----

def inject(ctx: otel_context.Context | None = None) -> dict[str, str]:
    """The W3C trace context of `ctx` (default: the current one) as {"traceparent": ...}; {} when no
    span there is recording, so that unsampled work sends nothing."""
    span = trace.get_current_span(ctx)
    if not span.is_recording():
        return {}
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=ctx)
    return carrier


def extract(carrier: Mapping[str, object] | Iterable[tuple[str, object]] | None) -> otel_context.Context | None:
    """The parent context in request parameters or gRPC metadata (a mapping or (key, value) pairs),
    or None when they carry none (or a malformed one)."""
    if not carrier:
        return None
    pairs = carrier.items() if isinstance(carrier, Mapping) else carrier
    found = {str(k).lower(): v for k, v in pairs if str(k).lower() in PROPAGATED_KEYS and isinstance(v, str)}
    if "traceparent" not in found:
        return None
    ctx = _propagator.extract(found)
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


# ---- spans with times known afterwards ----

def record_span(name: str, start_ns: int, end_ns: int, parent: otel_context.Context | None = None,
                attributes: Mapping[str, object] | None = None, kind: SpanKind = SpanKind.INTERNAL,
                error: BaseException | str | None = None) -> Span:
    """A span whose start and end are already known (the VAD's end of turn, a batched forward, the
    aggregated decode loop). parent None: the current span."""
    span = tracer().start_span(name, context=parent, kind=kind, attributes=dict(attributes or {}),
                               start_time=start_ns)
    if error is not None:
        mark_error(span, error)
    span.end(end_time=max(end_ns, start_ns))
    return span


def mark_error(span: Span, error: BaseException | str) -> None:
    if isinstance(error, BaseException):
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
    else:
        span.set_status(Status(StatusCode.ERROR, str(error)))


__all__ = ["TracingConfig", "TracingConfigError", "child_span", "configure", "configure_from_env", "enabled",
           "extract", "in_span", "inject", "within", "mark_error", "parse_headers", "record_span", "shutdown", "tracer", "SpanKind"]
