"""The public API's methods, independent of the server hosting them (Ray Serve in production).

`FunchatService` is one replica: admission, sessions, and the four RPCs. `Converse(stream, ctx)` is
the full-duplex call (`converse.ConverseCall`), `Respond` a single exchange (`exchange.Exchange`).
`ctx` is a gRPC servicer context (Ray Serve's `RayServegRPCContext` or grpc.aio's): errors that
end an RPC set its status code and details after an `error` event; errors of one event are sent as
an `error` event and the call goes on.

Authentication: with FUNCHAT_AUTH=api_keys (the default) every RPC but the health check carries
`authorization: Bearer <key>` metadata; the key file (FUNCHAT_API_KEYS_FILE, `funchat.api_keys`)
names the key's tenant, and a missing, wrong or revoked key ends the RPC with UNAUTHENTICATED.
Sessions belong to the tenant that created them: another tenant's session id or resume token is
answered as one that does not exist.

Limits: each replica admits at most FUNCHAT_MAX_CALLS calls (Converse and Respond) at once; each
tenant at most FUNCHAT_TENANT_MAX_CALLS across all replicas, and FUNCHAT_TENANT_RATE_PER_S RPCs a
second (`tenant_limits`, in Redis). Over a limit: RESOURCE_EXHAUSTED naming it, with a retry hint
(`errors`). A request message that is not valid protobuf (`ingress.UnparsableMessage`) gets
INVALID_ARGUMENT.

Traces: a caller may send W3C trace context (`traceparent` metadata); each turn's trace is then a
child of it (`exchange.TurnTrace`). Respond is one `funchat.Respond` span over the RPC with the
turn under it; in Converse every turn is a trace of its own.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from dataclasses import asdict
from typing import AsyncIterator

import numpy as np

from funchat import tracing
from funchat.api import pb
from funchat.api_keys import AuthError, KeyStore
from funchat.checkpoint_files import voice_names
from funchat.orchestrator.audio_input import AudioFormatError, decode_utterance
from funchat.orchestrator.call_config import PROTO_MODES, CallConfig, parse_config
from funchat.orchestrator.converse import ConverseCall
from funchat.orchestrator import metrics
from funchat.orchestrator.errors import ApiError, set_status, store_call
from funchat.orchestrator.exchange import Exchange, Response, TurnTrace
from funchat.orchestrator.ingress import UnparsableMessage
from funchat.orchestrator.kept_prompts import KeptPrompts
from funchat.orchestrator.outbox import END, Outbox
from funchat.orchestrator.realtime.call import CallContext
from funchat.orchestrator.sessions import SessionRecord, SessionStore
from funchat.orchestrator.settings import OrchestratorSettings
from funchat.orchestrator.tenant_limits import CallSlot, LimitExceeded, TenantLimiter, TenantLimits
from funchat.orchestrator.turn_runner import ModelServices, TurnRunner
from funchat.turn.prompt import PromptBuilder
from funchat.turn.schedule import Mode

# The retry hint of a full replica: when one of its calls ends is unknown; a second keeps retries
# cheap without making a caller wait long for a freed slot.
REPLICA_FULL_RETRY_AFTER_S = 1.0


class FunchatService:
    def __init__(self, settings: OrchestratorSettings):
        self.settings = settings
        self.resume_secret = settings.read_resume_secret()  # refuse to start without it
        self.info = PromptBuilder.from_checkpoint(settings.checkpoint)
        self.endpoints = settings.endpoints.model_dump()
        self.voices = voice_names(settings.checkpoint)
        self.replica_id = f"{socket.gethostname()}:{os.getpid()}"
        # KeyFileError (missing or malformed file) refuses to start: no replica serves without its keys
        self.keys = KeyStore(settings.api_keys_file) if settings.auth == "api_keys" else None
        self.calls = 0
        self._services: ModelServices | None = None
        self._store: SessionStore | None = None
        self._runner: TurnRunner | None = None
        self._limiter: TenantLimiter | None = None

    # Clients are created on first use, inside the serving event loop they belong to.
    @property
    def services(self) -> ModelServices:
        if self._services is None:
            self._services = ModelServices(self.endpoints, self.settings.service_timeout_s)
        return self._services

    @property
    def store(self) -> SessionStore:
        if self._store is None:
            self._store = SessionStore(self.settings.redis_url, secret=self.resume_secret.get_secret_value(),
                                       ttl_s=self.settings.session_ttl_s,
                                       token_ttl_s=self.settings.resume_token_ttl_s,
                                       audio_dtype=self.settings.session_audio_dtype,
                                       password=self.settings.redis_password.get_secret_value(),
                                       ca_file=self.settings.redis_ca_file)
        return self._store

    @property
    def limiter(self) -> TenantLimiter:
        """The tenants' limits, kept in the session store's Redis (its client shared): the settings'
        defaults, and a tenant's own where the API key file sets them."""
        if self._limiter is None:
            s = self.settings
            defaults = TenantLimits(s.tenant_max_calls, s.tenant_rate_per_s, s.tenant_burst)
            overrides = self.keys.tenant_limits if self.keys is not None else None  # the key file's, as reloaded
            self._limiter = TenantLimiter(self.store.redis, defaults, s.tenant_slot_lease_s, overrides=overrides)
        return self._limiter

    @property
    def runner(self) -> TurnRunner:
        if self._runner is None:
            kept = KeptPrompts(self.info.special.audio) if self.settings.keep_prefixes else None
            self._runner = TurnRunner(self.info, self.services, kept)
        return self._runner

    # ---- authentication ----

    def tenant_of(self, ctx) -> str:
        """The calling tenant, from the RPC's `authorization` metadata; "" when authentication is off.
        Raises ApiError UNAUTHENTICATED saying what to send (never echoing a key)."""
        if self.keys is None:
            return ""
        if isinstance(ctx, CallContext) and ctx.authenticated_tenant is not None:
            return ctx.authenticated_tenant  # a client secret the Realtime endpoint verified
        metadata = getattr(ctx, "invocation_metadata", None)
        try:
            return self.keys.authenticate_metadata(metadata() if callable(metadata) else None)
        except AuthError as exc:
            raise ApiError("UNAUTHENTICATED", str(exc)) from None

    # ---- admission ----

    async def limit_rate(self, tenant: str, call: bool) -> None:
        """Count one RPC against the tenant's rate; ApiError RESOURCE_EXHAUSTED with a retry hint when
        it is over. call: a Converse or Respond (counted as a refused call)."""
        try:
            await store_call(self.limiter.take_request(tenant))
        except LimitExceeded as exc:
            if call:
                metrics.call_refused(exc.reason)
            else:
                metrics.request_refused(exc.reason)
            raise ApiError("RESOURCE_EXHAUSTED", str(exc), retry_after_s=exc.retry_after_s) from None

    async def admit(self, tenant: str) -> CallSlot | None:
        """A place for one call on this replica and under the tenant's call limit, or ApiError
        RESOURCE_EXHAUSTED with a retry hint. Give it back with `release`, on every exit path."""
        if self.calls >= self.settings.max_calls:
            metrics.call_refused("replica_calls")
            raise ApiError("RESOURCE_EXHAUSTED", f"this server is at its limit of {self.settings.max_calls} "
                                                 "concurrent calls; retry later or add replicas",
                           retry_after_s=REPLICA_FULL_RETRY_AFTER_S)
        self.calls += 1  # before the await: calls admitted meanwhile see this one
        try:
            slot = await store_call(self.limiter.acquire_call(tenant))
        except LimitExceeded as exc:
            self.calls -= 1
            metrics.call_refused(exc.reason)
            raise ApiError("RESOURCE_EXHAUSTED", str(exc), retry_after_s=exc.retry_after_s) from None
        except BaseException:
            self.calls -= 1
            raise
        metrics.call_admitted()
        return slot

    async def release(self, slot: CallSlot | None) -> None:
        self.calls -= 1
        metrics.call_ended()
        await self.limiter.release(slot)  # never raises; a slot not given back lapses with its lease

    # ---- sessions ----

    async def open_session(self, cfg: CallConfig, tenant: str, resume_token: str = "", session_id: str = ""
                           ) -> tuple[SessionRecord, bool]:
        """A new session of `tenant`, or that tenant's session a resume token / id names (its history
        kept, its config replaced)."""
        if resume_token:
            session_id = await store_call(self.store.verify_resume_token(resume_token, tenant=tenant))
        if session_id:
            record = await store_call(self.store.get(session_id, tenant=tenant))
            await store_call(self.store.update_config(session_id, asdict(cfg)))
            record.config = asdict(cfg)
            return record, True
        return await store_call(self.store.create(asdict(cfg), tenant=tenant)), False

    def session_created(self, record: SessionRecord, resumed: bool) -> pb.ServerEvent:
        return pb.ServerEvent(session_created=pb.SessionCreated(
            session_id=record.session_id,
            resume_token=self.store.issue_resume_token(record.session_id, tenant=record.tenant),
            resumed=resumed, turns=len(record.turns), expires_in_s=self.settings.session_ttl_s))

    async def GetSession(self, request: pb.GetSessionRequest, ctx=None) -> pb.Session:
        try:
            tenant = self.tenant_of(ctx)
            await self.limit_rate(tenant, call=False)
            request = parsed(request)
            if not request.session_id:
                raise ApiError("INVALID_ARGUMENT", "session_id is empty")
            record = await store_call(self.store.get(request.session_id, tenant=tenant))
        except ApiError as exc:
            exc.end_rpc(ctx)
            return pb.Session()
        cfg = record.config
        return pb.Session(
            session_id=record.session_id, mode=PROTO_MODES[Mode.parse(cfg.get("mode", "s2s"))],
            instructions=cfg.get("instructions", ""), voice=cfg.get("voice", ""), state=record.state,
            created_at=record.created_at, expires_in_s=max(0, int(record.expires_in_s or 0)),
            turns=[pb.Turn(role=t.role, text=t.text or "", audio_ms=t.audio_ms, truncated=t.truncated)
                   for t in record.turns])

    async def DeleteSession(self, request: pb.DeleteSessionRequest, ctx=None) -> pb.DeleteSessionResponse:
        try:
            tenant = self.tenant_of(ctx)
            await self.limit_rate(tenant, call=False)
            request = parsed(request)
            if not request.session_id:
                raise ApiError("INVALID_ARGUMENT", "session_id is empty")
            deleted = await store_call(self.store.delete(request.session_id, tenant=tenant))
            if not deleted:
                raise ApiError("NOT_FOUND", f"no session {request.session_id!r} (never created, deleted or expired)")
        except ApiError as exc:
            exc.end_rpc(ctx)
            return pb.DeleteSessionResponse()
        return pb.DeleteSessionResponse(deleted=True)

    async def health(self) -> bool:
        try:
            return await self.store.ping()
        except Exception:
            return False

    # ---- Respond: one exchange ----

    async def Respond(self, request: pb.RespondRequest, ctx=None) -> AsyncIterator[pb.ServerEvent]:
        t_end = time.perf_counter()
        trace = TurnTrace()
        # Not made current here: an async generator's context belongs to whoever iterates it
        span = tracing.tracer().start_span("funchat.Respond", context=caller_trace(ctx), kind=tracing.SpanKind.SERVER,
                                           start_time=trace.ended_ns)
        trace.parent = tracing.in_span(span)
        admitted, slot = False, None
        try:
            trace.tenant = tenant = self.tenant_of(ctx)
            span.set_attribute("funchat.tenant", tenant)
            await self.limit_rate(tenant, call=True)
            request = parsed(request)
            cfg = parse_config(request.config, self.voices, self.settings.max_new_tokens)
            if request.config.resume_token:
                raise ApiError("INVALID_ARGUMENT", "Respond takes session_id, not a resume token (that is for "
                                                   "Converse)", "config")
            audio = _decode_request_audio(request.audio, cfg, self.settings.max_turn_s)
            slot = await self.admit(tenant)
            admitted = True
            with tracing.within(span):  # the store's spans join the RPC's
                record, resumed = await self.open_session(cfg, tenant, session_id=request.session_id)
            span.set_attribute("funchat.session_id", record.session_id)
            yield self.session_created(record, resumed)
            response = Response.new()
            yield pb.ServerEvent(response_created=pb.ResponseCreated(response_id=response.response_id))
            outbox = Outbox()
            task = metrics.spawn(self._respond(record.session_id, cfg, audio, response, outbox, t_end, trace), "respond")
            try:
                while (item := await outbox.get()) is not END:
                    yield item
                    if item.WhichOneof("event") == "error":
                        set_status(ctx, item.error.code, item.error.message)
            finally:
                if not task.done():  # the caller went away: stop generating
                    response.cancel.set()
                    await asyncio.gather(task, return_exceptions=True)
        except ApiError as exc:
            tracing.mark_error(span, f"{exc.code}: {exc.message}")
            exc.set_status(ctx)  # first: Ray's proxy takes the status from the context sent with each message
            yield exc.event_message()
        finally:
            span.end()
            if admitted:
                await self.release(slot)

    async def _respond(self, session_id: str, cfg: CallConfig, audio: np.ndarray, response: Response,
                       outbox: Outbox, t_end: float, trace: TurnTrace) -> None:
        try:
            await Exchange(self, session_id, cfg, audio, response, outbox.put, t_end, trace).run()
        finally:
            outbox.put_nowait(END)
            if response.ahead is not None:  # the caller has its reply; this task ends with the prefill ahead
                await asyncio.gather(response.ahead, return_exceptions=True)

    # ---- Converse: a call ----

    async def Converse(self, stream, ctx=None) -> AsyncIterator[pb.ServerEvent]:
        admitted, slot = False, None
        call: ConverseCall | None = None
        ending: CallEnding | None = None
        stream = ParsedEvents(stream)
        try:
            try:
                first = await stream.__anext__()
            except StopAsyncIteration:
                return
            # After the first read: a call refused before the client's first write lands can reach
            # grpc's asyncio client as INTERNAL instead of this status (grpc/grpc#36066)
            tenant = self.tenant_of(ctx)
            await self.limit_rate(tenant, call=True)
            kind = first.WhichOneof("event")
            if kind != "session":
                raise ApiError("FAILED_PRECONDITION", f"the first event of a call must be `session` (the config), "
                                                      f"got `{kind}`", kind or "")
            cfg = parse_config(first.session, self.voices, self.settings.max_new_tokens)
            slot = await self.admit(tenant)
            admitted = True
            ending = CallEnding(self, slot)
            record, resumed = await self.open_session(cfg, tenant, resume_token=first.session.resume_token)
            yield self.session_created(record, resumed)
            call = ending.call = ConverseCall(self, record.session_id, cfg, trace_parent=caller_trace(ctx),
                                              tenant=tenant)
            reader = metrics.spawn(call.read(stream), "converse.reader")
            watchdog = metrics.spawn(ending.when_abandoned(reader), "converse.watchdog")
            try:
                while (item := await call.outbox.get()) is not END:
                    if isinstance(item, ApiError):  # fatal: end the call with this status
                        raise item
                    yield item
                    ending.progressed()
            finally:
                watchdog.cancel()
                reader.cancel()
                await asyncio.gather(reader, watchdog, return_exceptions=True)
        except ApiError as exc:
            exc.set_status(ctx)  # first: Ray's proxy takes the status from the context sent with each message
            yield exc.event_message()
        finally:
            if ending is not None:
                await ending.end()
            elif admitted:
                await self.release(slot)


