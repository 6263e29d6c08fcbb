"""The orchestrator's Prometheus metrics, from every replica, one `/metrics` endpoint per pod.

What is measured, and where (the call code only calls the small functions below):

    funchat_orchestrator_first_audio_seconds{mode}     end of the caller's turn (commit, or the VAD's
                                                       end of speech) to the reply's first audio chunk
                                                       handed to the call's outgoing stream (exchange)
    funchat_orchestrator_stage_seconds{stage}          one observation per model-service request of a
                                                       turn, as the turn times it in `latency_ms`:
                                                       audio_tokenizer (exchange), llm_prefill, llm_step,
                                                       refined_head, vocoder (one push) (turn_runner)
    funchat_orchestrator_real_time_factor_ratio        a completed speech reply's generation time (llm
                                                       prefill sent -> last audio out) / its audio seconds
    funchat_orchestrator_audio_underruns_total         audio chunks that came after a caller playing the
                                                       reply in real time had run out (`PlaybackClock`)
    funchat_orchestrator_barge_in_seconds              the VAD reporting the caller's speech start, over a
                                                       reply still generating, to that generation stopped
                                                       and its cut turn stored (converse)
    funchat_orchestrator_active_calls                  calls admitted and not yet ended (service)
    funchat_orchestrator_tasks                         asyncio tasks of calls and turns still running
                                                       (`spawn`): 0 once no call is open, more is a leak
    funchat_orchestrator_calls_total{outcome}          admitted | refused (over a limit: FUNCHAT_MAX_CALLS,
                                                       or the tenant's calls or rate)
    funchat_orchestrator_refusals_total{reason}        RESOURCE_EXHAUSTED answers by the limit hit:
                                                       replica_calls (FUNCHAT_MAX_CALLS), tenant_calls,
                                                       tenant_rate (any RPC) (service)
    funchat_orchestrator_errors_total{code}            errors sent to callers, by gRPC status name: each
                                                       `error` event, each RPC ended by a status alone,
                                                       each unexpected failure (INTERNAL) (errors, app)
    funchat_orchestrator_model_queue_seconds{service}  see `model_queue`
    funchat_orchestrator_session_store_seconds{op}     each SessionStore operation (sessions)
    funchat_orchestrator_turns_total{mode,status}      turns by how they ended: completed | cancelled |
                                                       interrupted | failed (exchange)

Every replica, one endpoint per pod: Ray Serve replicas are separate processes, so the metrics use
prometheus-client's multiprocess mode. Each process writes its values into mmap files
(`<kind>_<pid>.db`) in the directory named by PROMETHEUS_MULTIPROC_DIR, which prometheus-client
reads when it is first imported: it has to be in a replica's environment when the process starts,
and a Ray runtime_env's env_vars put it there (for the replicas only, not Ray's own processes). A
`MultiProcessCollector` sums the directory's files at each scrape.

- `python -m funchat.orchestrator.app` (`make up`, the chart's Deployment mode): the process makes a
  fresh directory, gives it to the replicas (`replica_runtime_env`, the job's runtime_env, which
  Serve merges into the deployment's) and serves `/metrics` on FUNCHAT_METRICS_PORT before Serve
  starts, for as long as it runs.
- KubeRay RayService (or `serve run serve_config.yaml`): no such process in a pod. The application's
  runtime_env names `DEFAULT_MULTIPROC_DIR` (under the pod's /tmp, an emptyDir: one per pod, shared
  by its processes), and each replica calls `start_replica_exporter`: the first to bind the port
  serves the whole directory; the others keep writing their files and retry the bind every
  `REBIND_S`, so that another replica takes over when the serving one dies. In the first mode the
  process already holds the port and the replicas' attempts fail: the same code covers both.

The port is bound on all interfaces (`::`, dual-stack, or 0.0.0.0 where there is no IPv6), like
Ray Serve's gRPC proxy on FUNCHAT_GRPC_PORT, unless FUNCHAT_METRICS_HOST names an address (`make up`:
127.0.0.1); 0 turns the endpoint off.

Processes that are gone: Ray gives no hook when a replica is killed, but the replicas share the
exporter's pid space (a machine, a pod). Before each scrape the exporter drops the live gauge
(active calls, `livesum`) of every pid in the directory that no longer runs (`mark_process_dead`);
their counters and histograms stay, so totals never go down. A process also drops its own pid's
stale gauge when it starts: a restarted container reuses pids, and an emptyDir outlives it.

A metric update never raises into a call: a failure (e.g. the directory's disk is full) is logged
once per function and the call goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
DEFAULT_MULTIPROC_DIR = "/tmp/funchat-metrics"  # RayService / `serve run`: one per node (a pod's /tmp)
REBIND_S = 5.0  # a replica that lost the race for the port tries again this often
BIND_HOSTS = ("::", "0.0.0.0")  # dual-stack first; IPv4 alone where the machine has no IPv6

# Speech latencies: a first audio is ~0.2-2 s, a barge-in ~0.1-1 s, a model step 10-100 ms; 30 s is
# a turn that went badly wrong.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0,
                   7.5, 10.0, 15.0, 20.0, 30.0)
# Redis round trips and in-process queues are normally well under 10 ms: finer buckets below it.
FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005) + LATENCY_BUCKETS
# Generation time over audio time: below 1 is faster than real time.
RTF_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)


def multiprocess_dir() -> str | None:
    """The directory this process's metrics are written to, or None (values kept in memory)."""
    return os.environ.get(MULTIPROC_ENV) or None


