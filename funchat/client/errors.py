"""The one error type of the client: every failed RPC, and every reply it cannot assemble."""

from __future__ import annotations

RETRY_AFTER_MS = "retry-after-ms"  # the server's retry hint, trailing metadata (funchat.orchestrator.errors)


class FunchatClientError(Exception):
    """An RPC that failed (code: the gRPC status name) or a reply this client cannot assemble.

    The client's own base class, not funchat.errors.FunchatError: the client package imports
    nothing of the rest of funchat but the generated protos.

    unreachable: the channel never got a connection to the server (as opposed to a server that
    answered UNAVAILABLE itself, e.g. because a model service is down).

    retry_after_s: how long the server asked the caller to wait before trying again (a full server
    or a tenant over its limits answer RESOURCE_EXHAUSTED with one); None when it gave no hint."""

    def __init__(self, code: str, message: str, unreachable: bool = False, retry_after_s: float | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.unreachable = unreachable
        self.retry_after_s = retry_after_s


def retry_after_s(trailing_metadata) -> float | None:
    """The retry hint in an RPC's trailing metadata (`retry-after-ms`), in seconds; None when there is
    none or it is not a number. (The server also sends it as google.rpc.RetryInfo in the status
    details, for gRPC libraries that read those.)"""
    for key, value in trailing_metadata or ():
        if key == RETRY_AFTER_MS:
            try:
                ms = int(value.decode() if isinstance(value, bytes) else value)
            except ValueError:
                return None
            return ms / 1000 if ms >= 0 else None
    return None
