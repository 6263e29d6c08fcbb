"""`python -m funchat.benchmarks.vocoder`: time the token2wav vocoder (CPU by default), print tables, write JSON.

Sections, for the presets `tiny` and `full` (random weights, seeded; timings do not depend on
the values):

1. offline: one call over a 10 s utterance (250 tokens); real-time factor = seconds / 10 s.
2. first chunk: the time from pushing the 18th token (first_hop 15 + look-ahead 3) to the first
   chunk coming back, per streaming mode.
3. long call: tokens pushed one hop (15) at a time; every chunk is timed and the time per chunk
   is reported around token positions 100, 500, 1000, 2500, 5000, 7500. `incremental` keeps a
   bounded window and should stay flat; `reference` re-runs the flow and HiFT over the whole
   call (quadratic) and is stopped once one chunk takes longer than `--reference-budget-s`.
   The full preset on CPU is far too slow to push 7500 tokens: its incremental call is pushed
   to `--full-long-tokens` only, and the later positions are measured by restoring a tiny-preset
   stream state taken at that position (StreamState is model-agnostic: 80-bin mel, f0, phase,
   tokens) and timing the next chunk with the full model, whose work per chunk depends only on
   the state's sizes.
4. flow window (tiny): incremental mel SNR against offline, and the cost per chunk, for
   `flow_left_tokens` 10, 25, 50 (default), 100 on a ~500-token utterance; the reference
   streaming path for comparison.
5. concurrent calls: n incremental calls that start together, pushed one by one (as one service
   instance ran them before batching) against together (`push_many`, as the service now runs a
   dynamic batch): the last call's first chunk, then the time of a round of one 15-token push per
   call, per-call RTF (round / 0.6 s), and the speed-up, measured in the same run.

`--quick` shortens everything (a smoke run of the script).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from funchat.vocoder.token2wav import StreamConfig, StreamPush, StreamState, Token2Wav, VocoderConfig

MODES = ("incremental", "reference")
POSITIONS = (100, 500, 1000, 2500, 5000, 7500)
WINDOWS = (10, 25, 50, 100)
HOP = 15
FIRST_HOP_TOKENS = 18  # first_hop (15) + look-ahead (3): the push that gives a call its first chunk


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build(preset: str, seed: int = 0) -> Token2Wav:
    """Random weights of a preset, seeded without touching the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Token2Wav(VocoderConfig.preset(preset))
    return model.eval()


def speaker(dim: int = 192, seed: int = 0) -> torch.Tensor:
    return torch.randn(dim, generator=torch.Generator().manual_seed(seed))


def tokens(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, 6561, n).tolist()


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def mel_snr(ref: torch.Tensor, est: torch.Tensor) -> float:
    ref, est = ref.double(), est.double()
    return 10 * math.log10(float((ref ** 2).sum() / ((ref - est) ** 2).sum()))


# -- sections ------------------------------------------------------------------------------


def bench_offline(model: Token2Wav, xvec: torch.Tensor, n_tokens: int, repeats: int) -> dict[str, Any]:
    toks = tokens(n_tokens, 1)
    model.offline(toks[: min(n_tokens, 20)], xvec)  # warm-up (builds the noise buffers)
    runs = [timed(lambda: model.offline(toks, xvec))[0] for _ in range(repeats)]
    audio_s = n_tokens * model.cfg.samples_per_token / model.cfg.sample_rate
    seconds = statistics.median(runs)
    return {"tokens": n_tokens, "audio_s": audio_s, "seconds": seconds, "rtf": seconds / audio_s, "runs": runs}


