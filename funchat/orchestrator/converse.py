"""One Converse call after its `session` event: the caller's events in, the call's events out.

A reader task (`ConverseCall.read`) takes the caller's events while the RPC streams the call's
outbox back; each reply runs as its own task (`Exchange`), so audio keeps flowing both ways. Each
kind of client event has one handler (`ConverseCall.HANDLERS`); an event the call cannot take is
answered with an `error` event naming it and the call goes on. A broken client stream ends the
call (INTERNAL).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from funchat.api import pb
from funchat.audio_io import SAMPLE_RATE
from funchat.orchestrator import metrics
from funchat.orchestrator.audio_input import AudioFormatError, InputAudioStream
from funchat.orchestrator.call_config import MAX_FUNCTION_OUTPUT_BYTES, VAD_DEFAULTS, CallConfig, quoted
from funchat.orchestrator.caller_turn import CallerTurn
from funchat.orchestrator.errors import ApiError, store_call
from funchat.orchestrator.exchange import Exchange, Response, TurnTrace, turn_request
from funchat.orchestrator.outbox import END, Outbox
from funchat.orchestrator.sessions import HistoryTurn
from funchat.orchestrator.turn_runner import TurnRequest
from funchat.orchestrator.vad import SpeechStarted, SpeechStopped, TurnDetector
from funchat.turn.schedule import Mode

if TYPE_CHECKING:
    from funchat.orchestrator.service import FunchatService

END_EVENT = "end"  # the caller hangs up: the reading loop stops there, no handler
IDLE_RECHECK_S = 1.0  # while a reply plays, how often the idle limit is looked at again


@dataclass(frozen=True)
class _Limit:
    seconds_left: float
    error: ApiError | None  # what ends the call when they run out (None: look again then)


class ConverseCall:
    """One Converse call's state: input audio, turn detection, the reply in progress."""

    def __init__(self, service: FunchatService, session_id: str, cfg: CallConfig, trace_parent=None,
                 tenant: str = ""):
        """trace_parent: the caller's trace context (from the RPC's metadata), the parent of every
        turn's trace; None: each turn starts a trace of its own. tenant: the caller's (traces)."""
        self.service, self.session_id, self.cfg = service, session_id, cfg
        self.trace_parent, self.tenant = trace_parent, tenant
        self.settings = service.settings
        self.outbox = Outbox()
        self.audio = InputAudioStream(cfg.input_format, self.settings.max_chunk_ms)
        self.detector = None if cfg.vad is None else TurnDetector(
            threshold=cfg.vad["threshold"], prefix_padding_ms=cfg.vad["prefix_padding_ms"],
            silence_duration_ms=cfg.vad["silence_duration_ms"], max_utterance_s=self.settings.max_turn_s)
        self.buffer: list[np.ndarray] = []  # manual mode: audio since the last commit (16 kHz)
        self.aheads: list[asyncio.Task] = []  # earlier replies' prefills ahead (Response.ahead), awaited at the end
        self.buffered = 0
        self.response: Response | None = None
        self.stopped: Response | None = None  # the reply a barge-in or cancel just stopped (truncate may name it)
        self.held: tuple[np.ndarray, SpeechStopped, str] | None = None  # VAD turn committed, answered on `respond`
        self.idle: list[np.ndarray] = []  # server VAD: the caller's silence since the last reply played out
        self.idle_samples = 0
        self.caller_turn = CallerTurn(self)  # the turn in progress, encoded and prefilled while spoken

    def error(self, code: str, message: str, event: str) -> None:
        """Refuse one event; the call goes on."""
        self.outbox.put_nowait(ApiError(code, message, event).event_message())

    async def read(self, stream) -> None:
        """The caller's events until `end` or the stream's end; then the call's outbox ends. A call
        that sends nothing for FUNCHAT_IDLE_TIMEOUT_S while no reply is generating or playing, or
        that lasts FUNCHAT_MAX_CALL_S, is ended with a status saying so (its admission slot freed)."""
        events = stream.__aiter__()
        started = last_event = time.monotonic()
        # One read outstanding at a time, never cancelled by a timeout: the stream stays consistent
        pending: asyncio.Future | None = None
        try:
            while True:
                if pending is None:
                    pending = metrics.spawn(events.__anext__(), "converse.read")
                limit = self.time_limit(started, last_event)
                done, _ = await asyncio.wait({pending}, timeout=max(0.0, limit.seconds_left))
                if not done:
                    if limit.error is not None and limit.seconds_left <= 0:
                        self.outbox.put_nowait(limit.error)
                        break
                    continue  # a reply was generating or playing: not idle; check again
                event, pending = pending.result(), None
                last_event = time.monotonic()
                if event.WhichOneof("event") == END_EVENT:
                    await self.finish()
                    break
                await self.handle(event)
        except StopAsyncIteration:
            await self.finish()
        except asyncio.CancelledError:
            raise
        except ApiError as exc:  # the stream refused what the caller sent (a message that did not parse)
            self.outbox.put_nowait(exc)
        except Exception as exc:  # the client stream broke: end the call
            self.outbox.put_nowait(ApiError("INTERNAL", f"call failed: {exc}"))
        finally:
            if pending is not None and not pending.done():
                pending.cancel()
        self.outbox.put_nowait(END)

    def time_limit(self, started: float, last_event: float) -> "_Limit":
        """The nearer of the call's two limits: its whole length, and silence from the caller while
        nothing is generating or playing (a reply being heard is not idleness)."""
        now = time.monotonic()
        max_call_s, idle_s = self.settings.max_call_s, self.settings.idle_timeout_s
        call_left = started + max_call_s - now
        call_limit = _Limit(call_left, ApiError(
            "OUT_OF_RANGE", f"the call reached its maximum length of {max_call_s:g} s (FUNCHAT_MAX_CALL_S); "
                            "continue in a new call with the session's resume token"))
        r = self.response
        if r is not None and r.playing():
            return call_limit if call_left < IDLE_RECHECK_S else _Limit(IDLE_RECHECK_S, None)
        quiet_since = last_event
        if r is not None and r.first_audio_at is not None:  # the reply's playback counts as activity
            quiet_since = max(quiet_since, r.first_audio_at + r.audio_ms / 1000.0)
        idle_left = quiet_since + idle_s - now
        if idle_left < call_left:
            return _Limit(idle_left, ApiError(
                "DEADLINE_EXCEEDED", f"no event from the caller for {idle_s:g} s (FUNCHAT_IDLE_TIMEOUT_S): call "
                                     "ended; send audio (or silence) continuously, or resume later with the "
                                     "session's resume token"))
        return call_limit

    async def handle(self, event: pb.ClientEvent) -> None:
        handler = self.HANDLERS.get(event.WhichOneof("event"), ConverseCall.on_unknown)
        await handler(self, event)

    # ---- one handler per kind of client event ----

    async def on_session(self, event: pb.ClientEvent) -> None:
        self.error("FAILED_PRECONDITION", "the session is already configured; a call takes one `session` event "
                                          "(start a new call to change mode or format)", "session")

    async def on_audio(self, event: pb.ClientEvent) -> None:
        try:
            samples = self.audio.push(event.audio.audio)
        except AudioFormatError as exc:
            self.error("INVALID_ARGUMENT", f"{exc}; chunk dropped", "audio")
            return
        if self.detector is not None:
            for ev in self.detector.feed(samples):
                await self.on_vad(ev)
            self.caller_turn.follow(self.detector)
            await self.check_idle(samples)
        else:
            self.buffer_audio(samples)

    async def on_commit(self, event: pb.ClientEvent) -> None:
        if self.detector is not None:  # server VAD: a commit ends the speech in progress
            for ev in self.detector.flush():
                await self.on_vad(ev)
            return
        tail = self.audio.flush()  # what the resampler still holds belongs to this turn, not the next
        if tail.size:
            self.buffer_audio(tail)
        if not self.buffered:
            self.error("INVALID_ARGUMENT", "empty turn: no audio since the last commit", "commit")
            return
        audio = np.concatenate(self.buffer)
        self.buffer, self.buffered = [], 0
        await self.start_turn(audio)

    async def on_clear(self, event: pb.ClientEvent) -> None:
        self.audio.flush()
        self.buffer, self.buffered = [], 0
        self.caller_turn.reset()
        if self.detector is not None:
            self.detector.reset()

    async def on_cancel(self, event: pb.ClientEvent) -> None:
        if self.response is None or not self.response.running():
            self.error("FAILED_PRECONDITION", "no response is in progress to cancel", "cancel")
            return
        await self.interrupt(barge_in=False)

    async def on_playback(self, event: pb.ClientEvent) -> None:
        ack = event.playback
        if self.response is None or ack.response_id != self.response.response_id:
            self.error("INVALID_ARGUMENT", f"playback ack for {quoted(ack.response_id)}, which is not the current "
                                           "response", "playback")
            return
        self.response.played_ms = max(self.response.played_ms or 0, int(ack.played_ms))

    async def on_function_call_output(self, event: pb.ClientEvent) -> None:
        out = event.function_call_output
        if not out.call_id:
            self.error("INVALID_ARGUMENT", "function_call_output needs the call_id of the FunctionCall",
                       "function_call_output")
            return
        size = len(out.output.encode())
        if size > MAX_FUNCTION_OUTPUT_BYTES:
            self.error("INVALID_ARGUMENT", f"function_call_output is {size} bytes, over the "
                                           f"{MAX_FUNCTION_OUTPUT_BYTES}-byte limit: return less", "function_call_output")
            return
        try:
            await store_call(self.service.store.append_turns(self.session_id, [HistoryTurn(
                role="tool", text=out.output, item_id=out.item_id or None)]))
        except ApiError as exc:
            self.error(exc.code, exc.message, "function_call_output")

    async def on_user_text(self, event: pb.ClientEvent) -> None:
        """The caller's words as text: a user turn in the history (`respond` answers it)."""
        text = event.user_text.text
        size = len(text.encode())
        if not text.strip():
            self.error("INVALID_ARGUMENT", "user_text is empty: send the caller's words", "user_text")
            return
        if size > MAX_FUNCTION_OUTPUT_BYTES:
            self.error("INVALID_ARGUMENT", f"user_text is {size} bytes, over the {MAX_FUNCTION_OUTPUT_BYTES}-byte "
                                           "limit", "user_text")
            return
        if self.response is not None and self.response.running():
            self.error("FAILED_PRECONDITION", "a reply is being generated: send user_text after its response_done "
                                              "(or cancel it)", "user_text")
            return
        item = event.user_text.item_id or "item_" + secrets.token_hex(6)
        try:
            await store_call(self.service.store.append_turns(self.session_id, [HistoryTurn(role="user", text=text,
                                                                                            item_id=item)]))
        except ApiError as exc:
            self.error(exc.code, exc.message, "user_text")

    async def on_respond(self, event: pb.ClientEvent) -> None:
        """Answer the turn server VAD committed without answering (create_response false), else the history
        as it stands, without new speech (after a user_text or a function's output)."""
        if self.response is not None and self.response.running():
            self.error("FAILED_PRECONDITION", "a reply is already being generated: wait for its response_done or "
                                              "cancel it", "respond")
            return
        if self.held is not None:
            (audio, stopped, item), self.held = self.held, None
            await self.start_turn(audio, stopped, item=item)  # its `committed` was sent when it was held
            return
        await self.start_turn(None)

    async def on_delete_turn(self, event: pb.ClientEvent) -> None:
        """Remove a turn from the history (by its item id, or a reply's response id)."""
        item = event.delete_turn.item_id
        if self.response is not None and self.response.running():
            self.error("FAILED_PRECONDITION", "a reply is being generated: delete turns after its response_done",
                       "delete_turn")
            return
        try:
            deleted = await store_call(self.service.store.delete_turn(self.session_id, item))
        except ApiError as exc:
            self.error(exc.code, exc.message, "delete_turn")
            return
        if not deleted:
            self.error("NOT_FOUND", f"no turn {quoted(item)} in the session's history (it may have been trimmed)",
                       "delete_turn")
            return
        # the history moved: a later truncate or playback ack may not name a reply by its old place
        if self.response is not None and not self.response.running():
            self.response = None
        self.stopped = None
        await self.outbox.put(pb.ServerEvent(turn_deleted=pb.TurnDeleted(item_id=item)))

    async def on_truncate(self, event: pb.ClientEvent) -> None:
        """The caller heard the reply only up to audio_end_ms: cut its assistant turn there."""
        t = event.truncate
        r = next((r for r in (self.response, self.stopped) if r is not None and r.response_id == t.response_id), None)
        if r is None:
            self.error("INVALID_ARGUMENT", f"truncate names {quoted(t.response_id)}, which is neither the current "
                                           "reply nor the one just stopped", "truncate")
            return
        if Mode.parse(self.cfg.mode) is not Mode.S2S:
            self.error("FAILED_PRECONDITION", "truncate cuts a spoken reply; this call's replies are text only",
                       "truncate")
            return
        if r.running():  # still generating: stop it; the exchange stores it cut at what was heard
            r.played_ms = int(t.audio_end_ms)
            await self.interrupt(barge_in=False)
            return
        if r.outcome is None:
            self.error("FAILED_PRECONDITION", f"reply {quoted(t.response_id)} failed: it has no turn to cut",
                       "truncate")
            return
        produced_ms = r.outcome.audio_ms
        if t.audio_end_ms > produced_ms:
            self.error("INVALID_ARGUMENT", f"audio_end_ms {t.audio_end_ms} is past the end of reply "
                                           f"{quoted(t.response_id)} ({produced_ms} ms of audio)", "truncate")
            return
        r.played_ms = int(t.audio_end_ms)
        r.audio_ms = produced_ms  # a cut may move either way within what was generated
        await self.cut_played_reply(r)
        if r is self.response:
            self.stopped, self.response = r, None

    async def on_unknown(self, event: pb.ClientEvent) -> None:
        """An empty event, or a kind this server does not know (a newer client)."""
        kind = event.WhichOneof("event")
        self.error("INVALID_ARGUMENT", f"unknown or empty client event {kind!r}", kind or "")

    HANDLERS = {"session": on_session, "audio": on_audio, "commit": on_commit, "clear": on_clear,
                "cancel": on_cancel, "playback": on_playback, "function_call_output": on_function_call_output,
                "truncate": on_truncate, "user_text": on_user_text, "respond": on_respond,
                "delete_turn": on_delete_turn}

    # ---- turns ----

    def buffer_audio(self, samples: np.ndarray) -> None:
        """Manual turns: keep the caller's audio until the commit."""
        max_turn_s = self.settings.max_turn_s
        if self.buffered + len(samples) > max_turn_s * SAMPLE_RATE:
            self.error("INVALID_ARGUMENT", f"the turn is over the {max_turn_s:g} s limit; commit earlier (chunk "
                                           "dropped)", "audio")
            return
        self.buffer.append(samples)
        self.buffered += len(samples)
        self.caller_turn.append(samples)

    def vad_option(self, name: str):
        """A server VAD setting (a session stored before the setting existed has its default)."""
        return (self.cfg.vad or {}).get(name, VAD_DEFAULTS[name])

    async def on_vad(self, ev) -> None:
        if isinstance(ev, SpeechStarted):
            speech_started = time.perf_counter()
            await self.outbox.put(pb.ServerEvent(speech_started=pb.SpeechStarted(
                audio_start_ms=int(ev.audio_start_ms))))
            if self.response is not None and self.response.playing() and self.vad_option("interrupt_response"):
                if await self.interrupt(barge_in=True):
                    metrics.barge_in(time.perf_counter() - speech_started)
        elif isinstance(ev, SpeechStopped):
            await self.outbox.put(pb.ServerEvent(speech_stopped=pb.SpeechStopped(audio_end_ms=int(ev.audio_end_ms))))
            await self.end_of_speech(np.asarray(ev.audio, dtype=np.float32), ev)

    async def end_of_speech(self, audio: np.ndarray, stopped: SpeechStopped) -> None:
        """The VAD ended the caller's turn: answer it, or hold it (create_response false), or answer it once
        the reply it spoke over is done (interrupt_response false)."""
        if not self.vad_option("create_response"):
            item = "item_" + secrets.token_hex(6)
            if self.held is not None:  # a second utterance before `respond`: one turn of both (the newer name)
                audio = np.concatenate([self.held[0], audio])
            self.held = (audio, stopped, item)
            await self.outbox.put(pb.ServerEvent(committed=pb.InputAudioCommitted(
                item_id=item, audio_ms=len(stopped.audio) * 1000 // SAMPLE_RATE)))
            return
        r = self.response
        if r is not None and r.running() and not self.vad_option("interrupt_response"):
            # the caller may not stop the reply: this turn is answered after it (generation is faster
            # than real time: the wait is short, and events queue meanwhile)
            await asyncio.gather(r.task, return_exceptions=True)
        await self.start_turn(audio, stopped)

    async def check_idle(self, samples: np.ndarray) -> None:
        """Server VAD's idle timeout: once a reply has played out and the caller has said nothing for
        idle_timeout_ms of their audio, that silence is their turn, and it is answered."""
        timeout_ms = self.vad_option("idle_timeout_ms")
        if not timeout_ms:
            return
        r = self.response
        busy = (r is None or r.playing() or self.detector.in_speech or self.held is not None
                or not self.model_idle())  # counted from a reply's end: none yet, none to count from
        if busy:
            self.idle, self.idle_samples = [], 0
            return
        self.idle.append(samples)
        self.idle_samples += len(samples)
        if self.idle_samples * 1000 < timeout_ms * SAMPLE_RATE:
            return
        audio = np.concatenate(self.idle)[-int(self.settings.max_turn_s * SAMPLE_RATE):]
        self.idle, self.idle_samples = [], 0
        end_ms = self.detector.position_ms
        await self.outbox.put(pb.ServerEvent(idle_timeout=pb.IdleTimeout(
            audio_start_ms=max(0, end_ms - len(audio) * 1000 // SAMPLE_RATE), audio_end_ms=end_ms)))
        await self.start_turn(audio)

    async def interrupt(self, barge_in: bool) -> bool:
        """Stop the reply: cancel generation, drop unsent audio, cut the history at what was heard.
        -> whether a generation was running (and is now stopped, its cut turn stored)."""
        r = self.response
        if r is None:
            return False
        r.interrupted = barge_in
        stopped_generation = r.running()
        if stopped_generation:
            r.cancel.set()
            self.outbox.drop_audio(r.response_id)
            await asyncio.gather(r.task, return_exceptions=True)  # the exchange stores the cut turn
            self.outbox.drop_audio(r.response_id)
            if r.outcome is not None and r.outcome.status == "completed" and r.heard_ms() < r.audio_ms:
                # generation had just finished (the reply was being stored): cut it as a played one
                await self.cut_played_reply(r)
        elif r.outcome is not None and r.heard_ms() < r.audio_ms:
            await self.cut_played_reply(r)
        self.response, self.stopped = None, r
        return stopped_generation

    async def cut_played_reply(self, r: Response) -> None:
        """A reply generated in full but still playing: cut its stored assistant turn at what was heard."""
        heard = r.heard_ms()
        self.outbox.drop_audio(r.response_id)
        kept = r.outcome.text_heard(self.service.info.tokenizer, heard)
        try:
            await store_call(self.service.store.update_turn(
                self.session_id, -1, HistoryTurn(role="assistant", text=kept, truncated=True,
                                                 response_id=r.response_id)))
        except ApiError as exc:
            self.error(exc.code, exc.message, "playback")
        await self.outbox.put(pb.ServerEvent(interrupted=pb.ResponseInterrupted(
            response_id=r.response_id, audio_end_ms=heard, kept_text=kept)))
        r.audio_ms = heard

    def turn_trace(self, stopped: SpeechStopped | None) -> TurnTrace:
        """The turn's trace start. A VAD turn's speech ended `silence` ago in the caller's audio, which
        arrives in real time: the vad.end_of_turn span covers that wait."""
        trace = TurnTrace(parent=self.trace_parent, tenant=self.tenant)
        if stopped is not None:
            decided_ms = stopped.audio_offset_ms + len(stopped.audio) * 1000 // SAMPLE_RATE
            silence_ms = max(0, decided_ms - stopped.audio_end_ms)
            trace.speech_ended_ns = trace.ended_ns - silence_ms * 1_000_000
            trace.vad = {"funchat.audio_start_ms": stopped.audio_start_ms, "funchat.audio_end_ms": stopped.audio_end_ms,
                         "funchat.silence_ms": silence_ms, "funchat.forced": stopped.forced}
        return trace

    async def start_turn(self, audio: np.ndarray | None, stopped: SpeechStopped | None = None,
                         item: str | None = None) -> None:
        """audio: the caller's turn (None: no new speech, `respond`); stopped: the VAD's event that ended
        this turn (None: a commit); item: the turn's item id when its `committed` was sent already (a
        turn held since its commit), else one is made and announced."""
        if self.response is not None and self.response.ahead is not None:
            self.aheads.append(self.response.ahead)  # the new turn's prefill waits for it (TurnRunner's lock)
        if self.response is not None and self.response.running():
            await self.interrupt(barge_in=True)
        t_end = time.perf_counter()
        trace = self.turn_trace(stopped)
        response = Response.new()
        self.response, self.stopped = response, None
        if audio is not None and item is None:
            item = "item_" + secrets.token_hex(6)
            await self.outbox.put(pb.ServerEvent(committed=pb.InputAudioCommitted(
                item_id=item, audio_ms=len(audio) * 1000 // SAMPLE_RATE)))
        await self.outbox.put(pb.ServerEvent(response_created=pb.ResponseCreated(response_id=response.response_id)))
        response.task = metrics.spawn(
            Exchange(self.service, self.session_id, self.cfg, audio, response, self.outbox.put, t_end, trace,
                     spoken=self.caller_turn.take() if audio is not None else None, item_id=item).run(),
            "converse.exchange")

    def model_idle(self) -> bool:
        """No reply of this call is generating or prefilling ahead: the kept rows may be extended."""
        r = self.response
        return r is None or (not r.running() and (r.ahead is None or r.ahead.done()))

    def turn_template(self) -> TurnRequest:
        """What a turn of this call asks of the model services, without its audio (prefills ahead)."""
        width = self.service.info.facts.hidden_size
        return turn_request(self.cfg, self.settings, self.session_id, "", np.zeros((0, width), np.float32), 0, [])

    async def finish(self) -> None:
        """The caller ended the call: answer speech still in the detector, wait for the reply."""
        if self.detector is not None:
            for ev in self.detector.flush():
                if isinstance(ev, SpeechStopped):
                    await self.outbox.put(pb.ServerEvent(speech_stopped=pb.SpeechStopped(
                        audio_end_ms=int(ev.audio_end_ms))))
                    await self.end_of_speech(np.asarray(ev.audio, dtype=np.float32), ev)
        if self.response is not None and self.response.task is not None:
            await asyncio.gather(self.response.task, return_exceptions=True)
        await self.wait_aheads()
        await self.caller_turn.settle()

    async def close(self) -> None:
        """The RPC is over (ended, failed or cancelled): stop a reply still generating."""
        if self.response is not None and self.response.running():
            self.response.cancel.set()
            await asyncio.gather(self.response.task, return_exceptions=True)
        await self.wait_aheads()
        await self.caller_turn.settle()

    async def wait_aheads(self) -> None:
        """The call's prefills ahead are short: a call ends with none left running."""
        if self.response is not None and self.response.ahead is not None:
            self.aheads.append(self.response.ahead)
        await asyncio.gather(*self.aheads, return_exceptions=True)
        self.aheads.clear()
