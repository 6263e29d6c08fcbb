"""Token selection (greedy, repetition penalty, temperature, top-k, top-p, seeded draws) and
seeding through the whole generate() loop on a randomized tiny model."""

import math

import pytest
import torch

from funchat.oracle.generation import GenerationConfig, generate
from funchat.model.checkpoint import build_model, randomize
from funchat.model.config import FunAudioChatConfig
from funchat.model.presets import preset_config
from funchat.model.sampling import GREEDY, SamplingParams, apply_repetition_penalty, select, warp
from funchat.turn.schedule import Mode

NEG_INF = -float("inf")


def _log_probs(*probs: float) -> torch.Tensor:
    return torch.tensor([[math.log(p) for p in probs]], dtype=torch.float32)


def _kept(scores: torch.Tensor) -> list[int]:
    return torch.isfinite(scores[0]).nonzero().flatten().tolist()


# ---------------------------------------------------------------- greedy


def test_greedy_is_argmax_of_raw_logits():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=gen)
    assert torch.equal(select(logits, GREEDY, None, gen), torch.argmax(logits, dim=-1))


def test_greedy_ignores_repetition_penalty_and_history():
    logits = torch.tensor([[3.0, 2.9, -1.0]])
    history = torch.tensor([[0, 0, 0]])
    params = SamplingParams(greedy=True, repetition_penalty=10.0)
    assert select(logits, params, history, None).tolist() == [0]


# ---------------------------------------------------------------- repetition penalty


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_scores():
    scores = torch.tensor([[2.0, -2.0, 4.0, -1.0, 0.5]])
    history = torch.tensor([[0, 1]])
    out = apply_repetition_penalty(scores, history, 2.0)
    assert out.tolist() == [[1.0, -4.0, 4.0, -1.0, 0.5]]  # unseen ids 2, 3, 4 untouched


def test_repetition_penalty_applies_once_per_id_however_often_seen():
    scores = torch.tensor([[2.0, -2.0, 4.0]])
    out = apply_repetition_penalty(scores, torch.tensor([[0, 0, 0, 1, 1]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 4.0]]


def test_repetition_penalty_is_per_row():
    scores = torch.tensor([[2.0, 2.0], [2.0, 2.0]])
    out = apply_repetition_penalty(scores, torch.tensor([[0], [1]]), 4.0)
    assert out.tolist() == [[0.5, 2.0], [2.0, 0.5]]


def test_repetition_penalty_does_not_modify_its_input():
    scores = torch.tensor([[2.0, -2.0]])
    apply_repetition_penalty(scores, torch.tensor([[0, 1]]), 2.0)
    assert scores.tolist() == [[2.0, -2.0]]


def test_repetition_penalty_one_or_empty_history_is_identity():
    scores = torch.tensor([[2.0, -2.0]])
    assert torch.equal(apply_repetition_penalty(scores, torch.tensor([[0, 1]]), 1.0), scores)
    assert torch.equal(apply_repetition_penalty(scores, torch.zeros(1, 0, dtype=torch.long), 2.0), scores)


def test_select_applies_repetition_penalty_before_sampling():
    # id 0 is far ahead until penalised: with penalty 100, 5.0 -> 0.05 < 4.0 of id 1
    logits = torch.tensor([[5.0, 4.0, -10.0]])
    params = SamplingParams(temperature=1.0, top_p=1.0, top_k=1, repetition_penalty=100.0)
    gen = torch.Generator().manual_seed(0)
    assert select(logits, params, torch.tensor([[0]]), gen).tolist() == [1]
    assert select(logits, params, None, gen).tolist() == [0]


# ---------------------------------------------------------------- temperature, top-k, top-p


def test_temperature_divides_scores():
    scores = torch.tensor([[1.0, -2.0, 0.5]])
    out = warp(scores, SamplingParams(temperature=0.5, top_p=1.0, top_k=0))
    torch.testing.assert_close(out, scores / 0.5)
    assert torch.equal(warp(scores, SamplingParams(temperature=1.0, top_p=1.0, top_k=0)), scores)


def test_top_k_keeps_the_k_highest():
    scores = torch.tensor([[0.1, 3.0, -1.0, 2.0, 1.0]])
    out = warp(scores, SamplingParams(temperature=1.0, top_p=1.0, top_k=2))
    assert _kept(out) == [1, 3]
    assert out[0, 1] == 3.0 and out[0, 3] == 2.0  # kept scores unchanged
    assert _kept(warp(scores, SamplingParams(temperature=1.0, top_p=1.0, top_k=99))) == [0, 1, 2, 3, 4]


# probabilities of ids 0..4: 0.3, 0.5, 0.05, 0.1, 0.05 (sorted: 1, 0, 3, then 2 and 4)
TOP_P_SCORES = _log_probs(0.3, 0.5, 0.05, 0.1, 0.05)


@pytest.mark.parametrize("top_p, kept", [
    (0.45, [1]),  # 0.5 > 0.45
    (0.7, [0, 1]),  # 0.8 > 0.7
    (0.85, [0, 1, 3]),  # 0.9 > 0.85
    (0.97, [0, 1, 2, 3, 4]),  # 0.95 is not enough: both 0.05 ids are needed
])
def test_top_p_keeps_smallest_set_whose_mass_exceeds_p(top_p, kept):
    out = warp(TOP_P_SCORES, SamplingParams(temperature=1.0, top_p=top_p, top_k=0))
    assert _kept(out) == kept
    torch.testing.assert_close(out[0, kept], TOP_P_SCORES[0, kept])


def test_top_p_always_keeps_the_top_token():
    for top_p in (1e-9, 0.01):
        out = warp(TOP_P_SCORES, SamplingParams(temperature=1.0, top_p=top_p, top_k=0))
        assert _kept(out) == [1]
    # also when the top token alone carries almost all of the mass
    peaked = torch.tensor([[0.0, 60.0, 0.0]])
    assert _kept(warp(peaked, SamplingParams(temperature=1.0, top_p=1e-9, top_k=0))) == [1]


def test_top_p_applies_after_temperature():
    # at temperature 0.5 the probabilities 0.5 / 0.3 / ... sharpen, so fewer ids reach p
    params = SamplingParams(temperature=0.5, top_p=0.85, top_k=0)
    probs = (TOP_P_SCORES / 0.5).softmax(-1)[0]
    assert float(probs[1] + probs[0]) > 0.85
    assert _kept(warp(TOP_P_SCORES, params)) == [0, 1]


def test_filtered_tokens_are_never_drawn():
    params = SamplingParams(temperature=1.0, top_p=0.7, top_k=0, repetition_penalty=1.0)
    gen = torch.Generator().manual_seed(3)
    logits = TOP_P_SCORES.expand(400, -1)
    draws = select(logits, params, None, gen)
    assert set(draws.tolist()) == {0, 1}


# ---------------------------------------------------------------- seeded draws


def _draws(seed: int, n: int = 20) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, 100, generator=torch.Generator().manual_seed(99))
    params = SamplingParams(temperature=2.0, top_p=1.0)
    return [int(select(logits, params, None, gen)[0]) for _ in range(n)]


