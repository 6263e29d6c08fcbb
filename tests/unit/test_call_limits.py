"""A Converse call's time limits (ConverseCall.read): a caller that sends nothing while no reply is
generating or playing is ended after FUNCHAT_IDLE_TIMEOUT_S, every call after FUNCHAT_MAX_CALL_S,
each with a status that says so; events and a reply being heard keep a call alive."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from funchat.api import pb
from funchat.orchestrator.call_config import CallConfig
from funchat.orchestrator.converse import ConverseCall
from funchat.orchestrator.errors import ApiError
from funchat.orchestrator.exchange import Response
from funchat.orchestrator.outbox import END

CLEAR = pb.ClientEvent(clear=pb.InputAudioClear())  # an event every call accepts, doing nothing


def call(idle_s: float, max_call_s: float = 60.0) -> ConverseCall:
    settings = SimpleNamespace(max_chunk_ms=1000, max_turn_s=60.0, idle_timeout_s=idle_s, max_call_s=max_call_s,
                               encode_while_speaking=False)
    return ConverseCall(SimpleNamespace(settings=settings), "sid", CallConfig(vad=None))


async def events_every(period_s: float, count: int | None, then_wait: bool = True):
    """`count` clear events `period_s` apart (None: forever), then nothing (or the stream's end)."""
    sent = 0
    while count is None or sent < count:
        await asyncio.sleep(period_s)
        yield CLEAR
        sent += 1
    if then_wait:
        await asyncio.Event().wait()


async def read(c: ConverseCall, stream) -> tuple[list, float]:
    """-> (what the reader put in the outbox, seconds it read for)."""
    t0 = time.monotonic()
    await asyncio.wait_for(c.read(stream), timeout=10)
    return list(c.outbox.items), time.monotonic() - t0


def ending(items: list) -> ApiError | None:
    assert items[-1] is END
    errors = [i for i in items if isinstance(i, ApiError)]
    return errors[-1] if errors else None


def test_a_silent_call_is_ended_after_the_idle_timeout():
    c = call(idle_s=0.2)
    items, seconds = asyncio.run(read(c, events_every(0.0, 0)))
    error = ending(items)
    assert error is not None and error.code == "DEADLINE_EXCEEDED"
    assert "FUNCHAT_IDLE_TIMEOUT_S" in error.message and "0.2 s" in error.message
    assert 0.2 <= seconds < 2.0


def test_events_keep_a_call_alive_and_the_idle_clock_restarts_at_each():
    c = call(idle_s=0.3)
    items, seconds = asyncio.run(read(c, events_every(0.1, 8)))  # 0.8 s of events, then silence
    assert ending(items).code == "DEADLINE_EXCEEDED"
    assert seconds >= 0.8 + 0.3 - 0.05


def test_a_reply_generating_or_playing_is_not_idleness():
    async def main():
        c = call(idle_s=0.2)
        reply = Response.new()

        async def generating():
            await asyncio.sleep(0.6)
            reply.first_audio_at = time.monotonic() - 0.1
            reply.audio_ms = 500  # 0.4 s of it still to be heard when generation ends
        reply.task = asyncio.create_task(generating())
        c.response = reply
        return await read(c, events_every(0.0, 0))
    items, seconds = asyncio.run(main())
    assert ending(items).code == "DEADLINE_EXCEEDED"
    assert seconds >= 0.6 + 0.4 + 0.2 - 0.1  # generating, playing, then idle


def test_every_call_ends_at_its_maximum_length():
    c = call(idle_s=10.0, max_call_s=0.4)
    items, seconds = asyncio.run(read(c, events_every(0.05, None)))
    error = ending(items)
    assert error.code == "OUT_OF_RANGE" and "FUNCHAT_MAX_CALL_S" in error.message and "resume" in error.message
    assert 0.4 <= seconds < 2.0


def test_hanging_up_or_closing_the_stream_ends_the_call_without_an_error():
    c = call(idle_s=0.2)

    async def hang_up():
        yield CLEAR
        yield pb.ClientEvent(end=pb.SessionEnd())
        await asyncio.Event().wait()  # never read: the call ended at `end`
    items, _ = asyncio.run(read(c, hang_up()))
    assert ending(items) is None
    items, _ = asyncio.run(read(call(idle_s=0.2), events_every(0.0, 1, then_wait=False)))
    assert ending(items) is None
