"""funchat.loadgen.stats and report: percentiles, turn summaries, SLOs, goodput, the largest
concurrency that holds, and summary.json (pure functions over records)."""

from __future__ import annotations

import numpy as np
import pytest

from funchat.loadgen.records import BARGE_IN, HANG_UP, LISTEN, CallRecord, TurnRecord
from funchat.loadgen.report import build_summary
from funchat.loadgen.stats import (Slo, call_misses, goodput, largest_holding, percentile, turn_summary,
                                   violations)


def turn(first_ms=300.0, reply_s=2.0, audio_s=4.0, status="completed", error="", underruns=0, behaviour=LISTEN,
         barge_ms=None, kind="converse", index=0, started_at=100.0, call_id="c") -> TurnRecord:
    return TurnRecord(kind, call_id, index, started_at, behaviour=behaviour, status=status,
                      first_audio_s=None if first_ms is None else first_ms / 1e3, reply_s=reply_s, audio_s=audio_s,
                      underruns=underruns, underrun_s=0.1 * underruns, error=error,
                      error_message="why" if error else "", barge_in_s=None if barge_ms is None else barge_ms / 1e3)


def call(*turns: TurnRecord, started_at=100.0, call_id="c") -> CallRecord:
    return CallRecord("converse", call_id, started_at, 10.0, list(turns))


# -- percentiles ----------------------------------------------------------------------------------

def test_percentile_interpolates_like_numpy_and_is_none_without_values():
    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 95) == pytest.approx(4.8)
    assert percentile(values, 95) == pytest.approx(float(np.percentile(values, 95)))
    assert percentile([], 95) is None


# -- turn summary ---------------------------------------------------------------------------------

def test_turn_summary_takes_latencies_from_good_turns_and_counts_errors_by_code():
    turns = [turn(100), turn(200), turn(300, underruns=2), turn(5000, error="UNAVAILABLE"),
             turn(None, error="TIMEOUT", reply_s=None, audio_s=0.0), turn(None, error="TIMEOUT", audio_s=0.0)]
    s = turn_summary(turns)
    assert s["turns"] == 6 and s["errors"] == 3 and s["error_rate"] == 0.5
    assert s["errors_by_code"] == {"UNAVAILABLE": 1, "TIMEOUT": 2}
    assert s["first_audio_ms_p50"] == 200.0 and s["first_audio_ms_max"] == 300.0  # the 5000 ms failed turn is out
    assert s["turns_with_audio"] == 3
    assert s["underrun_turns"] == 1 and s["underruns"] == 2 and s["underrun_s"] == pytest.approx(0.2)
    assert s["error_messages"][0] == "UNAVAILABLE: why"


def test_rtf_only_for_completed_replies_and_pooled_over_them():
    turns = [turn(reply_s=1.0, audio_s=4.0), turn(reply_s=3.0, audio_s=2.0),
             turn(reply_s=0.5, audio_s=0.6, status="interrupted")]  # a cut reply has no real-time factor
    s = turn_summary(turns)
    assert s["samples"]["rtf"] == [0.25, 1.5]
    assert s["rtf_mean"] == pytest.approx(0.875)
    assert s["rtf_pooled"] == pytest.approx((1.0 + 3.0 + 0.5) / (4.0 + 2.0 + 0.6))


def test_barge_in_figures_come_from_barged_turns_and_behaviours_are_counted():
    turns = [turn(behaviour=BARGE_IN, barge_ms=200, status="interrupted"),
             turn(behaviour=BARGE_IN, barge_ms=400, status="interrupted"),
             turn(behaviour=HANG_UP, status="hung_up", reply_s=None), turn()]
    s = turn_summary(turns)
    assert s["barge_ins"] == 2 and s["barge_in_ms_p50"] == 300.0 and s["barge_in_ms_max"] == 400.0
    assert s["hang_ups"] == 1
    assert s["behaviours"] == {BARGE_IN: 2, HANG_UP: 1, LISTEN: 1}
    assert s["statuses"] == {"interrupted": 2, "hung_up": 1, "completed": 1}


def test_an_empty_summary_has_no_figures():
    s = turn_summary([])
    assert s["turns"] == 0 and s["first_audio_ms_p95"] is None and s["error_rate"] is None and s["rtf_pooled"] is None


# -- a call's SLO and goodput ---------------------------------------------------------------------

SLO = Slo(first_audio_p95_ms=1000)


def test_a_call_meets_the_slo_only_when_every_turn_does():
    assert call_misses(call(turn(900), turn(999)), SLO) == []
    assert call_misses(call(turn(900), turn(1200, index=1)), SLO) == ["turn 1: first audio 1200 ms > 1000 ms"]
    assert call_misses(call(turn(100, underruns=1)), SLO) == ["turn 0: 1 underrun(s)"]
    assert call_misses(call(turn(100, error="RESOURCE_EXHAUSTED")), SLO) == ["turn 0: RESOURCE_EXHAUSTED"]
    assert call_misses(call(turn(None)), SLO) == ["turn 0: no reply audio"]
    assert call_misses(call(), SLO) == ["no turn"]


def test_a_hang_up_is_a_behaviour_not_a_miss_but_a_slow_barge_in_misses_its_budget():
    assert call_misses(call(turn(300, behaviour=HANG_UP, status="hung_up", reply_s=None)), SLO) == []
    barged = call(turn(300, behaviour=BARGE_IN, barge_ms=700))
    assert call_misses(barged, SLO) == []
    assert call_misses(barged, Slo(barge_in_p95_ms=500)) == ["turn 0: barge-in 700 ms > 500 ms"]


