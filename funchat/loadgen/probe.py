"""Is a funchat server answering at a target, and does it take our API key? One line saying why
not, for a load test that must not start against nothing (or get nothing but UNAUTHENTICATED)."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from funchat.api import pb, pb_grpc
from funchat.client.auth import API_KEY_ENV, authed_stub, resolve_api_key
from funchat.client.tls import open_channel, resolve_tls

PROBE_SESSION_ID = "sess_loadtest_key_probe"  # no such session: the answer is NOT_FOUND once the key is taken


def unreachable_reason(target: str, timeout_s: float = 5.0) -> str | None:
    """None when the target's gRPC health check says SERVING; else why not, in one line."""
    if not target or ":" not in target or "://" in target:
        return f"{target!r} is not a host:port address"
    channel = open_channel(target, resolve_tls(None), aio=False)  # TLS as FUNCHAT_TLS* says
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


def auth_problem(target: str, api_key: str | None = None, timeout_s: float = 5.0,
                 source: str = API_KEY_ENV) -> str | None:
    """None when `target` takes the API key (api_key, None: $FUNCHAT_API_KEY; "": none), or needs
    none; else why not, in one line (never the key; `source` says where it came from). The probe is
    a GetSession of a session that does not exist: a server that authenticates the call answers
    NOT_FOUND; UNAUTHENTICATED comes first. Only UNAUTHENTICATED is a problem here
    (unreachable_reason tells the rest)."""
    key = resolve_api_key(api_key)
    channel = open_channel(target, resolve_tls(None), aio=False)  # TLS as FUNCHAT_TLS* says
    try:
        authed_stub(pb_grpc.FunchatStub(channel), key or "").GetSession(
            pb.GetSessionRequest(session_id=PROBE_SESSION_ID), timeout=timeout_s)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.UNAUTHENTICATED:
            return None
        details = " ".join((exc.details() or "").split())
        if key:
            return (f"{target} refused the API key from {source} (UNAUTHENTICATED: {details}); "
                    f"set {API_KEY_ENV} to an active key of this server")
        return (f"{target} needs an API key (UNAUTHENTICATED: {details}); set {API_KEY_ENV} to a key of this "
                f"server (`make up` writes one to .run/api_key)")
    finally:
        channel.close()
    return None
