"""`make soak`: live duplex calls against the local stack for minutes, with the memory of every
process of the stack sampled; the verdict is no error and no process whose memory keeps growing.

    python -m funchat.dev.soak [--calls N] [--minutes M] [--run-dir .run] [--start-stack]
        [--max-slope-mb-per-min X] [--json FILE]

The callers are the load generator's (funchat.loadgen.ConverseCaller, as `make loadtest` drives
them): N concurrent callers, each placing call after call (a few turns each, speaking in real
time, acknowledging playback, barging in on some replies and hanging up on a few) until M minutes
have passed; the calls in progress then finish. Every turn's error and every call's end status
counts.

Memory: every `--interval` seconds the resident set (RSS) of each process of the stack is read:
redis-server, each tritonserver with its Python backend stubs (where the models live), and the
orchestrator's process tree (Ray's GCS, raylet, the Serve controller, the proxy, each replica).
The first half of the run is warm-up (longer if a caller has not finished its first call by then),
and a least-squares line through the baseline of each process's later samples (each sample's
minimum with its neighbours: a buffer that lives for one request is not a trend) gives its slope in
MB per minute. A
process is flat when that slope stays under `--max-slope-mb-per-min`: a leak grows through the
whole run, while a cache that fills as new shapes and lengths arrive levels off. Such caches fill
over tens of replies, not seconds: the vocoder's oneDNN primitive cache (one kernel per new
convolution shape, at most ONEDNN_PRIMITIVE_CACHE_CAPACITY = 1024) grew its stub by about 25 MB
over its first 60 replies and then stayed flat, which a 10-minute soak at 2 callers only reaches
at its middle. A process that disappears or is replaced
(a crash and restart) is an error.

The stack is the one `make up` runs (`<run-dir>/stack.json`, `<run-dir>/endpoints.json`, its API
key); `--start-stack` starts it first when none runs and stops it afterwards. The exit code is 0
when the soak passed, 1 when it failed, 2 when it could not run.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

from funchat.dev.stack import DEFAULT_RUN_DIR, STACK_FILE, read_api_key
from funchat.dev.tritonserver import PIDS_FILE

WARMUP_SHARE = 0.5  # of the run; see the module's docstring


# ---- the stack's processes ----

def _label(proc: psutil.Process) -> str:
    """A process's role: Ray's workers carry theirs in their title (ray::ServeReplica:...)."""
    try:
        cmdline = proc.cmdline()
        if cmdline and cmdline[0].startswith("ray::"):
            return cmdline[0].split()[0]
        return proc.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "?"


def stack_roots(run_dir: Path) -> dict[str, int]:
    """The stack's top processes, {name: pid}: redis-server, tritonserver per model, orchestrator."""
    state = json.loads((run_dir / STACK_FILE).read_text())
    roots = {"redis": state["redis_pid"], "orchestrator": state["orchestrator_pid"]}
    pids = json.loads((run_dir / "triton" / PIDS_FILE).read_text())
    roots.update({f"triton:{model}": pid for model, pid in pids.items()})
    return roots


def stack_processes(roots: dict[str, int]) -> dict[int, str]:
    """Every live process of the stack, {pid: "root/role"} (the roots and all their descendants)."""
    found: dict[int, str] = {}
    for root, pid in roots.items():
        try:
            top = psutil.Process(pid)
            tree = [top, *top.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for proc in tree:
            found[proc.pid] = f"{root}/{_label(proc)}" if proc.pid != pid else root
    return found


@dataclass
class MemorySeries:
    """One process's RSS over the run."""

    name: str
    pid: int
    times_s: list[float] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)

    def slope_mb_per_min(self, after_s: float) -> float | None:
        """Least-squares slope of the baseline of the samples taken after `after_s`; None with fewer
        than 4. The baseline is each inner sample's minimum with its two neighbours: memory a request
        holds only while it runs (a long prefill's attention scores) shows as one high sample when the
        sampler happens to catch it, and is returned right after; a leak raises the baseline itself
        (at its own slope)."""
        t = np.asarray(self.times_s)
        keep = t >= after_s
        if keep.sum() < 4:
            return None
        rss = np.asarray(self.rss_mb)[keep]
        baseline = np.minimum(np.minimum(rss[:-2], rss[1:-1]), rss[2:])  # [n - 2]: samples 1 .. n-2
        slope, _ = np.polyfit(t[keep][1:-1] / 60.0, baseline, 1)
        return float(slope)


