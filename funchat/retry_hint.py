"""A retry hint in a gRPC status's trailing metadata, twice over: the standard
`google.rpc.RetryInfo` in the status details (`grpc-status-details-bin`, a `google.rpc.Status` of
the same code and message), which gRPC libraries of every language read, and `retry-after-ms`
(whole milliseconds as text), which needs no protobuf to read. Sent by the orchestrator
(`funchat.orchestrator.errors`) and by the gateway (`funchat.gateway.forward`); read by
`funchat.client` as `FunchatClientError.retry_after_s`."""

from __future__ import annotations

import math

import grpc
from google.rpc import error_details_pb2, status_pb2

RETRY_AFTER_MS = "retry-after-ms"
STATUS_DETAILS = "grpc-status-details-bin"


def retry_trailers(code: str, message: str, retry_after_s: float) -> list[tuple[str, str | bytes]]:
    """The trailing metadata of a retry hint for a status `code` (its name) and `message`. The hint
    is at least 1 ms: 0 would invite a busy loop."""
    ms = max(1, math.ceil(retry_after_s * 1000))
    info = error_details_pb2.RetryInfo()
    info.retry_delay.FromMilliseconds(ms)
    status = status_pb2.Status(code=getattr(grpc.StatusCode, code).value[0], message=message)
    status.details.add().Pack(info)
    return [(STATUS_DETAILS, status.SerializeToString()), (RETRY_AFTER_MS, str(ms))]
