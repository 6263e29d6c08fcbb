"""One exchange of a call: the caller's turn in, the assistant's reply streamed out, both stored.

Shared by Respond (one exchange per RPC) and Converse (one per detected or committed turn). The
steps, in order:

    check the turn's length -> encode it (audio tokenizer) -> read the session's history ->
    build the TurnRequest -> mark the session "responding" -> run the turn (its events stream out)
    -> say how it ended (interrupted, or the function calls) -> store the user and assistant turns,
    session "listening" -> response_done

A problem of this turn only (audio too short, a model service down, the store unreachable) is sent
as an `error` event and a failed `response_done`, the session goes back to "listening", and the
call goes on.

Each exchange is one trace (when tracing is on, `funchat.tracing`): a `funchat.turn` span, the child
of the caller's own trace context when the RPC carried one (`TurnTrace.parent`), else a new trace.
Under it: `vad.end_of_turn` for a turn the VAD ended (from the end of the speech to the decision),
the session store's operations, the model-service calls (`turn_runner`), and a `first_audio` event.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Awaitable, Callable

import numpy as np

from opentelemetry import context as otel_context

from funchat import tracing
from funchat.api import pb
from funchat.audio_io import SAMPLE_RATE
from funchat.orchestrator import metrics
from funchat.orchestrator.call_config import CallConfig
from funchat.orchestrator.errors import ApiError, store_call
from funchat.orchestrator.sessions import HistoryTurn
from funchat.orchestrator.turn_runner import TurnError, TurnOutcome, TurnRequest, new_call_id
from funchat.turn.schedule import Mode

if TYPE_CHECKING:
    from funchat.orchestrator.service import FunchatService

Emit = Callable[[pb.ServerEvent], Awaitable[None]]
log = logging.getLogger(__name__)


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

    @classmethod
    def new(cls) -> Response:
        return cls("resp_" + secrets.token_hex(8))

    def heard_ms(self) -> int:
        """Reply audio the caller has heard: the last ack, else real-time playback since the first chunk."""
        if self.played_ms is not None:
            return min(self.played_ms, self.audio_ms)
        if self.first_audio_at is None:
            return 0
        return min(self.audio_ms, int((time.monotonic() - self.first_audio_at) * 1000))

    def running(self) -> bool:
        """Its turn is still generating."""
        return self.task is not None and not self.task.done()

    def playing(self) -> bool:
        """Still generating, or generated but not yet all heard."""
        return self.running() or self.heard_ms() < self.audio_ms


@dataclass
class TurnTrace:
    """Where a turn's trace starts. Wall-clock times (time.time_ns), as spans need."""

    parent: otel_context.Context | None = None  # the caller's trace context, if its RPC carried one
    ended_ns: int = field(default_factory=time.time_ns)  # when the caller's turn ended (commit or VAD decision)
    speech_ended_ns: int | None = None  # a VAD turn: when the speech ended (the decision came after the silence)
    vad: dict = field(default_factory=dict)  # the vad.end_of_turn span's attributes
    tenant: str = ""  # the caller's (an attribute of the turn's span)