class MemorySampler:
    """Samples the stack's processes every `interval_s` in a thread; notes processes that vanish."""

    def __init__(self, roots: dict[str, int], interval_s: float):
        self.roots, self.interval_s = roots, interval_s
        self.series: dict[int, MemorySeries] = {}
        self.vanished: list[str] = []
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def start(self) -> None:
        self.sample()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        now = time.monotonic() - self.t0
        for root, pid in self.roots.items():
            if not psutil.pid_exists(pid) and root not in self.vanished:
                self.vanished.append(root)
        for pid, name in stack_processes(self.roots).items():
            try:
                rss = psutil.Process(pid).memory_info().rss / 2 ** 20
            except psutil.NoSuchProcess:
                continue
            series = self.series.setdefault(pid, MemorySeries(name, pid))
            series.times_s.append(now)
            series.rss_mb.append(rss)


# ---- the callers ----

@dataclass
class CallerTotals:
    calls: int = 0
    turns: int = 0
    errors: list[str] = field(default_factory=list)  # "CODE: message" of each failed turn or call
    first_calls_done_at: list[float] = field(default_factory=list)  # time.monotonic() per caller


def _caller(target: str, api_key: str, deadline: float, seed: int, turns: int, totals: CallerTotals,
            lock: threading.Lock, utterances) -> None:
    import grpc

    from funchat.loadgen import CallerSettings, ConverseCaller, Shares, plan_call

    rng = random.Random(seed)
    shares = Shares(barge_in=0.2, hang_up=0.05)
    first_done = False
    with grpc.insecure_channel(target) as channel:
        while time.monotonic() < deadline:
            plan = plan_call(rng, utterances, turns, shares)
            try:
                record = ConverseCaller(channel, plan, CallerSettings(), seed=rng.randrange(2 ** 31),
                                        api_key=api_key).run()
            except Exception as exc:  # the caller itself broke: counts, and the soak goes on
                with lock:
                    totals.errors.append(f"CALLER: {type(exc).__name__}: {exc}")
                continue
            with lock:
                if not first_done:
                    totals.first_calls_done_at.append(time.monotonic())
                    first_done = True
                totals.calls += 1
                totals.turns += len(record.turns)
                totals.errors += [f"{t.error}: {t.error_message}" for t in record.turns if t.error]
            time.sleep(rng.uniform(0.2, 0.8))  # a pause between calls


