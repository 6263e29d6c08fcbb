"""The orchestrator's use of kept prefixes (pure logic, fake model services; the real services run
in tests/integration/test_orchestrator.py): a conversation's turn ends its sequences with a keep
id, the next turn sends only what its prompt adds to the kept prompt (its audio rows too), a
kept prefix the services no longer have falls back to the whole prompt, and after a failed turn
nothing kept is trusted."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from funchat.orchestrator.kept_prompts import KeptPrompts, shared_prefix
from funchat.orchestrator.model_clients import ServiceError, VocoderReply
from funchat.orchestrator.sessions import HistoryTurn
from funchat.orchestrator.turn_runner import TurnError, TurnRequest, TurnRunner
from funchat.turn.prompt import PromptBuilder
from funchat.turn.schedule import Mode


class RecordingLlm:
    """Records every prefill and end; ends the reply at once (its first step answers <|im_end|>)."""

    def __init__(self, builder: PromptBuilder, forget_kept: bool = False, fail_steps: bool = False):
        self.width = builder.facts.hidden_size
        self.end_id = builder.token_ids.end_ids[0]
        self.first = builder.tokenizer.encode("hello")[0]
        self.forget_kept, self.fail_steps = forget_kept, fail_steps
        self.prefills: list[dict] = []
        self.ends: list[dict] = []

    async def prefill(self, call_id, ids, rows, keep_id=0, prefix=0, end=False, **kw):
        self.prefills.append({"ids": list(ids), "rows": len(rows), "keep_id": keep_id, "prefix": prefix, "end": end})
        if prefix and self.forget_kept:
            raise ServiceError("llm", "StatusCode.NOT_FOUND", "no kept prefix")
        return self.first, np.zeros((len(ids), self.width), np.float32)

    async def step(self, call_id, text_token, speech_group=None, end=False, srh_input=True, keep_id=0):
        if end:
            self.ends.append({"keep_id": keep_id})
            return self.end_id, None
        if self.fail_steps:
            raise ServiceError("llm", "StatusCode.INTERNAL", "the forward failed")
        return self.end_id, np.zeros((1, self.width), np.float32)


class RecordingRefinedHead:
    def __init__(self):
        self.starts: list[dict] = []
        self.ends: list[dict] = []

    async def run(self, call_id, srh_input, start=False, end=False, keep_id=0, prefix=0, partial=False, **kw):
        if start:
            entry = {"positions": len(srh_input), "keep_id": keep_id, "prefix": prefix}
            self.starts.append({**entry, "partial": True} if partial else entry)
        if end:
            self.ends.append({"keep_id": keep_id})
        return np.asarray([1, 2, 3, 4, 5], np.int64)


class Vocoder:
    first_chunk_codes = 0  # a stream's codes are pushed as they come (no chunk size learned)

    async def push(self, tokens, state, final, speaker=None, ready_at=None):
        return VocoderReply(np.zeros(960 * len(tokens), np.float32), b"state", 0, 0)


class Services:
    def __init__(self, llm, refined_head):
        self.llm, self.refined_head, self.vocoder = llm, refined_head, Vocoder()


@pytest.fixture(scope="module")
def builder(tiny_checkpoint) -> PromptBuilder:
    return PromptBuilder.from_checkpoint(tiny_checkpoint)


def rows(builder: PromptBuilder, n: int, value: float) -> np.ndarray:
    return np.full((n, builder.facts.hidden_size), value, np.float32)


def turn(builder: PromptBuilder, history: list[HistoryTurn], audio: np.ndarray, conversation: str = "s1") -> TurnRequest:
    return TurnRequest(response_id="resp", mode=Mode.S2S, audio_rows=audio, n_groups=len(audio), history=history,
                       max_new_tokens=8, conversation=conversation)


def run(runner: TurnRunner, req: TurnRequest):
    async def emit(event):
        pass

    return asyncio.run(runner.run(req, emit, asyncio.Event()))


def test_the_next_turn_sends_only_what_its_prompt_adds(builder):
    llm, srh = RecordingLlm(builder), RecordingRefinedHead()
    runner = TurnRunner(builder, Services(llm, srh), KeptPrompts(builder.special.audio))
    a, b = rows(builder, 3, 0.5), rows(builder, 4, 0.25)
    first = run(runner, turn(builder, [], a))
    whole1 = llm.prefills[0]
    assert whole1["prefix"] == 0 and whole1["rows"] == 3 and whole1["keep_id"] > 0
    assert llm.ends == srh.ends == [{"keep_id": whole1["keep_id"]}]  # both rows kept under the keep id
    assert first.latency_ms["kept_prefix"] == 0.0

    history = [HistoryTurn("user", audio_rows=a, n_groups=3), HistoryTurn("assistant", text=first.text)]
    second = run(runner, turn(builder, history, b))
    sent = llm.prefills[1]
    share = len(whole1["ids"]) - 1  # all of the last prompt but its last position
    assert sent["keep_id"] == whole1["keep_id"] and sent["prefix"] == share
    whole2 = runner.prompt(turn(builder, history, b))[0].ids
    assert whole2[:share] == whole1["ids"][:share] and sent["ids"] == whole2[share:]
    assert sent["rows"] == 4  # turn 1's audio rows are in the kept prefix, only the new ones are sent
    assert srh.starts[1] == {"positions": len(whole2) - share, "keep_id": whole1["keep_id"], "prefix": share}
    assert second.latency_ms["kept_prefix"] == float(share)


def test_a_kept_prefix_the_services_lost_falls_back_to_the_whole_prompt(builder):
    llm, srh = RecordingLlm(builder, forget_kept=True), RecordingRefinedHead()
    runner = TurnRunner(builder, Services(llm, srh), KeptPrompts(builder.special.audio))
    a = rows(builder, 3, 0.5)
    first = run(runner, turn(builder, [], a))
    history = [HistoryTurn("user", audio_rows=a, n_groups=3), HistoryTurn("assistant", text=first.text)]
    second = run(runner, turn(builder, history, rows(builder, 2, 0.1)))
    assert [p["prefix"] > 0 for p in llm.prefills] == [False, True, False]  # refused, then the whole prompt
    assert llm.prefills[2]["ids"] == runner.prompt(turn(builder, history, rows(builder, 2, 0.1)))[0].ids
    assert second.latency_ms["kept_prefix"] == 0.0


def test_changed_audio_shares_up_to_its_first_changed_row_and_another_conversation_nothing(builder):
    llm, srh = RecordingLlm(builder), RecordingRefinedHead()
    runner = TurnRunner(builder, Services(llm, srh), KeptPrompts(builder.special.audio))
    a = rows(builder, 3, 0.5)
    first = run(runner, turn(builder, [], a))
    audio_at = llm.prefills[0]["ids"].index(builder.special.audio)  # turn 1's first audio position
    edited_rows = a.copy()
    edited_rows[1] += 0.25  # same ids; the second audio row differs
    edited = [HistoryTurn("user", audio_rows=edited_rows, n_groups=3), HistoryTurn("assistant", text=first.text)]
    run(runner, turn(builder, edited, a))
    run(runner, turn(builder, [], a, conversation="s2"))
    assert [p["prefix"] for p in llm.prefills] == [0, audio_at + 1, 0]  # shared: up to the changed row
    assert llm.prefills[1]["rows"] == 2 + 3  # from the changed row on, and the new turn's


def test_after_a_failed_turn_nothing_kept_is_trusted(builder):
    llm, srh = RecordingLlm(builder, fail_steps=True), RecordingRefinedHead()
    runner = TurnRunner(builder, Services(llm, srh), KeptPrompts(builder.special.audio))
    with pytest.raises(TurnError):
        run(runner, turn(builder, [], rows(builder, 3, 0.5)))
    assert all(e["keep_id"] == 0 for e in llm.ends)  # ended, not kept
    assert len(runner.kept) == 0


def test_without_kept_prompts_every_turn_sends_the_whole_prompt(builder):
    llm, srh = RecordingLlm(builder), RecordingRefinedHead()
    runner = TurnRunner(builder, Services(llm, srh))
    a = rows(builder, 3, 0.5)
    first = run(runner, turn(builder, [], a))
    run(runner, turn(builder, [HistoryTurn("user", audio_rows=a, n_groups=3), HistoryTurn("assistant", text=first.text)],
                     a))
    assert [p["prefix"] for p in llm.prefills] == [0, 0] and [e["keep_id"] for e in llm.ends] == [0, 0]


def test_shared_prefix():
    assert shared_prefix((1, 2, 3, 4), [1, 2, 9], limit=3) == 2
    assert shared_prefix((1, 2, 3, 4), [1, 2, 3, 4, 5], limit=3) == 3
    assert shared_prefix((), [1], limit=-1) == 0


def test_a_prefill_ahead_leaves_only_the_callers_audio_and_the_header_to_the_next_turn(builder):
    llm, srh = RecordingLlm(builder), RecordingRefinedHead()
    runner = TurnRunner(builder, Services(llm, srh), KeptPrompts(builder.special.audio))
    a, b = rows(builder, 3, 0.5), rows(builder, 4, 0.25)
    req1 = turn(builder, [], a)
    first = run(runner, req1)
    p1 = llm.prefills[0]["ids"]
    history = [HistoryTurn("user", audio_rows=a, n_groups=3), HistoryTurn("assistant", text=first.text)]
    sent = asyncio.run(runner.prefill_ahead(req1, history))
    ahead = llm.prefills[1]
    whole2 = runner.prompt(turn(builder, history, b))[0].ids
    known = whole2[:whole2.index(builder.special.audio_bos, len(p1)) + 1]  # up to the new turn's audio_bos
    assert ahead["prefix"] == len(p1) - 1 and ahead["ids"] == known[len(p1) - 1:] and ahead["end"]
    assert ahead["rows"] == 0 and sent == len(known) - len(p1) + 1
    assert srh.starts[1] == {"positions": sent, "keep_id": ahead["keep_id"], "prefix": len(p1) - 1,
                             "partial": True}
    second = run(runner, turn(builder, history, b))
    last = llm.prefills[2]
    assert last["prefix"] == len(known) and last["ids"] == whole2[len(known):] and last["rows"] == 4
    assert second.latency_ms["kept_prefix"] == float(len(known))
    # nothing more to send ahead until the conversation has a new turn
    assert asyncio.run(runner.prefill_ahead(turn(builder, history, b), history)) == 0


def test_the_callers_windows_are_prefilled_while_spoken_and_the_turn_sends_only_the_rest(builder):
    llm, srh = RecordingLlm(builder), RecordingRefinedHead()
    runner = TurnRunner(builder, Services(llm, srh), KeptPrompts(builder.special.audio))
    a = rows(builder, 3, 0.5)
    first = run(runner, turn(builder, [], a))
    history = [HistoryTurn("user", audio_rows=a, n_groups=3), HistoryTurn("assistant", text=first.text)]
    template = turn(builder, history, rows(builder, 0, 0.0))
    ahead = asyncio.run(runner.prefill_ahead(template, history))
    spoken = np.concatenate([rows(builder, 10, 0.1), rows(builder, 10, 0.2)])  # two encoder windows
    assert asyncio.run(runner.prefill_ahead(template, history, spoken[:10])) == 10  # only the window
    assert asyncio.run(runner.prefill_ahead(template, history, spoken)) == 10
    assert asyncio.run(runner.prefill_ahead(template, history, spoken)) == 0  # nothing new
    assert [p["rows"] for p in llm.prefills[1:]] == [0, 10, 10] and srh.starts[-1]["partial"]
    # the turn: the windows' rows, then the rest of the caller's turn (its last window)
    caller = np.concatenate([spoken, rows(builder, 4, 0.3)])
    run(runner, turn(builder, history, caller))
    whole = runner.prompt(turn(builder, history, caller))[0].ids
    last = llm.prefills[-1]
    assert last["rows"] == 4 and last["prefix"] + len(last["ids"]) == len(whole)
    assert len(last["ids"]) < 4 + 10  # the last window, the closing tokens, the assistant header


def test_windows_are_not_prefilled_once_the_callers_turn_pushes_history_out(builder):
    llm, srh = RecordingLlm(builder), RecordingRefinedHead()
    runner = TurnRunner(builder, Services(llm, srh), KeptPrompts(builder.special.audio))
    long_rows = rows(builder, 900, 0.5)
    history = [HistoryTurn("user", audio_rows=long_rows, n_groups=900), HistoryTurn("assistant", text="hello there")]
    template = turn(builder, history, rows(builder, 0, 0.0))
    assert asyncio.run(runner.prefill_ahead(template, history)) > 900
    # 1150 positions of the caller's turn leave no room for the 900 of the last one: it would be dropped
    assert asyncio.run(runner.prefill_ahead(template, history, rows(builder, 1150, 0.1))) == 0
    assert asyncio.run(runner.prefill_ahead(template, history, rows(builder, 10, 0.1))) == 10
