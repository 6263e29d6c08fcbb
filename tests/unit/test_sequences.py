"""Per-call state of the llm and refined_head services (no Triton): batched calls equal the oracle,
slots are capped and freed, bad requests are named."""

from __future__ import annotations

import pytest
import torch

from funchat.oracle.generation import GenerationConfig
from funchat.model.sampling import GREEDY, SamplingParams
from funchat.turn.sampling import speech_seed, text_seed
from funchat.turn.schedule import Mode, TurnSchedule
from funchat.engines.llm import LlmEngine, LlmRequest
from funchat.engines.refined_head import SrhEngine, SrhRequest
from funchat.engines.slot_pool import SequenceError


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _prompt(pipeline, audio, persona=None, mode=Mode.S2S):
    ids = pipeline.prompts.ids(mode.value, persona, None, [], pipeline.audio_groups(len(audio)))
    return ids, pipeline.encode_audio(audio)


def _drive(pipeline, llm, srh, calls, max_new=16, srh_sampling=None, seed=0, text=None, mode=Mode.S2S):
    """Run several calls step-interleaved, every step of every live call in one batch (the SRH in
    s2s only). text: per call (SamplingParams, turn seed) of its text tokens; the other calls are
    greedy with turn seed `seed`. Each service gets its stream of the call's turn seed, as the
    oracle: the llm text_seed, the refined head speech_seed."""
    text = text or {}
    sched = {cid: TurnSchedule(pipeline.token_ids, mode, max_new, prompt_last_token=ids[-1])
             for cid, (ids, _) in calls.items()}
    order = list(calls)
    settings = {cid: text.get(cid, (GREEDY, seed)) for cid in order}
    res = llm.run([LlmRequest(cid, True, False, torch.tensor(calls[cid][0]), calls[cid][1],
                              sampling=settings[cid][0], seed=text_seed(settings[cid][1])) for cid in order])

    def srh_run(requests):
        return srh.run(requests) if mode is Mode.S2S else [None] * len(requests)

    def observe(cid, result, group):
        return sched[cid].observe(result.token, None if group is None else group.tolist()).speech_group

    speech = srh_run([SrhRequest(cid, True, False, res[k].srh_input, sampling=srh_sampling or GREEDY,
                                 seed=speech_seed(settings[cid][1])) for k, cid in enumerate(order)])
    appended = {cid: observe(cid, res[k], speech[k]) for k, cid in enumerate(order)}
    while True:
        live = [cid for cid in order if not sched[cid].finished]
        if not live:
            return sched
        steps = []
        for cid in live:
            nxt = sched[cid].next_input
            group = torch.tensor(nxt.speech_group) if nxt.speech_group else None
            steps.append(LlmRequest(cid, False, False, torch.tensor([nxt.text_token]), None, group))
        res = llm.run(steps)
        # the SRH's repetition penalty sees every group the schedule appended so far
        speech = srh_run([SrhRequest(cid, False, False, res[k].srh_input,
                                     appended=torch.tensor(appended[cid]) if appended[cid] else None)
                          for k, cid in enumerate(live)])
        for k, cid in enumerate(live):
            appended[cid] = observe(cid, res[k], speech[k])


def test_interleaved_batched_calls_equal_the_oracle(tiny_pipeline, speech):
    p = tiny_pipeline
    cases = {1: (speech, None), 2: (speech[:40000], "Be brief."), 3: (speech[20000:90000], None)}
    calls = {cid: _prompt(p, a, persona) for cid, (a, persona) in cases.items()}
    sched = _drive(p, LlmEngine(p.model, 4), SrhEngine(p.model, 4), calls)
    for cid, (audio, persona) in cases.items():
        ref = p.respond(audio, system_prompt=persona, gen=GenerationConfig.greedy(Mode.S2S, 16))
        assert sched[cid].text_tokens == ref.text_tokens
        assert sched[cid].speech_tokens == ref.speech_tokens


def test_a_call_alone_equals_the_same_call_in_a_batch(tiny_pipeline, speech):
    p = tiny_pipeline
    calls = {1: _prompt(p, speech), 2: _prompt(p, speech[:30000])}
    together = _drive(p, LlmEngine(p.model, 4), SrhEngine(p.model, 4), calls)
    alone = _drive(p, LlmEngine(p.model, 4), SrhEngine(p.model, 4), {2: calls[2]})
    assert together[2].text_tokens == alone[2].text_tokens and together[2].speech_tokens == alone[2].speech_tokens


def test_seeded_srh_sampling_equals_the_oracle(tiny_pipeline, speech):
    """With text greedy and the SRH sampling (repetition penalty included), a seeded call through
    the engines draws exactly what the oracle draws with the same seed."""
    p = tiny_pipeline
    calls = {7: _prompt(p, speech[:30000])}
    params = SamplingParams(temperature=0.8, top_p=0.9, repetition_penalty=1.2)
    got = _drive(p, LlmEngine(p.model, 2), SrhEngine(p.model, 2), calls, srh_sampling=params, seed=11)[7]
    ref = p.respond(speech[:30000], gen=GenerationConfig(mode=Mode.S2S, max_new_tokens=16, speech=params, seed=11))
    assert got.text_tokens == ref.text_tokens and got.speech_tokens == ref.speech_tokens


