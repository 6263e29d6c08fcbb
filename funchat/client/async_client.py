"""AsyncClient: the grpc.aio client of one funchat server (unary RPCs, Respond, and Converse calls)."""

from __future__ import annotations

import time
from typing import AsyncIterator

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from funchat.api import pb, pb_grpc
from funchat.client.audio import encode_audio
from funchat.client.auth import auth_metadata, authed_stub, resolve_api_key
from funchat.client.config import config_mode, input_format, session_config
from funchat.client.conversation import Conversation
from funchat.client.errors import FunchatClientError, retry_after_s
from funchat.client.replies import Reply, collect_reply
from funchat.client.tls import TlsOptions, open_channel, resolve_tls


class AsyncClient:
    """grpc.aio client of one funchat server. Use inside a running event loop (the channel is made
    on first use, in the loop it belongs to); `async with` closes it.

    timeout: deadline in seconds of each Respond / GetSession / DeleteSession / health RPC (None:
    none). A Converse call has no deadline unless converse(timeout=) gives one: calls are long.

    api_key: the API key every RPC sends (metadata `authorization: Bearer <key>`); None: the
    environment's FUNCHAT_API_KEY, read here; "": none (a server with authentication then answers
    UNAUTHENTICATED, raised as FunchatClientError). It is kept out of the repr.

    tls: False plaintext; True TLS with the system's root certificates; TlsOptions a CA file and a
    client certificate (mTLS); None: the environment's FUNCHAT_TLS* (funchat.client.tls), read here."""

    def __init__(self, target: str = "127.0.0.1:50051", timeout: float | None = None, api_key: str | None = None,
                 tls: bool | TlsOptions | None = None):
        self.target = target
        self.timeout = timeout
        self.tls = resolve_tls(tls)
        self._api_key = resolve_api_key(api_key) or ""  # "": none
        self._metadata = auth_metadata(self._api_key)
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.FunchatStub | None = None

    @property
    def has_api_key(self) -> bool:
        """Whether the RPCs send an API key."""
        return bool(self._metadata)

    def __repr__(self) -> str:
        key = "set" if self._metadata else "none"
        return (f"AsyncClient(target={self.target!r}, timeout={self.timeout!r}, api_key=<{key}>, "
                f"tls={self.tls is not None})")

    @property
    def channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = open_channel(self.target, self.tls)
        return self._channel

    @property
    def stub(self) -> pb_grpc.FunchatStub:
        """The Funchat stub on the channel; each of its RPCs carries the API key."""
        if self._stub is None:
            self._stub = authed_stub(pb_grpc.FunchatStub(self.channel), self._api_key)
        return self._stub

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        self._channel = self._stub = None

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def error(self, exc: grpc.aio.AioRpcError) -> FunchatClientError:
        """An RPC failure as FunchatClientError. UNAVAILABLE on a channel that is not connected means the
        server could not be reached; UNAVAILABLE from a connected server is the server's own answer.
        UNAUTHENTICATED (no key, or one the server does not take) keeps the server's message, which says
        what to send (and never holds the key)."""
        code = exc.code().name
        unreachable = (code == "UNAVAILABLE" and self._channel is not None
                       and self._channel.get_state() is not grpc.ChannelConnectivity.READY)
        return FunchatClientError(code, exc.details() or "", unreachable=unreachable,
                                  retry_after_s=retry_after_s(exc.trailing_metadata()))

    # ---- unary calls ----

    async def health(self, service: str = "") -> bool:
        """grpc.health.v1 Check: True when SERVING; False when NOT_SERVING or the server is unreachable.
        Other failures (e.g. UNIMPLEMENTED: not a funchat server) raise FunchatClientError."""
        health = health_pb2_grpc.HealthStub(self.channel)
        try:
            answer = await health.Check(health_pb2.HealthCheckRequest(service=service),
                                        timeout=self.timeout if self.timeout is not None else 5.0,
                                        metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return False
            raise self.error(exc) from None
        return answer.status == health_pb2.HealthCheckResponse.SERVING

    async def get_session(self, session_id: str) -> pb.Session:
        try:
            return await self.stub.GetSession(pb.GetSessionRequest(session_id=session_id), timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise self.error(exc) from None

    async def delete_session(self, session_id: str) -> bool:
        """True when the session was deleted, False when there was none (NOT_FOUND)."""
        try:
            answer = await self.stub.DeleteSession(pb.DeleteSessionRequest(session_id=session_id),
                                                   timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise self.error(exc) from None
        return answer.deleted

    # ---- Respond ----

    def _respond_request(self, audio: np.ndarray | bytes, config: pb.SessionConfig | None,
                         session_id: str | None) -> pb.RespondRequest:
        # No config: an empty one, so that every setting is the server's default (or, with session_id,
        # the session's).
        config = config if config is not None else pb.SessionConfig()
        if not isinstance(audio, (bytes, bytearray)):
            audio = encode_audio(audio, input_format(config)[0])
        return pb.RespondRequest(config=config, audio=bytes(audio), session_id=session_id or "")

    async def _respond_timed(self, request: pb.RespondRequest) -> AsyncIterator[tuple[float, pb.ServerEvent]]:
        call = self.stub.Respond(request, timeout=self.timeout)
        try:
            while True:
                try:
                    event = await call.read()
                except grpc.aio.AioRpcError as exc:
                    raise self.error(exc) from None
                if event is grpc.aio.EOF:
                    return
                yield time.monotonic(), event
        finally:
            call.cancel()  # a no-op once the call is over; frees the server when the caller stops early

    async def respond_stream(self, audio: np.ndarray | bytes, config: pb.SessionConfig | None = None,
                             session_id: str | None = None) -> AsyncIterator[pb.ServerEvent]:
        """Respond's server events as they come. A failed RPC raises FunchatClientError after its
        `error` event has been yielded."""
        async for _, event in self._respond_timed(self._respond_request(audio, config, session_id)):
            yield event

    async def respond(self, audio: np.ndarray | bytes, config: pb.SessionConfig | None = None,
                      session_id: str | None = None) -> Reply:
        """One whole utterance -> its Reply.

        audio: float samples at the config's input rate (16 kHz by default), encoded in its encoding;
        or bytes already in that format. session_id continues that session (multi-turn)."""
        request = self._respond_request(audio, config, session_id)
        events, times = [], []
        sent_at = time.monotonic()
        async for t, event in self._respond_timed(request):
            events.append(event)
            times.append(t)
        reply = collect_reply(events, times, sent_at=sent_at, mode=config_mode(request.config))
        if reply.errors:  # an RPC that ended OK after an error event still failed the turn
            raise FunchatClientError(reply.errors[0].code or "UNKNOWN", reply.errors[0].message)
        if not reply.status:
            raise FunchatClientError("DATA_LOSS", "the Respond stream ended without response_done")
        return reply

    # ---- Converse ----

    def converse(self, config: pb.SessionConfig | None = None, timeout: float | None = None) -> "Conversation":
        """A live call: `async with client.converse(config) as call: ...`."""
        return Conversation(self, config if config is not None else session_config(), timeout)
