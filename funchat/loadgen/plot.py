"""The load test's picture: first-audio p50/p95 and goodput against concurrent calls (PNG).

matplotlib (the `loadtest` extra) is imported when a plot is drawn, with the Agg backend (no
display), so the rest of the load generator needs only the client's packages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_summary(summary: dict[str, Any], path: str | Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [lv for lv in summary["levels"] if lv["concurrency"]]
    x = [lv["concurrency"] for lv in levels]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for key, label, style in (("first_audio_ms_p50", "first audio p50", "o-"),
                              ("first_audio_ms_p95", "first audio p95", "s-")):
        points = [(c, lv[key]) for c, lv in zip(x, levels) if lv[key] is not None]
        if points:
            ax.plot(*zip(*points), style, label=label)
    budget = summary["slo"]["first_audio_p95_ms"]
    ax.axhline(budget, color="tab:red", linestyle="--", linewidth=1, label=f"p95 budget {budget:g} ms")
    ax.set_xlabel("concurrent calls")
    ax.set_ylabel("first audio (ms)")
    ax.set_ylim(bottom=0)
    if x:
        ax.set_xticks(sorted(set(x)))
    right = ax.twinx()
    points = [(c, lv["goodput"]) for c, lv in zip(x, levels) if lv["goodput"] is not None]
    if points:
        right.plot(*zip(*points), "^:", color="tab:green", label="goodput")
    right.set_ylabel("goodput (share of calls meeting every SLO)")
    right.set_ylim(0, 1.05)
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="upper left", fontsize=8)
    verdict = "passed" if summary["verdict"]["passed"] else "failed"
    title = f"funchat load test ({summary['shape']}): SLO {verdict}"
    if summary.get("step"):
        title += f"; largest concurrency holding: {summary['step']['largest_concurrency_holding_slo']}"
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
