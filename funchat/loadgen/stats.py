"""Statistics of the records (pure functions): percentiles, a summary of turns, the SLOs, whether a
call counts toward goodput, and which load levels hold."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from funchat.loadgen.records import BARGE_IN, HANG_UP, CallRecord, TurnRecord

MAX_ERROR_MESSAGES = 10


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile with linear interpolation (numpy's default); None for no values."""
    return float(np.percentile(list(values), q)) if len(values) else None


def mean(values: Sequence[float]) -> float | None:
    return float(statistics.fmean(values)) if len(values) else None


@dataclass(frozen=True)
class Slo:
    """Service-level objectives. A call meets them when every turn has its first audio within
    first_audio_p95_ms (the per-turn budget behind the p95 objective), plays without underrun, has
    no error (and, when barge_in_p95_ms is set, every barge-in is honoured within it). A set of
    turns (a load level, a run) holds them when the first-audio p95 is within budget, at most
    max_underrun_turns turns had an underrun, at most max_error_rate of the turns failed (and the
    optional barge-in p95 and minimum goodput hold)."""

    first_audio_p95_ms: float = 1000.0
    max_underrun_turns: int = 0
    max_error_rate: float = 0.0
    barge_in_p95_ms: float | None = None
    min_goodput: float | None = None

    def __post_init__(self):
        if self.first_audio_p95_ms <= 0:
            raise ValueError(f"the first-audio budget must be > 0 ms, got {self.first_audio_p95_ms}")
        if self.max_underrun_turns < 0:
            raise ValueError(f"max_underrun_turns must be >= 0, got {self.max_underrun_turns}")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ValueError(f"max_error_rate must be in [0, 1], got {self.max_error_rate}")
        if self.min_goodput is not None and not 0.0 <= self.min_goodput <= 1.0:
            raise ValueError(f"min_goodput must be in [0, 1], got {self.min_goodput}")


def _ms(seconds: Iterable[float | None]) -> list[float]:
    return [1e3 * s for s in seconds if s is not None]


def turn_summary(turns: Sequence[TurnRecord]) -> dict[str, Any]:
    """Latency, RTF, playback, barge-in and error figures of a set of turns. Latencies and RTF come
    from the turns without error; errors are counted by code."""
    ok = [t for t in turns if not t.error]
    first = _ms(t.first_audio_s for t in ok)
    heard = _ms(t.speech_end_to_audio_s for t in ok)
    barge = _ms(t.barge_in_s for t in ok if t.behaviour == BARGE_IN)
    rtf = [t.rtf for t in ok if t.rtf is not None]
    walls = [t.reply_s for t in ok if t.reply_s is not None]
    audio = [t.audio_s for t in ok]
    pooled_audio = sum(t.audio_s for t in ok if t.reply_s is not None)
    errors = [t for t in turns if t.error]
    return {
        "turns": len(turns), "turns_with_audio": len(first), "errors": len(errors),
        "error_rate": len(errors) / len(turns) if turns else None,
        "errors_by_code": dict(Counter(t.error for t in errors)),
        "error_messages": [f"{t.error}: {t.error_message}" for t in errors[:MAX_ERROR_MESSAGES]],
        "first_audio_ms_p50": percentile(first, 50), "first_audio_ms_p95": percentile(first, 95),
        "first_audio_ms_p99": percentile(first, 99), "first_audio_ms_max": max(first) if first else None,
        "speech_end_to_audio_ms_p50": percentile(heard, 50), "speech_end_to_audio_ms_p95": percentile(heard, 95),
        "rtf_mean": mean(rtf), "rtf_p95": percentile(rtf, 95),
        "rtf_pooled": sum(walls) / pooled_audio if pooled_audio > 0 else None,
        "reply_audio_s_mean": mean(audio), "turn_wall_s_mean": mean(walls),
        "underrun_turns": sum(1 for t in turns if t.underruns), "underruns": sum(t.underruns for t in turns),
        "underrun_s": round(sum(t.underrun_s for t in turns), 4),
        "barge_ins": len(barge), "barge_in_ms_p50": percentile(barge, 50), "barge_in_ms_p95": percentile(barge, 95),
        "barge_in_ms_max": max(barge) if barge else None,
        "hang_ups": sum(1 for t in turns if t.behaviour == HANG_UP),
        "behaviours": dict(Counter(t.behaviour for t in turns)),
        "statuses": dict(Counter(t.status for t in turns)),
        "samples": {"first_audio_ms": [round(x, 1) for x in first], "rtf": [round(x, 4) for x in rtf],
                    "reply_audio_s": [round(x, 3) for x in audio], "barge_in_ms": [round(x, 1) for x in barge]},
    }


