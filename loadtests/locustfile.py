"""Locust load test of the funchat public API: live Converse callers and one-shot Respond callers.

    locust -f loadtests/locustfile.py --headless --host 127.0.0.1:50051 -u 4 -t 120s --load-shape step
    make loadtest USERS=4 DURATION=120 SHAPE=step            (the same, with the outputs in .run/loadtest/)

The callers, their measurements and the statistics are funchat.loadgen's (the same code as `make
bench-e2e`); this file is the Locust glue: the two users, the load shape, the options, each turn
reported as Locust request events (request_type "grpc"), the records moved from workers to the
master in distributed mode, and at the end summary.json, the plot and the SLO verdict as the exit
code (0 passed, 1 an SLO failed). loadtests/README.md explains the events, the outputs and the
distributed mode.

API keys: every call sends the key in the environment variable FUNCHAT_API_KEY (`authorization:
Bearer <key>`), read once per user; in the cluster it comes from the Secret funchat-loadtest-key
(k8s/locust.yaml). Without one, a server with authentication answers every call UNAUTHENTICATED
(counted as that error); `make loadtest` checks the key before Locust starts.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import threading
import time
from pathlib import Path

# gRPC's blocking calls must yield to Locust's greenlets: patch gRPC before any channel exists
# (Locust has already monkey-patched the standard library when it imports this file).
import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

import gevent  # noqa: E402
import grpc  # noqa: E402
from locust import LoadTestShape, User, between, events, task  # noqa: E402
from locust.runners import MasterRunner, WorkerRunner  # noqa: E402

from funchat.client.auth import API_KEY_ENV, resolve_api_key  # noqa: E402
from funchat.client.tls import open_channel, resolve_tls  # noqa: E402
from funchat.loadgen import (CallerSettings, CallRecord, ConverseCaller, Schedule, Shares, Slo,  # noqa: E402
                             TurnRecord, build_summary, call_misses, load_utterances, plan_call, respond_call)
from funchat.loadgen.records import BARGE_IN_IGNORED  # noqa: E402
from funchat.loadgen.shapes import SHAPES  # noqa: E402

log = logging.getLogger("funchat.loadtest")
WORKER_REPORT_WAIT_S = 5.0  # a worker reports every 3 s
CSV_ROUND_S = 1.2          # Locust writes its CSV files every second
REPLY_BYTES_PER_S = 48000  # reply audio on the wire: 24 kHz PCM16
DEFAULT_RECORDING = Path(__file__).resolve().parents[2] / "shared" / "data" / "fun-audio-chat-example-16k-f32.wav"


@events.init_command_line_parser.add_listener
def _options(parser):
    add = parser.add_argument_group("funchat load test").add_argument
    add("--load-shape", choices=SHAPES, default="steady", env_var="FUNCHAT_LOADTEST_SHAPE",
        help="steady: --users for --run-time; step: 1, 2, ... up to --users (--step-users apart), equal parts of "
             "--run-time; spike: a quarter of --users, all of them in the middle fifth, a quarter again")
    add("--step-users", type=int, default=1, help="step shape: users added per step")
    add("--step-min-users", type=int, default=1,
        help="step shape: the run fails unless at least this concurrency holds the SLOs")
    add("--turns", type=int, default=2, help="turns per Converse call (a barge-in adds the turn spoken over a reply)")
    add("--max-new-tokens", type=int, default=24, help="reply length cap sent in each session (0: the server's)")
    add("--barge-in-share", type=float, default=0.2, help="share of Converse replies the caller talks over")
    add("--silent-share", type=float, default=0.1,
        help="share of Converse replies during which the caller's uplink goes silent for --silent-s")
    add("--hang-up-share", type=float, default=0.1, help="share of Converse replies the caller hangs up on")
    add("--silent-s", type=float, default=2.0, help="how long a silent caller sends nothing")
    add("--behaviour-at-ms", default="300-1500",
        help="heard reply audio (ms, a range) at which a barge-in, silence or hang-up starts")
    add("--first-audio-p95-ms", type=float, default=1000.0, help="SLO: first-audio p95 budget (ms)")
    add("--max-underrun-turns", type=int, default=0, help="SLO: turns with a playback underrun allowed")
    add("--max-error-rate", type=float, default=0.0, help="SLO: share of turns allowed to fail")
    add("--barge-in-p95-ms", type=float, default=None, help="SLO (optional): barge-in delay p95 budget (ms)")
    add("--min-goodput", type=float, default=None, help="SLO (optional): minimum share of calls meeting every SLO")
    add("--recording", default=str(DEFAULT_RECORDING) if DEFAULT_RECORDING.exists() else "",
        help="a real recording, cut at its pauses into utterances, next to the espeak-ng sentences ('' for none)")
    add("--converse-weight", type=int, default=1, help="weight of ConverseUser")
    add("--respond-weight", type=int, default=1, help="weight of RespondUser")
    add("--seed", type=int, default=0, help="seed of the callers' scripts (utterances, behaviours, sampling seeds)")
    add("--turn-timeout-s", type=float, default=60.0, help="a reply not done this long after the caller's turn fails")
    add("--summary-dir", default=".run/loadtest", env_var="FUNCHAT_LOADTEST_DIR",
        help="where summary.json, turns.jsonl and plot.png go (on the master)")


class Collected:
    """Records of this process; on a worker they go to the master with each stats report."""

    def __init__(self):
        self.turns: list[dict] = []
        self.calls: list[dict] = []
        self.utterances = None
        self.lock = threading.Lock()
        self.shape_started_at: float | None = None  # wall clock, on the master (or the local runner)
        self.user_numbers = itertools.count()

    def drain(self) -> dict:
        turns, calls, self.turns, self.calls = self.turns, self.calls, [], []
        return {"turns": turns, "calls": calls}

    def load_utterances(self, options):
        with self.lock:  # the first user synthesises (or reads the cache); the others wait for it
            if self.utterances is None:
                self.utterances = load_utterances(options.recording or None)
                log.info("utterances: %s", ", ".join(f"{u.name} ({u.duration_s:.1f} s)" for u in self.utterances))
        return self.utterances


COLLECTED = Collected()


class Failure(Exception):
    """A failed measurement as Locust's failure table shows it: by code, not by message, so that the
    table counts errors by gRPC status or error-event code."""


def _fire(environment, name: str, ms: float, length: int = 0, failure: str | None = None) -> None:
    environment.events.request.fire(request_type="grpc", name=name, response_time=ms, response_length=length,
                                    exception=Failure(failure) if failure else None, context={})


def report_turn(environment, rec: TurnRecord) -> None:
    kind = rec.kind.capitalize()
    if rec.first_audio_s is not None and not rec.error:
        _fire(environment, f"{kind}.first_audio", 1e3 * rec.first_audio_s)
    _fire(environment, f"{kind}.turn", 1e3 * (rec.reply_s or 0.0), int(rec.audio_s * REPLY_BYTES_PER_S),
          rec.error or None)
    if rec.audio_s:
        _fire(environment, f"{kind}.playback", 1e3 * rec.underrun_s, failure="UNDERRUN" if rec.underruns else None)
    if rec.barge_in_s is not None:
        _fire(environment, "Converse.barge_in", 1e3 * rec.barge_in_s)
    elif rec.error == BARGE_IN_IGNORED:
        _fire(environment, "Converse.barge_in", 0.0, failure=BARGE_IN_IGNORED)
    COLLECTED.turns.append(rec.to_dict())


def report_call(environment, call: CallRecord, slo: Slo) -> None:
    missed = call_misses(call, slo)
    _fire(environment, f"{call.kind.capitalize()}.call", 1e3 * call.duration_s,
          failure="MISSED_SLO" if missed else None)
    COLLECTED.calls.append(call.to_dict())


def slo_of(options) -> Slo:
    return Slo(first_audio_p95_ms=options.first_audio_p95_ms, max_underrun_turns=options.max_underrun_turns,
               max_error_rate=options.max_error_rate, barge_in_p95_ms=options.barge_in_p95_ms,
               min_goodput=options.min_goodput)


def _at_ms(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    return int(low), int(high or low)


class FunchatUser(User):
    abstract = True
    wait_time = between(0.5, 1.5)  # a caller's pause between calls

    def on_start(self):
        options = self.environment.parsed_options
        self.options = options
        self.slo = slo_of(options)
        self.settings = CallerSettings(max_new_tokens=options.max_new_tokens, silent_s=options.silent_s,
                                       turn_timeout_s=options.turn_timeout_s)
        worker = getattr(self.environment.runner, "worker_index", 0)
        self.rng = random.Random(f"{options.seed}/{worker}/{next(COLLECTED.user_numbers)}")
        self.utterances = COLLECTED.load_utterances(options)
        self.api_key = resolve_api_key(None) or ""  # FUNCHAT_API_KEY ("": none)
        self.channel = open_channel(self.host, resolve_tls(None), aio=False)  # TLS as FUNCHAT_TLS* says

    def on_stop(self):
        self.channel.close()


class ConverseUser(FunchatUser):
    """A live caller: full-duplex calls of --turns turns, speaking in real time, acking playback,
    barging in, going silent or hanging up on a share of the replies."""

    @task
    def call(self):
        o = self.options
        shares = Shares(barge_in=o.barge_in_share, silent=o.silent_share, hang_up=o.hang_up_share)
        plan = plan_call(self.rng, self.utterances, o.turns, shares, _at_ms(o.behaviour_at_ms))
        caller = ConverseCaller(self.channel, plan, self.settings, seed=self.rng.randrange(2 ** 31),
                                on_turn=lambda rec: report_turn(self.environment, rec), api_key=self.api_key)
        report_call(self.environment, caller.run(), self.slo)


class RespondUser(FunchatUser):
    """A one-shot caller: one utterance per Respond call."""

    @task
    def respond(self):
        call = respond_call(self.channel, self.rng.choice(self.utterances), self.settings,
                            seed=self.rng.randrange(2 ** 31), api_key=self.api_key)
        for rec in call.turns:
            report_turn(self.environment, rec)
        report_call(self.environment, call, self.slo)


def schedule_of(options) -> Schedule:
    if not options.run_time:
        raise ValueError("give the test's duration with --run-time (-t), e.g. -t 60s")
    return Schedule(options.load_shape, options.num_users or 1, float(options.run_time), options.step_users,
                    options.spawn_rate)


class FunchatShape(LoadTestShape):
    """--load-shape's schedule (funchat.loadgen.shapes) over --users and --run-time."""

    use_common_options = True

    def tick(self):
        options = self.runner.environment.parsed_options
        run_time = self.get_run_time()
        if COLLECTED.shape_started_at is None:
            COLLECTED.shape_started_at = time.time() - run_time
        return schedule_of(options).tick(run_time)


