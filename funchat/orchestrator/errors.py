"""How the API refuses a request: a gRPC status name and a message saying what to fix.

An `ApiError` that ends an RPC becomes an `error` event and the RPC's status (`set_status`); one
that fails a single event of a call is sent as an `error` event and the call goes on; a unary RPC
ends with the status alone (`end_rpc`). Each error sent is counted once (metrics.error_sent): by
the event, or by `end_rpc` where there is none.
"""

from __future__ import annotations

from redis.exceptions import RedisError, ResponseError

from funchat.api import pb
from funchat.orchestrator import metrics
from funchat.orchestrator.sessions import (ExpiredResumeToken, InvalidResumeToken, SessionError, SessionNotFound,
                                           StoreUnavailable)


class ApiError(Exception):
    """A request the API refuses: gRPC status name and a message saying what to fix."""

    def __init__(self, code: str, message: str, event: str = ""):
        super().__init__(message)
        self.code, self.message, self.event = code, message, event

    def event_message(self) -> pb.ServerEvent:
        """The `error` event to send (counted as sent)."""
        metrics.error_sent(self.code)
        return pb.ServerEvent(error=pb.Error(code=self.code, message=self.message, event=self.event))

    def end_rpc(self, ctx) -> None:
        """End a unary RPC with this status, no event (counted as sent)."""
        metrics.error_sent(self.code)
        set_status(ctx, self.code, self.message)


def set_status(ctx, code: str, message: str) -> None:
    """End the RPC with this status (ctx: Ray Serve's or grpc.aio's servicer context; None in tests)."""
    if ctx is None:
        return
    import grpc
    ctx.set_code(getattr(grpc.StatusCode, code))
    ctx.set_details(message)


async def store_call(coro):
    """Await a session-store operation; every failure becomes a status the API answers with (none
    escapes a turn handler as an unexplained exception)."""
    try:
        return await coro
    except SessionNotFound as exc:
        raise ApiError("NOT_FOUND", f"{exc}") from None
    except ExpiredResumeToken as exc:
        raise ApiError("NOT_FOUND", f"{exc}; start a new session", "session") from None
    except InvalidResumeToken as exc:
        raise ApiError("INVALID_ARGUMENT", f"{exc}", "session") from None
    except StoreUnavailable as exc:
        raise ApiError("UNAVAILABLE", f"session store unavailable: {exc}") from None
    except SessionError as exc:  # optimistic writes that kept colliding with another writer
        raise ApiError("ABORTED", f"{exc}; the session was being changed by another request: retry") from None
    except ResponseError as exc:
        raise store_response_error(exc) from None
    except RedisError as exc:  # a connection dropped mid-reply, a protocol error, ...
        raise ApiError("UNAVAILABLE", f"session store failed: {type(exc).__name__}: {exc}; retry") from None


def store_response_error(exc: ResponseError) -> ApiError:
    """A Redis error reply as a status: a replica being promoted (READONLY, LOADING, MASTERDOWN) is
    worth a retry; a store out of memory is a resource limit; anything else is the server's fault."""
    text = str(exc)
    kind = text.split(" ", 1)[0].upper()
    if kind in ("READONLY", "LOADING", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN"):
        return ApiError("UNAVAILABLE", f"session store is not writable right now ({text}); retry shortly")
    if kind == "OOM":
        return ApiError("RESOURCE_EXHAUSTED", f"session store is out of memory ({text}); retry later or free "
                                              "sessions (DeleteSession)")
    if kind in ("NOAUTH", "WRONGPASS", "NOPERM"):
        return ApiError("INTERNAL", f"session store refused this server's credentials ({kind}); the operator must "
                                    "fix FUNCHAT_REDIS_PASSWORD / the Redis ACL")
    return ApiError("INTERNAL", f"session store error: {text}")
