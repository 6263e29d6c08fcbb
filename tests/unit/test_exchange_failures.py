"""A turn that fails after its session was marked "responding" puts it back to "listening" (the
state never sticks), and sends an error event and a failed response_done."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import numpy as np

from funchat.orchestrator.call_config import CallConfig
from funchat.orchestrator.exchange import Exchange, Response
from funchat.orchestrator.turn_runner import TurnError


class FakeStore:
    def __init__(self):
        self.states: list[str] = []

    async def get(self, session_id):
        return SimpleNamespace(turns=[])

    async def set_state(self, session_id, state, active=None, owner=None):
        self.states.append(state)


class FailingRunner:
    async def encode(self, audio):
        return np.zeros((2, 4), np.float32), 2

    async def run(self, request, emit, cancel, t_end_of_turn=None):
        raise TurnError("UNAVAILABLE", "model service llm failed: connection refused")


def test_a_failed_turn_puts_the_session_back_to_listening():
    store = FakeStore()
    service = SimpleNamespace(settings=SimpleNamespace(max_turn_s=60.0, max_new_tokens=16), store=store,
                              runner=FailingRunner(), endpoints={"llm": "h:1", "refined_head": "h:2"},
                              replica_id="test:1")
    sent = []

    async def emit(event):
        sent.append(event)

    outcome = asyncio.run(Exchange(service, "sid", CallConfig(vad=None), np.zeros(16000, np.float32),
                                   Response.new(), emit, time.perf_counter()).run())
    assert outcome is None
    assert store.states == ["responding", "listening"]
    assert [e.WhichOneof("event") for e in sent] == ["error", "response_done"]
    assert sent[0].error.code == "UNAVAILABLE" and sent[1].response_done.status == "failed"