def test_slots_are_capped_reaped_when_idle_and_freed_at_end(tiny_pipeline):
    clock = FakeClock()
    llm = LlmEngine(tiny_pipeline.model, max_sequences=2, idle_timeout_s=5.0, clock=clock)
    ids = torch.tensor([1, 2, 3])
    assert all(not isinstance(r, SequenceError) for r in llm.run([LlmRequest(1, True, False, ids), LlmRequest(2, True, False, ids)]))
    full = llm.run([LlmRequest(3, True, False, ids)])[0]
    assert isinstance(full, SequenceError) and full.status == "UNAVAILABLE" and "all 2 sequence slots are busy" in str(full)
    clock.now = 10.0  # both calls abandoned: their memory is freed on the next request
    assert not isinstance(llm.run([LlmRequest(3, True, False, ids)])[0], SequenceError)
    assert llm.pool.live == 1
    gone = llm.run([LlmRequest(1, False, False, torch.tensor([4]))])[0]
    assert isinstance(gone, SequenceError) and gone.status == "NOT_FOUND" and "unknown or ended sequence 1" in str(gone)
    llm.run([LlmRequest(3, False, True, torch.tensor([4]))])  # END frees the slot
    assert llm.pool.live == 0


def test_bad_requests_are_named_and_do_not_disturb_others(tiny_pipeline):
    llm = LlmEngine(tiny_pipeline.model, max_sequences=4)
    vocab = tiny_pipeline.model.cfg.text.vocab_size
    results = llm.run([
        LlmRequest(1, True, False, torch.tensor([1, 2, vocab])),
        LlmRequest(2, True, False, torch.tensor([], dtype=torch.long)),
        LlmRequest(3, True, False, torch.tensor([1, 2, 3])),
        LlmRequest(4, True, False, torch.tensor([tiny_pipeline.model.cfg.audio_token_index, 5])),  # AUDIO id, no rows
    ])
    assert "outside the text vocabulary" in str(results[0])
    assert "INPUT_IDS is empty" in str(results[1])
    assert not isinstance(results[2], SequenceError)
    assert "1 <|AUDIO|> positions but the audio gives 0" in str(results[3])
    step = llm.run([LlmRequest(3, False, False, torch.tensor([1, 2]))])[0]
    assert "a step takes one text id, got 2" in str(step)
    group = llm.run([LlmRequest(3, False, False, torch.tensor([1]), None, torch.tensor([1, 2, 3]))])[0]
    assert "SPEECH_GROUP must hold 5 ids" in str(group)
    srh = SrhEngine(tiny_pipeline.model, 2)
    bad = srh.run([SrhRequest(1, True, False, torch.zeros(3, 7))])[0]
    assert "SRH_INPUT must be [positions, 64]" in str(bad)
    nan = srh.run([SrhRequest(1, True, False, torch.full((2, 64), float("nan")))])[0]
    assert "non-finite" in str(nan)


TEXT_SAMPLING = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, repetition_penalty=1.3)


@pytest.mark.parametrize("mode", [Mode.S2T, Mode.S2S])
def test_seeded_text_sampling_equals_the_oracle(tiny_pipeline, speech, mode):
    """The llm engine draws the text tokens (temperature, top-k, top-p, repetition penalty over the
    prompt and the returned ids) with the call's text_seed stream: exactly the oracle's draws for
    that turn seed, for calls batched together with a greedy one."""
    p = tiny_pipeline
    clips = {1: speech[:30000], 2: speech[10000:60000], 3: speech[:30000]}
    calls = {cid: _prompt(p, audio, mode=mode) for cid, audio in clips.items()}
    text = {1: (TEXT_SAMPLING, 7), 3: (TEXT_SAMPLING, 8)}  # call 2 stays greedy
    speech_params = SamplingParams(temperature=0.8, top_p=0.9, repetition_penalty=1.2)
    srh = SrhEngine(p.model, 4) if mode is Mode.S2S else None
    got = _drive(p, LlmEngine(p.model, 4), srh, calls, mode=mode, text=text, srh_sampling=speech_params, seed=5)
    for cid, audio in clips.items():
        sampling, seed = text.get(cid, (GREEDY, 5))
        gen = GenerationConfig(mode=mode, max_new_tokens=16, text=sampling, speech=speech_params, seed=seed)
        ref = p.respond(audio, mode=mode, gen=gen)
        assert got[cid].text_tokens == ref.text_tokens, cid
        assert got[cid].speech_tokens == ref.speech_tokens, cid
    greedy = p.respond(clips[1], mode=mode, gen=GenerationConfig.greedy(mode, 16))
    assert got[1].text_tokens != greedy.text_tokens  # the draws did happen