@events.init.add_listener
def _on_init(environment, **_):
    # a malformed FUNCHAT_API_KEY fails here (the message does not repeat it); none is worth a warning
    # where callers run (the master holds none)
    if not resolve_api_key(None) and not isinstance(environment.runner, MasterRunner):
        log.warning("%s is not set: the callers send no API key, and a server with authentication answers "
                    "every call UNAUTHENTICATED", API_KEY_ENV)
    options = environment.parsed_options
    if options is None:
        return
    ConverseUser.weight, RespondUser.weight = options.converse_weight, options.respond_weight
    slo_of(options)  # bad SLO values fail here, before anything runs
    Shares(barge_in=options.barge_in_share, silent=options.silent_share, hang_up=options.hang_up_share)


@events.report_to_master.add_listener
def _to_master(client_id, data):
    data["funchat"] = COLLECTED.drain()


@events.worker_report.add_listener
def _from_worker(client_id, data):
    part = data.get("funchat") or {}
    COLLECTED.turns += part.get("turns", [])
    COLLECTED.calls += part.get("calls", [])


def _is_worker(environment) -> bool:
    return isinstance(environment.runner, WorkerRunner) or environment.parsed_options is None


@events.test_start.add_listener
def _on_test_start(environment, **_):
    # the web UI can run several tests in one process: each summary covers its own test
    COLLECTED.drain()
    COLLECTED.shape_started_at = None


