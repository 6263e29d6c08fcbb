"""`python -m funchat.benchmarks.srh_prefill` still runs: one prefill in one forward and in blocks,
both cases (from an empty cache, continuing a kept row), with the same tokens either way."""

from __future__ import annotations

from funchat.benchmarks import srh_prefill


def test_the_srh_prefill_bench_runs_and_blocks_keep_the_tokens():
    for kept, new in ((0, 30), (20, 30)):
        whole = srh_prefill.one(srh_prefill.ONE_FORWARD, kept, new)
        blocked = srh_prefill.one(16, kept, new)
        assert whole["tokens"] == blocked["tokens"] and len(whole["tokens"]) == 5
        assert whole["ms"] > 0 and blocked["peak_mb"] >= 0
