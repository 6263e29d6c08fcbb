"""Run the model services: one `tritonserver` process per model, each on its own 127.0.0.1 ports.

The `tritonserver` binary (2.51) and its Python backend come from the `nvidia-pytriton` wheel in the
venv; nothing is installed system-wide. For each requested model we

1. copy the Python backend (`libtriton_python.so`, `triton_python_backend_utils.py` and the
   `triton_python_backend_stub` built for this Python) into `<run_dir>/triton/backends/python/`;
2. write a one-model repository `<run_dir>/triton/repos/<model>/<model>/` (the model's `1/` folder
   copied, its `config.pbtxt` rewritten with the parameter overrides and relative path parameters
   (`checkpoint`, `tensorrt_plans`) made absolute against the project root, i.e. the parent of
   `services/`: the services themselves take a relative path from tritonserver's working directory);
3. start `tritonserver` on free (or given) ports with its log in `<run_dir>/triton/<model>.log`,
   and wait until the server and the model are ready (a load failure is reported at once, with the
   model's error and the log's tail);
4. write `<run_dir>/endpoints.json` (`{"audio_tokenizer": "127.0.0.1:PORT", ...}`, the gRPC
   endpoints) and `<run_dir>/triton/servers.json` (per model: grpc/http/metrics ports, pid, log).

Python: `with start_servers(["vocoder"]) as cluster: cluster.endpoints["vocoder"]`.
Command line (`up` returns once every model is ready and leaves the servers running; their pids go
to `<run_dir>/triton/pids.json`, which `down` reads):

    python -m funchat.dev.tritonserver up [--models audio_tokenizer vocoder] [--checkpoint DIR]
        [--device cpu|cuda] [--param MODEL.KEY=VALUE ...] [--base-port N] [--timeout S]
    python -m funchat.dev.tritonserver status
    python -m funchat.dev.tritonserver down [--models ...]

`restart_server(run_dir, model)` starts one of the servers `up` started again, on the same ports with
the same model repository (what `make restart SERVICE=<model>` runs: `funchat.dev.stack`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

# The wheel's tritonserver and a model folder configured for one server (re-exported: the launcher's API).
from funchat.engines.triton_server import (MODELS, PATH_PARAMS, TritonInstall, TritonServerError,  # noqa: F401
                                           available_models, find_triton, prepare_model_repo)
from funchat.engines.triton_server import server_env as triton_server_env

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_REPO = PROJECT_ROOT / "services"  # the four model folders (config.pbtxt + 1/model.py)
DEFAULT_RUN_DIR = PROJECT_ROOT / ".run"
HOST = "127.0.0.1"
ENDPOINTS_FILE = "endpoints.json"  # in run_dir: {model: "127.0.0.1:GRPC_PORT"}
SERVERS_FILE = "servers.json"  # in run_dir/triton: {model: {grpc_port, http_port, metrics_port, pid, log}}
PIDS_FILE = "pids.json"  # in run_dir/triton: {model: pid} of servers left running by `up`


def prepare_backend_dir(install: TritonInstall, run_dir: Path) -> Path:
    """`<run_dir>/triton/backends` holding `python/` (copied only when changed, atomically, so running
    servers keep the files they mapped)."""
    backends = Path(run_dir) / "triton" / "backends"
    target = backends / "python"
    target.mkdir(parents=True, exist_ok=True)
    for src in install.backend_files:
        dst = target / src.name
        if dst.exists() and dst.stat().st_size == src.stat().st_size and dst.stat().st_mtime >= src.stat().st_mtime:
            continue
        tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
        shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    return backends


def server_env(install: TritonInstall) -> dict[str, str]:
    """The server's environment, with the checkout first on PYTHONPATH (its model.py files import funchat)."""
    env = triton_server_env(install)
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


# ---- per-server model repository ----

# ---- processes ----

# Listening ports are picked below the kernel's ephemeral range: a port the OS picked (bind to 0) is
# free now, but in the seconds before its server binds it an outgoing connection of the stack (Ray,
# Redis, gRPC clients) may take it as its source port (seen in CI). 20000 is above Ray's worker ports.
PICK_MIN = 20000
_picked: set[int] = set()  # handed out by this process: never twice


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))  # the wildcard: some servers of the stack bind it
            return True
        except OSError:
            return False