def _prepare_own_files() -> None:
    path = multiprocess_dir()
    if path is None:
        return
    os.makedirs(path, exist_ok=True)
    mark_process_dead(os.getpid(), path)  # a dead process's gauge under our reused pid


_prepare_own_files()  # before the first metric opens this process's files

FIRST_AUDIO = Histogram("funchat_orchestrator_first_audio_seconds",
                        "End of the caller's turn (commit or VAD end of speech) to the reply's first audio chunk "
                        "sent.", ["mode"], buckets=LATENCY_BUCKETS)
STAGE = Histogram("funchat_orchestrator_stage_seconds",
                  "One model-service request of a turn: audio_tokenizer, llm_prefill, llm_step, refined_head, "
                  "vocoder (one push).", ["stage"], buckets=LATENCY_BUCKETS)
REAL_TIME_FACTOR = Histogram("funchat_orchestrator_real_time_factor_ratio",
                             "A completed speech reply's generation time (llm prefill sent to last audio out) "
                             "over its audio duration; below 1 is faster than real time.", buckets=RTF_BUCKETS)
UNDERRUNS = Counter("funchat_orchestrator_audio_underruns_total",
                    "Reply audio chunks sent after a caller playing the reply in real time (from its first "
                    "chunk) would have run out of audio.")
BARGE_IN = Histogram("funchat_orchestrator_barge_in_seconds",
                     "The VAD reporting the caller's speech start over a reply still generating, to that "
                     "generation stopped.", buckets=LATENCY_BUCKETS)
ACTIVE_CALLS = Gauge("funchat_orchestrator_active_calls", "Calls admitted and not yet ended.",
                     multiprocess_mode="livesum")
TASKS = Gauge("funchat_orchestrator_tasks", "Tasks of calls and turns still running (0 when no call is open; "
              "more is a leak).", multiprocess_mode="livesum")
CALLS = Counter("funchat_orchestrator_calls_total", "Calls (Converse and Respond) by admission outcome: "
                "admitted, or refused over a limit (see refusals_total for which).", ["outcome"])
REFUSALS = Counter("funchat_orchestrator_refusals_total", "RPCs refused with RESOURCE_EXHAUSTED by the limit hit: "
                   "replica_calls (FUNCHAT_MAX_CALLS), tenant_calls, tenant_rate.", ["reason"])
ERRORS = Counter("funchat_orchestrator_errors_total", "Errors sent to callers (error events or RPC statuses) by "
                 "gRPC status code name.", ["code"])
MODEL_QUEUE = Histogram("funchat_orchestrator_model_queue_seconds",
                        "Time a model-service request waited in the orchestrator before the Triton client was "
                        "called (see funchat/orchestrator/metrics.py: model_queue).", ["service"],
                        buckets=FAST_BUCKETS)
SESSION_STORE = Histogram("funchat_orchestrator_session_store_seconds", "One SessionStore (Redis) operation.",
                          ["op"], buckets=FAST_BUCKETS)
