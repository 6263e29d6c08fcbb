"""Per-call state of the llm and refined_head services (no Triton): batched calls equal the oracle,
slots are capped and freed, bad requests are named."""

from __future__ import annotations

import pytest
import torch

from funchat.audio_io import load_audio
from funchat.oracle.generation import GenerationConfig
from funchat.model.sampling import SamplingParams
from funchat.turn.schedule import Mode, TurnSchedule
from funchat.engines.sequences import LlmEngine, LlmRequest, SequenceError, SrhEngine, SrhRequest


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture(scope="module")
def speech(example_wav):
    return load_audio(example_wav)


def _prompt(pipeline, audio, persona=None):
    ids = pipeline.prompts.ids(Mode.S2S.value, persona, None, [], pipeline.audio_groups(len(audio)))
    return ids, pipeline.encode_audio(audio)


def _drive(pipeline, llm, srh, calls, max_new=16, srh_sampling=None, seed=0):
    """Run several calls step-interleaved, every step of every live call in one batch; text greedy."""
    sched = {cid: TurnSchedule(pipeline.token_ids, Mode.S2S, max_new, prompt_last_token=ids[-1])
             for cid, (ids, _) in calls.items()}
    order = list(calls)
    kw = dict(sampling=srh_sampling, seed=seed) if srh_sampling else {}
    res = llm.run([LlmRequest(cid, True, False, torch.tensor(calls[cid][0]), calls[cid][1]) for cid in order])
    speech = srh.run([SrhRequest(cid, True, False, res[k].srh_input, **kw) for k, cid in enumerate(order)])
    appended = {cid: sched[cid].observe(int(res[k].logits.argmax()), speech[k].tolist()).speech_group
                for k, cid in enumerate(order)}
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
        speech = srh.run([SrhRequest(cid, False, False, res[k].srh_input,
                                     appended=torch.tensor(appended[cid]) if appended[cid] else None)
                          for k, cid in enumerate(live)])
        for k, cid in enumerate(live):
            appended[cid] = sched[cid].observe(int(res[k].logits.argmax()), speech[k].tolist()).speech_group


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