def bench_first_chunk(model: Token2Wav, xvec: torch.Tensor, mode: str, repeats: int) -> dict[str, Any]:
    cfg = model.cfg
    first = cfg.stream.first_hop + cfg.flow.pre_lookahead_len  # 18
    toks = tokens(first, 2)
    runs, samples = [], 0
    for _ in range(repeats):
        state = model.start(xvec, mode)
        assert model.push(state, toks[:-1]) == [], "a chunk before first_hop + look-ahead tokens"
        seconds, chunks = timed(lambda: model.push(state, toks[-1:]))
        assert len(chunks) == 1, f"expected the first chunk at token {first}, got {len(chunks)} chunks"
        runs.append(seconds)
        samples = chunks[0].numel()
    return {"token": first, "ms": 1e3 * statistics.median(runs), "runs_ms": [1e3 * r for r in runs],
            "chunk_samples": samples, "chunk_audio_ms": 1e3 * samples / cfg.sample_rate}


def at_positions(chunks: list[tuple[int, float]], positions: tuple[int, ...]) -> dict[int, float | None]:
    """Median time of the (up to 5) chunks nearest each position, within two hops of it."""
    out: dict[int, float | None] = {}
    for p in positions:
        near = sorted((abs(pos - p), s) for pos, s in chunks if abs(pos - p) <= 2 * HOP)[:5]
        out[p] = statistics.median(s for _, s in near) if near else None
    return out


def bench_long_call(model: Token2Wav, xvec: torch.Tensor, mode: str, length: int, budget_s: float | None,
                    total_s: float | None, snapshot_at: tuple[int, ...] = ()) -> tuple[dict[str, Any], dict[int, bytes]]:
    """Push the first 18 tokens, then 15 at a time up to `length`; time every push (one chunk each).
    Stops early when one chunk takes longer than budget_s or all chunks together longer than total_s.
    -> (result, {position p: state bytes after the chunk whose next chunk is the last at or before p})."""
    toks = tokens(length, 3)
    first = model.cfg.stream.first_hop + model.cfg.flow.pre_lookahead_len
    state = model.start(xvec, mode)
    chunks: list[tuple[int, float]] = []
    snapshots: dict[int, bytes] = {}
    pending = sorted(snapshot_at)
    pos, stopped, spent = 0, f"reached {length} tokens", 0.0
    while pos < length:
        end = min(length, first if pos == 0 else pos + HOP)
        seconds, out = timed(lambda: model.push(state, toks[pos:end]))
        pos = end
        if not out:  # the last partial hop: no chunk until the final flush
            continue
        chunks.append((pos, seconds))
        spent += seconds
        while pending and pos + 2 * HOP > pending[0] and pos + HOP <= length:
            snapshots[pending.pop(0)] = state.to_bytes()
        if len(chunks) % 50 == 0 or (budget_s is not None and seconds > budget_s):
            log(f"    {mode}: position {pos}, {seconds:.3f} s/chunk, {spent:.0f} s so far")
        if budget_s is not None and seconds > budget_s:
            stopped = f"stopped at {pos} tokens: one chunk took {seconds:.1f} s > budget {budget_s:g} s"
            break
        if total_s is not None and spent > total_s:
            stopped = f"stopped at {pos} tokens: chunks took {spent:.0f} s in all > cap {total_s:g} s"
            break
    return {"mode": mode, "hop": HOP, "pushed_to": pos, "stopped": stopped, "total_s": spent,
            "chunks": [[p, s] for p, s in chunks]}, snapshots


def bench_fast_forward(model: Token2Wav, snapshots: dict[int, bytes], length: int) -> dict[int, dict[str, float]]:
    """Time one chunk of `model` from states taken (with another preset) near given positions."""
    toks = tokens(length, 3)  # the same token sequence as the long call the states came from
    out = {}
    for target, data in sorted(snapshots.items()):
        state = StreamState.from_bytes(data)
        pos = len(state.tokens)
        seconds, chunks = timed(lambda: model.push(state, toks[pos:pos + HOP]))
        assert len(chunks) == 1
        out[target] = {"position": len(state.tokens), "seconds": seconds}
        log(f"    full fast-forward: position {len(state.tokens)}, {seconds:.2f} s/chunk")
    return out


