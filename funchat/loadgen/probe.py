"""Is a funchat server answering at a target? One line saying why not, for a load test that must
not start against nothing."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def unreachable_reason(target: str, timeout_s: float = 5.0) -> str | None:
    """None when the target's gRPC health check says SERVING; else why not, in one line."""
    if not target or ":" not in target or "://" in target:
        return f"{target!r} is not a host:port address"
    channel = grpc.insecure_channel(target)
    try:
        # Not wait_for_ready: a refused connection or an unknown host answers at once.
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
    except grpc.RpcError as exc:
        code, details = exc.code(), " ".join((exc.details() or "").split())
        if code == grpc.StatusCode.UNAVAILABLE:
            # gRPC's "failed to connect to all addresses; last error: UNKNOWN: ipv4:...: <cause>" -> the cause
            cause = details.rsplit(": ", 1)[-1] if "last error" in details else details
            return f"cannot connect to {target} ({cause})"
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return f"no answer from {target} within {timeout_s:g} s"
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return f"{target} answers gRPC but has no health service: not a funchat server"
        return f"the health check of {target} failed: {code.name} {details}".rstrip()
    finally:
        channel.close()
    if answer.status != health_pb2.HealthCheckResponse.SERVING:
        return f"{target} is not serving (health: {health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)})"
    return None