TURNS = Counter("funchat_orchestrator_turns_total", "Turns by mode and how they ended: completed, cancelled, "
                "interrupted, failed.", ["mode", "status"])
KEPT_PREFIX = Counter("funchat_orchestrator_kept_prefix_total", "Prefills by what the model services kept of "
                      "the conversation's last prompt: hit (reused), miss (gone: the whole prompt was sent), none "
                      "(nothing kept: a first turn, a conversation new to this replica); ahead: prefills of the "
                      "next prompt's start made right after a turn.", ["outcome"])
PREFILL_POSITIONS = Counter("funchat_orchestrator_prefill_positions_total", "Prompt positions of turn prefills: "
                            "reused from a kept prefix, or prefilled.", ["kind"])
CALLER_WINDOWS = Counter("funchat_orchestrator_caller_windows_total", "Encoder windows (2 s) of callers' turns handled "
                         "while they spoke: encoded, encoded_again (a louder moment later changed the log-mel floor), "
                         "prefilled (into the kept rows, before the turn ended), held (used at the turn's end), "
                         "stale (found changed by the whole turn's floor at its end: encoded again then), failed "
                         "(a request that failed: the turn is encoded whole at its end).", ["event"])
CALLER_WINDOW_EVENTS = ("encoded", "encoded_again", "prefilled", "held", "stale", "failed")

# The label values known in advance start at 0, so that every series exists from a replica's start
# (rate() and the dashboards see a 0, not "no data"). SessionStore operations register as they are
# decorated; error codes are left to appear.
MODES = ("s2s", "s2t")
TURN_STATUSES = ("completed", "cancelled", "interrupted", "failed")
STAGES = ("audio_tokenizer", "llm_prefill", "llm_step", "refined_head", "vocoder")
SERVICES = ("audio_tokenizer", "llm", "refined_head", "vocoder")
REFUSAL_REASONS = ("replica_calls", "tenant_calls", "tenant_rate")
for _outcome in ("admitted", "refused"):
    CALLS.labels(_outcome)
for _reason in REFUSAL_REASONS:
    REFUSALS.labels(_reason)
FIRST_AUDIO.labels("s2s")  # the only mode with audio
for _mode in MODES:
    for _status in TURN_STATUSES:
        TURNS.labels(_mode, _status)
for _stage in STAGES:
    STAGE.labels(_stage)
for _outcome in ("hit", "miss", "none", "ahead"):
    KEPT_PREFIX.labels(_outcome)
for _kind in ("reused", "prefilled"):
    PREFILL_POSITIONS.labels(_kind)
for _event in CALLER_WINDOW_EVENTS:
    CALLER_WINDOWS.labels(_event)
for _service in SERVICES:
    MODEL_QUEUE.labels(_service)


# ---- updates: never raise into a call ----

_failed: set[str] = set()


