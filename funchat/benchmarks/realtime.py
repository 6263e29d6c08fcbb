"""`make bench-realtime`: first audio through the OpenAI Realtime-compatible WebSocket against
through the gRPC API, the same turn on the same stack.

On the local stack (tiny checkpoint, CPU), one-turn calls alternating between the two transports:
the same caller turn (the recording's first `--clip-s` seconds, 16 kHz PCM16) streamed in real time
in 100 ms chunks, greedy, manual turns. First audio is measured at the client, from the end of the
turn (gRPC: the commit; WebSocket: `response.create`, which answers the commit) to the first reply
audio chunk. The server's own first audio (`latency_ms.first_audio`, from its end of the turn) is
reported beside it, so what the transport adds shows apart from the model's time.

Prints a table, writes JSON. The ratio WebSocket / gRPC is the number to compare: both are measured
in one run, alternating, as the machine's speed drifts between runs.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from funchat.benchmarks.e2e import DEFAULT_INPUT, BenchError, load_clip, log, start_stack
from funchat.benchmarks.latency import median, spoken_turn as grpc_turn
from funchat.client.audio import encode_audio

CHUNK_S = 0.1
MODEL = "fun-audio-chat"


async def realtime_turn(base_url: str, api_key: str, clip: np.ndarray, max_new_tokens: int, timeout: float,
                        chunk_s: float = CHUNK_S) -> dict[str, Any]:
    """One WebSocket call with the official SDK: the turn streamed in real time, committed, answered
    -> first audio (s, from response.create) and the server's numbers."""
    from openai import AsyncOpenAI

    session = {"type": "realtime", "max_output_tokens": max_new_tokens, "generation": {"greedy": True, "seed": 0},
               "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}, "turn_detection": None}}}
    step = int(16000 * chunk_s)

    async def next_of(conn, kind: str):
        while True:
            event = await asyncio.wait_for(conn.recv(), timeout)
            if event.type == "error":
                raise BenchError(f"realtime: {event.error.code}: {event.error.message}")
            if event.type == kind:
                return event

    async with AsyncOpenAI(base_url=base_url, api_key=api_key).realtime.connect(model=MODEL) as conn:
        await next_of(conn, "session.created")
        await conn.session.update(session=session)
        await next_of(conn, "session.updated")
        t0 = time.monotonic()
        for i, k in enumerate(range(0, len(clip), step)):
            await conn.input_audio_buffer.append(audio=base64.b64encode(encode_audio(clip[k:k + step], "pcm16")).decode())
            await asyncio.sleep(max(0.0, t0 + (i + 1) * chunk_s - time.monotonic()))
        await conn.input_audio_buffer.commit()
        await next_of(conn, "input_audio_buffer.committed")
        sent = time.monotonic()
        await conn.response.create()
        await next_of(conn, "response.output_audio.delta")
        first_audio_s = time.monotonic() - sent
        done = await next_of(conn, "response.done")
    lat = done.response.model_extra["funchat"]["latency_ms"]
    return {"first_audio_s": first_audio_s, "status": done.response.status, "server_ms": dict(lat)}


def summary(turns: list[dict]) -> dict[str, Any]:
    first = sorted(1000 * t["first_audio_s"] for t in turns)
    return {"runs": turns, "first_audio_ms": median(first), "first_audio_p90_ms": first[int(0.9 * (len(first) - 1))],
            "server_first_audio_ms": median([t["server_ms"].get("first_audio") for t in turns])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--input", default=str(DEFAULT_INPUT))
    parser.add_argument("--clip-s", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=8, help="turns per transport")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--turn-timeout", type=float, default=120.0)
    parser.add_argument("--timeout", type=float, default=240.0, help="each part of the stack to start")
    parser.add_argument("--json", default="bench-results/bench-realtime.json")
    args = parser.parse_args(argv)

    clip, source = load_clip(args.input, args.clip_s, 0.0)
    try:
        stack = start_stack(Path(args.checkpoint), max_calls=4, timeout=args.timeout)
    except BenchError as exc:
        log(f"bench-realtime: {exc}")
        return 1
    base_url = f"http://127.0.0.1:{stack.orchestrator.http_port}/v1"
    transports = {
        "grpc": lambda: grpc_turn(stack.target, stack.api_key, clip, args.max_new_tokens, args.turn_timeout),
        "websocket": lambda: realtime_turn(base_url, stack.api_key, clip, args.max_new_tokens, args.turn_timeout),
    }
    runs: dict[str, list[dict]] = {name: [] for name in transports}
    try:
        for run in transports.values():  # not counted: each transport's first call (connections, first requests)
            asyncio.run(run())
        for rep in range(args.repeats):
            for name, run in transports.items():
                turn = asyncio.run(run())
                runs[name].append(turn)
                log(f"{name} run {rep + 1}: first audio {turn['first_audio_s'] * 1000:.0f} ms "
                    f"(server {turn['server_ms'].get('first_audio', 0):.0f} ms)")
    except BenchError as exc:
        log(f"bench-realtime: {exc}")
        return 1
    finally:
        stack.stop()
    report: dict[str, Any] = {"checkpoint": args.checkpoint, "input": source, "clip_s": args.clip_s,
                              "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
                              "cpu": platform.processor() or platform.machine(),
                              "transports": {name: summary(turns) for name, turns in runs.items()}}
    t = report["transports"]
    report["websocket_over_grpc"] = t["websocket"]["first_audio_ms"] / t["grpc"]["first_audio_ms"]
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"funchat bench-realtime: {args.checkpoint}, {args.clip_s:g} s caller turn streamed in real time, greedy, "
          f"max_new_tokens {args.max_new_tokens}, {args.repeats} turns per transport, alternating")
    print(f"\n{'transport':>10}{'first audio p50':>17}{'p90':>8}{'server first audio p50':>24}")
    for name, s in t.items():
        print(f"{name:>10}{s['first_audio_ms']:>17.0f}{s['first_audio_p90_ms']:>8.0f}{s['server_first_audio_ms']:>24.0f}")
    print(f"WebSocket / gRPC first audio (p50) = {report['websocket_over_grpc']:.2f}x")
    print(f"\nJSON written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
