"""`make bench-e2e`: first audio and real-time factor through the public API, against the in-process oracle.

    python -m funchat.benchmarks.e2e [--checkpoint DIR] [--input WAV] [--concurrency 1 2 4 8]
        [--turns 3] [--max-new-tokens 64] [--json OUT] [--server HOST:PORT]

The cluster: unless --server names a running one, the bench starts its own on free 127.0.0.1 ports
(redis-server, one tritonserver per model service with `threads=1`, the Ray Serve orchestrator with
FUNCHAT_MAX_CALLS >= 16 and an API key file with one key, tenant "bench", in its run dir) and stops
it at the end, whatever happens. With --server the calls send the API key in FUNCHAT_API_KEY.

For each concurrency c: c Converse calls at once, each `--turns` turns in one session (manual turn
detection, speech-to-speech, seeded speech sampling with a seed per call, or --greedy). A turn is the
same clip of the input (`--clip-s`, 3 s) sent in 100 ms chunks as fast as the call takes them, then
`commit`. Measured on the client:

- first audio: commit sent -> first audio_delta received;
- real-time factor: (commit -> response_done) / seconds of reply audio;
- errors: error events, replies not `completed`, failed RPCs (a failed call's remaining turns count too).

One warm-up turn (not counted) goes first. The callers and the statistics are the load generator's
(funchat/loadgen: ConverseCaller, not realtime, manual turns; turn_summary), the same code that
drives `make loadtest`: one load generator, not two.

The oracle: `ReferencePipeline.respond` on the same clip with the same settings, in this process, and
an in-process incremental vocoder fed from its `on_step` callback as each step's codes arrive (the
cluster's vocoder also takes the codes step by step). First audio = respond() called -> first
non-empty vocoder chunk; RTF = (respond + final flush) / seconds of audio. One call of `--turns`
turns, with the same history the cluster's session keeps (user audio, assistant text); it runs
before the stack is started, so that nothing else competes for the CPU. The table's ratio is
cluster first-audio p50 / oracle first-audio p50.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from funchat.dev.tritonserver import PROJECT_ROOT
from funchat.loadgen import CallerSettings, ConverseCaller, TurnPlan, TurnRecord, Utterance, turn_summary
from funchat.loadgen.probe import auth_problem, unreachable_reason
from funchat.loadgen.records import CLIENT_ERROR

INPUT_RATE = 16000
OUTPUT_RATE = 24000
CHUNK_MS = 100
DEFAULT_INPUT = PROJECT_ROOT.parent / "shared" / "data" / "fun-audio-chat-example-16k-f32.wav"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    """The bench could not run (the message says why)."""


# ---------------------------------------------------------------------------------------------
# Audio


def pcm16_roundtrip(samples: np.ndarray) -> np.ndarray:
    """What the server decodes from the PCM16 bytes the client sends (the oracle must hear the same)."""
    from funchat.client import decode_pcm16, encode_audio
    return decode_pcm16(encode_audio(samples, "pcm16"))


def load_clip(path: str | None, clip_s: float, start_s: float) -> tuple[np.ndarray, str]:
    n = int(round(clip_s * INPUT_RATE))
    if path and Path(path).exists():
        from funchat.audio_io import load_audio
        audio = load_audio(path)
        i = int(round(start_s * INPUT_RATE))
        clip = audio[i:i + n]
        if len(clip) < n:  # a short file: loop it
            clip = np.resize(audio[i:] if len(audio) > i else audio, n).astype(np.float32)
        source = str(Path(path).resolve())
    else:
        if path:
            raise BenchError(f"input audio {path} does not exist")
        clip = np.random.default_rng(0).normal(0, 0.1, n).astype(np.float32)
        source = "noise (seed 0)"
    return pcm16_roundtrip(clip), source


# ---------------------------------------------------------------------------------------------
# The oracle


def run_oracle(checkpoint: Path, clip: np.ndarray, turns: int, max_new_tokens: int, greedy: bool, seed: int,
               threads: int) -> dict[str, Any]:
    import torch

    from funchat.oracle.generation import GenerationConfig
    from funchat.oracle.pipeline import ReferencePipeline
    from funchat.turn.schedule import Mode
    from funchat.vocoder.checkpoint import load_vocoder, pick_speaker

    torch.set_num_threads(threads)
    t_load = time.perf_counter()
    pipeline = ReferencePipeline(checkpoint)
    vocoder, speakers = load_vocoder(checkpoint)
    vocoder.eval()
    xvec = pick_speaker(speakers, None)
    load_s = time.perf_counter() - t_load
    gen = GenerationConfig.greedy(Mode.S2S, max_new_tokens) if greedy else \
        GenerationConfig(mode=Mode.S2S, max_new_tokens=max_new_tokens, seed=seed)

    def turn(history: list[dict], index: int) -> tuple[TurnRecord, str]:
        state = vocoder.start(xvec, "incremental")
        box = {"first": None, "samples": 0}
        t0 = time.perf_counter()

        def on_step(record) -> None:
            codes = list(record.output.vocoder_tokens)
            if not codes:
                return
            chunks = vocoder.push(state, codes)
            n = sum(c.numel() for c in chunks)
            if n and box["first"] is None:
                box["first"] = time.perf_counter() - t0
            box["samples"] += n

        with torch.inference_mode():
            result = pipeline.respond(clip, history=history, mode=Mode.S2S, gen=gen, on_step=on_step)
            if state.tokens:
                chunks = vocoder.push(state, [], final=True)
                n = sum(c.numel() for c in chunks)
                if n and box["first"] is None:
                    box["first"] = time.perf_counter() - t0
                box["samples"] += n
        wall = time.perf_counter() - t0
        return TurnRecord("oracle", "oracle", index, time.time(), status="completed", first_audio_s=box["first"],
                          reply_s=wall, audio_s=box["samples"] / vocoder.cfg.sample_rate), result.text

    log("oracle: warm-up turn")
    turn([], -1)
    records: list[TurnRecord] = []
    history: list[dict] = []
    for i in range(turns):
        stat, text = turn(history, i)
        records.append(stat)
        history += [{"role": "user", "content": clip}, {"role": "assistant", "content": text}]
        log(f"oracle: turn {i + 1}/{turns}: first audio "
            f"{'-' if stat.first_audio_s is None else f'{1e3 * stat.first_audio_s:.0f} ms'}, "
            f"{stat.audio_s:.2f} s audio in {stat.reply_s:.2f} s")
    return {"calls": 1, "threads": threads, "load_s": load_s, **turn_summary(records)}


# ---------------------------------------------------------------------------------------------
# The cluster


@dataclass
class Stack:
    target: str
    run_dir: Path
    stop_fns: list = field(default_factory=list, repr=False)
    keep_run_dir: bool = False
    api_key: str = field(default="", repr=False)  # a key of the orchestrator's key file
    orchestrator_env: dict[str, str] = field(default_factory=dict, repr=False)
    orchestrator: Any = field(default=None, repr=False)

    def restart_orchestrator(self, overrides: dict[str, str], timeout: float = 180.0) -> None:
        """Stop the orchestrator and start a new one on the same services with these settings changed
        (e.g. to compare a setting within one run); Stack.target is its address."""
        from funchat.dev.stack import start_orchestrator
        from funchat.dev.tritonserver import free_port

        self.stop_fns.remove(self.orchestrator.stop)
        self.orchestrator.stop()
        self.orchestrator = start_orchestrator(self.run_dir, {**self.orchestrator_env, **overrides}, free_port(),
                                               timeout=timeout, api_key=self.api_key)
        self.stop_fns.append(self.orchestrator.stop)
        self.target = self.orchestrator.target

    def stop(self) -> None:
        for fn in reversed(self.stop_fns):
            try:
                fn()
            except Exception as exc:  # keep stopping the rest
                log(f"warning: while stopping the stack: {exc}")
        self.stop_fns.clear()
        if self.keep_run_dir:
            log(f"logs kept in {self.run_dir}")
        else:
            shutil.rmtree(self.run_dir, ignore_errors=True)


def start_stack(checkpoint: Path, max_calls: int, timeout: float) -> Stack:
    """redis-server, the four tritonservers, the orchestrator (its API key file in the run dir, one key
    of tenant "bench": Stack.api_key); BenchError (with the logs' tails) if any part does not start.
    Whatever was started is stopped again on failure."""
    from funchat.api_keys import create_key
    from funchat.dev.redis_server import start_redis
    from funchat.dev.stack import start_orchestrator
    from funchat.dev.tritonserver import MODELS, free_port, start_servers

    run_dir = Path(tempfile.mkdtemp(prefix="funchat-bench-e2e-"))
    stack = Stack(target="", run_dir=run_dir)
    part = "redis-server"
    try:
        t0 = time.monotonic()
        redis_server = start_redis(run_dir)
        stack.stop_fns.append(redis_server.stop)
        log(f"stack: redis-server {redis_server.url} ({time.monotonic() - t0:.1f} s)")
        part = "tritonserver"
        t0 = time.monotonic()
        cluster = start_servers(models=list(MODELS), params={"*": {"checkpoint": str(checkpoint), "threads": "1"}},
                                run_dir=run_dir / "triton", timeout=timeout)
        stack.stop_fns.append(cluster.stop)
        log(f"stack: tritonservers {', '.join(f'{m} {e}' for m, e in cluster.endpoints.items())} "
            f"({time.monotonic() - t0:.1f} s)")
        part = "orchestrator"
        t0 = time.monotonic()
        stack.api_key, _ = create_key(run_dir / "api_keys", "bench")
        env = {"FUNCHAT_CHECKPOINT": str(checkpoint), "FUNCHAT_REDIS_URL": redis_server.url,
               "FUNCHAT_RESUME_SECRET": secrets.token_hex(32), "FUNCHAT_ENDPOINTS": json.dumps(cluster.endpoints),
               "FUNCHAT_MAX_CALLS": str(max_calls), "FUNCHAT_API_KEYS_FILE": str(run_dir / "api_keys"),
               "FUNCHAT_AUTH": "api_keys"}
        orch = start_orchestrator(run_dir, env, free_port(), timeout=timeout, api_key=stack.api_key)
        stack.stop_fns.append(orch.stop)
        stack.target, stack.orchestrator, stack.orchestrator_env = orch.target, orch, env
        log(f"stack: orchestrator {orch.target} ({time.monotonic() - t0:.1f} s)")
        return stack
    except BaseException as exc:
        stack.keep_run_dir = True
        stack.stop()
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise BenchError(f"{part} did not start: {exc}") from None


def one_call(target: str, clip: np.ndarray, turns: int, max_new_tokens: int, greedy: bool, seed: int,
             turn_timeout: float, interceptors: tuple = (), api_key: str | None = None) -> list[TurnRecord]:
    """One Converse call of `turns` turns (the load generator's caller: manual turns, the clip sent as
    fast as the call takes it, then commit); a TurnRecord per turn, failed ones with `error`.
    interceptors: gRPC client interceptors on the call's channel (e.g. one adding metadata).
    api_key: the key the call sends (None: FUNCHAT_API_KEY)."""
    settings = CallerSettings(mode="s2s", turn_detection="manual", realtime=False, max_new_tokens=max_new_tokens,
                              greedy=greedy, turn_timeout_s=turn_timeout)
    plan = [TurnPlan(Utterance("clip", clip))] * turns
    channel = grpc.insecure_channel(target)
    try:
        calls = grpc.intercept_channel(channel, *interceptors) if interceptors else channel
        stats = ConverseCaller(calls, plan, settings, seed=seed, api_key=api_key).run().turns
    except Exception as exc:  # noqa: BLE001 - a bench counts what went wrong, it does not stop
        stats = [TurnRecord("converse", "", 0, time.time(), status="failed", error=CLIENT_ERROR,
                            error_message=f"{type(exc).__name__}: {exc}")]
    finally:
        channel.close()
    for stat in stats:  # the bench's rule: a reply that did not complete is an error
        if not stat.error and stat.status != "completed":
            stat.error, stat.error_message = "NOT_COMPLETED", f"reply status {stat.status or '(none)'}"
    # Turns never run because the call failed count as errors too.
    while len(stats) < turns:
        stats.append(TurnRecord("converse", "", len(stats), time.time(), status="not_run", error="NOT_RUN",
                                error_message="not run: the call failed earlier"))
    return stats


def run_level(target: str, clip: np.ndarray, concurrency: int, turns: int, max_new_tokens: int,
              greedy: bool, seed: int, turn_timeout: float,
              api_key: str | None = None) -> tuple[list[TurnRecord], float]:
    """`concurrency` calls at once (a thread each: the caller uses gRPC's blocking API)."""
    t0 = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda k: one_call(target, clip, turns, max_new_tokens, greedy, seed + k,
                                                   turn_timeout, api_key=api_key), range(concurrency)))
    return [stat for stats in results for stat in stats], time.monotonic() - t0


