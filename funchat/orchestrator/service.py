"""The public API's methods, independent of the server hosting them (Ray Serve in production).

`FunchatService.converse(stream, ctx)` is the full-duplex call: a reader task takes the caller's
events (audio through the VAD, commits, cancels, playback acks) while the method yields the
server's events from the call's outbox; replies run as their own tasks, so audio keeps flowing
both ways. `ctx` is a gRPC servicer context (Ray Serve's `RayServegRPCContext` or grpc.aio's):
errors that end an RPC set its status code and details after an `error` event; errors of one
event are sent as an `error` event and the call goes on.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import secrets
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any, AsyncIterator

import numpy as np

from funchat.api import pb
from funchat.audio_io import SAMPLE_RATE
from funchat.model.sampling import GREEDY, SamplingParams
from funchat.orchestrator.audio_input import AudioFormatError, InputAudioStream, InputFormat, decode_utterance
from funchat.orchestrator.sessions import (ExpiredResumeToken, HistoryTurn, InvalidResumeToken, SessionNotFound,
                                           SessionRecord, SessionStore, StoreUnavailable)
from funchat.orchestrator.settings import OrchestratorSettings
from funchat.orchestrator.turn_runner import (ModelServices, TurnError, TurnOutcome, TurnRequest, TurnRunner,
                                       new_call_id)
from funchat.orchestrator.vad import SpeechStarted, SpeechStopped, TurnDetector
from funchat.turn.prompt import PromptBuilder
from funchat.turn.schedule import Mode

MODES = {pb.MODE_UNSPECIFIED: Mode.S2S, pb.MODE_SPEECH_TO_SPEECH: Mode.S2S, pb.MODE_SPEECH_TO_TEXT: Mode.S2T}
PROTO_MODES = {Mode.S2S: pb.MODE_SPEECH_TO_SPEECH, Mode.S2T: pb.MODE_SPEECH_TO_TEXT}
VAD_DEFAULTS = {"threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500}


class ApiError(Exception):
    """A request the API refuses: gRPC status name and a message saying what to fix."""

    def __init__(self, code: str, message: str, event: str = ""):
        super().__init__(message)
        self.code, self.message, self.event = code, message, event

    def event_message(self) -> pb.ServerEvent:
        return pb.ServerEvent(error=pb.Error(code=self.code, message=self.message, event=self.event))


def set_status(ctx, code: str, message: str) -> None:
    if ctx is None:
        return
    import grpc
    ctx.set_code(getattr(grpc.StatusCode, code))
    ctx.set_details(message)


# ---------------------------------------------------------------------------------------------
# Session configuration


@dataclass
class CallConfig:
    """A validated SessionConfig, JSON-able for the session record."""

    mode: str = Mode.S2S.value
    instructions: str = ""
    voice: str = ""
    tools: list[dict] = field(default_factory=list)
    vad: dict | None = field(default_factory=lambda: dict(VAD_DEFAULTS))  # None = manual commits
    encoding: str = "pcm16"
    sample_rate: int = SAMPLE_RATE
    greedy: bool = False
    seed: int | None = None
    max_new_tokens: int = 0
    speech: dict = field(default_factory=dict)  # SamplingParams overrides for the speech tokens

    @property
    def input_format(self) -> InputFormat:
        enc = pb.AUDIO_ENCODING_FLOAT32 if self.encoding == "float32" else pb.AUDIO_ENCODING_PCM16
        return InputFormat.from_proto(pb.AudioFormat(encoding=enc, sample_rate_hz=self.sample_rate))

    def sampling(self) -> tuple[SamplingParams, SamplingParams]:
        """(text, speech). Text is greedy as in the reference demos; the speech tokens are sampled
        with the reference's settings unless greedy or overridden."""
        if self.greedy:
            return GREEDY, GREEDY
        return GREEDY, SamplingParams(**self.speech)