def bench_windows(model: Token2Wav, xvec: torch.Tensor, n_tokens: int, windows: tuple[int, ...]) -> dict[str, Any]:
    toks = tokens(n_tokens, 4)
    _, offline_mel = model.offline(toks, xvec, return_mel=True)
    saved = model.cfg.stream
    rows: dict[str, Any] = {}
    try:
        for label, mode, window in [*((str(w), "incremental", w) for w in windows), ("reference", "reference", None)]:
            model.cfg.stream = StreamConfig(flow_left_tokens=window if window is not None else saved.flow_left_tokens)
            state = model.start(xvec, mode)
            trace: list[dict] = []
            first = model.cfg.stream.first_hop + model.cfg.flow.pre_lookahead_len
            times, pos = [], 0
            while pos < n_tokens:
                end = min(n_tokens, first if pos == 0 else pos + HOP)
                seconds, out = timed(lambda: model.push(state, toks[pos:end], final=end == n_tokens, trace=trace))
                if out and end < n_tokens:
                    times.append((pos, seconds))  # the final flush is not a regular chunk
                pos = end
            if mode == "incremental":
                mel = torch.cat([c["flow_mel"] for c in trace], dim=1)
            else:
                mel = torch.cat([c["flow_mel"][:, 2 * c["offset"]:] for c in trace], dim=1)
            # Steady chunks: once the window is full (incremental); reference: all (they grow).
            steady = [s for p, s in times if window is None or p - first >= window] or [s for _, s in times]
            rows[label] = {"mode": mode, "flow_left_tokens": window, "snr_db": mel_snr(offline_mel, mel),
                           "chunk_ms_median": 1e3 * statistics.median(steady), "chunk_ms_max": 1e3 * max(s for _, s in times),
                           "chunks": len(times)}
            log(f"    window {label}: SNR {rows[label]['snr_db']:.1f} dB, {rows[label]['chunk_ms_median']:.0f} ms/chunk")
    finally:
        model.cfg.stream = saved
    return {"preset": "tiny", "tokens": n_tokens, "hop": HOP, "rows": rows}


# -- tables --------------------------------------------------------------------------------


def bench_concurrent(model: Token2Wav, xvec: torch.Tensor, calls: int, rounds: int) -> dict[str, Any]:
    """n calls started together, pushed one by one and together: first chunks and steady rounds."""
    first = FIRST_HOP_TOKENS
    streams = {k: [tokens(first + rounds * HOP + 3, 500 + i) for i in range(calls)] for k in ("serial", "batched")}
    out: dict[str, Any] = {"calls": calls}
    warm = model.start(xvec)
    model.push(warm, tokens(first + HOP, 1))  # first-use costs out of the timing
    for kind, toks in streams.items():
        states = [model.start(xvec) for _ in range(calls)]

        def push_round(lo: int, hi: int) -> None:
            pushes = [StreamPush(s, t[lo:hi]) for s, t in zip(states, toks)]
            if kind == "batched":
                model.push_many(pushes)
            else:
                for p in pushes:
                    model.push(p.state, p.tokens)

        first_s, _ = timed(lambda: push_round(0, first))
        round_s = [timed(lambda: push_round(first + r * HOP, first + (r + 1) * HOP))[0] for r in range(rounds)]
        out[kind] = {"first_chunk_ms": first_s * 1e3, "round_s": statistics.median(round_s),
                     "rtf_per_call": statistics.median(round_s) / (HOP / 25)}
    out["round_speedup"] = out["serial"]["round_s"] / out["batched"]["round_s"]
    out["first_chunk_speedup"] = out["serial"]["first_chunk_ms"] / out["batched"]["first_chunk_ms"]
    return out


def _cell(value: float | None, fmt: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{fmt}}"