def call_misses(call: CallRecord, slo: Slo) -> list[str]:
    """Why a call does not count toward goodput ([] when it meets every SLO)."""
    if not call.turns:
        return ["no turn"]
    misses = []
    for t in call.turns:
        if t.error:
            misses.append(f"turn {t.index}: {t.error}")
            continue
        if t.first_audio_s is None:
            misses.append(f"turn {t.index}: no reply audio")
        elif 1e3 * t.first_audio_s > slo.first_audio_p95_ms:
            misses.append(f"turn {t.index}: first audio {1e3 * t.first_audio_s:.0f} ms > {slo.first_audio_p95_ms:g} ms")
        if t.underruns:
            misses.append(f"turn {t.index}: {t.underruns} underrun(s)")
        if (slo.barge_in_p95_ms is not None and t.barge_in_s is not None
                and 1e3 * t.barge_in_s > slo.barge_in_p95_ms):
            misses.append(f"turn {t.index}: barge-in {1e3 * t.barge_in_s:.0f} ms > {slo.barge_in_p95_ms:g} ms")
    return misses


def goodput(calls: Sequence[CallRecord], slo: Slo) -> float | None:
    """Share of the calls that meet every SLO (None for no calls)."""
    if not calls:
        return None
    return sum(1 for c in calls if not call_misses(c, slo)) / len(calls)


def violations(summary: dict[str, Any], goodput_share: float | None, slo: Slo) -> list[str]:
    """The SLOs a set of turns (turn_summary) and its calls' goodput break ([] when all hold). Nothing
    measured breaks them too: a load level without a turn proves nothing."""
    if not summary["turns"]:
        return ["no turn was measured"]
    out = []
    p95 = summary["first_audio_ms_p95"]
    if p95 is None:
        out.append("no first audio was measured")
    elif p95 > slo.first_audio_p95_ms:
        out.append(f"first audio p95 {p95:.0f} ms > {slo.first_audio_p95_ms:g} ms")
    if summary["underrun_turns"] > slo.max_underrun_turns:
        out.append(f"{summary['underrun_turns']} turn(s) with underruns > {slo.max_underrun_turns}")
    if summary["error_rate"] > slo.max_error_rate:
        codes = ", ".join(f"{code} x{n}" for code, n in sorted(summary["errors_by_code"].items()))
        out.append(f"error rate {summary['error_rate']:.3f} ({summary['errors']} of {summary['turns']} turns: "
                   f"{codes}) > {slo.max_error_rate:g}")
    barge = summary["barge_in_ms_p95"]
    if slo.barge_in_p95_ms is not None and barge is not None and barge > slo.barge_in_p95_ms:
        out.append(f"barge-in p95 {barge:.0f} ms > {slo.barge_in_p95_ms:g} ms")
    if slo.min_goodput is not None and (goodput_share is None or goodput_share < slo.min_goodput):
        shown = "none" if goodput_share is None else f"{goodput_share:.3f}"
        out.append(f"goodput {shown} < {slo.min_goodput:g}")
    return out


def largest_holding(levels: Sequence[dict[str, Any]]) -> int | None:
    """The largest concurrency that holds the SLOs: walking up the levels ("concurrency",
    "holds_slo"), the last one before the first that breaks them (None if the first breaks them).
    A level that holds above a broken one is noise, not capacity."""
    best = None
    for level in sorted(levels, key=lambda lv: lv["concurrency"]):
        if not level["holds_slo"]:
            break
        best = level["concurrency"]
    return best
