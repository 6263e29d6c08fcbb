"""`make bench-tracing`: what tracing costs in first audio, on against off, in one run.

    python -m funchat.benchmarks.tracing_cost [--checkpoint DIR] [--rounds 8] [--turns 3]
        [--max-new-tokens 64] [--json OUT]

One stack (the same as `make bench-e2e` starts, API key file and key included) with every process
exporting to an OTLP/gRPC receiver in this process (funchat.dev.otlp_receiver) and
FUNCHAT_TRACING_SAMPLE_RATIO=0: a call is traced only when it sends a sampled `traceparent`, as a
caller's trace would. The calls alternate, traced and untraced, one at a time (ABBA order, so that
drift in the machine's load falls on both alike). Each call is `--turns` greedy Converse turns of
the same clip (manual commit; the load generator's caller, as in bench-e2e). First audio = commit
sent -> first audio_delta.

"Off" is a call no process samples: its spans are non-recording and nothing is sent to the model
services, which is what tracing configured at ratio 0 costs; a process with no endpoint at all
creates no-op spans, a difference of microseconds per turn.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from funchat.benchmarks.e2e import (DEFAULT_INPUT, BenchError, fmt, load_clip, log, one_call, ratio, start_stack,
                                    wait_healthy)
from funchat.dev.otlp_receiver import OtlpReceiver
from funchat.dev.tritonserver import PROJECT_ROOT
from funchat.loadgen import turn_summary


class _Traceparent(grpc.StreamStreamClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds a sampled W3C traceparent (a new trace per call) to every call on the channel."""

    def __init__(self):
        self.trace_ids: list[str] = []

    def _metadata(self, details):
        trace_id = secrets.token_hex(16)
        self.trace_ids.append(trace_id)
        metadata = list(details.metadata or []) + [("traceparent", f"00-{trace_id}-{secrets.token_hex(8)}-01")]
        return details._replace(metadata=metadata)  # grpc hands interceptors a namedtuple

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._metadata(details), request_iterator)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._metadata(details), request)


def run(args) -> dict[str, Any]:
    checkpoint = Path(args.checkpoint).resolve()
    clip, source = load_clip(args.input, args.clip_s, 0.0)
    receiver = OtlpReceiver().start()
    # Read by every process the stack starts (tritonservers inherit it; the orchestrator gets FUNCHAT_*)
    os.environ.update({"FUNCHAT_TRACING_ENDPOINT": receiver.endpoint, "FUNCHAT_TRACING_SAMPLE_RATIO": "0"})
    stack = None
    try:
        stack = start_stack(checkpoint, 16, args.start_timeout)
        wait_healthy(stack.target, 10.0, stack.api_key)
        log("warm-up: one traced and one untraced call")
        traced = _Traceparent()
        one_call(stack.target, clip, 1, args.max_new_tokens, True, 0, args.turn_timeout, (traced,), stack.api_key)
        one_call(stack.target, clip, 1, args.max_new_tokens, True, 0, args.turn_timeout, api_key=stack.api_key)
        records: dict[str, list] = {"on": [], "off": []}
        order = ["on", "off", "off", "on"]
        for k in range(args.rounds):
            kind = order[k % 4]
            interceptors = (traced,) if kind == "on" else ()
            records[kind] += one_call(stack.target, clip, args.turns, args.max_new_tokens, True, 0,
                                      args.turn_timeout, interceptors, stack.api_key)
            log(f"round {k + 1}/{args.rounds}: tracing {kind}")
        time.sleep(2.0)  # the last batches of spans (sent every 500 ms)
        ours = set(traced.trace_ids)
        spans = [s for s in receiver.spans if s.trace_id in ours]
        turns = sum(1 for s in spans if s.name == "funchat.turn")
        by_service: dict[str, int] = {}
        for s in spans:
            by_service[s.service] = by_service.get(s.service, 0) + 1
        untraced_spans = sum(1 for s in receiver.spans if s.trace_id not in ours)
    finally:
        if stack is not None:
            stack.stop()
        receiver.stop()
    on, off = turn_summary(records["on"]), turn_summary(records["off"])
    return {
        "settings": {"checkpoint": str(checkpoint), "input": source, "clip_s": args.clip_s, "rounds": args.rounds,
                     "turns_per_call": args.turns, "max_new_tokens": args.max_new_tokens, "greedy": True,
                     "cpus": os.cpu_count(), "loadavg_start": list(os.getloadavg())},
        "on": on, "off": off,
        "first_audio_p50_ratio": ratio(on["first_audio_ms_p50"], off["first_audio_ms_p50"]),
        "first_audio_p95_ratio": ratio(on["first_audio_ms_p95"], off["first_audio_ms_p95"]),
        "traced_turns_received": turns, "spans_received": len(spans),
        "spans_per_turn": len(spans) / turns if turns else None, "spans_by_service": by_service,
        "spans_from_untraced_calls": untraced_spans,
    }


def print_table(report: dict[str, Any]) -> None:
    s = report["settings"]
    print(f"funchat bench-tracing: {s['rounds']} calls alternating traced / untraced, {s['turns_per_call']} greedy "
          f"turns each of a {s['clip_s']:g} s clip, max_new_tokens {s['max_new_tokens']}; {s['cpus']} CPUs")
    print()
    print("| tracing | turns | errors | first audio p50 ms | first audio p95 ms | mean ms | RTF mean |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kind in ("off", "on"):
        r = report[kind]
        samples = r["samples"]["first_audio_ms"]
        mean = sum(samples) / len(samples) if samples else None
        print(f"| {kind} | {r['turns']} | {r['errors']} | {fmt(r['first_audio_ms_p50'], '.0f')} "
              f"| {fmt(r['first_audio_ms_p95'], '.0f')} | {fmt(mean, '.0f')} | {fmt(r['rtf_mean'], '.3f')} |")
    print()
    print(f"on / off: first audio p50 x{fmt(report['first_audio_p50_ratio'], '.3f')}, "
          f"p95 x{fmt(report['first_audio_p95_ratio'], '.3f')}")
    print(f"spans received: {report['spans_received']} from {report['traced_turns_received']} traced turns "
          f"({fmt(report['spans_per_turn'], '.1f')} per turn; by service {report['spans_by_service']}); "
          f"from untraced calls: {report['spans_from_untraced_calls']}")


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m funchat.benchmarks.tracing_cost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(PROJECT_ROOT / "checkpoints" / "tiny"))
    ap.add_argument("--input", default=str(DEFAULT_INPUT))
    ap.add_argument("--clip-s", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=8, help="calls, alternating traced and untraced (default 8)")
    ap.add_argument("--turns", type=int, default=3, help="turns per call (default 3)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--start-timeout", type=float, default=180.0)
    ap.add_argument("--turn-timeout", type=float, default=120.0)
    ap.add_argument("--json", default="bench-results/bench-tracing.json", help="'' for none")
    args = ap.parse_args(argv)
    if args.rounds < 2 or args.turns < 1:
        ap.error("--rounds must be >= 2 and --turns >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except BenchError as exc:
        log(f"error: {exc}")
        return 2
    print_table(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 1 if report["on"]["errors"] or report["off"]["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