def test_goodput_is_the_share_of_calls_meeting_every_slo():
    calls = [call(turn(100)), call(turn(100), turn(2000)), call(turn(100, underruns=1)), call(turn(100))]
    assert goodput(calls, SLO) == 0.5
    assert goodput([], SLO) is None
    assert goodput(calls, Slo(first_audio_p95_ms=5000)) == 0.75


# -- SLO verdicts ---------------------------------------------------------------------------------

def test_violations_name_each_broken_slo():
    s = turn_summary([turn(100), turn(3000, underruns=1), turn(None, error="UNAVAILABLE")])
    broken = violations(s, 0.2, Slo(first_audio_p95_ms=1000, min_goodput=0.5))
    assert broken[0].startswith("first audio p95 ") and broken[0].endswith(" ms > 1000 ms")
    assert broken[1] == "1 turn(s) with underruns > 0"
    assert broken[2] == "error rate 0.333 (1 of 3 turns: UNAVAILABLE x1) > 0"
    assert broken[3] == "goodput 0.200 < 0.5"
    assert violations(s, 0.2, Slo(first_audio_p95_ms=10_000, max_underrun_turns=1, max_error_rate=0.5)) == []


def test_nothing_measured_holds_no_slo():
    assert violations(turn_summary([]), None, SLO) == ["no turn was measured"]
    only_failures = turn_summary([turn(None, error="TIMEOUT")])
    assert "no first audio was measured" in violations(only_failures, 0.0, Slo(max_error_rate=1.0))


def test_slo_values_are_checked():
    for bad in (dict(first_audio_p95_ms=0), dict(max_underrun_turns=-1), dict(max_error_rate=1.5),
                dict(min_goodput=2.0)):
        with pytest.raises(ValueError):
            Slo(**bad)


# -- the step result ------------------------------------------------------------------------------

def test_largest_holding_stops_at_the_first_level_that_breaks():
    levels = [{"concurrency": c, "holds_slo": ok} for c, ok in ((4, True), (1, True), (3, False), (2, True))]
    assert largest_holding(levels) == 2  # 4 holding above a broken 3 is noise, not capacity
    assert largest_holding([{"concurrency": 1, "holds_slo": False}, {"concurrency": 2, "holds_slo": True}]) is None
    assert largest_holding([]) is None


# -- summary.json ---------------------------------------------------------------------------------

def _level_of(t: float) -> int:  # a step schedule: 1 call until t=10, 2 until 20, 3 after
    return 1 if t < 10 else 2 if t < 20 else 3


def test_the_step_summary_groups_by_level_and_names_the_largest_that_held():
    turns = [turn(200, started_at=1), turn(300, started_at=2),             # level 1: holds
             turn(500, started_at=11), turn(700, started_at=12),           # level 2: holds
             turn(1500, started_at=21), turn(400, started_at=22)]          # level 3: p95 over budget
    calls = [call(t, started_at=t.started_at, call_id=str(i)) for i, t in enumerate(turns)]
    s = build_summary(turns, calls, SLO, _level_of, "step", meta={"target": "x:1"})
    assert [lv["concurrency"] for lv in s["levels"]] == [1, 2, 3]
    assert [lv["holds_slo"] for lv in s["levels"]] == [True, True, False]
    assert s["levels"][2]["goodput"] == 0.5 and s["levels"][2]["good_calls"] == 1
    assert s["step"]["largest_concurrency_holding_slo"] == 2
    assert s["verdict"] == {"passed": True, "violations": []}
    assert s["target"] == "x:1" and s["slo"]["first_audio_p95_ms"] == 1000
    assert s["overall"]["turns"] == 6 and s["overall"]["calls"] == 6


def test_a_step_run_fails_when_no_level_or_too_small_a_level_holds():
    slow = [turn(2000, started_at=1)]
    s = build_summary(slow, [call(*slow, started_at=1)], SLO, _level_of, "step")
    assert not s["verdict"]["passed"]
    assert s["verdict"]["violations"][0].startswith("no load level held the SLOs (level 1: first audio p95 2000 ms")
    ok = [turn(200, started_at=1)]
    s = build_summary(ok, [call(*ok, started_at=1)], SLO, _level_of, "step", step_min_users=2)
    assert s["verdict"]["violations"] == ["the largest concurrency holding the SLOs is 1 < 2 required"]


def test_steady_and_spike_verdicts_are_the_whole_runs():
    turns = [turn(200, started_at=1), turn(400, started_at=11, underruns=1)]
    s = build_summary(turns, [], SLO, _level_of, "steady")
    assert s["verdict"] == {"passed": False, "violations": ["1 turn(s) with underruns > 0"]}
    assert "step" not in s and s["overall"]["goodput"] is None


def test_records_survive_the_trip_to_the_master():
    c = call(turn(250, behaviour=BARGE_IN, barge_ms=180), turn(None, error="TIMEOUT", index=1))
    c.hung_up = True
    back = CallRecord.from_dict(c.to_dict())
    assert back == c and back.turns[0].rtf == c.turns[0].rtf
    assert TurnRecord.from_dict({**c.turns[0].to_dict(), "added_later": 1}) == c.turns[0]
