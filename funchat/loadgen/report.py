"""The load test's summary (summary.json): per load level and overall, the turn figures, goodput and
the SLO verdict; for the step shape, the largest concurrency that held. Pure: records in, dict out.

A record belongs to the level (concurrent calls) the schedule held when its call or turn started.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict
from typing import Any, Callable, Sequence

from funchat.loadgen.records import CallRecord, TurnRecord
from funchat.loadgen.stats import Slo, call_misses, goodput, largest_holding, turn_summary, violations

MAX_MISSES = 10


def _figures(turns: Sequence[TurnRecord], calls: Sequence[CallRecord], slo: Slo) -> dict[str, Any]:
    share = goodput(calls, slo)
    summary = turn_summary(turns)
    misses = [f"{c.kind} call {c.call_id}: {'; '.join(m)}" for c in calls if (m := call_misses(c, slo))]
    broken = violations(summary, share, slo)
    return {**summary, "calls": len(calls), "good_calls": len(calls) - len(misses), "goodput": share,
            "calls_hung_up": sum(1 for c in calls if c.hung_up), "calls_missing_slo": misses[:MAX_MISSES],
            "by_kind": {kind: {"turns": n, "calls": sum(1 for c in calls if c.kind == kind)}
                        for kind, n in Counter(t.kind for t in turns).items()},
            "holds_slo": not broken, "violations": broken}


def build_summary(turns: Sequence[TurnRecord], calls: Sequence[CallRecord], slo: Slo,
                  level_of: Callable[[float], int | None], shape: str, step_min_users: int = 1,
                  meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """turns: every finished turn (also those of calls the test's end cut short); calls: the calls
    that ran to their end (they alone can be judged for goodput); level_of(wall time) -> the
    concurrency the schedule held then."""
    by_level_turns: dict[int, list[TurnRecord]] = defaultdict(list)
    by_level_calls: dict[int, list[CallRecord]] = defaultdict(list)
    for t in turns:
        by_level_turns[level_of(t.started_at) or 0].append(t)
    for c in calls:
        by_level_calls[level_of(c.started_at) or 0].append(c)
    levels = [{"concurrency": level, **_figures(by_level_turns[level], by_level_calls[level], slo)}
              for level in sorted(set(by_level_turns) | set(by_level_calls))]
    overall = _figures(turns, calls, slo)
    out: dict[str, Any] = {**(meta or {}), "shape": shape, "slo": asdict(slo), "levels": levels, "overall": overall}
    if shape == "step":
        largest = largest_holding(levels)
        out["step"] = {"largest_concurrency_holding_slo": largest, "levels": [lv["concurrency"] for lv in levels],
                       "min_required": step_min_users}
        if largest is None:
            first = levels[0] if levels else None
            why = (f"level {first['concurrency']}: " + "; ".join(first["violations"])) if first else "no level ran"
            broken = [f"no load level held the SLOs ({why})"]
        elif largest < step_min_users:
            broken = [f"the largest concurrency holding the SLOs is {largest} < {step_min_users} required"]
        else:
            broken = []
    else:
        broken = overall["violations"]
    out["verdict"] = {"passed": not broken, "violations": broken}
    return out
