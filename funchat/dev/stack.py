"""`make up` / `make down`: redis-server, the four Triton model services and the Ray Serve orchestrator
on 127.0.0.1, in the background.

    python -m funchat.dev.stack up [--checkpoint DIR] [--grpc-port P] [--timeout S]
    python -m funchat.dev.stack status
    python -m funchat.dev.stack restart SERVICE
    python -m funchat.dev.stack down

redis-server keeps an append-only file in `<run_dir>/redis/` (as the chart's does), so sessions
survive its restart. `up` returns when every part answers (Redis PING, Triton model readiness, the API's gRPC health
check) and writes `<run_dir>/endpoints.json`: each model service, `"orchestrator"` (the public
gRPC API), `"realtime"` (the OpenAI Realtime-compatible WebSocket, a ws:// URL), `"web"` (the web
page), `"orchestrator_metrics"` (its Prometheus /metrics, host:port), `"redis"` and `"checkpoint"`
(the directory in use). The parts' pids go to
`<run_dir>/stack.json`, which `down` reads. A resume-token key is created once in
`<run_dir>/resume_secret` (mode 0600); the orchestrator reads it there (FUNCHAT_RESUME_SECRET_FILE).

redis-server asks for a password and speaks TLS only (funchat.dev.redis_server: the password made
once in `<run_dir>/redis_password`, a local CA and certificate in `<run_dir>/tls/`, both mode 0600
where secret); the orchestrator gets `rediss://127.0.0.1:PORT/0`, FUNCHAT_REDIS_CA_FILE and the
password as FUNCHAT_REDIS_PASSWORD (never in the URL); endpoints.json names the CA and the password's
file ("redis_ca_file", "redis_password_file"). Nothing but the public API listens beyond loopback
(LOOPBACK_ENV says how, and what guards the ports Ray binds on all interfaces).

API keys: the first `up` creates the key file `<run_dir>/api_keys` with one key for the tenant
"dev" (funchat.api_keys.create_key) and writes that key to `<run_dir>/api_key` (mode 0600); later
`up`s keep both (delete them for a new key). The orchestrator authenticates every call against the
key file (FUNCHAT_API_KEYS_FILE, re-read when it changes: `funchat keys create --tenant NAME
--keys-file .run/api_keys` adds keys to the running stack); endpoints.json names the key's file
("api_key_file"); `up` prints how to use it (`export FUNCHAT_API_KEY=$(cat .run/api_key)`), and its
own health checks, `make run`'s demo and `make loadtest` read it from there. With FUNCHAT_AUTH=off
in this shell the orchestrator takes calls without a key (the files are made all the same).

The orchestrator's settings are FUNCHAT_* environment variables (services/orchestrator/README.md):
the ones set in this shell are passed on (not FUNCHAT_API_KEY, a client's), the stack sets
checkpoint, endpoints, Redis, ports and the key file.

`restart SERVICE` (`make restart SERVICE=...`) stops one part of the running stack (whether it still
runs or has crashed) and starts it again on the same port(s) with the same settings, then waits until
it is ready as `up` does: `redis` (the same append-only file: sessions survive), a model service
(`audio_tokenizer`, `llm`, `refined_head`, `vocoder`: the same model repository,
`funchat.dev.tritonserver.restart_server`) or `orchestrator` (the process `up` started, with the
settings `up` recorded in stack.json: its FUNCHAT_* variables, secrets excepted, which come from this
shell as they came from `up`'s). The new pids go to stack.json / triton/pids.json; endpoints.json
does not change.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from funchat.dev.redis_server import ensure_password, start_redis
from funchat.dev.tritonserver import PROJECT_ROOT
from funchat.dev.tritonserver import _alive, free_port, stop_pids, tail
from funchat.orchestrator.settings import ModelEndpoints, OrchestratorSettings, env_name

DEFAULT_RUN_DIR = PROJECT_ROOT / ".run"
DEFAULT_GRPC_PORT = OrchestratorSettings.model_fields["grpc_port"].default  # the orchestrator's own default
DEFAULT_HTTP_PORT = OrchestratorSettings.model_fields["http_port"].default  # the Realtime WebSocket, the web page
STACK_FILE = "stack.json"
HOST = "127.0.0.1"
MODEL_SERVICES = tuple(ModelEndpoints.model_fields)  # audio_tokenizer, llm, refined_head, vocoder
SERVICES = ("redis", *MODEL_SERVICES, "orchestrator")  # what `restart` restarts
# The orchestrator's secret settings are not written to stack.json: a restart takes them from its own
# environment, as `up` did
SECRET_VARIABLES = frozenset(env_name(name) for name, f in OrchestratorSettings.model_fields.items()
                             if f.annotation is SecretStr)


# make up's redis-server: AUTH (a password made once in <run_dir>/redis_password) and TLS only
# (certificates made once in <run_dir>/tls/); `restart redis` starts it the same way
REDIS_SECURITY = {"auth": True, "tls": True}
# What keeps the stack's own ports on loopback (the tritonservers and redis-server bind 127.0.0.1 by
# their flags): with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (no multi-machine cluster) Ray takes
# 127.0.0.1 as this node's address, so its GCS, raylet, agents and workers listen there (ray.init's
# _node_ip_address cannot: it turns 127.0.0.1 into the machine's address); FUNCHAT_METRICS_HOST does
# it for /metrics. Two ports Ray binds on all interfaces whatever it is told: Serve's gRPC proxy (the
# public API: our API keys guard it) and each replica's own gRPC server, guarded by Ray's token
# authentication (its default for a new local cluster, made explicit here). See
# tests/integration/make_up/test_local_stack_exposure.py.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token", "FUNCHAT_METRICS_HOST": HOST}


class StackError(RuntimeError):
    pass


def resume_secret_file(run_dir: Path) -> Path:
    """<run_dir>/resume_secret, created once (mode 0600) so sessions resume across `make up`s."""
    path = run_dir / "resume_secret"
    if not path.exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_hex(32))
    return path


API_KEYS_FILE = "api_keys"  # the key file the orchestrator reads
API_KEY_FILE = "api_key"    # the dev tenant's key, for the clients
DEV_TENANT = "dev"


def api_key_files(run_dir: Path) -> tuple[Path, Path]:
    """(<run_dir>/api_keys, <run_dir>/api_key): the key file and a key of tenant "dev" in it, created
    once (mode 0600) so that the key stays valid across `make up`s. When either is missing a new key
    is made (added to the key file, or to a new one)."""
    from funchat.api_keys import create_key

    keys_file, key_file = run_dir / API_KEYS_FILE, run_dir / API_KEY_FILE
    if keys_file.exists() and key_file.exists() and key_file.read_text().strip():
        return keys_file, key_file
    run_dir.mkdir(parents=True, exist_ok=True)
    key, _ = create_key(keys_file, DEV_TENANT)
    key_file.unlink(missing_ok=True)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return keys_file, key_file


def read_api_key(run_dir: Path) -> str:
    """The local stack's key (<run_dir>/api_key), "" when there is none."""
    try:
        return (run_dir / API_KEY_FILE).read_text().strip()
    except OSError:
        return ""


