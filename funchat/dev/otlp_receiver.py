"""A minimal OTLP/gRPC trace receiver: the collector service of `opentelemetry-proto`, keeping the
spans it is sent in memory. For tests and benchmarks that check what the stack exports, and for
looking at a local stack's traces without a collector:

    with OtlpReceiver() as receiver:                 # 127.0.0.1, a free port
        env["FUNCHAT_TRACING_ENDPOINT"] = receiver.endpoint
        ...
        spans = receiver.wait_for(lambda spans: any(s.name == "funchat.turn" for s in spans))

    python -m funchat.dev.otlp_receiver --port 4317  # prints one line per span received
"""

from __future__ import annotations

import argparse
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Callable

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass(frozen=True)
class ReceivedSpan:
    service: str           # the resource's service.name
    name: str
    trace_id: str          # hex
    span_id: str           # hex
    parent_span_id: str    # hex, "" for a root
    start_ns: int
    end_ns: int
    attributes: dict = field(hash=False, compare=False)
    status_code: int = 0   # 0 unset, 1 ok, 2 error
    links: tuple[str, ...] = ()  # linked span ids (hex)

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


def _value(any_value):
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


def _attributes(pairs) -> dict:
    return {kv.key: _value(kv.value) for kv in pairs}


class _Servicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver):
        self.receiver = receiver

    def Export(self, request, context):
        received = []
        for resource_spans in request.resource_spans:
            service = str(_attributes(resource_spans.resource.attributes).get("service.name", ""))
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    received.append(ReceivedSpan(
                        service=service, name=s.name, trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex(), start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano, attributes=_attributes(s.attributes),
                        status_code=s.status.code, links=tuple(link.span_id.hex() for link in s.links)))
        self.receiver._add(received, dict(context.invocation_metadata()))
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """A gRPC server on host:port (0 = a free port) answering OTLP trace exports."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 on_span: Callable[[ReceivedSpan], None] | None = None):
        self._spans: list[ReceivedSpan] = []
        self._cond = threading.Condition()
        self.on_span = on_span
        self.exports = 0
        self.last_metadata: dict = {}  # the gRPC metadata of the last export (the exporter's headers)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Servicer(self), self.server)
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        self.endpoint = f"{host}:{self.port}"

    def _add(self, spans: list[ReceivedSpan], metadata: dict) -> None:
        with self._cond:
            self._spans.extend(spans)
            self.exports += 1
            self.last_metadata = metadata
            self._cond.notify_all()
        if self.on_span is not None:
            for span in spans:
                self.on_span(span)

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._cond:
            return list(self._spans)

    def clear(self) -> None:
        with self._cond:
            self._spans.clear()

    def wait_for(self, done: Callable[[list[ReceivedSpan]], bool], timeout: float = 30.0) -> list[ReceivedSpan]:
        """The spans received once done(spans) holds; the spans so far when timeout passes first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not done(list(self._spans)):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return list(self._spans)

    def start(self) -> OtlpReceiver:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop(grace=None)

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m funchat.dev.otlp_receiver", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4317)
    args = parser.parse_args(argv)

    def show(span: ReceivedSpan) -> None:
        print(f"{span.trace_id[:8]} {span.service:28s} {span.name:28s} {span.duration_ms:9.2f} ms "
              f"{span.attributes}", flush=True)

    receiver = OtlpReceiver(args.host, args.port, on_span=show).start()
    print(f"OTLP/gRPC receiver on {receiver.endpoint} (FUNCHAT_TRACING_ENDPOINT={receiver.endpoint})", flush=True)
    try:
        receiver.server.wait_for_termination()
    except KeyboardInterrupt:
        receiver.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