def _never_raises(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception:  # a metric must not fail a call; say so once per function, not per update
            if fn.__name__ not in _failed:
                _failed.add(fn.__name__)
                log.exception("metrics: %s failed (logged once; the calls go on)", fn.__name__)
            return None
    return wrapper


@_never_raises
def call_admitted() -> None:
    CALLS.labels("admitted").inc()
    ACTIVE_CALLS.inc()


@_never_raises
def call_refused(reason: str = "replica_calls") -> None:
    """A Converse or Respond refused over a limit (`REFUSAL_REASONS`)."""
    CALLS.labels("refused").inc()
    REFUSALS.labels(reason).inc()


@_never_raises
def request_refused(reason: str) -> None:
    """Another RPC (GetSession, DeleteSession) refused over a limit."""
    REFUSALS.labels(reason).inc()


@_never_raises
def call_ended() -> None:
    ACTIVE_CALLS.dec()


@_never_raises
def task_started() -> None:
    TASKS.inc()


@_never_raises
def task_ended() -> None:
    TASKS.dec()


def spawn(coro, name: str) -> asyncio.Task:
    """asyncio.create_task for the orchestrator's call and turn work, counted in
    funchat_orchestrator_tasks until the task ends, however it ends: a task left behind by a
    failure shows there (the fault tests read it back to 0)."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    task_started()
    task.add_done_callback(lambda _: task_ended())
    return task


@_never_raises
def error_sent(code: str) -> None:
    ERRORS.labels(code).inc()


@contextlib.contextmanager
def unexpected_errors_counted():
    """Count an exception escaping an RPC: Ray Serve answers it with INTERNAL. (A caller going away
    closes the stream with GeneratorExit or CancelledError, which are not errors sent.)"""
    try:
        yield
    except Exception:
        error_sent("INTERNAL")
        raise


@_never_raises
def stage(name: str, seconds: float) -> None:
    STAGE.labels(name).observe(seconds)


@_never_raises
def model_queue(service: str, seconds: float) -> None:
    """Time a model-service request waited inside this replica before the Triton client was called.

    It starts when the turn has the request's inputs. The vocoder's inputs are the speech codes of a
    push, ready when the oldest of them was produced: a reply's pushes go one at a time (each carries
    the stream state the previous one returned), so codes made while a push is out wait for it, and
    then for the event loop to run the vocoder task. audio_tokenizer, llm and refined_head requests
    are issued by the turn's own coroutine the moment their inputs exist, and this orchestrator has
    no concurrency limit or batching in front of them: their wait is only the conversion of the
    inputs into request tensors, near zero. (Waiting inside Triton is Triton's own
    nv_inference_queue_duration_us.)
    """
    MODEL_QUEUE.labels(service).observe(seconds)


@_never_raises
def barge_in(seconds: float) -> None:
    BARGE_IN.observe(seconds)


@_never_raises
def kept_prefix(outcome: str, reused: int, prefilled: int) -> None:
    KEPT_PREFIX.labels(outcome).inc()
    PREFILL_POSITIONS.labels("reused").inc(reused)
    PREFILL_POSITIONS.labels("prefilled").inc(prefilled)


@_never_raises
def caller_windows(event: str, n: int = 1) -> None:
    if n:
        CALLER_WINDOWS.labels(event).inc(n)


@_never_raises
def turn_finished(mode: str, status: str) -> None:
    TURNS.labels(mode, status).inc()


def real_time_factor(generation_s: float, audio_s: float) -> float | None:
    """Generation time over the audio it produced; None for a reply without audio."""
    if audio_s <= 0:
        return None
    return generation_s / audio_s


@_never_raises
def reply_generated(generation_s: float, audio_s: float) -> None:
    ratio = real_time_factor(generation_s, audio_s)
    if ratio is not None:
        REAL_TIME_FACTOR.observe(ratio)


def session_store_op(fn):
    """Time a SessionStore coroutine method; the operation's label is its name. Failed operations
    count too (a Redis timeout is latency)."""
    op = fn.__name__
    SESSION_STORE.labels(op)  # the series exists from the start

    @functools.wraps(fn)
    async def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return await fn(*args, **kwargs)
        finally:
            _session_store(op, time.perf_counter() - started)
    return timed


@_never_raises
def _session_store(op: str, seconds: float) -> None:
    SESSION_STORE.labels(op).observe(seconds)


class PlaybackClock:
    """When a caller playing a reply's audio in real time would run out of it.

    The player starts the first chunk as it arrives and plays without pause; a chunk arriving after
    everything before it has played out is an underrun (the caller hears a gap), and playback goes
    on from that chunk's arrival. Times in seconds, on one clock.
    """

    def __init__(self):
        self.runs_out_at: float | None = None

    def chunk(self, arrived_at: float, duration_s: float) -> bool:
        """A chunk of duration_s arrived; -> whether playback had starved before it."""
        if self.runs_out_at is None:
            self.runs_out_at = arrived_at + duration_s
            return False
        starved = arrived_at > self.runs_out_at
        self.runs_out_at = max(arrived_at, self.runs_out_at) + duration_s
        return starved


class ReplyAudio:
    """One reply's audio as it is sent: its first audio latency, then its underruns."""

    def __init__(self, mode: str, turn_ended_at: float):
        """turn_ended_at: time.perf_counter() when the caller's turn ended."""
        self.mode, self.turn_ended_at = mode, turn_ended_at
        self.clock = PlaybackClock()

    @_never_raises
    def sent(self, duration_s: float, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        if self.clock.runs_out_at is None:
            FIRST_AUDIO.labels(self.mode).observe(now - self.turn_ended_at)
        if self.clock.chunk(now, duration_s):
            UNDERRUNS.inc()


# ---- exposition ----

_LIVE_GAUGE_FILE = re.compile(r"^gauge_live[a-z]+_(\d+)\.db$")  # prometheus-client's file naming


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: running
        return True
    return True


def drop_dead_processes(path: str) -> list[int]:
    """mark_process_dead for every pid with a live gauge file in `path` that no longer runs; -> those pids."""
    dead = sorted({int(m.group(1)) for name in os.listdir(path) if (m := _LIVE_GAUGE_FILE.match(name))
                   and not _pid_running(int(m.group(1)))})
    for pid in dead:
        mark_process_dead(pid, path)
    return dead


class _LiveProcessesCollector(MultiProcessCollector):
    """The directory's metrics, the live gauges of processes that are gone dropped first."""

    def collect(self):
        try:
            drop_dead_processes(self._path)
        except OSError:  # a scrape still answers with what is there
            log.exception("metrics: could not clear dead processes' files in %s", self._path)
        return super().collect()


def exposition_registry(path: str) -> CollectorRegistry:
    """A registry that reads every process's metrics from the multiprocess directory `path`."""
    registry = CollectorRegistry()
    _LiveProcessesCollector(registry, path=path)
    return registry


_PROCESS_DIR = re.compile(r"^funchat-metrics-(\d+)-\w+$")  # funchat-metrics-<pid of its process>-<random>


def new_multiprocess_dir() -> str:
    """A fresh, empty directory for this orchestrator process's replicas, named after the process;
    the caller removes it. Those left by processes that are gone (killed before they could remove
    theirs) are removed first."""
    base = tempfile.gettempdir()
    for name in os.listdir(base):
        m = _PROCESS_DIR.match(name)
        if m and not _pid_running(int(m.group(1))):
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"funchat-metrics-{os.getpid()}-")


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # one line per scrape would drown the replica's log
        pass


