"""funchat.loadgen.plan: a call's script (utterances and per-reply behaviours), drawn seeded."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from funchat.loadgen.plan import Shares, plan_call
from funchat.loadgen.records import BARGE_IN, HANG_UP, LISTEN, SILENT
from funchat.loadgen.utterances import Utterance

UTTERANCES = [Utterance(f"u{i}", np.zeros(1600 * (i + 1), np.float32)) for i in range(3)]


def test_shares_are_checked():
    for bad in (dict(barge_in=-0.1), dict(silent=1.5), dict(barge_in=0.6, hang_up=0.5)):
        with pytest.raises(ValueError):
            Shares(**bad)
    Shares(barge_in=0.5, silent=0.25, hang_up=0.25)  # adding up to exactly 1 is fine


def test_draws_follow_the_shares():
    rng = random.Random(7)
    shares = Shares(barge_in=0.3, silent=0.1, hang_up=0.1)
    counts = Counter(shares.draw(rng) for _ in range(20_000))
    assert counts[BARGE_IN] / 20_000 == pytest.approx(0.3, abs=0.015)
    assert counts[SILENT] / 20_000 == pytest.approx(0.1, abs=0.01)
    assert counts[HANG_UP] / 20_000 == pytest.approx(0.1, abs=0.01)
    assert counts[LISTEN] / 20_000 == pytest.approx(0.5, abs=0.015)


def test_a_listener_gets_exactly_its_turns_and_the_same_seed_gives_the_same_script():
    plan = plan_call(random.Random(1), UTTERANCES, 4)
    assert len(plan) == 4 and {p.behaviour for p in plan} == {LISTEN} and not any(p.barges_in for p in plan)
    assert plan == plan_call(random.Random(1), UTTERANCES, 4)
    assert {p.utterance.name for p in plan} <= {u.name for u in UTTERANCES}


def test_a_barge_in_is_the_next_utterance_spoken_over_the_reply():
    plan = plan_call(random.Random(3), UTTERANCES, 3, Shares(barge_in=1.0), at_ms=(400, 900))
    # every planned reply is barged into; the last barge-in adds the turn that barges, listened to
    assert [p.behaviour for p in plan] == [BARGE_IN, BARGE_IN, BARGE_IN, LISTEN]
    assert [p.barges_in for p in plan] == [False, True, True, True]
    assert all(400 <= p.at_ms <= 900 for p in plan)


def test_a_hang_up_ends_the_script():
    plan = plan_call(random.Random(0), UTTERANCES, 5, Shares(hang_up=1.0))
    assert [p.behaviour for p in plan] == [HANG_UP]


def test_a_call_needs_a_turn_and_something_to_say():
    with pytest.raises(ValueError):
        plan_call(random.Random(0), UTTERANCES, 0)
    with pytest.raises(ValueError):
        plan_call(random.Random(0), [], 1)
