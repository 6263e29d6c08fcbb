"""An admitted Converse call is ended once, whoever ends it first: the response generator's
`finally`, or the watchdog when the caller's stream is over and the generator stopped taking events
(Ray stopped iterating it without closing it). Fakes for the service and the call: pure logic."""

from __future__ import annotations

import asyncio

from funchat.orchestrator.service import CallEnding


class Service:
    def __init__(self):
        self.released = []

    async def release(self, slot):
        self.released.append(slot)


class Call:
    def __init__(self):
        self.closed = 0

    async def close(self):
        self.closed += 1
        await asyncio.sleep(0.01)


def ending_with(abandoned_s: float) -> tuple[CallEnding, Service, Call]:
    service, call = Service(), Call()
    ending = CallEnding(service, "slot")
    ending.call = call
    ending.ABANDONED_S = abandoned_s
    return ending, service, call


def test_an_abandoned_call_is_ended_by_the_watchdog_once():
    async def main():
        ending, service, call = ending_with(0.05)
        reader = asyncio.ensure_future(asyncio.sleep(0))  # the caller's stream: over
        await asyncio.wait_for(ending.when_abandoned(reader), 5)
        await ending.end()  # the generator's finally, much later
        return service.released, call.closed

    assert asyncio.run(main()) == (["slot"], 1)


def test_a_generator_still_taking_events_is_not_ended_and_a_second_cancel_cannot_stop_the_ending():
    async def main():
        ending, service, call = ending_with(0.2)
        reader = asyncio.ensure_future(asyncio.sleep(0))
        watchdog = asyncio.ensure_future(ending.when_abandoned(reader))
        for _ in range(5):  # events taken: no ending
            await asyncio.sleep(0.1)
            ending.progressed()
        assert service.released == []
        watchdog.cancel()
        first = asyncio.ensure_future(ending.end())
        await asyncio.sleep(0)
        first.cancel()  # the generator cancelled again while it ends the call
        await asyncio.gather(first, return_exceptions=True)
        await asyncio.sleep(0.05)
        return service.released, call.closed

    assert asyncio.run(main()) == (["slot"], 1)