def run_callers(target: str, api_key: str, calls: int, seconds: float, turns: int, seed: int,
                recording: str | None) -> CallerTotals:
    from funchat.loadgen import load_utterances

    utterances = load_utterances(recording)
    totals, lock = CallerTotals(), threading.Lock()
    deadline = time.monotonic() + seconds
    threads = [threading.Thread(target=_caller, name=f"caller-{i}", daemon=True,
                                args=(target, api_key, deadline, seed + i, turns, totals, lock, utterances))
               for i in range(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return totals


# ---- the verdict ----

def warmup_s(totals: CallerTotals, sampler: MemorySampler, seconds: float, callers: int) -> float:
    """Seconds of the run (from the sampler's start) that the trend leaves out."""
    warmup = WARMUP_SHARE * seconds
    if len(totals.first_calls_done_at) < callers:  # a caller never finished a call: all of it was warm-up
        return seconds
    return max(warmup, max(totals.first_calls_done_at) - sampler.t0)


def summarise(totals: CallerTotals, sampler: MemorySampler, seconds: float, max_slope: float,
              callers: int | None = None) -> dict:
    warmup = warmup_s(totals, sampler, seconds, callers) if callers else WARMUP_SHARE * seconds
    processes = []
    for s in sorted(sampler.series.values(), key=lambda s: s.name):
        slope = s.slope_mb_per_min(warmup)
        if slope is None:  # a short-lived process (e.g. a Ray worker started and stopped): no trend
            continue
        processes.append({"process": s.name, "pid": s.pid, "rss_start_mb": round(s.rss_mb[0], 1),
                          "rss_end_mb": round(s.rss_mb[-1], 1), "slope_mb_per_min": round(slope, 3),
                          "flat": slope <= max_slope,
                          # the samples, to plot or to tell a warm-up from a trend
                          "rss_series": [[round(t, 1), round(m, 1)] for t, m in zip(s.times_s, s.rss_mb)]})
    growing = [p["process"] for p in processes if not p["flat"]]
    return {"calls": totals.calls, "turns": totals.turns, "errors": len(totals.errors),
            "error_samples": totals.errors[:10], "seconds": round(seconds, 1), "warmup_s": round(warmup, 1),
            "max_slope_mb_per_min": max_slope, "vanished": sampler.vanished, "growing": growing,
            "processes": processes,
            # a run too short for any trend after the warm-up proves nothing about memory
            "passed": not totals.errors and not growing and not sampler.vanished and totals.turns > 0
            and bool(processes)}


def print_table(summary: dict) -> None:
    print(f"\nsoak: {summary['calls']} calls, {summary['turns']} turns in {summary['seconds']:.0f} s, "
          f"{summary['errors']} errors (slopes after a {summary['warmup_s']:.0f} s warm-up)")
    print(f"{'process':58s} {'RSS start':>10s} {'RSS end':>10s} {'MB/min':>9s}")
    for p in summary["processes"]:
        mark = "" if p["flat"] else "  GROWING"
        print(f"{p['process'][:58]:58s} {p['rss_start_mb']:10.1f} {p['rss_end_mb']:10.1f} "
              f"{p['slope_mb_per_min']:9.3f}{mark}")
    for e in summary["error_samples"]:
        print(f"error: {e}")
    for v in summary["vanished"]:
        print(f"vanished: {v}")
    print("PASSED" if summary["passed"] else "FAILED")


def soak(run_dir: Path, calls: int, minutes: float, turns: int = 3, interval_s: float = 5.0,
         max_slope: float = 1.0, seed: int = 0, recording: str | None = None) -> dict:
    endpoints = json.loads((run_dir / "endpoints.json").read_text())
    sampler = MemorySampler(stack_roots(run_dir), interval_s)
    sampler.start()
    t0 = time.monotonic()
    try:
        totals = run_callers(endpoints["orchestrator"], read_api_key(run_dir), calls, minutes * 60.0, turns,
                             seed, recording)
    finally:
        sampler.stop()
    return summarise(totals, sampler, time.monotonic() - t0, max_slope, callers=calls)


def _stack_running(run_dir: Path) -> bool:
    try:
        return all(psutil.pid_exists(pid) for pid in stack_roots(run_dir).values())
    except (OSError, ValueError, KeyError):
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m funchat.dev.soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=4, help="concurrent callers")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--turns", type=int, default=3, help="turns per call")
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between memory samples")
    ap.add_argument("--max-slope-mb-per-min", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recording", default=None, help="a WAV the callers' utterances are cut from")
    ap.add_argument("--run-dir", default=str(DEFAULT_RUN_DIR))
    ap.add_argument("--start-stack", action="store_true", help="start the stack (make up) when none runs, and "
                                                               "stop it afterwards")
    ap.add_argument("--stack-arg", action="append", default=[], help="passed to `funchat.dev.stack up`")
    ap.add_argument("--json", default=None, help="write the summary here")
    args = ap.parse_args(argv)
    if args.calls < 1 or args.minutes <= 0:
        print("soak: --calls must be >= 1 and --minutes > 0", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir).resolve()
    started = False
    if not _stack_running(run_dir):
        if not args.start_stack:
            print(f"soak: no stack runs in {run_dir}: start it with `make up` (or pass --start-stack)",
                  file=sys.stderr)
            return 2
        up = [sys.executable, "-m", "funchat.dev.stack", "up", "--run-dir", str(run_dir), *args.stack_arg]
        if subprocess.call(up) != 0:
            return 2
        started = True
    try:
        summary = soak(run_dir, args.calls, args.minutes, args.turns, args.interval, args.max_slope_mb_per_min,
                       args.seed, args.recording)
    finally:
        if started:
            subprocess.call([sys.executable, "-m", "funchat.dev.stack", "down", "--run-dir", str(run_dir)])
    print_table(summary)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
