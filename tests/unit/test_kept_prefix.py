"""Kept prefixes in the llm and refined_head engines: a conversation's next prompt continues the
row its last turn left (cut back to the positions the prompts share) and prefills only the rest,
and gets what a whole-prompt prefill gets: the same tokens, logits and SRH inputs within float
rounding, the same penalty history and draws. Partial prompt chunks (the caller still speaking)
add up to the whole prompt's prefill. The pool evicts the least recently kept row when it needs
one, expires old ones, and a prefix that is gone is refused with NOT_FOUND."""

from __future__ import annotations

import pytest
import torch

from funchat.engines.llm import LlmEngine, LlmRequest
from funchat.engines.refined_head import SrhEngine, SrhRequest
from funchat.engines.slot_pool import SequenceError, SlotPool
from funchat.model.checkpoint import load_model
from funchat.model.qwen3 import KVCache
from funchat.model.sampling import GREEDY, SamplingParams

ATOL = 1e-5
SAMPLED = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, repetition_penalty=1.3)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint)


def prompt(model, text: list[int], n_audio: int) -> torch.Tensor:
    """text ids, then an <|AUDIO|> run of n_audio positions between audio_bos/eos."""
    cfg = model.cfg
    return torch.tensor(text + [cfg.audio_bos_index] + [cfg.audio_token_index] * n_audio + [cfg.audio_eos_index])


def rows(n: int, seed: int, width: int) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def assert_same(got, want):
    assert not isinstance(got, SequenceError) and not isinstance(want, SequenceError), (got, want)
    assert got.token == want.token
    torch.testing.assert_close(got.logits, want.logits, atol=ATOL, rtol=0)


# ---- llm ----

def test_llm_second_turn_from_the_kept_prefix_equals_a_whole_prefill(model):
    width = model.cfg.text.hidden_size
    turn1 = prompt(model, list(range(10, 30)), 4)  # 26 positions
    audio1 = rows(4, 1, width)
    reply_as_text = torch.tensor([40, 41, 42, 43])
    turn2_tail = prompt(model, [50, 51, 52], 3)
    audio2 = rows(3, 2, width)
    turn2 = torch.cat([turn1, reply_as_text, turn2_tail])  # what the next whole prompt is
    for sampling in (GREEDY, SAMPLED):
        kept = LlmEngine(model, 4)
        (first,) = kept.run([LlmRequest(1, True, False, turn1, audio1, sampling=sampling, seed=3, keep_id=77)])
        token = first.token
        for k in range(3):  # the reply's steps go into the row too
            (res,) = kept.run([LlmRequest(1, False, k == 2, torch.tensor([token]), keep_id=77)])
            token = res.token
        assert kept.pool.live == 0 and list(kept.pool.kept) == [77]
        # The next prompt shares turn 1's positions but its last (the assistant header's end, whose
        # SRH sub-frames differ); the kept row is cut back there and the rest prefilled.
        share = len(turn1) - 1
        suffix = turn2[share:]
        (got,) = kept.run([LlmRequest(2, True, False, suffix, audio2, sampling=sampling, seed=5, keep_id=77,
                                      prefix=share)])
        whole = LlmEngine(model, 4)
        (want,) = whole.run([LlmRequest(9, True, False, turn2, torch.cat([audio1, audio2]), sampling=sampling,
                                        seed=5)])
        assert_same(got, want)
        torch.testing.assert_close(got.srh_input, want.srh_input[share:], atol=ATOL, rtol=0)
        assert kept.pool.slots[2].extra["history"] == whole.pool.slots[9].extra["history"] == turn2.tolist()
        for k in range(4):  # and the steps after it
            (a,) = kept.run([LlmRequest(2, False, False, torch.tensor([got.token]))])
            (b,) = whole.run([LlmRequest(9, False, False, torch.tensor([want.token]))])
            assert_same(a, b)
            got, want = a, b


def test_llm_partial_chunks_while_the_caller_speaks_add_up_to_the_whole_prompt(model):
    width = model.cfg.text.hidden_size
    ids = prompt(model, list(range(100, 112)), 6)
    audio = rows(6, 4, width)
    engine = LlmEngine(model, 4)
    # history + the first 2 audio positions, then 3 more, then the rest (the last audio + header)
    cuts = [(0, 15, 0, 2), (15, 18, 2, 5), (18, len(ids), 5, 6)]
    for n, (a, b, ra, rb) in enumerate(cuts):
        last = n == len(cuts) - 1
        (res,) = engine.run([LlmRequest(1 + n, True, not last, ids[a:b], audio[ra:rb], keep_id=5, prefix=a)])
    (want,) = LlmEngine(model, 4).run([LlmRequest(9, True, False, ids, audio)])
    assert_same(res, want)


# ---- refined_head ----

