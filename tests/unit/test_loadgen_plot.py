"""funchat.loadgen.plot: the load test's PNG (matplotlib, Agg) from a summary."""

from __future__ import annotations

from funchat.loadgen.plot import plot_summary
from funchat.loadgen.records import CallRecord, TurnRecord
from funchat.loadgen.report import build_summary
from funchat.loadgen.stats import Slo


def test_a_step_summary_becomes_a_png(tmp_path):
    turns = [TurnRecord("converse", str(i), 0, float(i), status="completed", first_audio_s=0.2 * (1 + i),
                        reply_s=1.0, audio_s=2.0) for i in range(6)]
    calls = [CallRecord("converse", t.call_id, t.started_at, 5.0, [t]) for t in turns]
    summary = build_summary(turns, calls, Slo(), lambda t: 1 + int(t) // 2, "step")
    path = plot_summary(summary, tmp_path / "out" / "plot.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_a_run_without_measurements_still_draws(tmp_path):
    summary = build_summary([], [], Slo(), lambda t: 1, "steady")
    assert plot_summary(summary, tmp_path / "plot.png").stat().st_size > 5_000
