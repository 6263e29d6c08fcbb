"""The oracle: respond(audio, history, mode) on the tiny checkpoint and the real recording."""

from __future__ import annotations

import numpy as np
import pytest

from funchat.errors import AudioInputError, PromptError
from funchat.oracle.generation import GenerationConfig
from funchat.model.sampling import GREEDY
from funchat.turn.schedule import Mode


def greedy(mode="s2s", n=24):
    return GenerationConfig.greedy(Mode(mode), n)


def test_s2s_turn_shapes_and_rules(tiny_pipeline, speech):
    cfg = tiny_pipeline.model.cfg
    steps = []
    result = tiny_pipeline.respond(speech, mode="s2s", gen=greedy(n=24), on_step=steps.append)
    assert result.text_tokens[0] == cfg.audio_bos_index  # forced at the prefill
    assert len(result.text_tokens) == len(steps) <= 24
    assert len(result.speech_tokens) % cfg.audio.group_size == 0
    # speech starts at forward 1; each forward with speech on adds one group
    assert steps[0].output.speech_group is None
    assert sum(s.output.speech_group is not None for s in steps) * 5 == len(result.speech_tokens)
    assert result.vocoder_tokens == [t for t in result.speech_tokens if 0 <= t < 6561]
    assert isinstance(result.text, str)
    assert result.prompt_tokens > tiny_pipeline.audio_groups(len(speech))  # the audio run plus the chat frame
    for key in ("mel", "encoder", "llm_prefill", "srh_prefill", "llm_step_mean", "srh_step_mean", "total"):
        assert result.timings[key] >= 0


def test_step_callback_reports_each_step_as_produced(tiny_pipeline, speech):
    seen = []
    result = tiny_pipeline.respond(speech, gen=greedy(n=12), on_step=lambda r: seen.append(r.output))
    assert [o.text_token for o in seen] == result.text_tokens
    assert [t for o in seen if o.speech_group for t in o.speech_group] == result.speech_tokens
    assert [o.index for o in seen] == list(range(len(seen)))


def test_s2t_has_no_speech_and_no_forced_bos(tiny_pipeline, speech):
    result = tiny_pipeline.respond(speech, mode="s2t", gen=greedy("s2t", 16))
    assert result.speech_tokens == [] and result.vocoder_tokens == []
    assert result.mode == "s2t"


def test_greedy_is_seed_independent_and_sampling_is_seeded(tiny_pipeline, speech):
    a = tiny_pipeline.respond(speech, gen=GenerationConfig(max_new_tokens=10, text=GREEDY, speech=GREEDY, seed=1))
    b = tiny_pipeline.respond(speech, gen=GenerationConfig(max_new_tokens=10, text=GREEDY, speech=GREEDY, seed=2))
    assert (a.text_tokens, a.speech_tokens) == (b.text_tokens, b.speech_tokens)
    c = tiny_pipeline.respond(speech, gen=GenerationConfig(max_new_tokens=10, seed=7))
    d = tiny_pipeline.respond(speech, gen=GenerationConfig(max_new_tokens=10, seed=7))
    e = tiny_pipeline.respond(speech, gen=GenerationConfig(max_new_tokens=10, seed=8))
    assert (c.text_tokens, c.speech_tokens) == (d.text_tokens, d.speech_tokens)
    assert c.speech_tokens != e.speech_tokens


def test_system_prompt_tools_and_history_enter_the_prompt(tiny_pipeline, speech):
    base = tiny_pipeline.respond(speech, gen=greedy(n=2)).prompt_tokens
    persona = tiny_pipeline.respond(speech, system_prompt="You are a calm guide.", gen=greedy(n=2)).prompt_tokens
    tools = [{"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    with_tools = tiny_pipeline.respond(speech, tools=tools, gen=greedy(n=2)).prompt_tokens
    history = [{"role": "user", "content": speech[:16000]}, {"role": "assistant", "content": "Hello there."}]
    with_history = tiny_pipeline.respond(speech, history=history, gen=greedy(n=2))
    assert base < persona < with_tools
    assert with_history.prompt_tokens > base + tiny_pipeline.audio_groups(16000)
    assert with_history.history_turns_dropped == 0


def test_oldest_history_is_dropped_to_fit_the_context(tiny_pipeline, speech):
    long_turn = speech  # 6 s = 30 positions per user turn
    history = []
    for i in range(80):  # far more than 2048 positions
        history += [{"role": "user", "content": long_turn}, {"role": "assistant", "content": f"answer {i}"}]
    result = tiny_pipeline.respond(speech, history=history, gen=greedy(n=4))
    assert result.history_turns_dropped > 0 and result.history_turns_dropped % 2 == 0
    assert result.prompt_tokens < tiny_pipeline.context_tokens


@pytest.mark.parametrize("audio,match", [
    (np.zeros(0, np.float32), "empty"),
    (np.full(16000, np.nan, np.float32), "NaN|non-finite"),
    (np.zeros((2, 3, 4), np.float32), "shape"),
    (np.zeros(80, np.float32), "too short"),
    (np.zeros(16000 * 420, np.float32), "too long: 420.0 s takes 2100 LLM positions, more than the 2048-token"),
])
def test_bad_audio_is_named(tiny_pipeline, audio, match):
    with pytest.raises(AudioInputError, match=match):
        tiny_pipeline.respond(audio, gen=greedy(n=2))


def test_pipeline_stays_usable_after_bad_input(tiny_pipeline, speech):
    with pytest.raises(AudioInputError):
        tiny_pipeline.respond(np.full(100, np.inf, np.float32))
    assert tiny_pipeline.respond(speech, gen=greedy(n=3)).text_tokens


def test_unknown_mode_and_bad_history_role(tiny_pipeline, speech):
    with pytest.raises(ValueError, match="unknown mode"):
        tiny_pipeline.respond(speech, mode="t2s")
    with pytest.raises(PromptError, match="role"):
        tiny_pipeline.respond(speech, history=[{"role": "narrator", "content": "hi"}], gen=greedy(n=2))
