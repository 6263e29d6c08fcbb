"""The short soak CI runs: `make soak` (funchat/dev/soak.py) with 2 callers for 2 minutes on the stack
as `make up` starts it (make_up/conftest.py) (redis-server, four tritonservers, Ray Serve), through the public API with
its API key: no turn fails, no process of the stack vanishes, and none grows.

The slope bound is looser than `make soak`'s default (1 MB/min over 10 minutes): two minutes on a
loaded 2-core machine leave a short trend line after the warm-up. It still catches a leak of a
session's audio or a reply's chunks per turn in the orchestrator's processes, Redis and the
tritonservers (tens of MB per minute at this rate of turns), and KV pools that grow with the calls
(before they were allocated once at load, the refined_head stub grew 82 MB/min here).
"""

from __future__ import annotations

import pytest

from funchat.dev.soak import print_table, soak

MAX_SLOPE_MB_PER_MIN = 8.0


@pytest.fixture(scope="module")
def stack_dir(make_up_stack):
    return make_up_stack["run_dir"]


def test_two_callers_for_two_minutes_no_error_and_no_growth(stack_dir, example_wav):
    summary = soak(stack_dir, calls=2, minutes=2.0, turns=3, interval_s=3.0, max_slope=MAX_SLOPE_MB_PER_MIN,
                   recording=str(example_wav))
    print_table(summary)
    assert summary["errors"] == 0, summary["error_samples"]
    assert summary["turns"] >= 6 and summary["calls"] >= 2
    assert summary["vanished"] == []
    names = {p["process"] for p in summary["processes"]}
    # every part of the stack was sampled: the store, each model service's backend stub, the replicas
    assert "redis" in names
    for model in ("audio_tokenizer", "llm", "refined_head", "vocoder"):
        assert any(n.startswith(f"triton:{model}/") and "stub" in n for n in names), (model, names)
    assert any("ServeReplica" in n for n in names), names
    assert summary["growing"] == [], summary["processes"]
