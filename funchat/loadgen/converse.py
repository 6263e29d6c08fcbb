"""One live Converse call played from a script (plan.py), measured turn by turn.

gRPC's blocking API, so that the same code runs in plain threads (the benchmark) and in Locust's
greenlets (after grpc.experimental.gevent.init_gevent(), blocking calls yield to other greenlets).
A call has two flows: this object's `run` (the caller: microphone, loudspeaker, decisions) and a
receiver thread that records every server event with its arrival time.

Realtime (a live caller): the microphone sends a chunk every chunk_ms, the caller's speech when it
talks and silence otherwise, as a phone does; the loudspeaker plays each reply in real time and
the caller acks what it has heard every chunk (no acks while it talks over a reply). Per turn:

- end of the caller's turn: with server VAD, the moment the caller sent the audio in which the
  server could first see the end (the speech's end as speech_stopped reports it, plus the VAD's
  silence duration, which this caller sets explicitly so it knows it); with manual turns, the commit;
- first audio: end of turn -> first audio chunk of its reply;
- speech end -> first audio: what a listener perceives, the VAD's wait included;
- reply time: end of turn -> response_done (real-time factor: reply time / reply audio);
- underruns: the loudspeaker ran dry (replies.py);
- barge-in delay: the first chunk of speech over a playing reply -> that reply's `interrupted`.

Not realtime (the benchmark): each turn's audio goes as fast as the call takes it, then commit;
the next turn starts at the reply's response_done; no playback acks.
"""

from __future__ import annotations

import bisect
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import grpc
import numpy as np

from funchat.api import pb, pb_grpc
from funchat.client.audio import encode_audio
from funchat.client.auth import authed_stub
from funchat.loadgen.plan import TurnPlan
from funchat.loadgen.records import (BARGE_IN, BARGE_IN_IGNORED, CLIENT_ERROR, HANG_UP, LISTEN, NO_TURN, SILENT,
                                     TIMEOUT, CallRecord, TurnRecord)
from funchat.loadgen.replies import ReplyTracker
from funchat.loadgen.settings import CallerSettings
from funchat.loadgen.utterances import INPUT_RATE

# A behaviour starts only while the reply still has this much audio to play (or is still being
# generated): barging into, going silent during or hanging up on a reply that is about to end
# would not be "mid-reply".
MIN_REMAINING_S = 1.0
END_GRACE_S = 10.0  # after `end`, how long the server may take to finish the call


class _Requests:
    """The call's request stream: events put here are sent in order; close() half-closes it."""

    def __init__(self):
        self._queue: queue.Queue = queue.Queue()
        self.closed = False

    def put(self, event: pb.ClientEvent) -> None:
        if not self.closed:
            self._queue.put(event)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._queue.put(None)

    def __iter__(self):
        while True:
            event = self._queue.get()
            if event is None:
                return
            yield event


@dataclass
class _Turn:
    plan: TurnPlan
    record: TurnRecord
    speech_sent_at: float | None = None   # its first chunk sent
    speech_done_at: float | None = None   # its last chunk sent (manual: the commit)
    commit_at: float | None = None
    response_id: str = ""
    turn_end_at: float | None = None
    speech_end_at: float | None = None
    extra_responses: int = 0              # the VAD cut the utterance in more than one turn
    barged_by: "_Turn | None" = None      # the next turn, spoken over this turn's reply
    emitted: bool = False


@dataclass
class _Received:
    """What the receiver thread learnt, read by the caller under the lock."""

    session: pb.SessionCreated | None = None
    ended: bool = False
    end_code: str = ""
    end_message: str = ""
    stopped_ms: int | None = None  # the last speech_stopped not yet taken by a response
    call_errors: list[tuple[str, str]] = field(default_factory=list)