def test_srh_partial_chunks_and_a_kept_turn_equal_whole_prefills(model):
    width = model.cfg.audio.output_dim
    g = model.cfg.audio.group_size
    h = rows(20, 7, width)
    for sampling in (GREEDY, SAMPLED):
        whole = SrhEngine(model, 4)
        (want,) = whole.run([SrhRequest(9, True, False, h, sampling=sampling, seed=2)])
        chunked = SrhEngine(model, 4)
        assert chunked.run([SrhRequest(1, True, True, h[:8], keep_id=3, partial=True)])[0].numel() == 0
        assert chunked.run([SrhRequest(2, True, True, h[8:13], keep_id=3, prefix=8, partial=True)])[0].numel() == 0
        (got,) = chunked.run([SrhRequest(3, True, False, h[13:], sampling=sampling, seed=2, keep_id=3, prefix=13)])
        assert torch.equal(got, want)
        assert_same_rows(chunked, 3, whole, 9, 20 * g)
        # a reply's steps, then the next turn from the kept row cut back before the prompt's last position
        prev = got
        for k in range(3):
            (prev,) = chunked.run([SrhRequest(3, False, k == 2, rows(1, 20 + k, width), appended=prev, keep_id=3)])
        turn2 = torch.cat([h, rows(6, 30, width)])
        (got2,) = chunked.run([SrhRequest(4, True, False, turn2[19:], sampling=sampling, seed=8, keep_id=3, prefix=19)])
        whole2 = SrhEngine(model, 4)
        (want2,) = whole2.run([SrhRequest(9, True, False, turn2, sampling=sampling, seed=8)])
        assert torch.equal(got2, want2)
        assert_same_rows(chunked, 4, whole2, 9, 26 * g)  # the kept positions, the re-run ones, the new ones


def assert_same_rows(a: SrhEngine, cid_a: int, b: SrhEngine, cid_b: int, n: int) -> None:
    """The two calls' SRH cache rows hold n positions with the same keys and values."""
    slot_a, slot_b = a.pool.slots[cid_a], b.pool.slots[cid_b]
    assert a.pool.length(slot_a) == b.pool.length(slot_b) == n
    for store_a, store_b in ((a.pool.cache.k, b.pool.cache.k), (a.pool.cache.v, b.pool.cache.v)):
        for layer_a, layer_b in zip(store_a, store_b):
            torch.testing.assert_close(layer_a[slot_a.row, :, :n], layer_b[slot_b.row, :, :n], atol=ATOL, rtol=0)


# ---- the pool ----

def pool(clock, max_sequences=3, keep_timeout_s=100.0) -> SlotPool:
    return SlotPool(lambda b, c: KVCache(1, b, 1, 2, torch.float32, "cpu", c), max_sequences, 10.0, 32, clock,
                    keep_timeout_s=keep_timeout_s)


def test_the_pool_keeps_evicts_the_least_recent_and_expires():
    now = [0.0]
    p = pool(lambda: now[0])
    for cid, keep in ((1, 11), (2, 12), (3, 13)):
        slot = p.start(cid)
        p.cache.lengths[slot.row] = 10
        now[0] += 1
        p.end(cid, keep)
    assert list(p.kept) == [11, 12, 13] and p.live == 0
    p.start(4)  # no free row: the least recently kept (11) goes
    assert list(p.kept) == [12, 13] and p.counts["kept_evicted"] == 1
    with pytest.raises(SequenceError, match="no kept prefix of 5 positions under keep id 11") as info:
        p.start(5, keep_id=11, prefix=5)
    assert info.value.status == "NOT_FOUND" and p.counts["prefix_misses"] == 1
    slot = p.start(5, keep_id=12, prefix=5)  # cut back to 5 of its 10 positions
    assert int(p.cache.lengths[slot.row]) == 5 and p.counts["prefix_hits"] == 1 and list(p.kept) == [13]
    with pytest.raises(SequenceError, match="no kept prefix of 20 positions"):
        p.start(6, keep_id=13, prefix=20)  # longer than what was kept: refused, and the row freed
    assert not p.kept
    p.end(5, 12)
    now[0] += 101
    p.reap_idle()
    assert not p.kept and p.counts["kept_expired"] == 1


def test_a_whole_prompt_under_a_kept_id_starts_over(model):
    engine = LlmEngine(model, 2)
    engine.run([LlmRequest(1, True, True, torch.tensor([5, 6, 7]), keep_id=9)])
    assert list(engine.pool.kept) == [9]
    engine.run([LlmRequest(2, True, True, torch.tensor([8, 9]), keep_id=9)])  # prefix 0: a new row replaces it
    assert list(engine.pool.kept) == [9] and engine.pool.length(engine.pool.kept[9]) == 2
    (bad,) = engine.run([LlmRequest(3, True, False, torch.tensor([1]), keep_id=9, prefix=-1)])
    assert isinstance(bad, SequenceError) and "PREFIX is -1" in str(bad)
