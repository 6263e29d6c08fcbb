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
