"""`make bench-latency`: first audio against the conversation's length and the caller's turn length.

On the local stack (tiny checkpoint, CPU, one torch thread per model service), through the public
API with `Respond` (a whole caller turn per request, greedy, the same recording each turn):

1. history: conversations of `--turns` turns (default 10). First audio (client side: the request
   sent -> the first audio chunk) per turn index, for two orchestrator settings alternated in one
   run: `kept` (FUNCHAT_KEEP_PREFIXES=true, the default: the llm and refined_head keep the
   conversation's rows and a turn prefills what its prompt adds) and `whole` (false: every turn
   prefills its whole prompt). Also the server's prompt positions, the positions it reused and its
   prefill time per turn; the kept-prefix hit rate over turns 2..N.
2. caller turn: one-turn Converse calls whose turn lasts 2 ... 55 s (the recording looped), streamed
   in real time and ended by a commit; first audio from the commit. Two settings alternated:
   `spoken` (FUNCHAT_ENCODE_WHILE_SPEAKING=true, the default: each 2 s encoder window is encoded and
   prefilled while the caller speaks) and `at_end` (false: the whole turn at the commit).

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
TURN_VARIANTS = {"spoken": {"FUNCHAT_KEEP_PREFIXES": "true", "FUNCHAT_ENCODE_WHILE_SPEAKING": "true"},
                 "at_end": {"FUNCHAT_KEEP_PREFIXES": "true", "FUNCHAT_ENCODE_WHILE_SPEAKING": "false"}}
CHUNK_S = 0.1  # the caller's audio chunks, sent in real time
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


async def spoken_turn(target: str, api_key: str, clip: np.ndarray, max_new_tokens: int, timeout: float,
                      chunk_s: float = CHUNK_S) -> dict[str, Any]:
    """One Converse call with one caller turn streamed in real time (chunk_s chunks), ended by a
    commit -> first audio (s, from the commit) and the server's numbers."""
    config = session_config(greedy=True, seed=0, max_new_tokens=max_new_tokens, turn_detection="manual")
    step = int(16000 * chunk_s)
    async with AsyncClient(target, timeout=timeout, api_key=api_key) as client:
        async with client.converse(config, timeout=timeout) as call:
            t0 = time.monotonic()
            for i, k in enumerate(range(0, len(clip), step)):
                await call.send_audio(clip[k:k + step])
                await asyncio.sleep(max(0.0, t0 + (i + 1) * chunk_s - time.monotonic()))  # as the caller speaks
            await call.commit()
            reply = await call.next_reply()
    lat = reply.latency_ms
    return {"first_audio_s": reply.first_audio_s, "status": reply.status, "kept_prefix": lat.get("kept_prefix", 0.0),
            "audio_tokenizer_ms": lat.get("audio_tokenizer"), "llm_prefill_ms": lat.get("llm_prefill"),
            "first_text_ms": lat.get("first_text"), "server_ms": dict(lat)}


def bench_turn_length(stack, source: str | None, args) -> dict[str, Any]:
    """Per variant (the turn encoded and prefilled while spoken, or at its end), alternated: one-turn
    calls whose turn lasts each of --turn-lengths, streamed in real time."""
    runs: dict[str, dict[str, list[dict]]] = {name: {f"{s:g}": [] for s in args.turn_lengths} for name in TURN_VARIANTS}
    clips = {f"{s:g}": load_clip(source, s, 0.0)[0] for s in args.turn_lengths}
    for rep in range(args.repeats):
        for name, overrides in TURN_VARIANTS.items():
            stack.restart_orchestrator(overrides)
            # not counted: a new orchestrator's first call is slower (connections, first requests)
            asyncio.run(spoken_turn(stack.target, stack.api_key, clips[f"{args.turn_lengths[0]:g}"],
                                    args.max_new_tokens, args.turn_timeout))
            for key, clip in clips.items():
                turn = asyncio.run(spoken_turn(stack.target, stack.api_key, clip, args.max_new_tokens,
                                               args.turn_timeout))
                runs[name][key].append(turn)
                log(f"caller turn {key} s, {name}, run {rep + 1}: first audio {turn['first_audio_s'] * 1000:.0f} ms "
                    f"(audio tokenizer {turn['audio_tokenizer_ms'] or 0:.0f} ms, llm prefill "
                    f"{turn['llm_prefill_ms'] or 0:.0f} ms, kept prefix {turn['kept_prefix']:.0f})")
    out: dict[str, Any] = {}
    for name, by_length in runs.items():
        rows = {}
        for key, turns in by_length.items():
            rows[key] = {"seconds": float(key), "runs": turns,
                         "first_audio_ms": 1000 * median([t["first_audio_s"] for t in turns]),
                         "audio_tokenizer_ms": median([t["audio_tokenizer_ms"] for t in turns]),
                         "llm_prefill_ms": median([t["llm_prefill_ms"] for t in turns]),
                         "first_text_ms": median([t["first_text_ms"] for t in turns]),
                         "kept_prefix": median([t["kept_prefix"] for t in turns])}
        first, last = rows[f"{args.turn_lengths[0]:g}"], rows[f"{args.turn_lengths[-1]:g}"]
        out[name] = {"by_length": rows, "longest_over_shortest": last["first_audio_ms"] / first["first_audio_ms"]}
    return out


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
        print("\nfirst audio (ms, median) by caller turn length, streamed in real time: encoded and prefilled "
              "while spoken against at the turn's end")
        print(f"{'turn':>7}{'spoken: first audio':>21}{'at end: first audio':>21}{'spoken: first text':>20}"
              f"{'at end: first text':>20}{'spoken: encode':>16}{'at end: encode':>16}")
        for sp, end in zip(length["spoken"]["by_length"].values(), length["at_end"]["by_length"].values()):
            print(f"{sp['seconds']:>5g} s{sp['first_audio_ms']:>21.0f}{end['first_audio_ms']:>21.0f}"
                  f"{sp['first_text_ms'] or 0:>20.0f}{end['first_text_ms'] or 0:>20.0f}"
                  f"{sp['audio_tokenizer_ms'] or 0:>16.1f}{end['audio_tokenizer_ms'] or 0:>16.1f}")
        print("(first text: the server's, from the end of the turn; encode: the audio tokenizer at the end)")
        for name in ("spoken", "at_end"):
            print(f"{name}: longest / shortest = {length[name]['longest_over_shortest']:.2f}x")


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