def wait_healthy(target: str, timeout: float, api_key: str | None = None) -> None:
    """The server answers its health check and takes the API key (None: FUNCHAT_API_KEY); BenchError
    otherwise."""
    deadline = time.monotonic() + timeout
    while (reason := unreachable_reason(target, timeout_s=2.0)) is not None:
        if time.monotonic() > deadline:
            raise BenchError(f"no funchat server answers its health check at {target} ({reason})")
        time.sleep(0.5)
    try:
        reason = auth_problem(target, api_key)
    except ValueError as exc:  # a malformed FUNCHAT_API_KEY
        raise BenchError(str(exc)) from None
    if reason:
        raise BenchError(reason)


def run_cluster(target: str, clip: np.ndarray, levels: list[int], turns: int, max_new_tokens: int,
                greedy: bool, seed: int, turn_timeout: float,
                api_key: str | None = None) -> tuple[list[dict], dict]:
    wait_healthy(target, 10.0, api_key)
    log("cluster: warm-up turn")
    warm = one_call(target, clip, 1, max_new_tokens, greedy, seed, turn_timeout, api_key=api_key)
    if warm[0].error:
        log(f"warning: the warm-up turn failed: {warm[0].error}: {warm[0].error_message}")
    warm_row = {"first_audio_ms": None if warm[0].first_audio_s is None else 1e3 * warm[0].first_audio_s,
                "wall_s": warm[0].reply_s or 0.0,
                "error": f"{warm[0].error}: {warm[0].error_message}" if warm[0].error else ""}
    rows = []
    for c in levels:
        records, elapsed = run_level(target, clip, c, turns, max_new_tokens, greedy, seed, turn_timeout, api_key)
        level = {"concurrency": c, **turn_summary(records), "elapsed_s": elapsed}
        rows.append(level)
        log(f"cluster: {c} call(s) x {turns} turns in {elapsed:.1f} s: first audio p50 "
            f"{fmt(level['first_audio_ms_p50'], '.0f')} ms, RTF {fmt(level['rtf_mean'], '.3f')}, "
            f"errors {level['errors']}")
    return rows, warm_row