def test_same_seed_gives_same_draws():
    assert _draws(5) == _draws(5)


def test_different_seeds_give_different_draws():
    assert _draws(5) != _draws(6)


@pytest.mark.parametrize("kwargs", [{"temperature": 0}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -1},
                                    {"repetition_penalty": 0}, {"temperature": float("nan")},
                                    {"top_p": float("nan")}, {"repetition_penalty": float("inf")}])
def test_invalid_sampling_params_raise(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


# ---------------------------------------------------------------- through generate()


@pytest.fixture(scope="module")
def tiny():
    cfg = FunAudioChatConfig.from_dict(preset_config("tiny"))
    model = randomize(build_model(cfg), seed=7).eval()
    ids = [cfg.audio_bos_index - 4, 5, 17, 300, 42, 7]  # "<|im_start|>" then a few ordinary ids
    with torch.inference_mode():
        embeds = model.language_model.embed(torch.tensor([ids]))
    return model, ids, embeds


def _generate(tiny, **kwargs):
    model, ids, embeds = tiny
    gen = GenerationConfig(**{"mode": Mode.S2S, "max_new_tokens": 6, **kwargs})
    return generate(model, ids, embeds, gen)


def test_generate_same_seed_gives_identical_tokens(tiny):
    a = _generate(tiny, seed=11)  # greedy text, sampled speech (the defaults)
    b = _generate(tiny, seed=11)
    assert a.speech_tokens and a.text_tokens
    assert a.text_tokens == b.text_tokens
    assert a.text_tokens_emitted == b.text_tokens_emitted
    assert a.speech_tokens == b.speech_tokens
    assert [s.srh_tokens for s in a.steps] == [s.srh_tokens for s in b.steps]


def test_generate_same_seed_gives_identical_tokens_with_sampled_text(tiny):
    text = SamplingParams(temperature=1.5, top_p=1.0)
    a = _generate(tiny, seed=12, text=text, mode=Mode.S2T)
    b = _generate(tiny, seed=12, text=text, mode=Mode.S2T)
    assert a.text_tokens == b.text_tokens


def test_generate_different_seeds_give_different_speech_tokens(tiny):
    # The SRH draws 5 tokens per forward from a 6565-way distribution at temperature 0.8; with
    # randomized weights the 30 draws of two seeds agree with negligible probability.
    assert _generate(tiny, seed=1).speech_tokens != _generate(tiny, seed=2).speech_tokens


def test_generate_greedy_output_is_independent_of_seed(tiny):
    a = _generate(tiny, seed=1, text=GREEDY, speech=GREEDY)
    b = _generate(tiny, seed=12345, text=GREEDY, speech=GREEDY)
    model, ids, embeds = tiny
    c = generate(model, ids, embeds, GenerationConfig.greedy(Mode.S2S, max_new_tokens=6))  # seed 0
    assert a.speech_tokens  # speech is on from forward 1
    assert a.text_tokens == b.text_tokens == c.text_tokens
    assert a.speech_tokens == b.speech_tokens == c.speech_tokens


def test_generate_greedy_text_is_argmax_of_step_logits(tiny):
    model, ids, embeds = tiny
    out = generate(model, ids, embeds, GenerationConfig.greedy(Mode.S2T, max_new_tokens=5), keep_logits=True)
    for step in out.steps:
        assert step.output.text_token_emitted == int(torch.argmax(step.text_logits))