async def _health(target: str, timeout: float = 2.0, api_key: str | None = None) -> bool:
    from funchat.client import AsyncClient, FunchatClientError
    try:
        async with AsyncClient(target, timeout=timeout, api_key=api_key) as client:
            return await client.health()
    except FunchatClientError:  # e.g. Ray's proxy up before the application: not ready yet
        return False


def api_healthy(target: str, timeout: float = 2.0, api_key: str | None = None) -> bool:
    """The API's gRPC health check says SERVING (it needs no key; api_key, None: FUNCHAT_API_KEY)."""
    return asyncio.run(_health(target, timeout, api_key))


@dataclass
class OrchestratorProcess:
    pid: int
    grpc_port: int
    log: Path
    metrics_port: int = 0
    http_port: int = 0

    @property
    def target(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    @property
    def metrics_target(self) -> str:
        """host:port of its Prometheus /metrics (all replicas)."""
        return f"{HOST}:{self.metrics_port}"

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (Serve and Ray shut down cleanly), then SIGKILL the whole process group."""
        if not _alive(self.pid):
            return
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _alive(self.pid):
            try:
                os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.2)
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def kill(self) -> None:
        """Crash it: SIGKILL the process group (the way a lost node looks)."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


def start_orchestrator(run_dir: Path, env: dict[str, str], grpc_port: int, timeout: float = 180.0,
                       metrics_port: int | None = None, api_key: str | None = None,
                       http_port: int | None = None) -> OrchestratorProcess:
    """Start `python -m funchat.orchestrator.app` in its own process group; wait for its health check.
    env: its FUNCHAT_* settings (checkpoint, endpoints, redis_url, the resume secret, the API key
    file FUNCHAT_API_KEYS_FILE or FUNCHAT_AUTH=off, ...), over this process's environment (less
    FUNCHAT_API_KEY: a client's key is no server's business); the gRPC port is `grpc_port`, Ray's HTTP
    proxy and /metrics get free ports unless `http_port` / `metrics_port` are given. api_key: the key the
    health check sends (None: FUNCHAT_API_KEY; the check needs none)."""
    from funchat.client.auth import API_KEY_ENV

    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "orchestrator.log"
    metrics_port = free_port() if metrics_port is None else metrics_port
    http_port = free_port() if http_port is None else http_port
    full_env = {**os.environ, **env, "FUNCHAT_GRPC_PORT": str(grpc_port), "FUNCHAT_HTTP_PORT": str(http_port),
                "FUNCHAT_METRICS_PORT": str(metrics_port), "PYTHONUNBUFFERED": "1", **LOOPBACK_ENV}
    full_env.pop(API_KEY_ENV, None)
    venv_bin = str(Path(sys.executable).parent)
    full_env["PATH"] = venv_bin + os.pathsep + full_env.get("PATH", "")
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "funchat.orchestrator.app"],
                                stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=str(PROJECT_ROOT),
                                start_new_session=True)
    orch = OrchestratorProcess(proc.pid, grpc_port, log, metrics_port, http_port)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"the orchestrator exited with code {proc.returncode}; log {log}:\n{tail(log)}")
        if api_healthy(orch.target, api_key=api_key):
            return orch
        time.sleep(0.5)
    orch.stop()
    raise StackError(f"the orchestrator did not become healthy on {orch.target} in {timeout:g} s; log {log}:\n"
                     f"{tail(log)}")


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def cmd_up(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir).resolve()
    checkpoint = Path(args.checkpoint).resolve()
    state = _read(run_dir / STACK_FILE)
    if any(state.get(k) and _alive(state[k]) for k in ("redis_pid", "orchestrator_pid")):
        print(f"the stack is already running ({run_dir / STACK_FILE}); run `make down` first", file=sys.stderr)
        return 1
    started: dict = {"run_dir": str(run_dir)}
    redis = None
    try:
        # the append-only file on, as in the chart: sessions survive a redis-server restart
        redis = start_redis(run_dir, port=args.redis_port or None, persist=True, **REDIS_SECURITY)
        started.update(redis_pid=redis.pid, redis_url=redis.url, redis_port=redis.port)
        print(f"redis-server      {redis.url}  pid {redis.pid}", flush=True)
        # one torch thread per service: on a small CPU machine the four services and the orchestrator
        # share the cores (a GPU deployment sets its own parameters)
        rc = subprocess.call([sys.executable, "-m", "funchat.dev.tritonserver", "up", "--checkpoint",
                              str(checkpoint), "--run-dir", str(run_dir), "--timeout", str(args.timeout),
                              "--param", f"threads={args.threads}"])
        if rc != 0:
            raise StackError("the Triton model services did not start (see above)")
        endpoints = _read(run_dir / "endpoints.json")
        env = {"FUNCHAT_CHECKPOINT": str(checkpoint), "FUNCHAT_REDIS_URL": redis.url,
               # the password in the environment, not in the URL (which logs and Ray's records show)
               "FUNCHAT_REDIS_PASSWORD": redis.password, "FUNCHAT_REDIS_CA_FILE": str(redis.ca_file),
               "FUNCHAT_ENDPOINTS": json.dumps({k: endpoints[k] for k in ModelEndpoints.model_fields}),
               # the key is the file; a FUNCHAT_RESUME_SECRET inherited from the shell would conflict
               "FUNCHAT_RESUME_SECRET_FILE": str(resume_secret_file(run_dir)), "FUNCHAT_RESUME_SECRET": ""}
        keys_file, key_file = api_key_files(run_dir)
        env["FUNCHAT_API_KEYS_FILE"] = str(keys_file)
        if args.replicas is not None:
            env["FUNCHAT_REPLICAS"] = str(args.replicas)
        orch = start_orchestrator(run_dir, env, args.grpc_port, args.timeout, api_key=read_api_key(run_dir),
                                  http_port=args.http_port or None)
        started.update(orchestrator_pid=orch.pid, orchestrator=_orchestrator_record(orch, env))
        realtime = f"ws://{HOST}:{orch.http_port}/v1/realtime"
        web = f"http://{HOST}:{orch.http_port}/"
        print(f"orchestrator      {orch.target} (Ray Serve gRPC)  pid {orch.pid}  log {orch.log}", flush=True)
        model = os.environ.get("FUNCHAT_MODEL_NAME") or OrchestratorSettings.model_fields["model_name"].default
        print(f"orchestrator      {realtime}?model={model} (OpenAI Realtime WebSocket)", flush=True)
        print(f"orchestrator      {web} (web page: talk to the model from the microphone)", flush=True)
        print(f"orchestrator      http://{orch.metrics_target}/metrics (Prometheus, all replicas)", flush=True)
        endpoints.update(orchestrator=orch.target, realtime=realtime, web=web,
                         orchestrator_metrics=orch.metrics_target, redis=redis.url,
                         redis_ca_file=str(redis.ca_file), redis_password_file=str(run_dir / "redis_password"),
                         checkpoint=str(checkpoint), api_key_file=str(key_file))
        (run_dir / "endpoints.json").write_text(json.dumps(endpoints, indent=2) + "\n")
        (run_dir / STACK_FILE).write_text(json.dumps(started, indent=2) + "\n")
        print(f"endpoints: {run_dir / 'endpoints.json'}")
        print(f"api key           {_shown(key_file)} (tenant {DEV_TENANT}; key file {_shown(keys_file)}); "
              f"for funchat chat/call and your clients:\n"
              f"                  export FUNCHAT_API_KEY=$(cat {_shown(key_file)})")
        return 0
    except Exception as exc:  # leave nothing half-started behind
        print(f"error: {exc}", file=sys.stderr)
        (run_dir / STACK_FILE).write_text(json.dumps(started, indent=2) + "\n")
        cmd_down(args)
        return 2