class ConverseCaller:
    """Play `plan` as one Converse call on `channel`; run() returns the CallRecord. on_turn(record)
    is called (from run's thread) as each turn's measurements are final. api_key: the API key the
    call sends (None: $FUNCHAT_API_KEY; "": none)."""

    def __init__(self, channel: grpc.Channel, plan: list[TurnPlan], settings: CallerSettings = CallerSettings(),
                 seed: int | None = None, on_turn: Callable[[TurnRecord], None] | None = None,
                 call_id: str | None = None, api_key: str | None = None):
        if not plan:
            raise ValueError("an empty plan: a call needs at least one turn")
        if any(p.behaviour != LISTEN for p in plan) and not (settings.realtime and settings.server_vad):
            raise ValueError("barge-in, silence and hang-up need a live caller (realtime with server VAD)")
        self.stub = authed_stub(pb_grpc.FunchatStub(channel), api_key)
        self.plan, self.settings, self.seed = plan, settings, seed
        self.on_turn = on_turn
        self.call_id = call_id or uuid.uuid4().hex[:12]
        self.chunk = INPUT_RATE * settings.chunk_ms // 1000
        self.requests = _Requests()
        self.tracker = ReplyTracker()
        self.got = _Received()
        self.lock = threading.Condition()
        self.turns: list[_Turn] = []
        self.sent_starts: list[int] = []   # stream position of each audio chunk sent ...
        self.sent_times: list[float] = []  # ... and when it was sent
        self.position = 0
        self.next_tick = 0.0
        self.listening_to = ""            # the reply being acked ("" while the caller talks)
        self.acked: dict[str, int] = {}
        self.muted_until = 0.0
        self.hung_up = False
        self.responses = None

    # ---- the receiver ----

    def _receive(self) -> None:
        try:
            for event in self.responses:
                with self.lock:
                    self._on_event(time.monotonic(), event)
                    self.lock.notify_all()
            code, message = "", "the server ended the call"
        except grpc.RpcError as exc:
            code, message = exc.code().name, exc.details() or ""
        with self.lock:
            self.got.ended = True
            if not (self.hung_up or self.requests.closed and code in ("", "CANCELLED")):
                self.got.end_code, self.got.end_message = code or "UNKNOWN", message
            self.lock.notify_all()

    def _on_event(self, t: float, event: pb.ServerEvent) -> None:
        kind = event.WhichOneof("event")
        turn = self.turns[-1] if self.turns else None
        if kind == "session_created":
            self.got.session = event.session_created
        elif kind == "speech_stopped":
            self.got.stopped_ms = event.speech_stopped.audio_end_ms
        elif kind == "error":
            err = event.error
            if turn is not None and not turn.record.error:
                turn.record.error, turn.record.error_message = err.code or "UNKNOWN", f"{err.event}: {err.message}"
            elif turn is None:
                self.got.call_errors.append((err.code or "UNKNOWN", err.message))
        elif kind == "response_created" and turn is not None:
            if turn.response_id:
                turn.extra_responses += 1
            turn.response_id = event.response_created.response_id
            self._mark_turn_end(turn, t)
        self.tracker.on_event(t, event)

    def _mark_turn_end(self, turn: _Turn, t: float) -> None:
        if not self.settings.server_vad:
            turn.turn_end_at = turn.turn_end_at or turn.commit_at or t
            return
        stopped, self.got.stopped_ms = self.got.stopped_ms, None
        if stopped is None:  # a turn the VAD did not report (cannot happen with server VAD): its arrival
            turn.turn_end_at = t
            return
        decided = (stopped + self.settings.vad_silence_ms) * INPUT_RATE // 1000
        turn.turn_end_at = self._sent_at(decided)
        turn.speech_end_at = self._sent_at(stopped * INPUT_RATE // 1000)

    def _sent_at(self, position: int) -> float:
        """When the chunk holding this stream position was sent."""
        i = max(0, bisect.bisect_right(self.sent_starts, position) - 1)
        return self.sent_times[i] if self.sent_times else time.monotonic()

    # ---- the caller ----

    def run(self) -> CallRecord:
        started_at, t_start = time.time(), time.monotonic()
        self.responses = self.stub.Converse(iter(self.requests))
        receiver = threading.Thread(target=self._receive, name=f"converse-{self.call_id}", daemon=True)
        receiver.start()
        self.requests.put(pb.ClientEvent(session=self.settings.session(self.seed)))
        try:
            if self._wait(lambda: self.got.session is not None or self.got.ended, self.settings.connect_timeout_s):
                if self.got.session is not None:
                    self._converse()
            if self.got.session is None:
                code, message = self._why_no_session()
                self._fail(self._new_turn(0, self.plan[0]), code, message)
        except Exception as exc:  # noqa: BLE001 - a bug here is reported as this call's error, not a crash
            turn = self.turns[-1] if self.turns else self._new_turn(0, self.plan[0])
            self._fail(turn, CLIENT_ERROR, f"{type(exc).__name__}: {exc}")
        finally:
            self._finish(receiver)
        return CallRecord("converse", self.call_id, started_at, time.monotonic() - t_start,
                          [t.record for t in self.turns], hung_up=self.hung_up)

    def _why_no_session(self) -> tuple[str, str]:
        with self.lock:
            if self.got.call_errors:
                return self.got.call_errors[0]
            if self.got.end_code:
                return self.got.end_code, self.got.end_message
        return TIMEOUT, f"no session_created within {self.settings.connect_timeout_s:g} s"

    def _converse(self) -> None:
        self.next_tick = time.monotonic()
        for index, plan in enumerate(self.plan):
            turn = self._new_turn(index, plan)
            if plan.barges_in and len(self.turns) > 1:
                self.turns[-2].barged_by = turn
            if not self._speak(turn):
                return
            outcome = self._await_reply(turn)
            if outcome != "done" and outcome != BARGE_IN:
                return
            if outcome == "done" and self.settings.realtime and index + 1 < len(self.plan):
                self._idle(self.settings.think_s)

    def _new_turn(self, index: int, plan: TurnPlan) -> _Turn:
        turn = _Turn(plan, TurnRecord("converse", self.call_id, index, time.time()))
        with self.lock:
            self.turns.append(turn)
        return turn

    def _speak(self, turn: _Turn) -> bool:
        """Send the utterance (realtime: one chunk per tick of the microphone); manual: then commit."""
        audio = turn.plan.utterance.audio
        self.listening_to = ""  # a caller who talks stops acking the reply it talks over
        if self.settings.realtime:
            # the microphone sends whole chunks: the end of the speech is padded with silence
            padded = np.zeros(-(-len(audio) // self.chunk) * self.chunk, np.float32)
            padded[:len(audio)] = audio
            for i in range(0, len(padded), self.chunk):
                sent = self._mic_tick(padded[i:i + self.chunk])
                if turn.speech_sent_at is None:
                    turn.speech_sent_at = sent
                if self.got.ended:
                    return self._call_ended(turn)
        else:
            for i in range(0, len(audio), self.chunk):
                sent = self._send_audio(audio[i:i + self.chunk])
                turn.speech_sent_at = turn.speech_sent_at or sent
        turn.speech_done_at = time.monotonic()
        if not self.settings.server_vad:
            turn.commit_at = time.monotonic()
            self.requests.put(pb.ClientEvent(commit=pb.InputAudioCommit()))
        return True

    def _await_reply(self, turn: _Turn) -> str:
        """Listen to the turn's reply (and do the planned behaviour); -> "done", BARGE_IN (speak the
        next turn now), HANG_UP, or "failed"."""
        deadline = turn.speech_done_at + self.settings.turn_timeout_s
        plan = turn.plan
        armed = plan.behaviour != LISTEN
        while True:
            now = time.monotonic()
            with self.lock:
                ended = self.got.ended
                state = self.tracker.replies.get(turn.response_id) if turn.response_id else None
            if ended:
                return self._call_ended(turn)
            if state is None or state.done_at is None:
                if now > deadline:
                    code = NO_TURN if state is None else TIMEOUT
                    what = "no response to the caller's speech" if state is None else "no response_done"
                    self._fail(turn, code, f"{what} within {self.settings.turn_timeout_s:g} s")
                    return "failed"
            if state is not None and self.settings.realtime and now >= self.muted_until:
                self.listening_to = turn.response_id
            if state is not None and not self.settings.realtime and state.done_at is not None:
                self._emit(turn)
                return "done"
            if armed and state is not None and state.first_audio_at is not None and state.interrupted_at is None:
                heard = self.tracker.played_ms(turn.response_id, now)
                left = self.tracker.ends_at(turn.response_id) - now
                if heard >= plan.at_ms and (state.done_at is None or left >= MIN_REMAINING_S):
                    armed = False
                    turn.record.behaviour = plan.behaviour
                    if plan.behaviour == BARGE_IN:
                        return BARGE_IN  # turn is emitted once its `interrupted` came (_flush)
                    if plan.behaviour == HANG_UP:
                        self._hang_up(turn)
                        return HANG_UP
                    if plan.behaviour == SILENT:
                        self.muted_until = now + self.settings.silent_s
                        self.listening_to = ""
            if (state is not None and state.done_at is not None and now >= self.muted_until
                    and (state.interrupted_at is not None or now >= self.tracker.ends_at(turn.response_id))):
                self._ack()  # the final one: the reply has been heard to its end
                self._emit(turn)
                return "done"
            if self.settings.realtime:
                self._mic_tick(None)
            else:
                self._wait(lambda: self.got.ended or self._done(turn), min(1.0, max(0.0, deadline - now)))

    def _done(self, turn: _Turn) -> bool:
        state = self.tracker.replies.get(turn.response_id) if turn.response_id else None
        return state is not None and state.done_at is not None

    def _idle(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end and not self.got.ended:
            self._mic_tick(None)

    # ---- the wire ----

    def _mic_tick(self, speech: np.ndarray | None) -> float:
        """Wait for the microphone's next tick, send its chunk (speech, else silence) and ack what
        the loudspeaker has played; a muted caller sends nothing. -> when the chunk went out."""
        self._sleep_until(self.next_tick)
        self.next_tick += self.settings.chunk_ms / 1000
        self._flush()
        now = time.monotonic()
        if now < self.muted_until:
            return now
        sent = self._send_audio(speech if speech is not None else np.zeros(self.chunk, np.float32))
        self._ack()
        return sent

    def _send_audio(self, samples: np.ndarray) -> float:
        t = time.monotonic()
        with self.lock:
            self.sent_starts.append(self.position)
            self.sent_times.append(t)
            self.position += len(samples)
        self.requests.put(pb.ClientEvent(audio=pb.InputAudioAppend(audio=encode_audio(samples, "pcm16"))))
        return t

    def _ack(self) -> None:
        rid = self.listening_to
        if not rid or rid in self.tracker.player.stopped:
            return
        with self.lock:
            ms = self.tracker.ack_ms(rid, time.monotonic())
        if ms > self.acked.get(rid, 0):
            self.acked[rid] = ms
            self.requests.put(pb.ClientEvent(playback=pb.PlaybackAck(response_id=rid, played_ms=ms)))

    def _sleep_until(self, t: float) -> None:
        delay = t - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def _wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        with self.lock:
            return self.lock.wait_for(predicate, timeout)

    def _hang_up(self, turn: _Turn) -> None:
        self.hung_up = True
        turn.record.status = "hung_up"
        self.responses.cancel()
        self._emit(turn)

    def _finish(self, receiver: threading.Thread) -> None:
        """End the call (`end`, then the server's last events), or cancel it; emit what is left."""
        try:
            if not self.got.ended and not self.hung_up:
                self.requests.put(pb.ClientEvent(end=pb.SessionEnd()))
                self.requests.close()
                self._wait(lambda: self.got.ended, END_GRACE_S)
            self.requests.close()
            if not self.got.ended:
                self.responses.cancel()
            receiver.join(timeout=5.0)
            self._flush(final=True)
        finally:
            self.requests.close()
            self.responses.cancel()

    # ---- records ----

    def _call_ended(self, turn: _Turn) -> str:
        """The server ended the call under this turn: the turn failed with the call's status."""
        with self.lock:
            code, message = self.got.end_code or "UNKNOWN", self.got.end_message or "the call ended"
        self._fail(turn, code, message)
        return "failed"

    def _fail(self, turn: _Turn, code: str, message: str) -> None:
        if not turn.record.error:
            turn.record.error, turn.record.error_message = code, message
        turn.record.status = turn.record.status or "failed"
        self._emit(turn)

    def _flush(self, final: bool = False) -> None:
        """Emit the barged-into turns whose `interrupted` came, or whose wait for it is over (final:
        the call is over; a barge-in still unanswered then is left unmeasured unless its time is up)."""
        for turn in self.turns:
            if turn.emitted or turn.record.behaviour != BARGE_IN or turn.barged_by is None:
                continue
            with self.lock:
                state = self.tracker.replies.get(turn.response_id)
                interrupted = state is not None and state.interrupted_at is not None and state.done_at is not None
            started = turn.barged_by.speech_sent_at
            if interrupted and started is not None:
                turn.record.barge_in_s = state.interrupted_at - started
                self._emit(turn)
            elif started is not None and time.monotonic() - started > self.settings.barge_in_timeout_s:
                if not turn.record.error:
                    turn.record.error = BARGE_IN_IGNORED
                    turn.record.error_message = (f"the reply was not interrupted within "
                                                 f"{self.settings.barge_in_timeout_s:g} s of speech over it")
                self._emit(turn)
            elif final:
                self._emit(turn)

    def _emit(self, turn: _Turn) -> None:
        if turn.emitted:
            return
        turn.emitted = True
        rec = turn.record
        with self.lock:
            state = self.tracker.replies.get(turn.response_id) if turn.response_id else None
            if state is not None:
                rec.status = rec.status or state.status
                rec.audio_s = round(state.audio_s, 4)
                rec.underruns, rec.underrun_s = state.underruns, round(state.underrun_s, 4)
                if turn.turn_end_at is not None and state.first_audio_at is not None:
                    rec.first_audio_s = state.first_audio_at - turn.turn_end_at
                if turn.speech_end_at is not None and state.first_audio_at is not None:
                    rec.speech_end_to_audio_s = state.first_audio_at - turn.speech_end_at
                if turn.turn_end_at is not None and state.done_at is not None:
                    rec.reply_s = state.done_at - turn.turn_end_at
        if rec.status == "failed" and not rec.error:
            rec.error, rec.error_message = "FAILED", "the reply's status is failed"
        if self.on_turn is not None:
            self.on_turn(rec)