def free_port() -> int:
    """A TCP port no one listens on, outside the ephemeral range when that leaves room."""
    high = _ephemeral_low() - 1
    if high - PICK_MIN >= 1000:
        for _ in range(200):
            port = random.randint(PICK_MIN, high)
            if port not in _picked and _bindable(port):
                _picked.add(port)
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass
class Server:
    model: str
    grpc_port: int
    http_port: int
    metrics_port: int
    log: Path
    repo: Path
    pid: int = 0
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def grpc(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    @property
    def http(self) -> str:
        return f"{HOST}:{self.http_port}"

    def info(self) -> dict:
        return {"grpc": self.grpc, "http": self.http, "metrics": f"{HOST}:{self.metrics_port}",
                "grpc_port": self.grpc_port, "http_port": self.http_port, "metrics_port": self.metrics_port,
                "pid": self.pid, "log": str(self.log), "repo": str(self.repo)}


def _command(install: TritonInstall, server: Server, backends: Path, exit_timeout_s: int) -> list[str]:
    return [str(install.binary), f"--model-repository={server.repo}", f"--backend-directory={backends}",
            "--exit-on-error=false", "--strict-readiness=true", f"--exit-timeout-secs={exit_timeout_s}",
            "--model-control-mode=explicit", f"--load-model={server.model}",
            f"--grpc-address={HOST}", f"--grpc-port={server.grpc_port}",
            f"--http-address={HOST}", f"--http-port={server.http_port}",
            f"--metrics-address={HOST}", f"--metrics-port={server.metrics_port}", "--allow-gpu-metrics=false"]


def _launch(install: TritonInstall, server: Server, backends: Path, env: dict[str, str],
            exit_timeout_s: int) -> None:
    server.log.parent.mkdir(parents=True, exist_ok=True)
    with open(server.log, "ab") as log:
        log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {server.model} "
                  f"(grpc {server.grpc_port}, http {server.http_port}, metrics {server.metrics_port})\n".encode())
        log.flush()
        # Own session: `up` can leave it running after we exit, and stop() can signal its whole group
        # (tritonserver and its Python backend stubs).
        server.process = subprocess.Popen(_command(install, server, backends, exit_timeout_s), stdin=subprocess.DEVNULL,
                                          stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(PROJECT_ROOT),
                                          start_new_session=True)
    server.pid = server.process.pid


