"""`make bench-latency`: first audio against the conversation's length and the caller's turn length.

On the local stack (tiny checkpoint, CPU, one torch thread per model service), through the public
API with `Respond` (a whole caller turn per request, greedy, the same recording each turn):

1. history: conversations of `--turns` turns (default 10). First audio (client side: the request
   sent -> the first audio chunk) per turn index, for two orchestrator settings alternated in one
   run: `kept` (FUNCHAT_KEEP_PREFIXES=true, the default: the llm and refined_head keep the
   conversation's rows and a turn prefills what its prompt adds) and `whole` (false: every turn
   prefills its whole prompt). Also the server's prompt positions, the positions it reused and its
   prefill time per turn; the kept-prefix hit rate over turns 2..N.
2. caller turn: one-turn conversations whose turn lasts 2 ... 55 s (the recording looped).

Prints tables, writes JSON. Ratios (turn N / turn 1, 55 s / 2 s) are the numbers to compare: they
are measured in one run, as the machine's speed drifts between runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from funchat.benchmarks.e2e import DEFAULT_INPUT, BenchError, load_clip, log, start_stack
from funchat.client.async_client import AsyncClient
from funchat.client.config import session_config

VARIANTS = {"kept": {"FUNCHAT_KEEP_PREFIXES": "true"}, "whole": {"FUNCHAT_KEEP_PREFIXES": "false"}}
TURN_LENGTHS_S = (2.0, 10.0, 30.0, 55.0)


async def conversation(target: str, api_key: str, clip: np.ndarray, turns: int, max_new_tokens: int,
                       timeout: float) -> list[dict[str, Any]]:
    """One conversation of `turns` Respond turns -> per turn: first audio (s) and the server's numbers."""
    config = session_config(greedy=True, seed=0, max_new_tokens=max_new_tokens, turn_detection="manual")
    out, session_id = [], None
    async with AsyncClient(target, timeout=timeout, api_key=api_key) as client:
        for _ in range(turns):
            reply = await client.respond(clip, config, session_id=session_id)
            session_id = reply.session_id
            lat = reply.latency_ms
            out.append({"first_audio_s": reply.first_audio_s, "prompt_tokens": reply.usage.get("input_tokens"),
                        "kept_prefix": lat.get("kept_prefix", 0.0), "llm_prefill_ms": lat.get("llm_prefill"),
                        "status": reply.status, "server_ms": dict(lat)})
    return out


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def bench_history(stack, clip: np.ndarray, args) -> dict[str, Any]:
    """Alternate the variants `--repeats` times (an orchestrator restart each), one conversation each."""
    runs: dict[str, list[list[dict]]] = {name: [] for name in VARIANTS}
    for rep in range(args.repeats):
        for name, overrides in VARIANTS.items():
            stack.restart_orchestrator(overrides)
            t0 = time.monotonic()
            turns = asyncio.run(conversation(stack.target, stack.api_key, clip, args.turns, args.max_new_tokens,
                                             args.turn_timeout))
            runs[name].append(turns)
            log(f"history {name} run {rep + 1}: {len(turns)} turns in {time.monotonic() - t0:.1f} s, first audio "
                + " ".join(f"{t['first_audio_s'] * 1000:.0f}" for t in turns if t["first_audio_s"] is not None))
    out: dict[str, Any] = {}
    for name, convs in runs.items():
        per_turn = []
        for i in range(args.turns):
            cells = [c[i] for c in convs if i < len(c)]
            per_turn.append({"turn": i + 1,
                             "first_audio_ms": 1000 * median([c["first_audio_s"] for c in cells]),
                             "prompt_tokens": median([c["prompt_tokens"] for c in cells]),
                             "kept_prefix": median([c["kept_prefix"] for c in cells]),
                             "llm_prefill_ms": median([c["llm_prefill_ms"] for c in cells])})
        later = [c[i] for c in convs for i in range(1, len(c))]
        hits = sum(1 for t in later if t["kept_prefix"] > 0)
        reused = sum(t["kept_prefix"] for t in later)
        prompt = sum(t["prompt_tokens"] or 0 for t in later)
        out[name] = {"per_turn": per_turn, "runs": convs,
                     "last_over_first": per_turn[-1]["first_audio_ms"] / per_turn[0]["first_audio_ms"],
                     "hit_rate": hits / len(later) if later else None,
                     "reused_share": reused / prompt if prompt else None}
    return out