def test_a_step_without_start_is_not_found_even_with_sampling_settings(tiny_pipeline):
    llm = LlmEngine(tiny_pipeline.model, max_sequences=2)
    step = llm.run([LlmRequest(9, False, False, torch.tensor([4]), sampling=TEXT_SAMPLING, seed=3)])[0]
    assert isinstance(step, SequenceError) and step.status == "NOT_FOUND"
    assert "unknown or ended sequence 9: send a START request first" in str(step)
    assert llm.pool.live == 0  # settings on a step start nothing


def test_debug_top_k_only_when_asked(tiny_pipeline):
    llm = LlmEngine(tiny_pipeline.model, max_sequences=2)
    vocab = tiny_pipeline.model.cfg.text.vocab_size
    plain, asked = llm.run([LlmRequest(1, True, False, torch.tensor([1, 2, 3])),
                            LlmRequest(2, True, False, torch.tensor([1, 2, 3]), return_top_k=5)])
    assert plain.top_ids is None and plain.top_logits is None
    top = torch.topk(asked.logits, 5)
    assert asked.top_ids.tolist() == top.indices.tolist()
    assert asked.top_ids[0] == asked.token  # greedy: the argmax
    torch.testing.assert_close(asked.top_logits, top.values)
    step = llm.run([LlmRequest(2, False, False, torch.tensor([asked.token]), return_top_k=3)])[0]
    assert step.top_ids.shape == (3,) and int(step.top_ids[0]) == step.token
    for bad in (-1, vocab + 1):
        error = llm.run([LlmRequest(1, False, False, torch.tensor([4]), return_top_k=bad)])[0]
        assert isinstance(error, SequenceError) and error.status == "INVALID_ARG"
        assert f"RETURN_TOP_K is {bad}: use 0 (none) to {vocab}" in str(error)


def _pool_bytes(pool) -> list[tuple[int, int]]:
    """(data pointer, bytes) of every tensor of a pool's cache: what a growing cache would change."""
    return [(t.data_ptr(), t.numel() * t.element_size()) for t in pool.cache.k + pool.cache.v]


def test_kv_pools_are_allocated_once_and_refuse_what_does_not_fit(tiny_pipeline):
    model = tiny_pipeline.model
    g, width = model.cfg.audio.group_size, model.cfg.audio.output_dim
    llm, srh = LlmEngine(model, max_sequences=2, capacity=8), SrhEngine(model, 2, max_context=8)
    assert llm.pool.cache.capacity == 8 and srh.pool.cache.capacity == 8 * g  # g SRH positions per LLM position
    llm_at_load, srh_at_load = _pool_bytes(llm.pool), _pool_bytes(srh.pool)

    too_long = llm.run([LlmRequest(1, True, False, torch.arange(1, 10))])[0]  # 9 positions
    assert isinstance(too_long, SequenceError) and "the prompt has 9 positions, more than max_context 8" in str(too_long)
    assert llm.pool.live == 0
    first = llm.run([LlmRequest(1, True, False, torch.arange(1, 6)), LlmRequest(2, True, False, torch.tensor([3]))])
    token = first[0].token
    for _ in range(3):  # 5 + 3 = 8 positions: full
        token = llm.run([LlmRequest(1, False, False, torch.tensor([token]))])[0].token
    full = llm.run([LlmRequest(1, False, False, torch.tensor([token])), LlmRequest(2, False, False, torch.tensor([4]))])
    assert isinstance(full[0], SequenceError) and "holds max_context 8 positions: no room for another step" in str(full[0])
    assert not isinstance(full[1], SequenceError)  # the other call goes on
    assert _pool_bytes(llm.pool) == llm_at_load  # nothing grew or moved

    h = torch.randn(8, width, generator=torch.Generator().manual_seed(0))
    assert isinstance(srh.run([SrhRequest(1, True, False, torch.cat([h, h[:1]]))])[0], SequenceError)  # 9 > 8
    assert not isinstance(srh.run([SrhRequest(1, True, False, h)])[0], SequenceError)  # 8 x g positions: full
    step = srh.run([SrhRequest(1, False, False, h[:1])])[0]
    assert isinstance(step, SequenceError) and f"holds {8 * g} positions and this request adds {g}" in str(step)
    assert _pool_bytes(srh.pool) == srh_at_load


def test_a_bounded_pool_gives_the_same_tokens_as_a_roomy_one(tiny_pipeline):
    """Batches copy only the positions their rows reach: rows of different lengths, stepped
    together, give what each gives alone in a pool with far more room."""
    model = tiny_pipeline.model
    prompts = {1: torch.arange(1, 12), 2: torch.tensor([5, 6]), 3: torch.arange(20, 27)}

    def drive(llm: LlmEngine, cids: list[int]) -> dict[int, list[int]]:
        out = {c: [r.token] for c, r in zip(cids, llm.run([LlmRequest(c, True, False, prompts[c]) for c in cids]))}
        for _ in range(5):
            steps = llm.run([LlmRequest(c, False, False, torch.tensor([out[c][-1]])) for c in cids])
            for c, r in zip(cids, steps):
                out[c].append(r.token)
        return out

    together = drive(LlmEngine(model, 3, capacity=16), [1, 2, 3])
    for cid in prompts:
        assert together[cid] == drive(LlmEngine(model, 1, capacity=2048), [cid])[cid], cid