def _http(server: Server, method: str, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://{server.http}{path}", method=method, data=b"{}" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def _is_tritonserver(pid: int) -> bool:
    try:
        return b"tritonserver" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def stop_pids(pids: Iterable[int], timeout: float = 20.0) -> None:
    """SIGTERM each server's process group, wait up to `timeout`, then SIGKILL what is left."""
    pids = [p for p in pids if p and _alive(p)]

    def signal_group(pid: int, sig: int) -> None:
        try:
            os.killpg(pid, sig)  # each server leads its own session/group (start_new_session)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    for pid in pids:  # the server alone: it finalizes its models and stops its backend stubs itself
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        for p in pids:
            try:
                os.waitpid(p, os.WNOHANG)  # reap our own children
            except ChildProcessError:
                pass
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            signal_group(pid, signal.SIGKILL)
    for pid in pids:  # the stubs: any of the group still there after the server went
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if pids:
        remove_stale_shm_regions()


SHM_DIR = Path("/dev/shm")
SHM_REGION_PREFIX = "triton_python_backend_shm_region_"


def _mapped_shm_names(shm_dir: Path = SHM_DIR) -> set[str] | None:
    """The files of `shm_dir` some process maps; None when a Triton process's maps could not be read."""
    names: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            maps = (proc / "maps").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue  # it ended meanwhile
        except PermissionError:  # not ours (e.g. the init of a sandbox): it matters only if it is Triton's
            try:
                name = (proc / "comm").read_text().strip()
            except OSError:
                return None
            if name.startswith(("tritonserver", "triton_python")):
                return None
            continue
        for line in maps.splitlines():
            where = line.find(f"{shm_dir}/")
            if where >= 0:
                names.add(line[where + len(str(shm_dir)) + 1:].split()[0])
    return names


def remove_stale_shm_regions(min_age_s: float = 30.0, shm_dir: Path = SHM_DIR) -> list[str]:
    """Remove the Python backend's shared-memory regions that no process maps any more. A server
    stopped by SIGKILL (or killed by a test) cannot unlink its region, and each one left holds its
    size of the machine's RAM in tmpfs until reboot. Only our own regions older than `min_age_s`
    go (a server creating one right now maps it at once), and nothing goes when some process's
    mappings cannot be read. Returns the names removed."""
    try:
        candidates = [f for f in shm_dir.glob(SHM_REGION_PREFIX + "*")
                      if f.stat().st_uid == os.getuid() and time.time() - f.stat().st_mtime > min_age_s]
    except FileNotFoundError:
        return []
    if not candidates:
        return []
    mapped = _mapped_shm_names(shm_dir)
    if mapped is None:
        return []
    removed = []
    for f in candidates:
        if f.name not in mapped:
            try:
                f.unlink()
                removed.append(f.name)
            except FileNotFoundError:
                pass
    return removed


class Cluster:
    """Running tritonservers, one per model. A context manager: leaving it stops them."""

    def __init__(self, servers: dict[str, Server], run_dir: Path):
        self.servers = servers
        self.run_dir = Path(run_dir)

    @property
    def endpoints(self) -> dict[str, str]:
        """model -> gRPC endpoint "127.0.0.1:PORT"."""
        return {m: s.grpc for m, s in self.servers.items()}

    @property
    def http_endpoints(self) -> dict[str, str]:
        return {m: s.http for m, s in self.servers.items()}

    @property
    def metrics_endpoints(self) -> dict[str, str]:
        return {m: f"{HOST}:{s.metrics_port}" for m, s in self.servers.items()}

    @property
    def pids(self) -> dict[str, int]:
        return {m: s.pid for m, s in self.servers.items()}

    def log_tail(self, model: str, lines: int = 60) -> str:
        return tail(self.servers[model].log, lines)

    def logs(self, lines: int = 200) -> str:
        return "\n".join(f"---- {m}: {s.log} ----\n{tail(s.log, lines)}" for m, s in self.servers.items())

    def alive(self, model: str) -> bool:
        s = self.servers[model]
        return s.process.poll() is None if s.process is not None else _alive(s.pid)

    def restart(self, model: str, timeout: float = 120.0, exit_timeout_s: int = 10) -> None:
        """Stop one model's server and start it again on the same ports (its in-memory state, e.g. the
        llm's KV caches, is gone): what a replica restart looks like to its callers."""
        server = self.servers[model]
        stop_pids([server.pid], timeout=20.0)
        if server.process is not None:
            try:
                server.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        install = find_triton()
        _launch(install, server, prepare_backend_dir(install, self.run_dir), server_env(install), exit_timeout_s)
        wait_ready([server], timeout)
        remove_stale_shm_regions()  # the old server's, if it was killed before this restart
        self.write_files()

    def write_files(self) -> None:
        write_run_files(self.run_dir, {m: s.info() for m, s in self.servers.items()})

    def stop(self, timeout: float = 20.0) -> None:
        stop_pids([s.pid for s in self.servers.values()], timeout)
        for s in self.servers.values():
            if s.process is not None:
                try:
                    s.process.wait(timeout=1)
                except subprocess.TimeoutExpired:
                    pass
        remove_run_entries(self.run_dir, list(self.servers))

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ---- run files ----

def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def write_run_files(run_dir: Path, infos: dict[str, dict], pids: bool = False) -> None:
    """Merge these servers into endpoints.json and triton/servers.json (and triton/pids.json)."""
    run_dir = Path(run_dir)
    endpoints = _read_json(run_dir / ENDPOINTS_FILE)
    servers = _read_json(run_dir / "triton" / SERVERS_FILE)
    for model, info in infos.items():
        endpoints[model] = info["grpc"]
        servers[model] = info
    _write_json(run_dir / ENDPOINTS_FILE, endpoints)
    _write_json(run_dir / "triton" / SERVERS_FILE, servers)
    if pids:
        recorded = _read_json(run_dir / "triton" / PIDS_FILE)
        recorded.update({m: info["pid"] for m, info in infos.items()})
        _write_json(run_dir / "triton" / PIDS_FILE, recorded)


def remove_run_entries(run_dir: Path, models: list[str]) -> None:
    run_dir = Path(run_dir)
    for path in (run_dir / ENDPOINTS_FILE, run_dir / "triton" / SERVERS_FILE, run_dir / "triton" / PIDS_FILE):
        if not path.exists():
            continue
        data = _read_json(path)
        for m in models:
            data.pop(m, None)
        if data:
            _write_json(path, data)
        else:
            path.unlink(missing_ok=True)


# ---- start ----

def _model_state(server: Server) -> tuple[str, str]:
    """(state, reason) of the model from the repository index ('' when the server does not answer)."""
    code, body = _http(server, "POST", "/v2/repository/index")
    if code != 200:
        return "", ""
    try:
        for entry in json.loads(body):
            if entry.get("name") == server.model:
                return entry.get("state", ""), entry.get("reason", "")
    except ValueError:
        pass
    return "", ""


def _bind_failed(log: Path) -> bool:
    text = tail(log, 30).lower()
    return "address already in use" in text or "failed to listen" in text or "failed to start" in text


def wait_ready(servers: list[Server], timeout: float) -> None:
    """Until every server answers /v2/health/ready and its model is ready; raises on exit, load failure
    or timeout (the message holds the reason and the log's tail)."""
    pending = {s.model: s for s in servers}
    deadline = time.monotonic() + timeout
    while pending:
        for model, s in list(pending.items()):
            code = s.process.poll() if s.process is not None else None
            if code is not None:
                raise TritonServerError(f"tritonserver for {model} exited with code {code} before it was ready "
                                        f"(log {s.log}):\n{tail(s.log)}")
            if _http(s, "GET", f"/v2/models/{model}/ready")[0] == 200 and _http(s, "GET", "/v2/health/ready")[0] == 200:
                del pending[model]
                continue
            state, reason = _model_state(s)
            if state == "UNAVAILABLE" and reason and reason != "unloaded":
                raise TritonServerError(f"model {model} failed to load: {reason}\n(log {s.log}):\n{tail(s.log)}")
        if not pending:
            break
        if time.monotonic() > deadline:
            names = ", ".join(pending)
            raise TritonServerError(f"not ready after {timeout:.0f} s: {names}\n"
                                    + "\n".join(f"---- {s.log}:\n{tail(s.log)}" for s in pending.values()))
        time.sleep(0.1)


def start_servers(models: Iterable[str] | None = None, repo: str | Path = DEFAULT_REPO,
                  run_dir: str | Path = DEFAULT_RUN_DIR, params: Mapping[str, Mapping[str, str]] | None = None,
                  ports: Mapping[str, tuple[int, int, int]] | None = None, timeout: float = 120.0,
                  exit_timeout_s: int = 10, config_name: str | None = None) -> Cluster:
    """Start one tritonserver per model and wait until all are ready.

    models: names in `repo` (default: every model there). params: per model, config parameters to set,
    e.g. {"vocoder": {"checkpoint": "/tmp/ckpt"}}; the key "*" applies to every model. ports: per model
    (grpc, http, metrics); others get free ports. Writes `<run_dir>/endpoints.json` and
    `<run_dir>/triton/servers.json`; logs go to `<run_dir>/triton/<model>.log`.
    """
    repo, run_dir = Path(repo).resolve(), Path(run_dir).resolve()
    models = list(models) if models is not None else available_models(repo)
    if not models:
        raise TritonServerError(f"no models to start (none in {repo})")
    if len(set(models)) != len(models):
        raise TritonServerError(f"a model is listed twice: {models} (use another run_dir for a second server)")
    params = params or {}
    unknown = sorted(set(params) - set(models) - {"*"})
    if unknown:
        raise TritonServerError(f"parameters given for models not started: {', '.join(unknown)}")
    install = find_triton()
    backends = prepare_backend_dir(install, run_dir)
    env = server_env(install)
    servers: dict[str, Server] = {}
    for model in models:
        model_params = {**params.get("*", {}), **params.get(model, {})}
        model_repo = prepare_model_repo(model, repo, run_dir, model_params, config_name=config_name)
        grpc, http, metrics = ports[model] if ports and model in ports else (free_port(), free_port(), free_port())
        servers[model] = Server(model, grpc, http, metrics, run_dir / "triton" / f"{model}.log", model_repo)
        servers[model].log.unlink(missing_ok=True)
    cluster = Cluster(servers, run_dir)
    try:
        for s in servers.values():
            _launch(install, s, backends, env, exit_timeout_s)
        for attempt in range(3):
            try:
                wait_ready(list(servers.values()), timeout)
                break
            except TritonServerError:
                # A free port taken by someone else between our probe and the server's bind: new ports.
                retry = [s for s in servers.values() if s.process is not None and s.process.poll() is not None
                         and _bind_failed(s.log) and not (ports and s.model in ports)]
                if attempt == 2 or not retry:
                    raise
                for s in retry:
                    s.grpc_port, s.http_port, s.metrics_port = free_port(), free_port(), free_port()
                    _launch(install, s, backends, env, exit_timeout_s)
    except BaseException:
        cluster.stop()
        raise
    cluster.write_files()
    return cluster


def restart_server(run_dir: str | Path, model: str, timeout: float = 120.0, exit_timeout_s: int = 10) -> Server:
    """Stop `model`'s server that `up` started in `run_dir` (if it still runs) and start it again on the
    same ports, with the same model repository (config and parameters), log appended; wait until it is
    ready; record its new pid in triton/pids.json. Its in-memory state (the llm's KV caches) is gone.
    Raises TritonServerError when `up` started no such server there, or when it does not come back."""
    run_dir = Path(run_dir).resolve()
    info = _read_json(run_dir / "triton" / SERVERS_FILE).get(model)
    if not info:
        raise TritonServerError(f"no {model} server was started in {run_dir} (no entry in "
                                f"{run_dir / 'triton' / SERVERS_FILE}): start the stack first")
    # Servers written before the repository was recorded: `up` puts it here (prepare_model_repo)
    repo = Path(info.get("repo") or run_dir / "triton" / "repos" / model)
    if not (repo / model / "config.pbtxt").is_file():
        raise TritonServerError(f"the model repository of {model} is gone ({repo}): run `down` and `up` again")
    old = _read_json(run_dir / "triton" / PIDS_FILE).get(model, info.get("pid"))
    if isinstance(old, int) and _alive(old) and _is_tritonserver(old):
        stop_pids([old], timeout=20.0)
    server = Server(model, info["grpc_port"], info["http_port"], info["metrics_port"], Path(info["log"]), repo)
    install = find_triton()
    _launch(install, server, prepare_backend_dir(install, run_dir), server_env(install), exit_timeout_s)
    try:
        wait_ready([server], timeout)
    except BaseException:
        stop_pids([server.pid])
        raise
    remove_stale_shm_regions()  # the old server's, if it was killed before this restart
    write_run_files(run_dir, {model: server.info()}, pids=True)
    return server


# ---- command line ----

def _parse_params(items: list[str], checkpoint: str | None, device: str | None) -> dict[str, dict[str, str]]:
    params: dict[str, dict[str, str]] = {}
    if checkpoint:
        params.setdefault("*", {})["checkpoint"] = str(Path(checkpoint).resolve())
    if device:
        params.setdefault("*", {})["device"] = device
    for item in items:
        key, sep, value = item.partition("=")
        model, dot, name = key.rpartition(".")
        if not sep or not name:
            raise SystemExit(f"--param {item!r}: expected MODEL.KEY=VALUE or KEY=VALUE")
        params.setdefault(model if dot else "*", {})[name] = value
    return params


def _running(run_dir: Path) -> dict[str, int]:
    pids = _read_json(run_dir / "triton" / PIDS_FILE)
    return {m: p for m, p in pids.items() if isinstance(p, int) and _alive(p) and _is_tritonserver(p)}


def cmd_up(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir).resolve()
    models = args.models or available_models(Path(args.repo))
    already = {m: p for m, p in _running(run_dir).items() if m in models}
    if already:
        print("already running: " + ", ".join(f"{m} (pid {p})" for m, p in already.items())
              + "; run `down` first", file=sys.stderr)
        return 1
    ports = None
    if args.base_port:
        ports = {m: (args.base_port + 3 * i, args.base_port + 3 * i + 1, args.base_port + 3 * i + 2)
                 for i, m in enumerate(models)}
    params = _parse_params(args.param, args.checkpoint, args.device)
    try:
        cluster = start_servers(models, repo=args.repo, run_dir=run_dir, params=params, ports=ports, config_name=args.config_name,
                                timeout=args.timeout)
    except TritonServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_run_files(run_dir, {m: s.info() for m, s in cluster.servers.items()}, pids=True)
    for m, s in cluster.servers.items():
        print(f"{m:16s} grpc {s.grpc}  http {s.http}  metrics {HOST}:{s.metrics_port}  pid {s.pid}  log {s.log}")
    print(f"endpoints: {run_dir / ENDPOINTS_FILE}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir).resolve()
    pids = _read_json(run_dir / "triton" / PIDS_FILE)
    models = args.models or list(pids)
    targets = {m: pids[m] for m in models if m in pids}
    live = {m: p for m, p in targets.items() if isinstance(p, int) and _alive(p) and _is_tritonserver(p)}
    stop_pids(live.values(), timeout=args.timeout)
    remove_run_entries(run_dir, list(targets))
    for m in models:
        print(f"{m:16s} " + ("stopped" if m in live else "not running"))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir).resolve()
    servers = _read_json(run_dir / "triton" / SERVERS_FILE)
    pids = _read_json(run_dir / "triton" / PIDS_FILE)
    if not pids:
        print("no servers started by `up`")
    for m, pid in pids.items():
        info = servers.get(m, {})
        up = isinstance(pid, int) and _alive(pid) and _is_tritonserver(pid)
        ready = up and _http(Server(m, 0, info.get("http_port", 0), 0, Path(), Path()), "GET",
                             f"/v2/models/{m}/ready")[0] == 200
        print(f"{m:16s} pid {pid}  {'ready' if ready else 'running, not ready' if up else 'not running'}  "
              f"grpc {info.get('grpc', '?')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m funchat.dev.tritonserver",
                                     description="Start/stop one tritonserver per model service on 127.0.0.1.")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the servers, wait until ready, leave them running")
    up.add_argument("--models", nargs="+", help="default: every model in the repository")
    up.add_argument("--repo", default=str(DEFAULT_REPO))
    up.add_argument("--checkpoint", help="checkpoint parameter for every model (default: each config's)")
    up.add_argument("--device", help="device parameter for every model (cpu, cuda)")
    up.add_argument("--config-name", default=None,
                    help="config variant: configs/<name>.pbtxt of each model where present (gpu: KIND_GPU, cuda, bf16)")
    up.add_argument("--param", action="append", default=[], metavar="MODEL.KEY=VALUE",
                    help="set a config parameter (KEY=VALUE: every model); repeatable")
    up.add_argument("--base-port", type=int, default=0,
                    help="fixed ports: model i gets grpc BASE+3i, http BASE+3i+1, metrics BASE+3i+2 (default: free ports)")
    up.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for readiness")
    down = sub.add_parser("down", help="stop the servers `up` started")
    down.add_argument("--models", nargs="+", help="default: all")
    down.add_argument("--timeout", type=float, default=20.0, help="seconds between SIGTERM and SIGKILL")
    status = sub.add_parser("status", help="list the servers `up` started")
    for p in (up, down, status):
        p.add_argument("--run-dir", default=str(DEFAULT_RUN_DIR))
    args = parser.parse_args(argv)
    return {"up": cmd_up, "down": cmd_down, "status": cmd_status}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