def print_tables(report: dict[str, Any]) -> None:
    meta = report["meta"]
    print(f"funchat vocoder bench: threads={meta['threads']} cpus={meta['cpus']} torch={meta['torch']} "
          f"cpu={meta['cpu']}{' (quick)' if meta['quick'] else ''}")

    print("\n[1] offline: one call over the whole utterance")
    print(f"{'preset':<8}{'tokens':>8}{'audio s':>10}{'time s':>10}{'RTF':>9}")
    for name, r in report["offline"].items():
        print(f"{name:<8}{r['tokens']:>8}{r['audio_s']:>10.1f}{r['seconds']:>10.2f}{r['rtf']:>9.3f}")

    print("\n[2] first-chunk latency: push of token 18 (first_hop 15 + look-ahead 3) -> first chunk")
    print(f"{'preset':<8}{'mode':<13}{'ms (median)':>12}{'runs':>6}{'chunk ms of audio':>19}")
    for name, modes in report["first_chunk"].items():
        for mode, r in modes.items():
            print(f"{name:<8}{mode:<13}{r['ms']:>12.1f}{len(r['runs_ms']):>6}{r['chunk_audio_ms']:>19.0f}")

    print(f"\n[3] long call: seconds per chunk (hop {HOP} tokens = 0.6 s of audio) around token position")
    head = f"{'preset':<8}{'mode':<13}" + "".join(f"{'~' + str(p):>9}" for p in POSITIONS) + "   pushed to / note"
    print(head)
    print("-" * len(head))
    for name, modes in report["long_call"].items():
        for key, r in modes.items():
            cells = "".join(_cell(r["at"].get(str(p), r["at"].get(p)), ".3f", 9) for p in POSITIONS)
            print(f"{name:<8}{key:<13}{cells}   {r['note']}")

    w = report.get("windows")
    if w:
        print(f"\n[4] flow window ({w['preset']}, {w['tokens']} tokens, hop {w['hop']}): "
              f"mel SNR vs offline and time per chunk")
        print(f"{'flow_left_tokens':<18}{'mel SNR dB':>11}{'ms/chunk':>10}{'max ms':>9}{'chunks':>8}")
        for label, r in w["rows"].items():
            name = f"{label}{' (default)' if label == str(StreamConfig().flow_left_tokens) else ''}"
            if r["mode"] == "reference":
                name = "reference mode"
            print(f"{name:<18}{r['snr_db']:>11.1f}{r['chunk_ms_median']:>10.1f}{r['chunk_ms_max']:>9.1f}{r['chunks']:>8}")
        print("(ms/chunk: median once the window is full; reference mode: median over the call, it grows)")

    if report.get("concurrent"):
        print(f"\n[5] concurrent calls, one by one against batched (push_many): last first chunk and a "
              f"{HOP}-token round for all calls")
        print(f"{'preset':<8}{'calls':>6}{'first ms 1by1':>15}{'first ms batch':>16}{'round s 1by1':>14}"
              f"{'round s batch':>15}{'RTF/call batch':>16}{'speed-up':>10}")
        for name, levels in report["concurrent"].items():
            for r in levels:
                print(f"{name:<8}{r['calls']:>6}{r['serial']['first_chunk_ms']:>15.1f}{r['batched']['first_chunk_ms']:>16.1f}"
                      f"{r['serial']['round_s']:>14.3f}{r['batched']['round_s']:>15.3f}"
                      f"{r['batched']['rtf_per_call']:>16.3f}{r['round_speedup']:>9.2f}x")