class CallEnding:
    """Ends an admitted Converse call once: stops what it runs, gives its admission slot back.

    The RPC's response generator ends the call in its `finally`, but only if it is resumed or
    closed: when Ray stops iterating a cancelled call's generator between two events and never
    closes it, that `finally` waits for the garbage collector, and the slot stayed taken (seen in
    the tests: a call the caller had hung up on still counted, with none of its tasks running).
    So a watchdog ends it too, once the caller's stream is over and the generator has taken no
    event for `ABANDONED_S`; the ending itself runs as its own task, so a second cancellation of
    the generator cannot stop it half-way."""

    ABANDONED_S = 10.0  # a live generator takes each event at once (Ray's proxy does not push back)

    def __init__(self, service: FunchatService, slot: CallSlot | None):
        self.service, self.slot = service, slot
        self.call: ConverseCall | None = None
        self.last_progress = time.monotonic()
        self._task: asyncio.Task | None = None

    def progressed(self) -> None:
        self.last_progress = time.monotonic()

    async def end(self) -> None:
        if self._task is None:
            self._task = metrics.spawn(self._end(), "converse.end")
        await asyncio.shield(self._task)

    async def _end(self) -> None:
        try:
            if self.call is not None:
                await self.call.close()
        finally:
            await self.service.release(self.slot)

    async def when_abandoned(self, reader: asyncio.Task) -> None:
        """After the caller's stream is over: end the call if the generator stops taking events."""
        await asyncio.gather(reader, return_exceptions=True)
        self.progressed()
        while True:
            idle = time.monotonic() - self.last_progress
            if idle >= self.ABANDONED_S:
                await self.end()
                return
            await asyncio.sleep(self.ABANDONED_S - idle)


