"""Every RPC forwarded to one upstream gRPC server, as raw bytes.

The gateway does not know the API: every method is handled as a bidirectional stream of
serialized messages (unary and server-streaming calls look the same on the wire), so a new RPC
or message field needs no change here. What a call carries goes through both ways:

- caller -> upstream: the messages, half-close, the metadata (authorization, traceparent, ...),
  the deadline, and cancellation (a caller that hangs up cancels the upstream call);
- upstream -> caller: initial metadata, the messages, the status code, its details and the
  trailing metadata (grpc-status-details-bin included).

Two statuses are completed on the way:
- a call whose orchestrator replica died (`public_status`). Ray's proxy answers it INTERNAL with
  Ray's error text (the actor's pid, address and ids); the caller gets UNAVAILABLE, the status a
  client retries on, with what to do, and Ray's internals stay inside;
- RESOURCE_EXHAUSTED without a retry hint: Ray's own refusal when its queue is full
  (max_queued_requests) carries none, unlike the orchestrator's; it gets QUEUE_FULL_RETRY_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re

import grpc

from funchat.retry_hint import RETRY_AFTER_MS, retry_trailers

# Metadata gRPC sets itself on each hop: copying it would be refused or would lie about the hop
HOP_METADATA = frozenset({"user-agent", "te", "content-type", "host", "grpc-accept-encoding", "grpc-encoding",
                          "grpc-timeout", "grpc-message-type", "grpc-status", "grpc-message"})
UNBOUNDED = 1 << 30  # seconds: what grpc.aio reports as the time left of a call without a deadline
# Ray's RayActorError texts (ray/exceptions.py: ActorDiedError, RayActorError, ActorUnavailableError),
# which Ray Serve's proxy sends as INTERNAL details when the replica serving a call is gone
REPLICA_LOST = re.compile(r"The actor (died|is dead|experienced an error|[0-9a-f]+ is unavailable)")
QUEUE_FULL_RETRY_S = 1.0  # the hint added to a RESOURCE_EXHAUSTED that came without one
REPLICA_LOST_DETAILS = ("the server handling this call stopped (its orchestrator replica was lost); nothing of the "
                        "call's finished turns is lost: call again, and Converse with the session's resume_token "
                        "continues the session")


def public_status(code: grpc.StatusCode, details: str) -> tuple[grpc.StatusCode, str]:
    """The status the caller gets for the upstream's (code, details): the same, except a lost replica."""
    if code == grpc.StatusCode.INTERNAL and REPLICA_LOST.search(details):
        return grpc.StatusCode.UNAVAILABLE, REPLICA_LOST_DETAILS
    return code, details


def forwarded(metadata) -> tuple[tuple[str, str | bytes], ...]:
    """The metadata of one hop worth passing to the next (no pseudo-headers, no transport headers)."""
    return tuple((key, value) for key, value in (metadata or ())
                 if not key.startswith(":") and key not in HOP_METADATA)


class Forwarder(grpc.GenericRpcHandler):
    """Answers every method by forwarding it on `channel` (a grpc.aio channel to the upstream).

    send_timeout_s: a message the caller does not take within this long (it stopped reading: gRPC's
    flow control holds the write) ends the call with RESOURCE_EXHAUSTED and cancels it upstream,
    which frees its admission slot and model-service sequences. Ray's proxy takes the replica's
    messages without backpressure, so without this bound a caller that never reads has them piling
    up in memory for as long as its call lasts."""

    def __init__(self, channel: grpc.aio.Channel, send_timeout_s: float | None = None):
        self.channel = channel
        self.send_timeout_s = send_timeout_s

    def service(self, handler_call_details):
        method = handler_call_details.method
        # no (de)serializers: the handler sees and sends bytes; a coroutine function (not a generator):
        # it writes through the context, after the upstream's initial metadata
        return grpc.stream_stream_rpc_method_handler(functools.partial(self.forward, method))

    async def forward(self, method: str, _requests, context: grpc.aio.ServicerContext) -> None:
        """One call: the caller's messages are read from `context` (not `_requests`)."""
        remaining = context.time_remaining()
        call = self.channel.stream_stream(method)(
            metadata=forwarded(context.invocation_metadata()),
            timeout=remaining if remaining is not None and remaining < UNBOUNDED else None)
        pump = asyncio.ensure_future(self._requests(context, call))
        not_reading = False
        try:
            initial = await call.initial_metadata()
            if initial:
                await context.send_initial_metadata(forwarded(initial))
            while (message := await call.read()) is not grpc.aio.EOF:
                # asyncio.timeout, not wait_for: wait_for runs the write in a task of its own, and the
                # caller's cancellation then stopped reaching the upstream (test_gateway.py shows it)
                async with asyncio.timeout(self.send_timeout_s):
                    await context.write(message)
        except grpc.aio.AioRpcError:
            pass  # the status is the call's own: passed on below
        except asyncio.TimeoutError:
            not_reading = True
        finally:
            # the caller hung up (this task is cancelled) or the upstream ended: stop the other side
            pump.cancel()
            call.cancel()
            # the pump's own end does not matter (e.g. a write to an upstream call that had just ended
            # fails with InvalidStateError): the call's status, passed on below, says what happened
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump
        if not_reading:
            context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
            context.set_details(f"the client is not reading: a message waited {self.send_timeout_s:g} s to be taken "
                                f"(FUNCHAT_SEND_TIMEOUT_S); the call was ended. Read the call's events as they come")
            return
        trailing = forwarded(await call.trailing_metadata())
        code = await call.code()
        if code != grpc.StatusCode.OK:
            code, details = public_status(code, await call.details() or "")
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED and all(k != RETRY_AFTER_MS for k, _ in trailing):
                trailing += tuple(retry_trailers(code.name, details, QUEUE_FULL_RETRY_S))
            context.set_code(code)
            context.set_details(details)
        context.set_trailing_metadata(trailing)

    @staticmethod
    async def _requests(context: grpc.aio.ServicerContext, call) -> None:
        """The caller's messages to the upstream, then its half-close."""
        while (message := await context.read()) is not grpc.aio.EOF:
            await call.write(message)
        await call.done_writing()