# -- main ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "full"], choices=["tiny", "full"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--quick", action="store_true", help="short calls everywhere: a smoke run")
    parser.add_argument("--reference-budget-s", type=float, default=5.0,
                        help="stop the reference mode's long call once one chunk takes longer (default 5)")
    parser.add_argument("--reference-total-s", type=float, default=240.0,
                        help="and once its chunks took this long in all (default 240)")
    parser.add_argument("--long-tokens", type=int, default=None, help="tiny long-call length (default 7500; quick 198)")
    parser.add_argument("--full-long-tokens", type=int, default=None,
                        help="full preset: tokens pushed in its long call (default 108; quick 33)")
    parser.add_argument("--window-tokens", type=int, default=None, help="flow-window section length (default 500; quick 120)")
    parser.add_argument("--json", default="bench-results/bench-vocoder.json")
    args = parser.parse_args(argv)

    quick = args.quick
    long_tokens = args.long_tokens or (198 if quick else 7500)
    full_long = args.full_long_tokens or (33 if quick else 108)
    window_tokens = args.window_tokens or (120 if quick else 500)
    offline_tokens = {"tiny": 50 if quick else 250, "full": 20 if quick else 250}
    repeats = {"tiny": 2 if quick else 5, "full": 1 if quick else 2}
    positions = tuple(p for p in POSITIONS if p <= long_tokens)

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "meta": {"threads": args.threads, "cpus": os.cpu_count(), "torch": torch.__version__,
                 "cpu": platform.processor() or platform.machine(), "quick": quick,
                 "reference_budget_s": args.reference_budget_s, "reference_total_s": args.reference_total_s,
                 "hop": HOP, "long_tokens": long_tokens, "full_long_tokens": full_long},
        "offline": {}, "first_chunk": {}, "long_call": {}, "windows": None, "concurrent": {},
    }
    xvec = speaker()
    snapshots: dict[int, bytes] = {}
    for name in args.presets:
        log(f"== {name}: building")
        model = build(name)
        report["meta"].setdefault("parameters_m", {})[name] = sum(p.numel() for p in model.parameters()) / 1e6
        log(f"  offline {offline_tokens[name]} tokens")
        report["offline"][name] = bench_offline(model, xvec, offline_tokens[name], 1 if name == "full" else repeats[name])
        report["first_chunk"][name] = {}
        for mode in MODES:
            log(f"  first chunk, {mode}")
            report["first_chunk"][name][mode] = bench_first_chunk(model, xvec, mode, repeats[name])

        rows: dict[str, Any] = {}
        length = long_tokens if name == "tiny" else full_long
        for mode in MODES:
            log(f"  long call, {mode}, up to {length} tokens")
            wanted = tuple(p for p in POSITIONS if p > full_long and p <= long_tokens)
            result, snaps = bench_long_call(
                model, xvec, mode, length,
                budget_s=args.reference_budget_s if mode == "reference" else None,
                total_s=args.reference_total_s if mode == "reference" else None,
                snapshot_at=wanted if (name == "tiny" and mode == "incremental") else ())
            snapshots.update(snaps)
            at = at_positions([(p, s) for p, s in result["chunks"]], positions)
            last = result["chunks"][-1] if result["chunks"] else None
            result["at"] = {str(p): v for p, v in at.items()}
            result["last_chunk"] = last
            if mode == "reference" or result["pushed_to"] < long_tokens:
                result["note"] = result["stopped"] if mode == "reference" else f"pushed to {result['pushed_to']} (CPU time)"
                if mode == "reference" and last:
                    result["note"] += f"; last chunk {last[1]:.2f} s at {last[0]}"
            else:
                result["note"] = f"pushed to {result['pushed_to']}"
            rows[mode] = result
        if name == "full" and "tiny" in args.presets and snapshots:
            log("  long call, incremental, full, from fast-forwarded states")
            ff = bench_fast_forward(model, snapshots, long_tokens)
            rows["incr. (ff)"] = {"mode": "incremental", "fast_forward": True, "points": {str(p): v for p, v in ff.items()},
                                  "at": {str(p): v["seconds"] for p, v in ff.items()},
                                  "note": "one chunk each, from the tiny run's state at that position"}
        report["long_call"][name] = rows

        if name == "tiny":
            log(f"  flow windows, {window_tokens} tokens")
            report["windows"] = bench_windows(model, xvec, window_tokens, WINDOWS)
        levels = (1, 4) if quick or name == "full" else (1, 4, 16)
        log(f"  concurrent calls {levels}")
        report["concurrent"][name] = [bench_concurrent(model, xvec, n, 1 if quick or name == "full" else 3)
                                      for n in levels]
        del model

    report["meta"]["elapsed_s"] = time.perf_counter() - started
    print_tables(report)
    print(f"\nelapsed {report['meta']['elapsed_s']:.0f} s")
    if "full" in args.presets:
        print(f"note: the full preset's long call is pushed only to {full_long} tokens on CPU (each chunk takes "
              "seconds); its later positions restore the tiny run's stream state there and time one chunk.")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"JSON written to {path}")
    return report


if __name__ == "__main__":
    main()