def bench_turn_length(stack, source: str | None, args) -> dict[str, Any]:
    stack.restart_orchestrator(VARIANTS["kept"])
    out = {}
    for seconds in args.turn_lengths:
        clip, _ = load_clip(source, seconds, 0.0)
        firsts = []
        for _ in range(args.repeats):
            (turn,) = asyncio.run(conversation(stack.target, stack.api_key, clip, 1, args.max_new_tokens,
                                               args.turn_timeout))
            firsts.append(turn["first_audio_s"])
        out[f"{seconds:g}"] = {"seconds": seconds, "first_audio_ms": 1000 * median(firsts),
                               "runs_ms": [1000 * f for f in firsts if f is not None]}
        log(f"caller turn {seconds:g} s: first audio {out[f'{seconds:g}']['first_audio_ms']:.0f} ms")
    first, last = out[f"{args.turn_lengths[0]:g}"], out[f"{args.turn_lengths[-1]:g}"]
    return {"by_length": out, "longest_over_shortest": last["first_audio_ms"] / first["first_audio_ms"]}


def print_tables(report: dict[str, Any]) -> None:
    hist = report["history"]
    print(f"funchat bench-latency: {report['checkpoint']}, {report['clip_s']:g} s caller turns, greedy, "
          f"max_new_tokens {report['max_new_tokens']}, {report['repeats']} conversations per variant")
    print("\nfirst audio (ms, median) by turn: kept prefixes against whole prompts")
    print(f"{'turn':>5}{'prompt':>8}{'kept: reused':>14}{'kept: first audio':>19}{'whole: first audio':>20}"
          f"{'kept: prefill':>15}{'whole: prefill':>16}")
    for k, w in zip(hist["kept"]["per_turn"], hist["whole"]["per_turn"]):
        print(f"{k['turn']:>5}{k['prompt_tokens'] or 0:>8.0f}{k['kept_prefix'] or 0:>14.0f}{k['first_audio_ms']:>19.0f}"
              f"{w['first_audio_ms']:>20.0f}{k['llm_prefill_ms'] or 0:>15.1f}{w['llm_prefill_ms'] or 0:>16.1f}")
    for name in ("kept", "whole"):
        h = hist[name]
        print(f"{name}: turn {len(h['per_turn'])} / turn 1 = {h['last_over_first']:.2f}x" +
              (f"; kept prefix hit rate {h['hit_rate']:.0%}, prompt positions reused {h['reused_share']:.0%}"
               if name == "kept" else ""))
    length = report.get("turn_length")
    if length:
        print("\nfirst audio (ms, median) by caller turn length")
        for row in length["by_length"].values():
            print(f"{row['seconds']:>6g} s{row['first_audio_ms']:>10.0f}")
        print(f"longest / shortest = {length['longest_over_shortest']:.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--input", default=str(DEFAULT_INPUT), help="caller audio (looped to each length)")
    parser.add_argument("--clip-s", type=float, default=3.0, help="each history turn's caller audio")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--turn-lengths", type=float, nargs="+", default=list(TURN_LENGTHS_S))
    parser.add_argument("--turn-timeout", type=float, default=120.0)
    parser.add_argument("--timeout", type=float, default=240.0, help="each part of the stack to start")
    parser.add_argument("--json", default="bench-results/bench-latency.json")
    args = parser.parse_args(argv)

    clip, source = load_clip(args.input, args.clip_s, 0.0)
    report: dict[str, Any] = {"checkpoint": args.checkpoint, "input": source, "clip_s": args.clip_s,
                              "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
                              "cpu": platform.processor() or platform.machine()}
    try:
        stack = start_stack(Path(args.checkpoint), max_calls=4, timeout=args.timeout)
    except BenchError as exc:
        log(f"bench-latency: {exc}")
        return 1
    try:
        report["history"] = bench_history(stack, clip, args)
        if args.turn_lengths:
            report["turn_length"] = bench_turn_length(stack, args.input, args)
    finally:
        stack.stop()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print_tables(report)
    print(f"\nJSON written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
