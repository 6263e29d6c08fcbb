"""A reply's codes are pushed to the vocoder when they can make a chunk, not as they come.

The vocoder's answer says how many codes its next chunk wants (WANTS), and the first reply of a
stream teaches the client how many a first chunk needs. The turn's vocoder task holds codes
until then (the final push excepted), so a reply of 40 codes costs 3 pushes instead of one per
group of 5, and no code that completes a chunk waits behind a push that could only store codes.
The model services are fakes (pure orchestration logic); through the real services the
integration tests check the tokens and audio stay the oracle's.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from funchat.orchestrator.model_clients import VocoderReply
from funchat.orchestrator.turn_runner import TurnRequest, TurnRunner
from funchat.turn.prompt import PromptBuilder
from funchat.turn.schedule import Mode
from test_turn_failures import FakeLlm, FakeRefinedHead, FakeServices  # noqa: E402

FIRST, HOP = 18, 15  # the vocoder's first chunk (15 + 3 look-ahead) and later hops


class ChunkingVocoder:
    """Makes chunks as the real vocoder schedules them and answers WANTS like it."""

    first_chunk_codes = 0

    def __init__(self):
        self.pushes: list[tuple[int, bool]] = []  # (codes pushed, final)
        self.streams: dict[bytes, tuple[int, int]] = {}  # state -> (codes so far, codes made into audio)

    async def push(self, tokens, state, final, speaker=None, ready_at=None):
        self.pushes.append((len(tokens), final))
        await asyncio.sleep(0.002)
        have, made = self.streams.get(state, (0, 0)) if state else (0, 0)
        have += len(tokens)
        done = made
        while True:  # a chunk per hop while its look-ahead exists
            end = done + (FIRST - 3 if done == 0 else HOP)
            if end + 3 > have:
                break
            done = end
        if final:
            done = have
        wants = 0 if final else max(0, done + (FIRST - 3 if done == 0 else HOP) + 3 - have)
        if state is None and not final and done == 0:
            self.first_chunk_codes = len(tokens) + wants  # what the real client learns
        new_state = f"s{len(self.pushes)}".encode()
        self.streams[new_state] = (have, done)
        return VocoderReply(np.zeros(960 * (done - made), np.float32), new_state, 0, wants)


class PacedRefinedHead(FakeRefinedHead):
    """A group of 5 codes every few ms, as generation paces them (the vocoder task runs in between)."""

    async def run(self, *args, **kwargs):
        await asyncio.sleep(0.004)
        return await super().run(*args, **kwargs)


@pytest.fixture(scope="module")
def builder(tiny_checkpoint) -> PromptBuilder:
    return PromptBuilder.from_checkpoint(tiny_checkpoint)


def one_turn(builder: PromptBuilder, vocoder: ChunkingVocoder, new_tokens: int) -> list:
    token = builder.tokenizer.encode("hello")[0]
    svc = FakeServices(FakeLlm(token, builder.facts.hidden_size, fail_at=10 ** 6), PacedRefinedHead([1, 2, 3, 4, 5]),
                       vocoder)
    request = TurnRequest(response_id="resp_feed", mode=Mode.S2S, n_groups=3,
                          audio_rows=np.zeros((3, builder.facts.hidden_size), np.float32), max_new_tokens=new_tokens)
    events = []

    async def emit(event):
        events.append(event)

    asyncio.run(TurnRunner(builder, svc).run(request, emit, asyncio.Event()))
    return events


def audio_samples(events) -> int:
    return sum(len(e.audio_delta.pcm16) // 2 for e in events if e.WhichOneof("event") == "audio_delta")


def test_codes_are_held_until_they_make_a_chunk(builder):
    vocoder = ChunkingVocoder()
    events = one_turn(builder, vocoder, new_tokens=20)  # the first turn: the first chunk's size not known yet
    first_turn = list(vocoder.pushes)
    codes = sum(n for n, _ in first_turn)
    assert codes > FIRST and first_turn[-1][1]  # the reply's codes, the last push final
    assert vocoder.first_chunk_codes == FIRST, first_turn
    # After the first push (5 codes: the stream opens and says what it wants), every non-final
    # push carries at least what the last answer wanted: a chunk each.
    assert first_turn[0][0] == 5 and all(n >= 13 for n, final in first_turn[1:-1] if not final)
    vocoder.pushes.clear()
    events = one_turn(builder, vocoder, new_tokens=20)  # now known: the first push waits for 18
    assert all(n >= FIRST if i == 0 else n >= 3 for i, (n, final) in enumerate(vocoder.pushes) if not final)
    assert len(vocoder.pushes) < sum(n for n, _ in vocoder.pushes) // 5  # fewer pushes than groups of 5
    assert audio_samples(events) == 960 * sum(n for n, _ in vocoder.pushes)  # every code made into audio
