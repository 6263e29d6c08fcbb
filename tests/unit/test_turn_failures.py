"""A turn that fails part-way leaves nothing running: the vocoder task that feeds the reply's
audio is stopped with it (before the fix it waited for codes forever, one task leaked per failed
turn), and the llm / refined_head sequences are ended.

The model services are fakes here (pure orchestration logic); the real ones run in
tests/integration/test_faults_network.py."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from funchat.orchestrator.model_clients import ServiceError, VocoderReply
from funchat.orchestrator.turn_runner import FAILED_TURN_END_TIMEOUT_S, TurnError, TurnRequest, TurnRunner
from funchat.turn.prompt import PromptBuilder
from funchat.turn.schedule import Mode


class FakeLlm:
    """Answers a prefill and `fail_at - 1` steps with an ordinary text id, then fails."""

    def __init__(self, token: int, width: int, fail_at: int, status: str = "StatusCode.INTERNAL",
                 end_hangs: bool = False):
        self.token, self.width, self.fail_at, self.status = token, width, fail_at, status
        self.end_hangs = end_hangs  # a partitioned service: the END never gets an answer
        self.calls = 0
        self.ended: list[int] = []

    async def prefill(self, call_id, ids, rows, **kw):
        self.calls += 1
        return self.token, np.zeros((len(ids), self.width), np.float32)

    async def step(self, call_id, text_token, speech_group=None, end=False, srh_input=True, keep_id=0):
        if end:
            self.ended.append(call_id)
            if self.end_hangs:
                await asyncio.Event().wait()
            return self.token, None
        self.calls += 1
        if self.calls >= self.fail_at:
            raise ServiceError("llm", self.status, "the forward failed")
        return self.token, np.zeros((1, self.width), np.float32)


class FakeRefinedHead:
    def __init__(self, group: list[int]):
        self.group = group
        self.ended: list[int] = []

    async def run(self, call_id, srh_input, start=False, end=False, **kw):
        if end:
            self.ended.append(call_id)
        return np.asarray(self.group, np.int64)


class SlowVocoder:
    """Each push takes a while: generation runs ahead of it, as with a real vocoder."""
    first_chunk_codes = 0  # a stream's codes are pushed as they come (no chunk size learned)


    def __init__(self):
        self.pushes = 0

    async def push(self, tokens, state, final, speaker=None, ready_at=None):
        self.pushes += 1
        await asyncio.sleep(0.01)
        return VocoderReply(np.zeros(960 * len(tokens), np.float32), b"state", 0, 0)


class FakeServices:
    def __init__(self, llm, refined_head, vocoder):
        self.llm, self.refined_head, self.vocoder = llm, refined_head, vocoder


@pytest.fixture(scope="module")
def builder(tiny_checkpoint) -> PromptBuilder:
    return PromptBuilder.from_checkpoint(tiny_checkpoint)


def request(builder: PromptBuilder) -> TurnRequest:
    n_groups = 3
    return TurnRequest(response_id="resp_test", mode=Mode.S2S, n_groups=n_groups,
                       audio_rows=np.zeros((n_groups, builder.facts.hidden_size), np.float32), max_new_tokens=40)


def services(builder: PromptBuilder, fail_at: int, status: str = "StatusCode.INTERNAL") -> FakeServices:
    token = builder.tokenizer.encode("hello")[0]
    return FakeServices(FakeLlm(token, builder.facts.hidden_size, fail_at, status), FakeRefinedHead([1, 2, 3, 4, 5]),
                        SlowVocoder())


async def run_turn(builder: PromptBuilder, svc: FakeServices) -> tuple[BaseException | None, set]:
    """Run one turn to its end; -> (what it raised, the tasks still alive afterwards)."""
    events = []

    async def emit(event):
        events.append(event)

    raised = None
    try:
        await TurnRunner(builder, svc).run(request(builder), emit, asyncio.Event())
    except BaseException as exc:
        raised = exc
    await asyncio.sleep(0.05)  # a leaked task would still be waiting now
    return raised, {t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()}


def test_a_failed_turn_stops_its_vocoder_task(builder):
    svc = services(builder, fail_at=6)
    raised, alive = asyncio.run(run_turn(builder, svc))
    assert isinstance(raised, TurnError) and raised.code == "UNAVAILABLE", raised
    assert "llm failed: the forward failed" in raised.message
    assert svc.vocoder.pushes > 0  # the vocoder task had started before the failure
    assert alive == set(), f"tasks left running after the failed turn: {alive}"
    assert svc.llm.ended and svc.refined_head.ended  # both sequences ended, their slots freed now


def test_a_failed_turn_does_not_wait_for_an_unanswered_sequence_end(builder):
    """A partitioned llm: its step times out, and the END sent to free the slot is never answered
    either. The caller's error must not wait another service timeout for it."""
    svc = services(builder, fail_at=6, status="StatusCode.DEADLINE_EXCEEDED")
    svc.llm.end_hangs = True

    async def timed():
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        raised, alive = await run_turn(builder, svc)
        return raised, alive, loop.time() - t0

    raised, alive, seconds = asyncio.run(timed())
    assert isinstance(raised, TurnError) and raised.code == "UNAVAILABLE"
    assert seconds < FAILED_TURN_END_TIMEOUT_S + 1.0, seconds
    assert svc.llm.ended  # it was tried
    assert alive == set(), f"tasks left running: {alive}"


def test_a_cancelled_turn_task_stops_its_vocoder_task(builder):
    """The turn's own task cancelled mid-generation (the call went away)."""
    async def scenario():
        svc = services(builder, fail_at=10 ** 6)
        gate = asyncio.Event()
        step = svc.llm.step

        async def slow_step(*args, **kw):  # generation blocks here until cancelled
            if not kw.get("end") and svc.llm.calls >= 4:
                await gate.wait()
            return await step(*args, **kw)
        svc.llm.step = slow_step

        async def emit(event):
            pass
        turn = asyncio.create_task(TurnRunner(builder, svc).run(request(builder), emit, asyncio.Event()))
        while svc.vocoder.pushes == 0:
            await asyncio.sleep(0.01)
        turn.cancel()
        await asyncio.gather(turn, return_exceptions=True)
        await asyncio.sleep(0.05)
        return turn, {t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()}

    turn, alive = asyncio.run(scenario())
    assert turn.cancelled()
    assert alive == set(), f"tasks left running after the cancelled turn: {alive}"
