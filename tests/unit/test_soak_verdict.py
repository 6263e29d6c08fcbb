"""The soak's verdict (funchat/dev/soak.py) from its samples: slopes, growing processes, errors."""

from __future__ import annotations

import pytest

from funchat.dev.soak import CallerTotals, MemorySampler, MemorySeries, summarise


def series(name: str, pid: int, rss: list[float], every_s: float = 10.0) -> MemorySeries:
    return MemorySeries(name, pid, times_s=[i * every_s for i in range(len(rss))], rss_mb=rss)


def sampler_with(*all_series: MemorySeries, vanished: list[str] | None = None) -> MemorySampler:
    s = MemorySampler(roots={}, interval_s=10.0)
    s.series = {x.pid: x for x in all_series}
    s.vanished = vanished or []
    return s


def test_slope_is_megabytes_per_minute_after_the_warmup():
    # 100 MB during the warm-up, then +1 MB every 10 s = 6 MB/min
    s = series("p", 1, [50.0, 100.0] + [100.0 + i for i in range(10)])
    assert s.slope_mb_per_min(after_s=20.0) == pytest.approx(6.0)
    assert s.slope_mb_per_min(after_s=1e9) is None  # no samples left: no trend


def test_flat_processes_and_no_errors_pass():
    flat = series("triton:llm/triton_python_backend_stub", 2, [300.0 + (i % 2) * 0.5 for i in range(24)])
    summary = summarise(CallerTotals(calls=4, turns=12), sampler_with(flat), seconds=240.0, max_slope=1.0)
    assert summary["passed"] and summary["growing"] == [] and summary["warmup_s"] == 120.0  # half the run
    assert summary["processes"][0]["flat"]
    assert len(summary["processes"][0]["rss_series"]) == 24  # every sample kept for the JSON


def test_a_growing_process_fails_the_soak():
    leak = series("orchestrator/ray::ServeReplica:funchat:Orchestrator", 3, [200.0 + 2.0 * i for i in range(24)])
    summary = summarise(CallerTotals(calls=4, turns=12), sampler_with(leak), seconds=240.0, max_slope=1.0)
    assert not summary["passed"]
    assert summary["growing"] == ["orchestrator/ray::ServeReplica:funchat:Orchestrator"]
    assert summary["processes"][0]["slope_mb_per_min"] == pytest.approx(12.0)


def test_errors_a_vanished_process_or_no_turn_at_all_fail_the_soak():
    flat = series("redis", 4, [10.0] * 24)
    errors = CallerTotals(calls=2, turns=6, errors=["UNAVAILABLE: llm is down"])
    assert not summarise(errors, sampler_with(flat), 240.0, 1.0)["passed"]
    assert not summarise(CallerTotals(calls=2, turns=6), sampler_with(flat, vanished=["triton:vocoder"]),
                         240.0, 1.0)["passed"]
    assert not summarise(CallerTotals(), sampler_with(flat), 240.0, 1.0)["passed"]


def test_short_lived_processes_have_no_trend_and_are_left_out():
    brief = series("orchestrator/ray::IDLE", 5, [80.0, 90.0])
    flat = series("redis", 4, [10.0] * 24)
    summary = summarise(CallerTotals(calls=1, turns=3), sampler_with(brief, flat), 240.0, 1.0)
    assert [p["process"] for p in summary["processes"]] == ["redis"] and summary["passed"]


def test_a_run_too_short_for_any_trend_fails():
    flat = series("redis", 4, [10.0] * 24)
    sampler = sampler_with(flat)
    # one of two callers never finished a call: the whole run was warm-up, no trend, no verdict
    totals = CallerTotals(calls=1, turns=3, first_calls_done_at=[sampler.t0 + 100.0])
    summary = summarise(totals, sampler, 240.0, 1.0, callers=2)
    assert summary["warmup_s"] == 240.0 and summary["processes"] == [] and not summary["passed"]


def test_the_warmup_lasts_until_every_caller_finished_its_first_call():
    flat = series("redis", 4, [10.0] * 24)
    sampler = sampler_with(flat)
    totals = CallerTotals(calls=3, turns=9, first_calls_done_at=[sampler.t0 + 30.0, sampler.t0 + 150.0])
    assert summarise(totals, sampler, 240.0, 1.0, callers=2)["warmup_s"] == 150.0
    totals = CallerTotals(calls=3, turns=9, first_calls_done_at=[sampler.t0 + 30.0, sampler.t0 + 50.0])
    assert summarise(totals, sampler, 240.0, 1.0, callers=2)["warmup_s"] == 120.0  # at least half the run


def test_a_cache_that_levels_off_passes_and_a_steady_leak_does_not():
    # +30 MB over the first 80 s, then flat: the oneDNN primitive cache filling with new shapes
    cache = series("triton:vocoder/triton_python_backend_stub", 6, [500.0 + min(i, 8) * 3.75 for i in range(24)])
    leak = series("orchestrator/ray::ServeReplica:funchat:Orchestrator", 7, [200.0 + 0.5 * i for i in range(24)])
    summary = summarise(CallerTotals(calls=4, turns=12), sampler_with(cache, leak), seconds=240.0, max_slope=1.0)
    assert summary["growing"] == ["orchestrator/ray::ServeReplica:funchat:Orchestrator"]  # 3 MB/min all along


def test_memory_held_only_while_a_request_runs_is_not_a_trend_but_a_leak_under_it_is():
    # a long prefill's transient buffers, caught by single samples (the last one too)
    spiky = [480.0 + (220.0 if i in (14, 19, 23) else 0.0) for i in range(24)]
    flat = series("triton:refined_head/triton_python_backend_stub", 8, spiky)
    leaking = series("triton:llm/triton_python_backend_stub", 9,
                     [380.0 + 0.5 * i + (150.0 if i in (15, 20) else 0.0) for i in range(24)])
    summary = summarise(CallerTotals(calls=4, turns=12), sampler_with(flat, leaking), seconds=240.0, max_slope=1.0)
    assert summary["growing"] == ["triton:llm/triton_python_backend_stub"]  # 3 MB/min under its spikes
