"""How a turn ends when something fails (pure orchestration logic: the store and the model services
are fakes here; tests/integration/test_session_integrity.py runs the real ones):

- a turn that fails after its session was marked "responding" puts it back to "listening" (the
  state never sticks), and sends an error event and a failed response_done (with a fresh resume
  token);
- when generation fails the caller's turn is kept in the history; when its encoding fails nothing
  is stored and the error says so;
- the session's lease: a busy session refuses the turn before any model work, a lease lost mid-turn
  stops it with ABORTED and nothing stored, and the lease is released however the turn ends;
- a session holding speech of another model is refused before any model work.
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import numpy as np
import pytest

from funchat.orchestrator.call_config import CallConfig
from funchat.orchestrator.exchange import Exchange, Response, model_fingerprint
from funchat.orchestrator.sessions import HistoryTurn, Lease, LeaseLost, SessionBusy
from funchat.orchestrator.turn_runner import TurnError, TurnOutcome


class FakeStore:
    """Records what a turn writes; `busy`: another turn holds the lease; `lose_lease`: renewals fail."""

    def __init__(self, history=(), busy=False, lose_lease=False):
        self.history, self.busy, self.lose_lease = list(history), busy, lose_lease
        self.states: list[str] = []
        self.appended: list[list[HistoryTurn]] = []
        self.trimmed: list[int] = []
        self.released: list[str] = []
        self.lost = False

    async def acquire_lease(self, session_id, ttl_s):
        if self.busy:
            raise SessionBusy(f"session {session_id}: another turn of this session is in progress")
        return Lease(session_id, "token-1", int(ttl_s * 1000))

    async def renew_lease(self, lease):
        self.lost = self.lose_lease
        return not self.lose_lease

    async def release_lease(self, lease):
        self.released.append(lease.token)
        return True

    async def get(self, session_id):
        return SimpleNamespace(turns=list(self.history))

    def check(self, lease):
        if lease is not None and self.lost:
            raise LeaseLost("this turn lost its lease on the session")

    async def set_state(self, session_id, state, active=None, owner=None, lease=None, exclusive=False):
        self.check(lease)
        self.states.append(state)

    async def append_turns(self, session_id, turns, lease=None, drop_oldest=0):
        self.check(lease)
        self.appended.append(turns)
        self.trimmed.append(drop_oldest)
        return len(self.history) + len(turns)

    def issue_resume_token(self, session_id, tenant=""):
        return f"v2.{session_id}.1.fresh"


class Runner:
    """encode_error / run_error: a TurnError to raise; else encode gives 2 rows and run waits for the
    cancel event (or answers at once)."""

    def __init__(self, encode_error=None, run_error=None, wait_for_cancel=False):
        self.encode_error, self.run_error, self.wait_for_cancel = encode_error, run_error, wait_for_cancel
        self.encoded = self.ran = 0

    async def encode(self, audio, windows=None):
        self.encoded += 1
        if self.encode_error:
            raise self.encode_error
        return np.zeros((2, 4), np.float32), 2

    async def run(self, request, emit, cancel, t_end_of_turn=None):
        self.ran += 1
        if self.run_error:
            raise self.run_error
        if self.wait_for_cancel:
            await asyncio.wait_for(cancel.wait(), 5)
        return TurnOutcome(response_id=request.response_id, status="cancelled" if cancel.is_set() else "completed",
                           text="", text_tokens=[], text_tokens_emitted=[], speech_tokens=[], vocoder_tokens=[],
                           prompt_tokens=10, history_turns_dropped=0, audio_samples=0, latency_ms={})


def run_turn(tmp_path, store, runner, lease_s=15.0, unusable=lambda history: 0):
    service = SimpleNamespace(
        settings=SimpleNamespace(max_turn_s=60.0, max_new_tokens=16, checkpoint=tmp_path, model_revision="",
                                 session_lease_s=lease_s),
        store=store, runner=runner, endpoints={"llm": "h:1", "refined_head": "h:2"}, replica_id="test:1",
        info=SimpleNamespace(unusable_history=unusable))
    sent = []

    async def emit(event):
        if event.WhichOneof("event") == "response_done":  # the session is free before the caller hears it
            assert store.released or store.busy, "response_done sent while the turn still held the lease"
        sent.append(event)

    outcome = asyncio.run(Exchange(service, "sid", CallConfig(vad=None), np.zeros(16000, np.float32),
                                   Response.new(), emit, time.perf_counter()).run())
    return outcome, sent


def kinds(sent):
    return [e.WhichOneof("event") for e in sent]


def test_failed_generation_keeps_the_callers_turn_and_puts_the_session_back_to_listening(tmp_path):
    store = FakeStore()
    outcome, sent = run_turn(tmp_path, store, Runner(run_error=TurnError("UNAVAILABLE", "model service llm failed")))
    assert outcome is None
    assert store.states == ["responding", "listening"]
    assert kinds(sent) == ["error", "response_done"]
    assert sent[0].error.code == "UNAVAILABLE" and "your turn is kept in the session's history" in sent[0].error.message
    assert sent[1].response_done.status == "failed" and sent[1].response_done.resume_token == "v2.sid.1.fresh"
    [[user]] = store.appended
    assert user.role == "user" and user.n_groups == 2 and user.audio_model == model_fingerprint(tmp_path, "")
    assert store.released == ["token-1"]


def test_a_completed_turn_is_stored_and_frees_the_session_before_its_response_done(tmp_path):
    store = FakeStore(history=[HistoryTurn(role="assistant", text="hello")] * 3)
    # the store trims what the prompt builder says no later prompt can hold, given the new turns
    outcome, sent = run_turn(tmp_path, store, Runner(), unusable=lambda history: len(history) - 2)
    assert outcome.status == "completed" and kinds(sent) == ["response_done"]
    assert sent[0].response_done.resume_token == "v2.sid.1.fresh"
    assert [[t.role for t in turns] for turns in store.appended] == [["user", "assistant"]]
    assert store.trimmed == [3]
    assert store.states == ["responding", "listening"] and store.released == ["token-1"]


def test_a_failed_encoding_stores_nothing_and_says_so(tmp_path):
    store = FakeStore()
    outcome, sent = run_turn(tmp_path, store, Runner(encode_error=TurnError("UNAVAILABLE", "audio tokenizer: down")))
    assert outcome is None and store.appended == [] and store.states == []
    assert sent[0].error.code == "UNAVAILABLE" and "nothing of it was stored: send it again" in sent[0].error.message
    assert store.released == ["token-1"]


def test_a_turn_the_context_cannot_hold_is_not_kept(tmp_path):
    store = FakeStore()
    run_turn(tmp_path, store, Runner(run_error=TurnError("INVALID_ARGUMENT", "the prompt takes 3000 positions")))
    assert store.appended == [] and store.released == ["token-1"]


def test_a_busy_session_refuses_the_turn_before_any_model_work(tmp_path):
    store, runner = FakeStore(busy=True), Runner()
    outcome, sent = run_turn(tmp_path, store, runner)
    assert outcome is None and runner.encoded == runner.ran == 0
    assert sent[0].error.code == "ABORTED" and "another turn of this session is in progress" in sent[0].error.message
    assert store.states == [] and store.appended == [] and store.released == []  # not its lease to free


def test_a_lease_lost_mid_turn_stops_it_with_nothing_stored(tmp_path):
    store, runner = FakeStore(lose_lease=True), Runner(wait_for_cancel=True)
    outcome, sent = run_turn(tmp_path, store, runner, lease_s=0.03)
    assert outcome is None and runner.ran == 1
    assert sent[0].error.code == "ABORTED" and "lost its lease" in sent[0].error.message
    assert store.appended == [] and store.states == ["responding", "listening"]  # reset only while no one holds it
    assert sent[-1].response_done.status == "failed"


@pytest.mark.parametrize("stored_model", ["sha256:another0model0", None])
def test_speech_of_another_model_is_refused_before_any_model_work(tmp_path, stored_model):
    history = [HistoryTurn(role="user", audio_rows=np.zeros((2, 4), np.float32), n_groups=2,
                           audio_model=stored_model), HistoryTurn(role="assistant", text="hi")]
    store, runner = FakeStore(history=history), Runner()
    outcome, sent = run_turn(tmp_path, store, runner)
    assert outcome is None and runner.encoded == runner.ran == 0
    message = sent[0].error.message
    assert sent[0].error.code == "FAILED_PRECONDITION" and "another model" in message and "new session" in message
    assert (stored_model or "unknown") in message and store.released == ["token-1"]


def test_the_model_fingerprint_follows_the_config_and_the_revision(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir(), (tmp_path / "c").mkdir()
    (tmp_path / "a" / "config.json").write_text('{"hidden_size": 64, "audio_config": {"d_model": 64}}')
    (tmp_path / "b" / "config.json").write_text('{\n  "audio_config": {"d_model": 64},\n  "hidden_size": 64\n}')
    (tmp_path / "c" / "config.json").write_text('{"hidden_size": 128, "audio_config": {"d_model": 64}}')
    a, b, c = (model_fingerprint(tmp_path / n) for n in "abc")
    assert a == b != c and a.startswith("sha256:")  # the same config however it is written; another differs
    assert model_fingerprint(tmp_path / "a", "rev-2") != a
