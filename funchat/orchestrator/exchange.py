"""One exchange of a call: the caller's turn in, the assistant's reply streamed out, both stored.

Shared by Respond (one exchange per RPC) and Converse (one per detected or committed turn). The
steps, in order:

    check the turn's length -> take the session's lease -> read the session's history (its audio
    must come from this model) -> encode the turn (audio tokenizer) -> build the TurnRequest ->
    mark the session "responding" -> run the turn (its events stream out) -> say how it ended
    (interrupted, or the function calls) -> store the user and assistant turns, trimming what no
    later prompt can hold, session "listening" -> response_done (with a fresh resume token)
    -> release the lease

A problem of this turn only (audio too short, a model service down, the store unreachable) is sent
as an `error` event and a failed `response_done`, the session goes back to "listening", and the
call goes on.

Session integrity:
- One turn at a time per session, across replicas and RPCs: the turn holds the session's lease
  (`SessionStore.acquire_lease`, renewed every third of FUNCHAT_SESSION_LEASE_S while it runs) and
  writes only while it holds it. A second turn is refused with ABORTED; a turn whose lease was lost
  (it stalled past the lease, or the session was deleted) stops and fails with ABORTED, nothing of
  it stored.
- When generation fails after the caller's speech was encoded (a model service down), the caller's
  turn is stored alone: the next turn is answered with it in the history (there is no event that
  re-answers a stored turn; the caller simply goes on). When the encoding itself failed nothing
  is stored, and the error says to send the turn again.
- Audio rows carry the fingerprint of the model that encoded them (`model_fingerprint`); a
  session holding rows of another model (or of none recorded) is refused with FAILED_PRECONDITION
  before anything runs: its speech cannot be fed to this model, so the caller starts a new session.
- Each `response_done` carries a fresh resume token (tokens are short-lived, FUNCHAT_RESUME_TOKEN_TTL_S).

Each exchange is one trace (when tracing is on, `funchat.tracing`): a `funchat.turn` span, the child
of the caller's own trace context when the RPC carried one (`TurnTrace.parent`), else a new trace.
Under it: `vad.end_of_turn` for a turn the VAD ended (from the end of the speech to the decision),
the session store's operations, the model-service calls (`turn_runner`), and a `first_audio` event.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Awaitable, Callable

import numpy as np

from opentelemetry import context as otel_context

from funchat import tracing
from funchat.api import pb
from funchat.audio_io import SAMPLE_RATE
from funchat.orchestrator import metrics
from funchat.orchestrator.audio_output import delta_samples
from funchat.orchestrator.call_config import CallConfig
from funchat.orchestrator.caller_turn import SpokenTurn
from funchat.orchestrator.errors import ApiError, store_call
from funchat.orchestrator.sessions import HistoryTurn, Lease
from funchat.orchestrator.turn_runner import TurnError, TurnOutcome, TurnRequest, new_call_id, without_tool_calls
from funchat.turn.schedule import Mode

if TYPE_CHECKING:
    from funchat.orchestrator.service import FunchatService

Emit = Callable[[pb.ServerEvent], Awaitable[None]]
log = logging.getLogger(__name__)

# The files that decide what the audio tokenizer's rows mean: the whole model config (encoder,
# adaptor, LLM width) and the mel front end. The weights are not read (gigabytes, and not every
# replica has them): FUNCHAT_MODEL_REVISION names weights that changed under the same config.
FINGERPRINT_FILES = ("config.json", "preprocessor_config.json")


@functools.lru_cache(maxsize=8)
def model_fingerprint(checkpoint: Path, revision: str = "") -> str:
    """The identity of the model that encodes the caller's speech, recorded with each stored clip:
    sha256 over the canonical JSON of FINGERPRINT_FILES (those present) and `revision`. Computed
    once per replica."""
    digest = hashlib.sha256(revision.encode())
    for name in FINGERPRINT_FILES:
        path = Path(checkpoint) / name
        if path.exists():
            canonical = json.dumps(json.loads(path.read_text()), sort_keys=True, separators=(",", ":"))
            digest.update(f"\0{name}\0{canonical}".encode())
    return "sha256:" + digest.hexdigest()[:16]


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
    # the prefill ahead of the conversation's next turn, started once this reply is stored and done
    # (not part of `task`: a next turn that comes at once is not a barge-in)
    ahead: asyncio.Task | None = None

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


def turn_request(cfg: CallConfig, settings, session_id: str, response_id: str, rows: np.ndarray, n_groups: int,
                 history: list[HistoryTurn]) -> TurnRequest:
    """What a turn of a call with config `cfg` asks of the model services."""
    text_sampling, speech_sampling = cfg.sampling()
    return TurnRequest(
        response_id=response_id, mode=Mode.parse(cfg.mode), audio_rows=rows, n_groups=n_groups,
        history=history, persona=cfg.instructions or None, tools=cfg.tools or None, voice=cfg.voice or None,
        text_sampling=text_sampling, speech_sampling=speech_sampling,
        seed=cfg.seed if cfg.seed is not None else secrets.randbits(31),
        max_new_tokens=cfg.max_new_tokens or settings.max_new_tokens, call_id=new_call_id(),
        conversation=session_id, output_format=cfg.output_format)


class Exchange:
    """One caller turn and its reply (see the module docstring for the steps)."""

    def __init__(self, service: FunchatService, session_id: str, cfg: CallConfig, audio16k: np.ndarray | None,
                 response: Response, emit: Emit, t_end: float, trace: TurnTrace | None = None,
                 spoken: SpokenTurn | None = None, item_id: str | None = None):
        """audio16k: the caller's turn (None: no new speech: the reply answers the history as it stands,
        which must end with the caller's turn or a function's output; only the reply is stored).
        emit: where the reply's events go (the call's outbox); t_end: when the caller's turn ended
        (time.perf_counter), the start of the latencies reported. spoken: the turn's encoder windows
        encoded (and prefilled) while it was spoken (`CallerTurn`)."""
        self.service, self.session_id, self.cfg = service, session_id, cfg
        self.spoken = spoken
        self.item_id = item_id  # the caller's turn's item id (its `committed`), kept with it in the history
        self.audio16k, self.response, self.emit, self.t_end = audio16k, response, emit, t_end
        self.audio_out = metrics.ReplyAudio(cfg.mode, t_end)  # first audio, underruns
        self.trace = trace or TurnTrace()
        self.span = None
        self.responding = False  # the session was marked "responding" by this exchange
        self.lease: Lease | None = None  # the session's lease while this turn holds it
        self.lease_keeper: asyncio.Task | None = None
        self.lease_lost = False
        settings = service.settings
        self.fingerprint = model_fingerprint(Path(settings.checkpoint), settings.model_revision)

    async def run(self) -> TurnOutcome | None:
        """The reply's outcome, or None when the turn failed (after its error and response_done events)."""
        tr = self.trace
        # No parent given: a new trace, whatever the task's context holds
        with tracing.tracer().start_as_current_span(
                "funchat.turn", context=tr.parent or otel_context.Context(), kind=tracing.SpanKind.SERVER,
                start_time=tr.speech_ended_ns or tr.ended_ns, record_exception=True, set_status_on_exception=True,
                attributes={"funchat.tenant": tr.tenant, "funchat.session_id": self.session_id,
                            "funchat.response_id": self.response.response_id,
                            "funchat.mode": self.cfg.mode, "funchat.audio_ms": self.audio_ms}
                ) as self.span:
            if tr.speech_ended_ns is not None:
                tracing.record_span("vad.end_of_turn", tr.speech_ended_ns, tr.ended_ns, attributes=tr.vad)
            return await self._run()

    async def _run(self) -> TurnOutcome | None:
        status = "failed"
        try:
            self.check_length()
            await self.take_lease()
            record = await store_call(self.service.store.get(self.session_id))
            await self.end_abandoned_turn(record)
            self.check_model(record.turns)
            self.check_something_to_answer(record.turns)
            rows, n_groups, encode_ms = await self.encode()
            request = self.turn_request(rows, n_groups, record.turns)
            await self.mark_responding(request)
            outcome = await self.generate(request, record.turns)
            outcome.latency_ms["audio_tokenizer"] = encode_ms
            self.response.outcome = outcome
            assistant = await self.emit_ending(outcome)
            stored = await self.store_turns(rows, n_groups, assistant, record.turns)
            await self.drop_lease()  # free before the caller hears it is done: its next turn may come at once
            await self.emit(self.with_resume_token(outcome.done_event()))
            status = outcome.status
            self.trace_outcome(outcome)
            self.response.ahead = metrics.spawn(self.prefill_ahead(request, [*record.turns, *stored]),
                                                "exchange.prefill_ahead")
            return outcome
        except TurnError as exc:
            await self.fail(exc.code, exc.message, "turn")
        except ApiError as exc:
            await self.fail(exc.code, exc.message, exc.event or "turn")
        finally:
            metrics.turn_finished(self.cfg.mode, status)
            self.span.set_attribute("funchat.status", status)
            await self.end_failed_turn(status)  # also when cancelled, or on a bug
        return None

    async def end_abandoned_turn(self, record) -> None:
        """Still "responding" while this turn holds the lease: the turn before died with its replica
        (SIGKILL, a lost node) and never ended its llm / refined_head sequences. End them now, so
        their KV rows are not held until the services' idle timeout."""
        active = getattr(record, "active", None) or {}  # (records stood in by unit tests may lack both)
        if getattr(record, "state", "") == "responding" and active.get("correlation_id"):
            await self.service.runner.end_sequences(int(active["correlation_id"]))

    async def end_failed_turn(self, status: str) -> None:
        """A failed turn hands the session back: state "listening", lease released (once)."""
        if status == "failed" and self.responding:
            self.responding = False
            await self.back_to_listening()
        await self.drop_lease()

    # ---- the session's lease ----

    async def take_lease(self) -> None:
        """Hold the session for this turn (ABORTED while another turn holds it) and keep holding it."""
        lease_s = self.service.settings.session_lease_s
        self.lease = await store_call(self.service.store.acquire_lease(self.session_id, lease_s))
        self.lease_keeper = metrics.spawn(self.keep_lease(lease_s / 3), "exchange.lease")

    async def keep_lease(self, every_s: float) -> None:
        """Renew the lease while the turn runs; once it is lost, stop generating (the turn then fails
        with ABORTED, and its writes would be refused anyway)."""
        while True:
            await asyncio.sleep(every_s)
            try:
                held = await store_call(self.service.store.renew_lease(self.lease))
            except ApiError as exc:  # a store blip: the next renewal may get through before the lease ends
                log.warning("session %s: could not renew the turn's lease: %s", self.session_id, exc.message)
                continue
            if not held:
                self.lease_lost = True
                self.response.cancel.set()
                return

    async def drop_lease(self) -> None:
        """Release the lease at the turn's end, whatever the end (best effort: else it expires). Once:
        later calls do nothing."""
        if self.lease_keeper is not None:
            self.lease_keeper.cancel()
            await asyncio.gather(self.lease_keeper, return_exceptions=True)
            self.lease_keeper = None
        if self.lease is not None:
            lease, self.lease = self.lease, None
            try:
                await store_call(self.service.store.release_lease(lease))
            except ApiError as exc:
                log.warning("session %s: could not release the turn's lease (it expires on its own): %s",
                            self.session_id, exc.message)

    def check_lease(self) -> None:
        if self.lease_lost:
            raise ApiError("ABORTED", f"session {self.session_id}: this turn lost its lease on the session (it "
                                      f"stalled longer than FUNCHAT_SESSION_LEASE_S="
                                      f"{self.service.settings.session_lease_s:g} s, or the session was deleted); "
                                      "nothing of it was stored: send the turn again")

    async def back_to_listening(self) -> None:
        """A failed turn must not leave its session marked "responding" for good: best effort (the
        store may be what failed; the state's TTL ends it then). A turn that lost its lease resets
        the state only while no other turn holds the session (that turn owns the state then)."""
        store = self.service.store
        try:
            try:
                await store_call(store.set_state(self.session_id, "listening", active=None,
                                                 owner=self.service.replica_id, lease=self.lease))
            except ApiError as exc:
                if exc.code != "ABORTED":
                    raise
                await store_call(store.set_state(self.session_id, "listening", active=None,
                                                 owner=self.service.replica_id, exclusive=True))
        except ApiError as exc:
            log.warning("session %s: could not reset its state after a failed turn: %s", self.session_id,
                        exc.message)

    # ---- the steps ----

    def check_model(self, history: list[HistoryTurn]) -> None:
        """Stored speech must come from the model this replica serves: another model's rows mean
        nothing to it."""
        foreign = [t for t in history if t.audio_rows is not None and t.audio_model != self.fingerprint]
        if foreign:
            theirs = foreign[0].audio_model or "unknown: stored before models were recorded"
            raise ApiError("FAILED_PRECONDITION",
                           f"session {self.session_id} holds {len(foreign)} turn(s) of caller speech encoded by "
                           f"another model ({theirs}; this server runs {self.fingerprint}), which this model cannot "
                           "read: start a new session", "turn")

    def trace_outcome(self, outcome: TurnOutcome) -> None:
        lat = outcome.latency_ms
        self.span.set_attributes({
            "funchat.prompt_tokens": outcome.prompt_tokens, "funchat.text_tokens": len(outcome.text_tokens),
            "funchat.speech_tokens": len(outcome.speech_tokens), "funchat.reply_audio_ms": outcome.audio_ms,
            "funchat.history_turns_dropped": outcome.history_turns_dropped,
            **{f"funchat.{name}_ms": float(lat[name]) for name in ("first_text", "first_audio") if name in lat}})

    @property
    def audio_ms(self) -> int:
        return len(self.audio16k) * 1000 // SAMPLE_RATE if self.audio16k is not None else 0

    def check_something_to_answer(self, history: list[HistoryTurn]) -> None:
        """A reply without new speech answers the last turn: the caller's (text, or speech whose answer
        failed) or a function's output."""
        if self.audio16k is None and (not history or history[-1].role not in ("user", "tool")):
            last = "its last turn is the assistant's" if history else "it is empty"
            raise ApiError("FAILED_PRECONDITION", f"nothing to respond to: the conversation has no new caller turn "
                                                  f"({last}); send the caller's speech, a user_text or a function's "
                                                  "output first", "respond")

    def check_length(self) -> None:
        max_turn_s = self.service.settings.max_turn_s
        if self.audio16k is not None and len(self.audio16k) > max_turn_s * SAMPLE_RATE:
            raise TurnError("INVALID_ARGUMENT", f"the turn's audio is {len(self.audio16k) / SAMPLE_RATE:.1f} s, over "
                                                f"the {max_turn_s:g} s limit")

    async def encode(self) -> tuple[np.ndarray, int, float]:
        """-> (the audio tokenizer's rows, n_groups, ms it took); none without new speech."""
        if self.audio16k is None:
            return np.zeros((0, self.service.info.facts.hidden_size), np.float32), 0, 0.0
        t = time.perf_counter()
        try:
            windows = await self.spoken.windows(self.audio16k) if self.spoken is not None else None
            rows, n_groups = await self.service.runner.encode(self.audio16k, windows)
        except TurnError as exc:
            if exc.code == "INVALID_ARGUMENT":  # the audio itself: its message says what to fix
                raise
            raise TurnError(exc.code, f"{exc.message}; the turn's audio could not be encoded, so nothing of it was "
                                      "stored: send it again") from None
        seconds = time.perf_counter() - t
        metrics.stage("audio_tokenizer", seconds)
        return rows, n_groups, seconds * 1000.0

    def turn_request(self, rows: np.ndarray, n_groups: int, history: list[HistoryTurn]) -> TurnRequest:
        return turn_request(self.cfg, self.service.settings, self.session_id, self.response.response_id, rows,
                            n_groups, history)

    async def mark_responding(self, request: TurnRequest) -> None:
        """The session's turn state: which model replicas, correlation id and seed this reply uses."""
        endpoints = self.service.endpoints
        self.responding = True  # from here on a failure resets the state (even if this write half-failed)
        await store_call(self.service.store.set_state(self.session_id, "responding", active={
            "response_id": request.response_id, "llm": endpoints["llm"], "refined_head": endpoints["refined_head"],
            "correlation_id": request.call_id, "seed": request.seed, "started_at": time.time()},
            owner=self.service.replica_id, lease=self.lease))

    async def generate(self, request: TurnRequest, history: list[HistoryTurn]) -> TurnOutcome:
        """Run the turn. When generation fails (a model service down), the caller's turn is stored
        alone, so that it is not lost: the next turn is answered with it. A turn the model cannot
        take (INVALID_ARGUMENT: it does not fit the context) is not stored."""
        try:
            outcome = await self.service.runner.run(request, self.emit_tracked, self.response.cancel,
                                                    t_end_of_turn=self.t_end)
        except TurnError as exc:
            if exc.code == "INVALID_ARGUMENT" or self.lease_lost or self.audio16k is None:
                raise  # (without new speech there is no caller's turn to keep)
            user = self.user_turn(request.audio_rows, request.n_groups)
            try:
                await store_call(self.service.store.append_turns(
                    self.session_id, [user], lease=self.lease, drop_oldest=self.unusable(history, [user])))
            except ApiError as store_exc:
                raise TurnError(exc.code, f"{exc.message}; your turn could not be kept either "
                                          f"({store_exc.message}): send it again") from None
            raise TurnError(exc.code, f"{exc.message}; your turn is kept in the session's history: the next turn "
                                      "is answered with it") from None
        self.check_lease()
        return outcome

    async def emit_tracked(self, event: pb.ServerEvent) -> None:
        """Send a reply event; audio chunks also advance what the caller can have heard."""
        if event.WhichOneof("event") == "audio_delta":
            if self.response.first_audio_at is None:
                self.response.first_audio_at = time.monotonic()
                self.span.add_event("first_audio")
            chunk = event.audio_delta
            samples, rate = delta_samples(chunk)  # pcm16, or `audio` in the call's output format
            self.response.audio_ms = chunk.start_ms + samples * 1000 // rate
            self.audio_out.sent(samples / rate)
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
        text = without_tool_calls(outcome.text) if outcome.function_calls else outcome.text
        return HistoryTurn(role="assistant", text=text, response_id=response.response_id,
                           tool_calls=[{"name": c["name"], "arguments": c["arguments"]}
                                       for c in outcome.function_calls] or None)

    def user_turn(self, rows: np.ndarray, n_groups: int) -> HistoryTurn:
        """The caller's speech as its rows, marked with the model that encoded them."""
        return HistoryTurn(role="user", text=None, audio_rows=rows, n_groups=n_groups,
                           audio_ms=len(self.audio16k) * 1000 // SAMPLE_RATE, audio_model=self.fingerprint,
                           item_id=self.item_id)

    def unusable(self, history: list[HistoryTurn], new: list[HistoryTurn]) -> int:
        """How many of the oldest turns the store may trim once `new` is appended: those no later
        prompt can hold (the prompt builder would drop them anyway)."""
        return self.service.info.unusable_history([*history, *new])

    async def prefill_ahead(self, request: TurnRequest, history: list[HistoryTurn]) -> None:
        """While the caller listens: the start of the next prompt into the kept rows (best effort:
        a failure only means the next turn prefills more)."""
        try:
            await self.service.runner.prefill_ahead(request, history)
        except Exception as exc:  # noqa: BLE001 - never fail a turn that was answered
            log.warning("prefill ahead of session %s's next turn failed: %s", self.session_id, exc)

    async def store_turns(self, rows: np.ndarray, n_groups: int, assistant: HistoryTurn,
                          history: list[HistoryTurn]) -> list[HistoryTurn]:
        """The caller's turn (if it spoke) and the reply at the end of the history, the oldest trimmed;
        session listening. -> the turns stored."""
        turns = ([self.user_turn(rows, n_groups)] if self.audio16k is not None else []) + [assistant]
        store = self.service.store
        stored = await store_call(store.append_turns(self.session_id, turns, lease=self.lease,
                                                     drop_oldest=self.unusable(history, turns)))
        self.response.history_index = stored - 1
        await store_call(store.set_state(self.session_id, "listening", active=None, owner=self.service.replica_id,
                                         lease=self.lease))
        return turns

    def with_resume_token(self, event: pb.ServerEvent) -> pb.ServerEvent:
        """A response_done carrying a fresh resume token (tokens are short-lived: the caller keeps the
        newest)."""
        event.response_done.resume_token = self.service.store.issue_resume_token(self.session_id,
                                                                                 tenant=self.trace.tenant)
        return event

    async def fail(self, code: str, message: str, event: str) -> None:
        tracing.mark_error(self.span, f"{code}: {message}")
        await self.end_failed_turn("failed")  # the session is free before the caller hears of the failure
        await self.emit(ApiError(code, message, event).event_message())
        await self.emit(self.with_resume_token(pb.ServerEvent(response_done=pb.ResponseDone(
            response_id=self.response.response_id, status="failed"))))
