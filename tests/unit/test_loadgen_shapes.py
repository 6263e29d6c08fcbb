"""funchat.loadgen.shapes: the steady, step and spike schedules Locust's shape asks each second."""

from __future__ import annotations

import pytest

from funchat.loadgen.shapes import Schedule, step_levels


def test_step_levels_climb_to_the_top_in_steps():
    assert step_levels(4) == [1, 2, 3, 4]
    assert step_levels(5, 2) == [2, 4, 5]  # the top level always runs
    assert step_levels(6, 3) == [3, 6]
    assert step_levels(1) == [1]
    with pytest.raises(ValueError):
        step_levels(0)
    with pytest.raises(ValueError):
        step_levels(4, 0)


def test_steady_holds_its_users_then_ends():
    s = Schedule("steady", users=3, duration_s=60)
    assert [s.users_at(t) for t in (0, 30, 59.9)] == [3, 3, 3]
    assert s.users_at(60) is None and s.tick(61) is None
    assert s.tick(0) == (3, 3.0)  # all at once by default
    assert Schedule("steady", 3, 60, spawn_rate=0.5).tick(0) == (3, 0.5)
    assert s.levels == [3]


def test_step_spends_an_equal_part_of_the_duration_on_each_level():
    s = Schedule("step", users=4, duration_s=120)
    assert s.step_s == 30
    assert [s.users_at(t) for t in (0, 29.9, 30, 59.9, 60, 90, 119.9)] == [1, 1, 2, 2, 3, 4, 4]
    assert s.users_at(120) is None
    assert s.levels == [1, 2, 3, 4]
    two = Schedule("step", users=5, duration_s=30, step_users=2)
    assert [two.users_at(t) for t in (0, 10, 20)] == [2, 4, 5]


def test_spike_jumps_to_all_users_in_the_middle_fifth():
    s = Schedule("spike", users=8, duration_s=100)
    assert [s.users_at(t) for t in (0, 39.9, 40, 59.9, 60, 99.9)] == [2, 2, 8, 8, 2, 2]
    assert s.levels == [2, 8]
    assert Schedule("spike", users=2, duration_s=10).users_at(0) == 1  # at least one caller


def test_a_schedule_refuses_what_it_cannot_run():
    for bad in (dict(shape="ramp", users=1, duration_s=1), dict(shape="steady", users=0, duration_s=1),
                dict(shape="steady", users=1, duration_s=0), dict(shape="step", users=2, duration_s=1, step_users=0)):
        with pytest.raises(ValueError):
            Schedule(**bad)
    assert Schedule("steady", 1, 10).users_at(-1) is None