def parsed(message):
    """A request message, or ApiError INVALID_ARGUMENT when its bytes did not parse (ingress)."""
    if isinstance(message, UnparsableMessage):
        raise ApiError("INVALID_ARGUMENT", message.explain())
    return message


class ParsedEvents:
    """A Converse request stream whose messages that did not parse raise ApiError INVALID_ARGUMENT
    (the call ends with it) instead of reaching the call as something that is no ClientEvent."""

    def __init__(self, stream):
        self.stream = stream.__aiter__()

    def __aiter__(self) -> ParsedEvents:
        return self

    async def __anext__(self) -> pb.ClientEvent:
        return parsed(await self.stream.__anext__())


def caller_trace(ctx):
    """The trace context in an RPC's metadata (`traceparent`, `tracestate`), or None."""
    metadata = getattr(ctx, "invocation_metadata", None)
    return tracing.extract(metadata()) if callable(metadata) else None


def _decode_request_audio(data: bytes, cfg: CallConfig, max_turn_s: float) -> np.ndarray:
    """The Respond turn's audio as 16 kHz float32; its length is checked on the bytes, before any
    decoding or resampling work is spent on it."""
    if not data:
        raise ApiError("INVALID_ARGUMENT", "empty turn: the request holds no audio", "audio")
    fmt = cfg.input_format
    most = int(max_turn_s * fmt.sample_rate) * fmt.bytes_per_sample
    if len(data) > most:
        seconds = len(data) / fmt.bytes_per_sample / fmt.sample_rate
        raise ApiError("INVALID_ARGUMENT", f"the turn's audio is {seconds:.1f} s, over the {max_turn_s:g} s limit "
                                           f"(FUNCHAT_MAX_TURN_S): send at most {most} bytes of {fmt.encoding} at "
                                           f"{fmt.sample_rate} Hz", "audio")
    try:
        return decode_utterance(data, cfg.input_format)
    except AudioFormatError as exc:
        raise ApiError("INVALID_ARGUMENT", str(exc), "audio") from None