def _server_class(family: int) -> type[WSGIServer]:
    class Server(ThreadingWSGIServer):
        address_family = family

        def server_bind(self):
            if family == socket.AF_INET6:  # dual-stack whatever the system default (bindv6only)
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            super().server_bind()
    return Server


def start_exporter(port: int, path: str, host: str = "") -> WSGIServer | None:
    """Serve `/metrics` (the sum of every process's files in `path`) on `host:port` (host "": all
    interfaces) from a daemon thread. -> the server (`shutdown()` stops it), or None when the port
    is already bound (by another replica, or the orchestrator process)."""
    app = make_wsgi_app(exposition_registry(path))
    candidates = (host,) if host else BIND_HOSTS
    for address in candidates:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        try:
            server = make_server(address, port, app, _server_class(family), handler_class=_QuietHandler)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return None
            if exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL) and address != candidates[-1]:
                continue  # no IPv6 here
            raise
        threading.Thread(target=server.serve_forever, name="funchat-metrics-exporter", daemon=True).start()
        return server
    return None


_replica_exporter_started = False


def start_replica_exporter(port: int, rebind_s: float = REBIND_S, host: str = "") -> bool:
    """Called by every replica when it starts: serve this pod's `/metrics` unless something already
    does; if the port is taken, retry every `rebind_s` from a daemon thread. -> whether this replica
    serves it now. Never raises (the replica serves calls without metrics rather than not at all)."""
    global _replica_exporter_started
    path = multiprocess_dir()
    if not port or _replica_exporter_started:
        return False
    if path is None:
        log.warning("metrics: %s is not set in this replica's environment (the application's runtime_env "
                    "sets it): no /metrics from it", MULTIPROC_ENV)
        return False
    _replica_exporter_started = True
    try:
        if start_exporter(port, path, host) is not None:
            return True
    except Exception:  # e.g. a port below 1024 without the right: no metrics, the calls go on
        log.exception("metrics: cannot serve /metrics on port %d", port)
        return False

    def keep_trying():
        while True:
            time.sleep(rebind_s)
            try:
                if start_exporter(port, path, host) is not None:
                    log.info("metrics: this replica now serves /metrics on port %d", port)
                    return
            except Exception:
                log.exception("metrics: cannot serve /metrics on port %d", port)
                return

    threading.Thread(target=keep_trying, name="funchat-metrics-rebind", daemon=True).start()
    return False