# ---------------------------------------------------------------------------------------------
# Report


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def print_table(report: dict[str, Any]) -> None:
    s, m, o = report["settings"], report["machine"], report["oracle"]
    print(f"funchat bench-e2e: {s['mode']}, {s['sampling']}, {s['turns']} turns per call of a {s['clip_s']:g} s clip "
          f"({CHUNK_MS} ms chunks, manual commit), max_new_tokens {s['max_new_tokens']}; "
          f"{m['cpus']} CPUs, {m['platform']}; cluster: {s['cluster']}")
    print()
    print("| setup | calls | turns | errors | first audio p50 ms | first audio p95 ms | RTF mean | RTF pooled "
          "| reply audio s (mean) | first-audio p50 vs oracle |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    if not o.get("skipped"):
        print(f"| oracle (in process) | 1 | {o['turns']} | {o['errors']} | {fmt(o['first_audio_ms_p50'], '.0f')} "
              f"| {fmt(o['first_audio_ms_p95'], '.0f')} | {fmt(o['rtf_mean'], '.3f')} | {fmt(o['rtf_pooled'], '.3f')} "
              f"| {fmt(o['reply_audio_s_mean'], '.2f')} | 1.00 |")
    for r in report["cluster"]:
        print(f"| cluster | {r['concurrency']} | {r['turns']} | {r['errors']} | {fmt(r['first_audio_ms_p50'], '.0f')} "
              f"| {fmt(r['first_audio_ms_p95'], '.0f')} | {fmt(r['rtf_mean'], '.3f')} | {fmt(r['rtf_pooled'], '.3f')} "
              f"| {fmt(r['reply_audio_s_mean'], '.2f')} | {fmt(r['ratio_vs_oracle'], '.2f')} |")
    print()
    print("first audio: commit sent -> first audio_delta received (oracle: respond() called -> first vocoder chunk).")
    print("RTF: turn wall time (commit -> response_done) / reply audio seconds; mean of the turns' RTFs, and pooled "
          "(all wall time / all audio). Ratio: cluster first-audio p50 / oracle first-audio p50.")
    load = m.get("loadavg_start")
    if load and load[0] > 0.5 * (m["cpus"] or 1):
        print(f"note: the load average was {load[0]:.2f} when the bench started: other work shared the CPUs")
    for r in report["cluster"]:
        for msg in r["error_messages"][:3]:
            print(f"error at {r['concurrency']} calls: {msg}")


# ---------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m funchat.benchmarks.e2e", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(PROJECT_ROOT / "checkpoints" / "tiny"),
                    help="checkpoint of the stack and the oracle (with --server: the one that server runs)")
    ap.add_argument("--input", default=str(DEFAULT_INPUT), help="16 kHz speech; a clip of it is each turn's audio")
    ap.add_argument("--clip-s", type=float, default=3.0, help="seconds of the input per turn (default 3)")
    ap.add_argument("--clip-start-s", type=float, default=0.0, help="where the clip starts in the input")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8], help="concurrent calls per level")
    ap.add_argument("--turns", type=int, default=3, help="turns per call (default 3)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--greedy", action="store_true", help="greedy decoding (default: seeded speech sampling)")
    ap.add_argument("--seed", type=int, default=1234, help="call k uses seed + k (default 1234)")
    ap.add_argument("--oracle-threads", type=int, default=1,
                    help="torch threads of the in-process oracle (default 1, as each model service has)")
    ap.add_argument("--no-oracle", action="store_true", help="skip the oracle baseline")
    ap.add_argument("--server", default=None, metavar="HOST:PORT",
                    help="bench a running stack's public API instead of starting one (the calls send the API key "
                         "in FUNCHAT_API_KEY)")
    ap.add_argument("--max-calls", type=int, default=16, help="FUNCHAT_MAX_CALLS of the stack started (>= 16)")
    ap.add_argument("--start-timeout", type=float, default=180.0, help="seconds for each part of the stack to start")
    ap.add_argument("--turn-timeout", type=float, default=120.0, help="seconds for one reply before it is an error")
    ap.add_argument("--json", default="bench-results/bench-e2e.json", help="where to write the JSON ('' for none)")
    args = ap.parse_args(argv)
    if any(c < 1 for c in args.concurrency):
        ap.error("--concurrency values must be >= 1")
    if args.turns < 1:
        ap.error("--turns must be >= 1")
    if args.max_new_tokens < 1:
        ap.error("--max-new-tokens must be >= 1")
    if args.clip_s <= 0:
        ap.error("--clip-s must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    checkpoint = Path(args.checkpoint).resolve()
    if not (checkpoint / "config.json").exists() or not (checkpoint / "vocoder" / "model.safetensors").exists():
        log(f"error: no checkpoint at {checkpoint}; create one: "
            f"funchat init-checkpoint --preset tiny --out {args.checkpoint} --seed 0")
        return 2
    try:
        clip, source = load_clip(args.input, args.clip_s, args.clip_start_s)
    except Exception as exc:  # noqa: BLE001
        log(f"error: {exc}")
        return 2
    max_calls = max(16, args.max_calls, max(args.concurrency))
    sampling = "greedy" if args.greedy else f"seeded sampling (seed {args.seed} + call)"
    try:
        import torch
        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(),
                    "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                    "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "torch": torch_version,
                    "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "settings": {"checkpoint": str(checkpoint), "input": source, "clip_s": args.clip_s,
                     "clip_start_s": args.clip_start_s, "chunk_ms": CHUNK_MS, "concurrency": args.concurrency,
                     "turns": args.turns, "max_new_tokens": args.max_new_tokens, "mode": "s2s",
                     "turn_detection": "manual", "sampling": sampling, "greedy": args.greedy, "seed": args.seed,
                     "cluster": args.server or f"started by the bench (4 tritonservers threads=1, "
                                               f"FUNCHAT_MAX_CALLS={max_calls})",
                     "oracle_threads": args.oracle_threads},
        "oracle": None, "cluster": [],
    }

    # The oracle first: before the stack starts, nothing competes with it for the CPU.
    if not args.no_oracle:
        try:
            report["oracle"] = run_oracle(checkpoint, clip, args.turns, args.max_new_tokens, args.greedy, args.seed,
                                          args.oracle_threads)
        except Exception as exc:  # noqa: BLE001
            log(f"error: the oracle failed: {type(exc).__name__}: {exc}")
            return 2
    else:
        report["oracle"] = {**turn_summary([]), "skipped": True}

    stack = None
    try:
        if args.server:
            target, api_key = args.server, None  # FUNCHAT_API_KEY
        else:
            log("stack: starting redis-server, 4 tritonservers, the orchestrator")
            t0 = time.monotonic()
            stack = start_stack(checkpoint, max_calls, args.start_timeout)
            target, api_key = stack.target, stack.api_key
            report["settings"]["stack_start_s"] = time.monotonic() - t0
        rows, warm = run_cluster(target, clip, args.concurrency, args.turns, args.max_new_tokens, args.greedy,
                                 args.seed, args.turn_timeout, api_key)
    except BenchError as exc:
        log(f"error: {exc}")
        return 2
    finally:
        if stack is not None:
            log("stack: stopping")
            stack.stop()
    oracle_p50 = report["oracle"]["first_audio_ms_p50"]
    for r in rows:
        r["ratio_vs_oracle"] = ratio(r["first_audio_ms_p50"], oracle_p50)
        r["rtf_ratio_vs_oracle"] = ratio(r["rtf_mean"], report["oracle"]["rtf_mean"])
    report["cluster"] = rows
    report["warmup"] = warm
    report["elapsed_s"] = time.perf_counter() - started
    report["machine"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None

    print_table(report)
    print(f"\nelapsed {report['elapsed_s']:.0f} s")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"JSON written to {path}")
    errors = sum(r["errors"] for r in rows)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
