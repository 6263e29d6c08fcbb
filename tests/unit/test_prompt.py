"""The prompt module: history fitting, audio positions, limits, one prompt for oracle and orchestrator."""

from __future__ import annotations

import pytest

from funchat.errors import AudioInputError, ContextOverflowError
from funchat.turn.prompt import PromptBuilder, PromptTurn, fit_history, groups_for_frames, speech_frames_for_samples


def test_fit_history_drops_whole_exchanges():
    def turn(role, text):
        return PromptTurn(role=role, text=text)

    history = [turn("user", "u1"), turn("assistant", "a1"), turn("tool", "t1"), turn("assistant", "a1b"),
               turn("user", "u2"), turn("assistant", "a2"), turn("user", "u3"), turn("assistant", "a3")]
    cost = lambda h: 100 + 10 * len(h)  # noqa: E731  (prompt length: fixed part + 10 per turn)
    kept, dropped = fit_history(history, cost, context_tokens=1000)
    assert kept == history and dropped == 0
    kept, dropped = fit_history(history, cost, context_tokens=175)  # 8 turns: 180 -> drop u1..a1b (4)
    assert [t.text for t in kept] == ["u2", "a2", "u3", "a3"] and dropped == 4
    kept, dropped = fit_history(history, cost, context_tokens=135)  # 4 turns: 140 -> 2 more: 120
    assert [t.text for t in kept] == ["u3", "a3"] and dropped == 6
    kept, dropped = fit_history(history, cost, context_tokens=100)  # never fits: all dropped
    assert kept == [] and dropped == 8
    # A history that starts with assistant turns (already cut elsewhere): the first cut reaches a user.
    kept, dropped = fit_history(history[1:], cost, context_tokens=165)  # 7 turns: 170
    assert [t.text for t in kept] == ["u2", "a2", "u3", "a3"] and dropped == 3
    assert fit_history([], cost, 10) == ([], 0)


def test_audio_positions_follow_the_reference_processor():
    assert speech_frames_for_samples(16000) == 25  # int(seconds * 25)
    assert speech_frames_for_samples(639) == 0 and speech_frames_for_samples(640) == 1
    assert [groups_for_frames(f, 5) for f in (0, 1, 5, 6, 25)] == [0, 1, 1, 2, 5]  # ceil(frames / 5)


@pytest.fixture(scope="module")
def builder(tiny_checkpoint):
    return PromptBuilder.from_checkpoint(tiny_checkpoint)


def test_clip_limits_name_the_problem(builder):
    assert builder.check_clip(16000) == 5
    with pytest.raises(AudioInputError, match="too short: 39.9 ms \\(639 samples\\)"):
        builder.check_clip(639, "the turn's audio")
    too_long = builder.context_tokens * 5 * 16000 // 25
    with pytest.raises(AudioInputError, match="too long"):
        builder.check_clip(too_long)


def test_the_oracle_and_the_orchestrator_build_the_same_prompt(builder, tiny_pipeline):
    """The orchestrator reads the checkpoint's files; the oracle passes its loaded config: same ids."""
    assert builder.token_ids == tiny_pipeline.token_ids and builder.special == tiny_pipeline.special
    history = [PromptTurn("user", n_groups=7), PromptTurn("assistant", "hello there"),
               PromptTurn("tool", '{"ok": true}'), PromptTurn("assistant", None, tool_calls=[{"name": "f", "arguments": {}}])]
    mine = builder.build("s2s", "Be brief.", None, history, 4, 512)
    theirs = tiny_pipeline.prompts.build("s2s", "Be brief.", None, history, 4, 512)
    assert mine == theirs and mine.dropped == 0
    assert mine.max_new_tokens == 512


def test_a_reply_without_new_speech_answers_the_history_as_it_stands(builder):
    """n_groups 0 (a user's text, a function's output to answer): no caller clip after the history, the
    prompt ends with the assistant's header right after the last turn."""
    history = [PromptTurn("user", n_groups=7), PromptTurn("assistant", "hello"), PromptTurn("user", "and tomorrow?")]
    with_speech = builder.ids("s2s", None, None, history, 4)
    without = builder.ids("s2s", None, None, history, 0)
    audio = builder.special.audio  # <|AUDIO|>: one position per 5 Hz group
    assert without.count(audio) == 7 and with_speech.count(audio) == 11
    assert builder.tokenizer.decode(without, skip_special_tokens=False).endswith(
        "and tomorrow?<|im_end|>\n<|im_start|>assistant\n")
    assert builder.messages("s2s", None, None, history, 0)[-1].content == "and tomorrow?"


def test_history_is_fitted_and_the_reply_bounded_by_the_room_left(tiny_checkpoint):
    small = PromptBuilder.from_checkpoint(tiny_checkpoint, context_tokens=120)
    history = [PromptTurn("user", n_groups=30), PromptTurn("assistant", "a"), PromptTurn("user", n_groups=30),
               PromptTurn("assistant", "b")]
    prompt = small.build("s2t", None, None, history, 20, 512)
    assert prompt.dropped == 2 and prompt.kept(history) == history[2:]
    assert len(prompt.ids) < 120 and prompt.max_new_tokens == 120 - len(prompt.ids)
    with pytest.raises(ContextOverflowError, match="the context holds 120"):
        small.build("s2t", None, None, [], 119, 512)
