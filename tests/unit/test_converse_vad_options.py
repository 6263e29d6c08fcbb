"""Server VAD's options in a Converse call (funchat/orchestrator/converse.py): a turn held until
`respond` (create_response false), a reply the caller may not stop (interrupt_response false), and
the idle timeout. The turns are recorded, not generated: only the call's decisions are under test
(with the real Silero VAD on the recording)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np

from funchat.api import pb
from funchat.orchestrator.call_config import VAD_DEFAULTS, CallConfig
from funchat.orchestrator.converse import ConverseCall
from funchat.orchestrator.exchange import Response

CHUNK = 1600  # 100 ms at 16 kHz


def pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


class RecordingCall(ConverseCall):
    def __init__(self, **vad):
        service = SimpleNamespace(settings=SimpleNamespace(max_chunk_ms=1000, max_turn_s=60.0,
                                                           encode_while_speaking=False))
        super().__init__(service, "sid", CallConfig(vad={**VAD_DEFAULTS, "silence_duration_ms": 800, **vad}))
        self.turns: list[int | None] = []

    async def start_turn(self, audio, stopped=None, item=None) -> None:
        self.turns.append(None if audio is None else len(audio))
        if audio is not None and item is None:
            await self.outbox.put(pb.ServerEvent(committed=pb.InputAudioCommitted(audio_ms=len(audio) // 16)))

    async def send(self, samples: np.ndarray) -> None:
        for k in range(0, len(samples), CHUNK):
            await self.handle(pb.ClientEvent(audio=pb.InputAudioAppend(audio=pcm16(samples[k:k + CHUNK]))))

    def kinds(self) -> list[str]:
        return [item.WhichOneof("event") for item in self.outbox.items]


def a_reply(running: bool = False) -> Response:
    """A reply of this call: done and played out, or still generating."""
    r = Response.new()
    r.task = asyncio.ensure_future(asyncio.sleep(0.2 if running else 0))
    return r


def test_without_create_response_a_detected_turn_is_committed_and_answered_on_respond(speech):
    async def main():
        call = RecordingCall(create_response=False)
        await call.send(np.concatenate([speech[:48000], np.zeros(16000, np.float32)]))
        held = list(call.turns), call.kinds()
        await call.handle(pb.ClientEvent(respond=pb.ResponseCreate()))
        return held, call.turns, call.kinds()

    (turns_before, kinds_before), turns, kinds = asyncio.run(main())
    assert turns_before == [] and kinds_before[-2:] == ["speech_stopped", "committed"]
    assert len(turns) == 1 and turns[0] > 16000  # the held utterance, answered once asked
    assert kinds.count("committed") == 1  # not announced twice


def test_without_interrupt_response_caller_speech_does_not_stop_the_reply(speech):
    async def main():
        call = RecordingCall(interrupt_response=False)
        call.response = reply = a_reply(running=True)
        await call.send(np.concatenate([speech[:48000], np.zeros(16000, np.float32)]))
        return reply, call

    reply, call = asyncio.run(main())
    assert not reply.cancel.is_set() and not reply.interrupted  # it ran to its end
    assert "speech_started" in call.kinds() and len(call.turns) == 1  # and the turn was answered after it


def test_with_interrupt_response_the_same_speech_stops_the_reply(speech):
    async def main():
        call = RecordingCall()
        call.response = reply = a_reply(running=True)
        reply.first_audio_at, reply.audio_ms = None, 0
        await call.send(speech[:32000])
        return reply

    reply = asyncio.run(main())
    assert reply.cancel.is_set() and reply.interrupted


def test_the_idle_timeout_answers_the_callers_silence_after_a_reply():
    async def main():
        call = RecordingCall(idle_timeout_ms=1000)
        await call.send(np.zeros(24000, np.float32))  # no reply yet: nothing to time out from
        before = list(call.turns)
        call.response = a_reply()
        await asyncio.sleep(0.01)  # its task done
        await call.send(np.zeros(11200, np.float32))  # 0.7 s of silence after it: not yet
        not_yet = list(call.turns)
        await call.send(np.zeros(6400, np.float32))  # 1.1 s in all
        return before, not_yet, call

    before, not_yet, call = asyncio.run(main())
    assert before == [] and not_yet == []
    assert call.turns == [16000]  # the second of silence, committed as the caller's turn
    idle = [i.idle_timeout for i in call.outbox.items if i.WhichOneof("event") == "idle_timeout"]
    assert len(idle) == 1 and idle[0].audio_end_ms - idle[0].audio_start_ms == 1000


def test_a_session_stored_before_the_options_keeps_their_defaults():
    call = RecordingCall()
    call.cfg.vad = {"threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500}
    assert call.vad_option("create_response") and call.vad_option("interrupt_response")
    assert call.vad_option("idle_timeout_ms") == 0