def parse_config(cfg: pb.SessionConfig, voices: set[str], max_new_tokens: int) -> CallConfig:
    """SessionConfig -> CallConfig; raises ApiError(INVALID_ARGUMENT) naming the bad field."""
    def bad(message: str) -> ApiError:
        return ApiError("INVALID_ARGUMENT", message, "session")

    if cfg.mode not in MODES:
        raise bad(f"unknown mode {cfg.mode}; use MODE_SPEECH_TO_TEXT or MODE_SPEECH_TO_SPEECH")
    out = CallConfig(mode=MODES[cfg.mode].value, instructions=cfg.instructions.strip())
    if cfg.voice:
        if cfg.voice not in voices:
            raise bad(f"unknown voice {cfg.voice!r}; available: {', '.join(sorted(voices))}")
        out.voice = cfg.voice
    for i, tool in enumerate(cfg.tools):
        if not tool.name:
            raise bad(f"tools[{i}] has no name")
        try:
            params = json.loads(tool.parameters_json) if tool.parameters_json else {"type": "object", "properties": {}}
        except json.JSONDecodeError as exc:
            raise bad(f"tools[{i}] ({tool.name}): parameters_json is not valid JSON: {exc}") from None
        out.tools.append({"type": "function", "function": {"name": tool.name, "description": tool.description,
                                                             "parameters": params}})
    td = cfg.turn_detection
    if td.WhichOneof("type") == "manual":
        out.vad = None
    else:
        v = td.server_vad
        vad = dict(VAD_DEFAULTS)
        if v.threshold:
            if not 0.0 < v.threshold < 1.0:
                raise bad(f"server_vad.threshold must be in (0, 1), got {v.threshold}")
            vad["threshold"] = float(v.threshold)
        if v.prefix_padding_ms:
            if v.prefix_padding_ms > 5000:
                raise bad(f"server_vad.prefix_padding_ms must be <= 5000, got {v.prefix_padding_ms}")
            vad["prefix_padding_ms"] = int(v.prefix_padding_ms)
        if v.silence_duration_ms:
            if not 100 <= v.silence_duration_ms <= 10000:
                raise bad(f"server_vad.silence_duration_ms must be in 100..10000, got {v.silence_duration_ms}")
            vad["silence_duration_ms"] = int(v.silence_duration_ms)
        out.vad = vad
    try:
        fmt = InputFormat.from_proto(cfg.input_audio_format)
    except AudioFormatError as exc:
        raise bad(str(exc)) from None
    out.encoding, out.sample_rate = fmt.encoding, fmt.sample_rate
    g = cfg.generation
    out.greedy = g.greedy
    out.seed = int(g.seed) if g.HasField("seed") else None
    if g.max_new_tokens > max_new_tokens:
        raise bad(f"generation.max_new_tokens {g.max_new_tokens} is over the server's limit {max_new_tokens}")
    out.max_new_tokens = int(g.max_new_tokens)
    speech = {}
    for name in ("temperature", "top_p", "top_k", "repetition_penalty"):
        if g.HasField(name):
            speech[name] = getattr(g, name)
    try:
        SamplingParams(**speech)
    except ValueError as exc:
        raise bad(f"generation: {exc}") from None
    out.speech = speech
    return out


def config_from_record(record: SessionRecord) -> CallConfig:
    return CallConfig(**record.config)


# ---------------------------------------------------------------------------------------------
# The call's outgoing events


_END = object()


class Outbox:
    """The events a call will send, in order; audio not yet sent can be dropped at a barge-in."""

    def __init__(self):
        self.items: collections.deque = collections.deque()
        self.ready = asyncio.Event()

    async def put(self, item) -> None:
        self.items.append(item)
        self.ready.set()

    def put_nowait(self, item) -> None:
        self.items.append(item)
        self.ready.set()

    def drop_audio(self, response_id: str) -> int:
        keep = [e for e in self.items if not (isinstance(e, pb.ServerEvent) and e.WhichOneof("event") == "audio_delta"
                                                and e.audio_delta.response_id == response_id)]
        dropped = len(self.items) - len(keep)
        self.items = collections.deque(keep)
        return dropped

    async def get(self):
        while not self.items:
            self.ready.clear()
            await self.ready.wait()
        return self.items.popleft()