def _shown(path: Path) -> str:
    """`path` relative to the working directory when it is below it (.run/api_key), else absolute."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def cmd_down(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir).resolve()
    state = _read(run_dir / STACK_FILE)
    pid = state.get("orchestrator_pid")
    if pid and _alive(pid):
        OrchestratorProcess(pid, 0, run_dir / "orchestrator.log").stop()
        print("orchestrator      stopped")
    subprocess.call([sys.executable, "-m", "funchat.dev.tritonserver", "down", "--run-dir", str(run_dir)])
    pid = state.get("redis_pid")
    if pid and _alive(pid):
        stop_pids([pid], timeout=10)
        print("redis-server      stopped")
    (run_dir / STACK_FILE).unlink(missing_ok=True)
    return 0


def _orchestrator_record(orch: OrchestratorProcess, env: dict[str, str]) -> dict:
    """What `restart orchestrator` needs to start it again the same way: its ports and its settings
    (the FUNCHAT_* variables of this shell and the stack's own, secrets and the client's key left out)."""
    from funchat.client.auth import API_KEY_ENV

    shell = {k: v for k, v in os.environ.items() if k.startswith("FUNCHAT_") and k != API_KEY_ENV}
    settings = {k: v for k, v in {**shell, **env}.items() if k not in SECRET_VARIABLES}
    return {"grpc_port": orch.grpc_port, "metrics_port": orch.metrics_port, "http_port": orch.http_port,
            "env": settings}


def _running_state(run_dir: Path) -> dict:
    """stack.json of the stack `up` started in run_dir; StackError when there is none."""
    state = _read(run_dir / STACK_FILE)
    if not state:
        raise StackError(f"no stack is running in {run_dir} (no {STACK_FILE}): start it with `make up`")
    return state


def _is_process(pid: int | None, name: str) -> bool:
    """pid is alive and runs `name` (a pid recorded long ago may have been reused)."""
    if not pid or not _alive(pid):
        return False
    try:
        return name.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def restart_redis(run_dir: Path, state: dict) -> int:
    """redis-server again on its port, with the same append-only file (sessions survive); -> its pid."""
    from urllib.parse import urlparse

    port = state.get("redis_port") or urlparse(state.get("redis_url", "")).port
    if not port:
        raise StackError(f"{run_dir / STACK_FILE} records no redis-server port: run `make down` and `make up`")
    if _is_process(state.get("redis_pid"), "redis-server"):
        stop_pids([state["redis_pid"]], timeout=10)  # SIGTERM: redis fsyncs its append-only file
    redis = start_redis(run_dir, port=port, persist=True, **REDIS_SECURITY)
    return redis.pid


def restart_orchestrator(run_dir: Path, state: dict, timeout: float) -> int:
    """The orchestrator process (its whole process group: Ray, Serve, the replicas) stopped and started
    again with the ports and settings `up` recorded; -> its pid once its health check answers."""
    record = state.get("orchestrator")
    if not record:
        raise StackError(f"{run_dir / STACK_FILE} records no orchestrator settings: run `make down` and `make up`")
    old = OrchestratorProcess(state.get("orchestrator_pid") or 0, record["grpc_port"], run_dir / "orchestrator.log")
    if old.pid:
        old.stop()
        old.kill()  # what a crash left of its group (Ray's processes) would hold the ports
    env = {**record["env"], "FUNCHAT_REDIS_PASSWORD": ensure_password(run_dir)}  # a secret: not in stack.json
    orch = start_orchestrator(run_dir, env, record["grpc_port"], timeout,
                              metrics_port=record["metrics_port"], http_port=record["http_port"],
                              api_key=read_api_key(run_dir))
    return orch.pid


def cmd_restart(args: argparse.Namespace) -> int:
    from funchat.dev.tritonserver import TritonServerError, restart_server

    run_dir = Path(args.run_dir).resolve()
    service = args.service
    t0 = time.monotonic()
    try:
        state = _running_state(run_dir)
        if service == "redis":
            state["redis_pid"] = pid = restart_redis(run_dir, state)
        elif service == "orchestrator":
            state["orchestrator_pid"] = pid = restart_orchestrator(run_dir, state, args.timeout)
        else:
            pid = restart_server(run_dir, service, timeout=args.timeout).pid
    except (StackError, TritonServerError, RuntimeError) as exc:  # RuntimeError: redis-server's start
        print(f"error: restart {service}: {exc}", file=sys.stderr)
        return 2
    if service in ("redis", "orchestrator"):
        (run_dir / STACK_FILE).write_text(json.dumps(state, indent=2) + "\n")
    print(f"{service:17s} restarted  pid {pid}  ready after {time.monotonic() - t0:.1f} s", flush=True)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir).resolve()
    state = _read(run_dir / STACK_FILE)
    endpoints = _read(run_dir / "endpoints.json")
    for name, key in (("redis-server", "redis_pid"), ("orchestrator", "orchestrator_pid")):
        pid = state.get(key)
        print(f"{name:17s} {'running' if pid and _alive(pid) else 'stopped'}" + (f"  pid {pid}" if pid else ""))
    if endpoints.get("orchestrator"):
        ok = api_healthy(endpoints["orchestrator"], api_key=read_api_key(run_dir))
        print(f"api               {endpoints['orchestrator']}  {'SERVING' if ok else 'not serving'}")
    return subprocess.call([sys.executable, "-m", "funchat.dev.tritonserver", "status", "--run-dir", str(run_dir)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m funchat.dev.stack", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up")
    up.add_argument("--checkpoint", default=str(PROJECT_ROOT / "checkpoints" / "tiny"))
    up.add_argument("--grpc-port", type=int, default=DEFAULT_GRPC_PORT)
    up.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT,
                    help="the Realtime WebSocket /v1/realtime and the web page (0: a free port)")
    up.add_argument("--redis-port", type=int, default=0, help="default: a free port")
    up.add_argument("--replicas", type=int, default=None, help="orchestrator replicas (default: FUNCHAT_REPLICAS "
                                                              "or the orchestrator's default)")
    up.add_argument("--timeout", type=float, default=180.0)
    up.add_argument("--threads", type=int, default=1, help="torch threads per model service (0 = torch default)")
    down = sub.add_parser("down")
    status = sub.add_parser("status")
    restart = sub.add_parser("restart", help="restart one part of the running stack on the same ports")
    restart.add_argument("service", metavar="SERVICE", choices=SERVICES, help=" | ".join(SERVICES))
    restart.add_argument("--timeout", type=float, default=180.0, help="seconds to wait until it is ready")
    for p in (up, down, status, restart):
        p.add_argument("--run-dir", default=str(DEFAULT_RUN_DIR))
    args = ap.parse_args(argv)
    return {"up": cmd_up, "down": cmd_down, "status": cmd_status, "restart": cmd_restart}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
