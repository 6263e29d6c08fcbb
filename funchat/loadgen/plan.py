"""A call's script, drawn before it starts: what the caller says each turn and what it does while
each reply plays (listen to the end, barge in, go silent for a while, hang up). Pure: a seeded
random.Random gives the same script every time."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from funchat.loadgen.records import BARGE_IN, HANG_UP, LISTEN, SILENT
from funchat.loadgen.utterances import Utterance


@dataclass(frozen=True)
class Shares:
    """Share of replies the caller barges into, goes silent during, or hangs up on (the rest it
    listens to). Each in [0, 1], together at most 1."""

    barge_in: float = 0.0
    silent: float = 0.0
    hang_up: float = 0.0

    def __post_init__(self):
        for name in ("barge_in", "silent", "hang_up"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"the {name} share must be in [0, 1], got {value}")
        if self.barge_in + self.silent + self.hang_up > 1.0 + 1e-9:
            raise ValueError(f"the barge-in, silent and hang-up shares add up to more than 1 "
                             f"({self.barge_in} + {self.silent} + {self.hang_up})")

    def draw(self, rng: random.Random) -> str:
        x = rng.random()
        for behaviour, share in ((BARGE_IN, self.barge_in), (SILENT, self.silent), (HANG_UP, self.hang_up)):
            if x < share:
                return behaviour
            x -= share
        return LISTEN


@dataclass(frozen=True)
class TurnPlan:
    utterance: Utterance
    behaviour: str = LISTEN  # what the caller does while this turn's reply plays
    at_ms: int = 0           # reply audio heard when the behaviour starts (barge-in, silence, hang-up)
    barges_in: bool = False  # this utterance is spoken over the previous turn's reply


def plan_call(rng: random.Random, utterances: Sequence[Utterance], turns: int, shares: Shares = Shares(),
              at_ms: tuple[int, int] = (300, 1500)) -> list[TurnPlan]:
    """`turns` turns with behaviours drawn from shares. A barge-in is the next utterance spoken over
    the reply, so a barge-in on the last turn adds one more turn (listened to); a hang-up ends the
    script."""
    if turns < 1:
        raise ValueError(f"a call needs at least one turn, got {turns}")
    if not utterances:
        raise ValueError("no utterances to say")
    plans: list[TurnPlan] = []
    barging = False
    while len(plans) < turns or barging:
        behaviour = shares.draw(rng) if len(plans) < turns else LISTEN
        plans.append(TurnPlan(rng.choice(list(utterances)), behaviour, rng.randint(*at_ms), barges_in=barging))
        barging = behaviour == BARGE_IN
        if behaviour == HANG_UP:
            break
    return plans
