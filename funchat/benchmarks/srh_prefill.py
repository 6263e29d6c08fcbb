"""`python -m funchat.benchmarks.srh_prefill`: what a refined_head prefill costs in memory and time,
in one forward against in blocks of `PREFILL_BLOCK` sub-frames (tiny preset, random weights, CPU).

Cases: a prompt from an empty cache (one causal forward either way) and new positions continuing a
kept row (a masked forward: the case the blocks bound). Each variant runs in its own process, as
the peak resident memory (`ru_maxrss`) only grows; the number reported is the peak above what the
process held just before the prefill. Prints a table, writes JSON; the tokens must agree.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ONE_FORWARD = 10 ** 9  # a block larger than any prompt
CASES = ((0, 1500), (1000, 500))  # (kept LLM positions, new LLM positions)


def one(block: int, kept: int, new: int) -> dict:
    """In this process: one prefill of `new` positions after `kept` -> peak MB above baseline, ms, tokens."""
    import torch

    from funchat.model.checkpoint import build_model, randomize
    from funchat.model.config import FunAudioChatConfig
    from funchat.model.presets import preset_config

    torch.set_num_threads(1)
    srh = randomize(build_model(FunAudioChatConfig.from_dict(preset_config("tiny"))), seed=1).eval().audio_invert_tower
    h = torch.randn(1, kept + new, srh.cfg.output_dim, generator=torch.Generator().manual_seed(5))  # [1, L, E]
    with torch.inference_mode():
        state = srh.new_state(1, capacity=(kept + new) * srh.cfg.group_size + 16)
        if kept:
            srh.crq_transformer.masked_block = ONE_FORWARD
            srh.extend(h[:, :kept], state)
        srh.crq_transformer.masked_block = block
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        tokens = srh(h[:, kept:], state, lambda _j, logits: logits.argmax(-1))  # [1, g]
        ms = (time.perf_counter() - t0) * 1000
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024  # ru_maxrss is in KiB on Linux
    return {"block": block, "kept": kept, "new": new, "peak_mb": peak_mb, "ms": ms, "tokens": tokens[0].tolist()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", nargs=3, type=int, metavar=("BLOCK", "KEPT", "NEW"), help=argparse.SUPPRESS)
    parser.add_argument("--json", default="bench-results/bench-srh-prefill.json")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one(*args.one)))
        return {}
    from funchat.model.refined_head import PREFILL_BLOCK

    rows = []
    for kept, new in CASES:
        for block in (ONE_FORWARD, PREFILL_BLOCK):
            out = subprocess.run([sys.executable, "-m", "funchat.benchmarks.srh_prefill", "--one", str(block), str(kept),
                                  str(new)], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'kept':>6}{'new':>6}{'prefill':>14}{'peak MB':>9}{'ms':>8}  tokens")
    for r in rows:
        how = "one forward" if r["block"] == ONE_FORWARD else f"blocks {r['block']}"
        print(f"{r['kept']:>6}{r['new']:>6}{how:>14}{r['peak_mb']:>9.0f}{r['ms']:>8.0f}  {r['tokens']}")
    same = all(a["tokens"] == b["tokens"] for a, b in zip(rows[::2], rows[1::2]))
    print("tokens equal in blocks and in one forward:", same)
    report = {"rows": rows, "tokens_equal": same}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