class Exchange:
    """One caller turn and its reply (see the module docstring for the steps)."""

    def __init__(self, service: FunchatService, session_id: str, cfg: CallConfig, audio16k: np.ndarray,
                 response: Response, emit: Emit, t_end: float, trace: TurnTrace | None = None):
        """emit: where the reply's events go (the call's outbox); t_end: when the caller's turn ended
        (time.perf_counter), the start of the latencies reported."""
        self.service, self.session_id, self.cfg = service, session_id, cfg
        self.audio16k, self.response, self.emit, self.t_end = audio16k, response, emit, t_end
        self.audio_out = metrics.ReplyAudio(cfg.mode, t_end)  # first audio, underruns
        self.trace = trace or TurnTrace()
        self.span = None
        self.responding = False  # the session was marked "responding" by this exchange

    async def run(self) -> TurnOutcome | None:
        """The reply's outcome, or None when the turn failed (after its error and response_done events)."""
        tr = self.trace
        # No parent given: a new trace, whatever the task's context holds
        with tracing.tracer().start_as_current_span(
                "funchat.turn", context=tr.parent or otel_context.Context(), kind=tracing.SpanKind.SERVER,
                start_time=tr.speech_ended_ns or tr.ended_ns, record_exception=True, set_status_on_exception=True,
                attributes={"funchat.tenant": tr.tenant, "funchat.session_id": self.session_id,
                            "funchat.response_id": self.response.response_id,
                            "funchat.mode": self.cfg.mode, "funchat.audio_ms": len(self.audio16k) * 1000 // SAMPLE_RATE}
                ) as self.span:
            if tr.speech_ended_ns is not None:
                tracing.record_span("vad.end_of_turn", tr.speech_ended_ns, tr.ended_ns, attributes=tr.vad)
            return await self._run()

    async def _run(self) -> TurnOutcome | None:
        status = "failed"
        try:
            self.check_length()
            rows, n_groups, encode_ms = await self.encode()
            record = await store_call(self.service.store.get(self.session_id))
            request = self.turn_request(rows, n_groups, record.turns)
            await self.mark_responding(request)
            outcome = await self.service.runner.run(request, self.emit_tracked, self.response.cancel,
                                                    t_end_of_turn=self.t_end)
            outcome.latency_ms["audio_tokenizer"] = encode_ms
            self.response.outcome = outcome
            assistant = await self.emit_ending(outcome)
            await self.store_turns(rows, n_groups, assistant, history_len=len(record.turns))
            await self.emit(outcome.done_event())
            status = outcome.status
            self.trace_outcome(outcome)
            return outcome
        except TurnError as exc:
            await self.fail(exc.code, exc.message, "turn")
        except ApiError as exc:
            await self.fail(exc.code, exc.message, exc.event or "turn")
        finally:
            metrics.turn_finished(self.cfg.mode, status)
            self.span.set_attribute("funchat.status", status)
            if status == "failed" and self.responding:
                await self.back_to_listening()
        return None

    async def back_to_listening(self) -> None:
        """A failed turn must not leave its session marked "responding" for good: best effort (the
        store may be what failed; the state's TTL ends it then)."""
        try:
            await store_call(self.service.store.set_state(self.session_id, "listening", active=None,
                                                          owner=self.service.replica_id))
        except ApiError as exc:
            log.warning("session %s: could not reset its state after a failed turn: %s", self.session_id,
                        exc.message)

    def trace_outcome(self, outcome: TurnOutcome) -> None:
        lat = outcome.latency_ms
        self.span.set_attributes({
            "funchat.prompt_tokens": outcome.prompt_tokens, "funchat.text_tokens": len(outcome.text_tokens),
            "funchat.speech_tokens": len(outcome.speech_tokens), "funchat.reply_audio_ms": outcome.audio_ms,
            "funchat.history_turns_dropped": outcome.history_turns_dropped,
            **{f"funchat.{name}_ms": float(lat[name]) for name in ("first_text", "first_audio") if name in lat}})

    def check_length(self) -> None:
        max_turn_s = self.service.settings.max_turn_s
        if len(self.audio16k) > max_turn_s * SAMPLE_RATE:
            raise TurnError("INVALID_ARGUMENT", f"the turn's audio is {len(self.audio16k) / SAMPLE_RATE:.1f} s, over "
                                                f"the {max_turn_s:g} s limit")

    async def encode(self) -> tuple[np.ndarray, int, float]:
        """-> (the audio tokenizer's rows, n_groups, ms it took)."""
        t = time.perf_counter()
        rows, n_groups = await self.service.runner.encode(self.audio16k)
        seconds = time.perf_counter() - t
        metrics.stage("audio_tokenizer", seconds)
        return rows, n_groups, seconds * 1000.0

    def turn_request(self, rows: np.ndarray, n_groups: int, history: list[HistoryTurn]) -> TurnRequest:
        cfg = self.cfg
        text_sampling, speech_sampling = cfg.sampling()
        return TurnRequest(
            response_id=self.response.response_id, mode=Mode.parse(cfg.mode), audio_rows=rows, n_groups=n_groups,
            history=history, persona=cfg.instructions or None, tools=cfg.tools or None, voice=cfg.voice or None,
            text_sampling=text_sampling, speech_sampling=speech_sampling,
            seed=cfg.seed if cfg.seed is not None else secrets.randbits(31),
            max_new_tokens=cfg.max_new_tokens or self.service.settings.max_new_tokens, call_id=new_call_id())

    async def mark_responding(self, request: TurnRequest) -> None:
        """The session's turn state: which model replicas, correlation id and seed this reply uses."""
        endpoints = self.service.endpoints
        self.responding = True  # from here on a failure resets the state (even if this write half-failed)
        await store_call(self.service.store.set_state(self.session_id, "responding", active={
            "response_id": request.response_id, "llm": endpoints["llm"], "refined_head": endpoints["refined_head"],
            "correlation_id": request.call_id, "seed": request.seed, "started_at": time.time()},
            owner=self.service.replica_id))

    async def emit_tracked(self, event: pb.ServerEvent) -> None:
        """Send a reply event; audio chunks also advance what the caller can have heard."""
        if event.WhichOneof("event") == "audio_delta":
            if self.response.first_audio_at is None:
                self.response.first_audio_at = time.monotonic()
                self.span.add_event("first_audio")
            chunk = event.audio_delta
            self.response.audio_ms = chunk.start_ms + len(chunk.pcm16) // 2 * 1000 // chunk.sample_rate_hz
            self.audio_out.sent(len(chunk.pcm16) / 2 / chunk.sample_rate_hz)
        await self.emit(event)

    async def emit_ending(self, outcome: TurnOutcome) -> HistoryTurn:
        """`interrupted` for a cut reply, else its function calls; -> the assistant turn to store."""
        response = self.response
        if outcome.status == "cancelled":
            outcome.status = "interrupted" if response.interrupted else "cancelled"
            heard = response.heard_ms()
            kept = outcome.text_heard(self.service.info.tokenizer, heard) if Mode.parse(self.cfg.mode) is Mode.S2S \
                else outcome.text
            await self.emit(pb.ServerEvent(interrupted=pb.ResponseInterrupted(
                response_id=response.response_id, audio_end_ms=heard, kept_text=kept)))
            return HistoryTurn(role="assistant", text=kept, truncated=True, response_id=response.response_id)
        for c in outcome.function_calls:
            await self.emit(pb.ServerEvent(function_call=pb.FunctionCall(
                response_id=response.response_id, call_id=c["call_id"], name=c["name"],
                arguments_json=c["arguments"])))
        return HistoryTurn(role="assistant", text=outcome.text, response_id=response.response_id,
                           tool_calls=[{"name": c["name"], "arguments": c["arguments"]}
                                       for c in outcome.function_calls] or None)

    async def store_turns(self, rows: np.ndarray, n_groups: int, assistant: HistoryTurn, history_len: int) -> None:
        """Both turns at the end of the history (the caller's speech as its rows); session listening."""
        user = HistoryTurn(role="user", text=None, audio_rows=rows, n_groups=n_groups,
                           audio_ms=len(self.audio16k) * 1000 // SAMPLE_RATE)
        store = self.service.store
        await store_call(store.append_turns(self.session_id, [user, assistant]))
        self.response.history_index = history_len + 1
        await store_call(store.set_state(self.session_id, "listening", active=None, owner=self.service.replica_id))

    async def fail(self, code: str, message: str, event: str) -> None:
        tracing.mark_error(self.span, f"{code}: {message}")
        await self.emit(ApiError(code, message, event).event_message())
        await self.emit(pb.ServerEvent(response_done=pb.ResponseDone(response_id=self.response.response_id,
                                                                     status="failed")))
