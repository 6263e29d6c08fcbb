"""Load shapes as pure schedules: seconds since the start -> (users, spawn rate per second), or None
when the test is over. A user is one caller making one call after another, so users = concurrent
calls. Locust's LoadTestShape (loadtests/locustfile.py) only asks these.

- steady: `users` for the whole duration;
- step: 1 x step_users, 2 x step_users, ... up to `users`, each for an equal part of the duration
  (the report names the largest level that held the SLOs);
- spike: a quarter of `users` (at least 1), then all of them for the middle fifth of the duration,
  then back to the quarter.
"""

from __future__ import annotations

from dataclasses import dataclass

SHAPES = ("steady", "step", "spike")
SPIKE_FROM, SPIKE_TO = 0.4, 0.6  # the spike's place in the duration


def step_levels(users: int, step_users: int = 1) -> list[int]:
    """The step shape's levels: multiples of step_users up to users, users itself always last."""
    if users < 1 or step_users < 1:
        raise ValueError(f"users and step_users must be >= 1, got {users} and {step_users}")
    levels = list(range(step_users, users + 1, step_users))
    if not levels or levels[-1] != users:
        levels.append(users)
    return levels


@dataclass(frozen=True)
class Schedule:
    shape: str
    users: int
    duration_s: float
    step_users: int = 1
    spawn_rate: float | None = None  # users started (or stopped) per second; None: all at once

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"unknown load shape {self.shape!r}; use one of {', '.join(SHAPES)}")
        if self.users < 1:
            raise ValueError(f"users must be >= 1, got {self.users}")
        if self.duration_s <= 0:
            raise ValueError(f"the duration must be > 0 s, got {self.duration_s}")
        if self.shape == "step":
            step_levels(self.users, self.step_users)  # checks step_users

    @property
    def rate(self) -> float:
        return self.spawn_rate if self.spawn_rate else float(self.users)

    @property
    def levels(self) -> list[int]:
        """Every concurrency the schedule holds, ascending."""
        if self.shape == "steady":
            return [self.users]
        if self.shape == "step":
            return step_levels(self.users, self.step_users)
        return sorted({self.spike_base, self.users})

    @property
    def spike_base(self) -> int:
        return max(1, self.users // 4)

    @property
    def step_s(self) -> float:
        return self.duration_s / len(step_levels(self.users, self.step_users))

    def users_at(self, t: float) -> int | None:
        """Users the schedule asks for t seconds after the start (None: over)."""
        if t < 0:
            return None
        if t >= self.duration_s:
            return None
        if self.shape == "steady":
            return self.users
        if self.shape == "step":
            levels = step_levels(self.users, self.step_users)
            return levels[min(int(t // self.step_s), len(levels) - 1)]
        if SPIKE_FROM * self.duration_s <= t < SPIKE_TO * self.duration_s:
            return self.users
        return self.spike_base

    def tick(self, t: float) -> tuple[int, float] | None:
        users = self.users_at(t)
        return None if users is None else (users, self.rate)