# ---------------------------------------------------------------------------------------------


@dataclass
class Response:
    """A reply in progress or being played back."""

    response_id: str
    task: asyncio.Task | None = None
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    interrupted: bool = False
    outcome: TurnOutcome | None = None
    audio_ms: int = 0
    first_audio_at: float | None = None
    played_ms: int | None = None  # from the caller's playback acks
    history_index: int | None = None  # where its assistant turn sits in the history

    def heard_ms(self) -> int:
        """Reply audio the caller has heard: the last ack, else real-time playback since the first chunk."""
        if self.played_ms is not None:
            return min(self.played_ms, self.audio_ms)
        if self.first_audio_at is None:
            return 0
        return min(self.audio_ms, int((time.monotonic() - self.first_audio_at) * 1000))

    def playing(self) -> bool:
        return (self.task is not None and not self.task.done()) or self.heard_ms() < self.audio_ms


class FunchatService:
    def __init__(self, settings: OrchestratorSettings | None = None):
        self.settings = settings or OrchestratorSettings()
        import torch
        torch.set_num_threads(1)  # the orchestrator only draws tokens; the cores belong to the model services
        if not self.settings.resume_secret:
            raise RuntimeError("FUNCHAT_RESUME_SECRET is not set: resume tokens need a key shared by all replicas")
        self.info = PromptBuilder.from_checkpoint(self.settings.checkpoint)
        self.endpoints = self.settings.model_endpoints()
        self.voices = _voices(self.settings.checkpoint)
        self.replica_id = f"{socket.gethostname()}:{os.getpid()}"
        self.calls = 0
        self._services: ModelServices | None = None
        self._store: SessionStore | None = None
        self._runner: TurnRunner | None = None

    # Clients are created on first use, inside the serving event loop they belong to.
    @property
    def services(self) -> ModelServices:
        if self._services is None:
            self._services = ModelServices(self.endpoints, self.settings.service_timeout_s)
        return self._services

    @property
    def store(self) -> SessionStore:
        if self._store is None:
            self._store = SessionStore(self.settings.redis_url, self.settings.session_ttl_s,
                                       self.settings.resume_secret)
        return self._store

    @property
    def runner(self) -> TurnRunner:
        if self._runner is None:
            self._runner = TurnRunner(self.info, self.services)
        return self._runner

    # ---- admission ----

    def admit(self) -> None:
        if self.calls >= self.settings.max_calls:
            raise ApiError("RESOURCE_EXHAUSTED", f"this server is at its limit of {self.settings.max_calls} "
                                                 "concurrent calls; retry later or add replicas")
        self.calls += 1

    def release(self) -> None:
        self.calls -= 1

    # ---- sessions ----

    async def _session(self, coro):
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

    async def open_session(self, cfg: CallConfig, resume_token: str = "", session_id: str = ""
                           ) -> tuple[SessionRecord, bool]:
        """A new session, or the one a resume token / id names (its history kept, its config replaced)."""
        if resume_token:
            session_id = await self._session(self.store.verify_resume_token(resume_token))
        if session_id:
            record = await self._session(self.store.get(session_id))
            await self._session(self.store.update_config(session_id, asdict(cfg)))
            record.config = asdict(cfg)
            return record, True
        return await self._session(self.store.create(asdict(cfg))), False

    def session_created(self, record: SessionRecord, resumed: bool) -> pb.ServerEvent:
        return pb.ServerEvent(session_created=pb.SessionCreated(
            session_id=record.session_id, resume_token=self.store.issue_resume_token(record.session_id),
            resumed=resumed, turns=len(record.turns), expires_in_s=self.settings.session_ttl_s))

    async def GetSession(self, request: pb.GetSessionRequest, ctx=None) -> pb.Session:
        try:
            if not request.session_id:
                raise ApiError("INVALID_ARGUMENT", "session_id is empty")
            record = await self._session(self.store.get(request.session_id))
        except ApiError as exc:
            set_status(ctx, exc.code, exc.message)
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
            if not request.session_id:
                raise ApiError("INVALID_ARGUMENT", "session_id is empty")
            deleted = await self._session(self.store.delete(request.session_id))
            if not deleted:
                raise ApiError("NOT_FOUND", f"no session {request.session_id!r} (never created, deleted or expired)")
        except ApiError as exc:
            set_status(ctx, exc.code, exc.message)
            return pb.DeleteSessionResponse()
        return pb.DeleteSessionResponse(deleted=True)

    async def health(self) -> bool:
        try:
            return await self.store.ping()
        except Exception:
            return False

    # ---- one turn (shared by Respond and Converse) ----

    async def run_turn(self, record_id: str, cfg: CallConfig, audio16k: np.ndarray, response: Response,
                       emit, t_end: float) -> TurnOutcome | None:
        """Encode the caller's turn, answer it with the session's history, store both turns.
        Per-turn problems (audio too short, a model service down) are sent as an error event."""
        runner = self.runner
        try:
            if len(audio16k) > self.settings.max_turn_s * SAMPLE_RATE:
                raise TurnError("INVALID_ARGUMENT", f"the turn's audio is {len(audio16k) / SAMPLE_RATE:.1f} s, over "
                                                    f"the {self.settings.max_turn_s:g} s limit")
            t = time.perf_counter()
            rows, n_groups = await runner.encode(audio16k)
            encode_ms = (time.perf_counter() - t) * 1000.0
            record = await self._session(self.store.get(record_id))
            text_sampling, speech_sampling = cfg.sampling()
            seed = cfg.seed if cfg.seed is not None else secrets.randbits(31)
            call_id = new_call_id()
            req = TurnRequest(response_id=response.response_id, mode=Mode.parse(cfg.mode), audio_rows=rows,
                              n_groups=n_groups, history=record.turns, persona=cfg.instructions or None,
                              tools=cfg.tools or None, voice=cfg.voice or None, text_sampling=text_sampling,
                              speech_sampling=speech_sampling, seed=seed,
                              max_new_tokens=cfg.max_new_tokens or self.settings.max_new_tokens, call_id=call_id)
            await self._session(self.store.set_state(record_id, "responding", active={
                "response_id": response.response_id, "llm": self.endpoints["llm"],
                "refined_head": self.endpoints["refined_head"], "correlation_id": call_id, "seed": seed,
                "started_at": time.time()},
                owner=self.replica_id))

            async def emit_tracked(event: pb.ServerEvent) -> None:
                if event.WhichOneof("event") == "audio_delta":
                    if response.first_audio_at is None:
                        response.first_audio_at = time.monotonic()
                    response.audio_ms = event.audio_delta.start_ms + \
                        len(event.audio_delta.pcm16) // 2 * 1000 // event.audio_delta.sample_rate_hz
                await emit(event)

            outcome = await runner.run(req, emit_tracked, response.cancel, t_end_of_turn=t_end)
            outcome.latency_ms["audio_tokenizer"] = encode_ms
            response.outcome = outcome
            user = HistoryTurn(role="user", text=None, audio_rows=rows, n_groups=n_groups,
                               audio_ms=len(audio16k) * 1000 // SAMPLE_RATE)
            if outcome.status == "cancelled":
                outcome.status = "interrupted" if response.interrupted else "cancelled"
                heard = response.heard_ms()
                kept = outcome.text_heard(self.info.tokenizer, heard) if Mode.parse(cfg.mode) is Mode.S2S \
                    else outcome.text
                assistant = HistoryTurn(role="assistant", text=kept, truncated=True, response_id=response.response_id)
                await emit(pb.ServerEvent(interrupted=pb.ResponseInterrupted(
                    response_id=response.response_id, audio_end_ms=heard, kept_text=kept)))
            else:
                assistant = HistoryTurn(role="assistant", text=outcome.text, response_id=response.response_id,
                                        tool_calls=[{"name": c["name"], "arguments": c["arguments"]}
                                                    for c in outcome.function_calls] or None)
                for c in outcome.function_calls:
                    await emit(pb.ServerEvent(function_call=pb.FunctionCall(
                        response_id=response.response_id, call_id=c["call_id"], name=c["name"],
                        arguments_json=c["arguments"])))
            await self._session(self.store.append_turns(record_id, [user, assistant]))
            response.history_index = len(record.turns) + 1
            await self._session(self.store.set_state(record_id, "listening", active=None, owner=self.replica_id))
            await emit(outcome.done_event())
            return outcome
        except TurnError as exc:
            await emit(ApiError(exc.code, exc.message, "turn").event_message())
            await emit(pb.ServerEvent(response_done=pb.ResponseDone(response_id=response.response_id,
                                                                    status="failed")))
        except ApiError as exc:
            exc.event = exc.event or "turn"
            await emit(exc.event_message())
            await emit(pb.ServerEvent(response_done=pb.ResponseDone(response_id=response.response_id,
                                                                    status="failed")))
        return None

    # ---- Respond ----

    async def Respond(self, request: pb.RespondRequest, ctx=None) -> AsyncIterator[pb.ServerEvent]:
        t_end = time.perf_counter()
        admitted = False
        try:
            cfg = parse_config(request.config, self.voices, self.settings.max_new_tokens)
            if request.config.resume_token:
                raise ApiError("INVALID_ARGUMENT", "Respond takes session_id, not a resume token (that is for "
                                                   "Converse)", "config")
            audio = _decode_request_audio(request.audio, cfg)
            self.admit()
            admitted = True
            record, resumed = await self.open_session(cfg, session_id=request.session_id)
            yield self.session_created(record, resumed)
            response = Response("resp_" + secrets.token_hex(8))
            yield pb.ServerEvent(response_created=pb.ResponseCreated(response_id=response.response_id))
            outbox = Outbox()
            task = asyncio.create_task(self._respond_task(record.session_id, cfg, audio, response, outbox, t_end))
            try:
                while True:
                    item = await outbox.get()
                    if item is _END:
                        break
                    yield item
                    if item.WhichOneof("event") == "error":
                        set_status(ctx, item.error.code, item.error.message)
            finally:
                if not task.done():
                    response.cancel.set()
                    await asyncio.gather(task, return_exceptions=True)
        except ApiError as exc:
            yield exc.event_message()
            set_status(ctx, exc.code, exc.message)
        finally:
            if admitted:
                self.release()

    async def _respond_task(self, session_id, cfg, audio, response, outbox, t_end):
        try:
            await self.run_turn(session_id, cfg, audio, response, outbox.put, t_end)
        finally:
            outbox.put_nowait(_END)

    # ---- Converse ----

    async def Converse(self, stream, ctx=None) -> AsyncIterator[pb.ServerEvent]:
        admitted = False
        call: _Call | None = None
        try:
            try:
                first = await stream.__anext__()
            except StopAsyncIteration:
                return
            kind = first.WhichOneof("event")
            if kind != "session":
                raise ApiError("FAILED_PRECONDITION", f"the first event of a call must be `session` (the config), "
                                                      f"got `{kind}`", kind or "")
            cfg = parse_config(first.session, self.voices, self.settings.max_new_tokens)
            self.admit()
            admitted = True
            record, resumed = await self.open_session(cfg, resume_token=first.session.resume_token)
            yield self.session_created(record, resumed)
            call = _Call(self, record.session_id, cfg)
            reader = asyncio.create_task(call.read(stream))
            try:
                while True:
                    item = await call.outbox.get()
                    if item is _END:
                        break
                    if isinstance(item, ApiError):  # fatal: end the call with this status
                        raise item
                    yield item
            finally:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
        except ApiError as exc:
            yield exc.event_message()
            set_status(ctx, exc.code, exc.message)
        finally:
            if call is not None:
                await call.close()
            if admitted:
                self.release()


def _decode_request_audio(data: bytes, cfg: CallConfig) -> np.ndarray:
    if not data:
        raise ApiError("INVALID_ARGUMENT", "empty turn: the request holds no audio", "audio")
    try:
        return decode_utterance(data, cfg.input_format)
    except AudioFormatError as exc:
        raise ApiError("INVALID_ARGUMENT", str(exc), "audio") from None


def _voices(checkpoint) -> set[str]:
    from safetensors import safe_open

    from funchat.vocoder.checkpoint import SPEAKERS_FILE, vocoder_dir
    path = vocoder_dir(checkpoint) / SPEAKERS_FILE
    if not path.exists():
        return set()
    with safe_open(str(path), "np") as f:
        return set(f.keys())


class _Call:
    """One Converse call's state: input audio, turn detection, the reply in progress."""

    def __init__(self, service: FunchatService, session_id: str, cfg: CallConfig):
        self.service, self.session_id, self.cfg = service, session_id, cfg
        self.outbox = Outbox()
        self.audio = InputAudioStream(cfg.input_format, service.settings.max_chunk_ms)
        self.detector = None if cfg.vad is None else TurnDetector(
            threshold=cfg.vad["threshold"], prefix_padding_ms=cfg.vad["prefix_padding_ms"],
            silence_duration_ms=cfg.vad["silence_duration_ms"], max_utterance_s=service.settings.max_turn_s)
        self.buffer: list[np.ndarray] = []  # manual mode: audio since the last commit (16 kHz)
        self.buffered = 0
        self.received_ms = 0.0
        self.response: Response | None = None
        self.tasks: set[asyncio.Task] = set()

    def error(self, code: str, message: str, event: str) -> None:
        self.outbox.put_nowait(ApiError(code, message, event).event_message())

    async def read(self, stream) -> None:
        try:
            async for event in stream:
                kind = event.WhichOneof("event")
                if kind == "end":
                    break
                await self.handle(kind, event)
            await self.finish()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the client stream broke: end the call
            self.outbox.put_nowait(ApiError("INTERNAL", f"call failed: {exc}"))
        self.outbox.put_nowait(_END)

    async def handle(self, kind: str | None, event: pb.ClientEvent) -> None:
        if kind == "session":
            self.error("FAILED_PRECONDITION", "the session is already configured; a call takes one `session` event "
                                              "(start a new call to change mode or format)", "session")
        elif kind == "audio":
            try:
                samples = self.audio.push(event.audio.audio)
            except AudioFormatError as exc:
                self.error("INVALID_ARGUMENT", f"{exc}; chunk dropped", "audio")
                return
            self.received_ms += len(samples) * 1000.0 / SAMPLE_RATE
            if self.detector is not None:
                for ev in self.detector.feed(samples):
                    await self.on_vad(ev)
            else:
                if self.buffered + len(samples) > self.service.settings.max_turn_s * SAMPLE_RATE:
                    self.error("INVALID_ARGUMENT", f"the turn is over the {self.service.settings.max_turn_s:g} s "
                                                   "limit; commit earlier (chunk dropped)", "audio")
                    return
                self.buffer.append(samples)
                self.buffered += len(samples)
        elif kind == "commit":
            if self.detector is not None:
                for ev in self.detector.flush():
                    await self.on_vad(ev)
                return
            if not self.buffered:
                self.error("INVALID_ARGUMENT", "empty turn: no audio since the last commit", "commit")
                return
            audio = np.concatenate(self.buffer)
            self.buffer, self.buffered = [], 0
            await self.start_turn(audio)
        elif kind == "clear":
            self.buffer, self.buffered = [], 0
            if self.detector is not None:
                self.detector.reset()
        elif kind == "cancel":
            if self.response is None or self.response.task is None or self.response.task.done():
                self.error("FAILED_PRECONDITION", "no response is in progress to cancel", "cancel")
                return
            await self.interrupt(barge_in=False)
        elif kind == "playback":
            ack = event.playback
            if self.response is None or ack.response_id != self.response.response_id:
                self.error("INVALID_ARGUMENT", f"playback ack for {ack.response_id!r}, which is not the current "
                                               "response", "playback")
                return
            self.response.played_ms = max(self.response.played_ms or 0, int(ack.played_ms))
        elif kind == "function_call_output":
            out = event.function_call_output
            if not out.call_id:
                self.error("INVALID_ARGUMENT", "function_call_output needs the call_id of the FunctionCall", kind)
                return
            try:
                await self.service._session(self.service.store.append_turns(
                    self.session_id, [HistoryTurn(role="tool", text=out.output)]))
            except ApiError as exc:
                self.error(exc.code, exc.message, kind)
        else:
            self.error("INVALID_ARGUMENT", f"unknown or empty client event {kind!r}", kind or "")

    async def on_vad(self, ev) -> None:
        if isinstance(ev, SpeechStarted):
            await self.outbox.put(pb.ServerEvent(speech_started=pb.SpeechStarted(audio_start_ms=int(ev.audio_start_ms))))
            if self.response is not None and self.response.playing():
                await self.interrupt(barge_in=True)
        elif isinstance(ev, SpeechStopped):
            await self.outbox.put(pb.ServerEvent(speech_stopped=pb.SpeechStopped(audio_end_ms=int(ev.audio_end_ms))))
            await self.start_turn(np.asarray(ev.audio, dtype=np.float32))

    async def interrupt(self, barge_in: bool) -> None:
        """Stop the reply: cancel generation, drop unsent audio, cut the history at what was heard."""
        r = self.response
        if r is None:
            return
        r.interrupted = barge_in
        running = r.task is not None and not r.task.done()
        if running:
            r.cancel.set()
            self.outbox.drop_audio(r.response_id)
            await asyncio.gather(r.task, return_exceptions=True)  # run_turn stores the cut turn
            self.outbox.drop_audio(r.response_id)
        elif r.outcome is not None and r.heard_ms() < r.audio_ms:
            # generated in full but still playing: cut the stored assistant turn
            heard = r.heard_ms()
            self.outbox.drop_audio(r.response_id)
            kept = r.outcome.text_heard(self.service.info.tokenizer, heard)
            try:
                await self.service._session(self.service.store.update_turn(
                    self.session_id, -1, HistoryTurn(role="assistant", text=kept, truncated=True,
                                                     response_id=r.response_id)))
            except ApiError as exc:
                self.error(exc.code, exc.message, "playback")
            await self.outbox.put(pb.ServerEvent(interrupted=pb.ResponseInterrupted(
                response_id=r.response_id, audio_end_ms=heard, kept_text=kept)))
            r.audio_ms = heard
        self.response = None

    async def start_turn(self, audio: np.ndarray) -> None:
        if self.response is not None and self.response.task is not None and not self.response.task.done():
            await self.interrupt(barge_in=True)
        t_end = time.perf_counter()
        response = Response("resp_" + secrets.token_hex(8))
        self.response = response
        await self.outbox.put(pb.ServerEvent(committed=pb.InputAudioCommitted(
            item_id="item_" + secrets.token_hex(6), audio_ms=len(audio) * 1000 // SAMPLE_RATE)))
        await self.outbox.put(pb.ServerEvent(response_created=pb.ResponseCreated(response_id=response.response_id)))
        response.task = asyncio.create_task(self.service.run_turn(self.session_id, self.cfg, audio, response,
                                                                  self.outbox.put, t_end))

    async def finish(self) -> None:
        """The caller ended the call: answer speech still in the detector, wait for the reply."""
        if self.detector is not None:
            for ev in self.detector.flush():
                if isinstance(ev, SpeechStopped):
                    await self.outbox.put(pb.ServerEvent(speech_stopped=pb.SpeechStopped(
                        audio_end_ms=int(ev.audio_end_ms))))
                    await self.start_turn(np.asarray(ev.audio, dtype=np.float32))
        if self.response is not None and self.response.task is not None:
            await asyncio.gather(self.response.task, return_exceptions=True)

    async def close(self) -> None:
        if self.response is not None and self.response.task is not None and not self.response.task.done():
            self.response.cancel.set()
            await asyncio.gather(self.response.task, return_exceptions=True)