@events.test_stop.add_listener
def _on_test_stop(environment, **_):
    if _is_worker(environment):
        return
    # Locust rewrites its CSV files every second from a greenlet that dies when the process quits:
    # one more round, so that the turns of calls that finished during the stop are in them too.
    gevent.sleep(CSV_ROUND_S)
    # With the web UI (the in-cluster master) a test ends without the process quitting: write the
    # summary once the workers' last records have come with their next stats report (every 3 s).
    if isinstance(environment.runner, MasterRunner):
        gevent.spawn_later(WORKER_REPORT_WAIT_S, _summarise, environment)


@events.quitting.add_listener
def _on_quitting(environment, **_):
    if not _is_worker(environment):
        _summarise(environment)


def _summarise(environment) -> None:
    """Write the summary; the process's exit code is the SLO verdict (2: no verdict)."""
    try:
        passed = write_summary(environment)
        environment.process_exit_code = 0 if passed else 1
    except Exception as exc:  # noqa: BLE001 - the run's outcome is unknown: say so in one line
        log.error("loadtest: the summary could not be written: %s: %s", type(exc).__name__, exc)
        environment.process_exit_code = 2


def write_summary(environment) -> bool:
    options = environment.parsed_options
    schedule = schedule_of(options)
    started = COLLECTED.shape_started_at or time.time()

    def level_of(t: float) -> int:
        return schedule.users_at(min(max(0.0, t - started), schedule.duration_s - 1e-6)) or 0

    turns = [TurnRecord.from_dict(t) for t in COLLECTED.turns]
    calls = [CallRecord.from_dict(c) for c in COLLECTED.calls]
    meta = {"target": environment.host, "users": schedule.users, "duration_s": schedule.duration_s,
            "step_users": schedule.step_users, "started_at": started, "ended_at": time.time(),
            "distributed": isinstance(environment.runner, MasterRunner),
            "callers": {"converse_weight": options.converse_weight, "respond_weight": options.respond_weight,
                        "turns_per_call": options.turns, "max_new_tokens": options.max_new_tokens,
                        "barge_in_share": options.barge_in_share, "silent_share": options.silent_share,
                        "hang_up_share": options.hang_up_share, "behaviour_at_ms": options.behaviour_at_ms,
                        "recording": options.recording or None, "seed": options.seed}}
    summary = build_summary(turns, calls, slo_of(options), level_of, schedule.shape, options.step_min_users, meta)
    out = Path(options.summary_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    # every turn as measured, for questions the summary does not answer
    (out / "turns.jsonl").write_text("".join(json.dumps(t.to_dict()) + "\n" for t in turns))
    try:
        from funchat.loadgen.plot import plot_summary
        plot_summary(summary, out / "plot.png")
    except ImportError as exc:  # matplotlib is the loadtest extra's; the summary stands without the picture
        log.warning("no plot: %s", exc)
    print_summary(summary, out)
    return summary["verdict"]["passed"]


def _fmt(value, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def print_summary(summary: dict, out: Path) -> None:
    print(f"\nfunchat load test ({summary['shape']}, {summary['target']}):")
    print("| calls | turns | first audio p50 / p95 ms | barge-in p50 ms | underrun turns | errors | goodput |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for lv in summary["levels"]:
        errors = ", ".join(f"{k} x{n}" for k, n in sorted(lv["errors_by_code"].items())) or "0"
        print(f"| {lv['concurrency']} | {lv['turns']} | {_fmt(lv['first_audio_ms_p50'])} / "
              f"{_fmt(lv['first_audio_ms_p95'])} | {_fmt(lv['barge_in_ms_p50'])} | {lv['underrun_turns']} | {errors} "
              f"| {_fmt(lv['goodput'], '.2f')} |")
    if "step" in summary:
        print(f"largest concurrency holding the SLOs: {summary['step']['largest_concurrency_holding_slo']}")
    verdict = summary["verdict"]
    print("SLO passed" if verdict["passed"] else "SLO FAILED: " + "; ".join(verdict["violations"]))
    print(f"summary: {out / 'summary.json'}")
