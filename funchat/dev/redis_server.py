"""Start and stop a local `redis-server`, the session store of the orchestrator (tests, `make up`).

The Debian `redis-server` binary is used as is (`apt-get install redis-server`); nothing runs as a
system service. One server per call of `start_redis`, in its own process group, with its working
directory and log under `<run_dir>/redis/`:

    with start_redis(run_dir) as server:   # a free 127.0.0.1 port, no persistence
        store = SessionStore(server.url, ...)

Persistence: by default nothing is written to disk (`--save "" --appendonly no`): sessions live as
long as the server, which is what tests and a single-machine stack want. `persist=True` turns the
append-only file on (`--appendonly yes`, fsync every second, in `<run_dir>/redis/appendonlydir/`):
a server started again with the same `run_dir` (and port) reloads the sessions, so calls survive a
Redis restart, losing at most the last second of writes.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from funchat.dev.tritonserver import _alive as _pid_alive  # one liveness check (zombies count as gone)

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

INSTALL_HINT = "apt-get install redis-server"


@dataclass
class RedisServer:
    """A running redis-server. A context manager: leaving it stops the server."""

    host: str
    port: int
    pid: int
    log: Path
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return _pid_alive(self.pid)

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log, lines)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the server's process group, wait up to `timeout` s, then SIGKILL it. Idempotent."""
        if not self.alive():
            self._reap()
            return
        _signal_group(self.pid, signal.SIGTERM)  # redis exits cleanly on SIGTERM (and fsyncs its AOF)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.alive():
            time.sleep(0.02)
        if self.alive():
            _signal_group(self.pid, signal.SIGKILL)
        self._reap()

    def _reap(self) -> None:
        # Wait for our own child so that it leaves no zombie behind (and alive() reads False).
        if self.process is not None:
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_redis(run_dir: Path, port: int | None = None, host: str = "127.0.0.1", persist: bool = False,
                timeout: float = 10.0) -> RedisServer:
    """Launch redis-server on `host:port` (a free port when None) and wait until it answers PING.

    Raises RuntimeError when the binary is missing, or when the server exits or does not answer
    within `timeout` seconds (the message holds the tail of its log).
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError(f"redis-server is not installed (not on PATH); install it: {INSTALL_HINT}")
    work = Path(run_dir).resolve() / "redis"
    work.mkdir(parents=True, exist_ok=True)
    log = work / "redis.log"
    # A free port found here can be taken by someone else before redis binds it: then try another
    # (only when we picked the port; a port the caller asked for is theirs to sort out).
    attempt = 0
    while True:
        attempt += 1
        server = _launch(binary, work, log, host, port if port is not None else _free_port(host), persist)
        try:
            _wait_ready(server, timeout)
            return server
        except RuntimeError as exc:
            server.stop()
            if port is None and attempt < 3 and "Address already in use" in str(exc):
                continue
            raise


def _launch(binary: str, work: Path, log: Path, host: str, port: int, persist: bool) -> RedisServer:
    args = [binary, "--port", str(port), "--bind", host, "--save", "", "--dir", str(work),
            "--logfile", str(log), "--daemonize", "no"]
    if persist:
        args += ["--appendonly", "yes", "--appendfsync", "everysec"]
    else:
        args += ["--appendonly", "no"]
    with open(log, "ab") as out:
        out.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} starting redis-server on {host}:{port}"
                  f" (persist={persist})\n".encode())
        out.flush()
        # stdout/stderr go to the log too: errors in the arguments are printed before --logfile
        # takes effect. Own session, so that stop() can signal the whole group.
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   cwd=str(work), start_new_session=True)
    return RedisServer(host=host, port=port, pid=process.pid, log=log, process=process)


def _wait_ready(server: RedisServer, timeout: float) -> None:
    # No retries inside the client: this loop is the retry, and it must notice an exited server.
    client = redis.Redis(host=server.host, port=server.port, socket_connect_timeout=0.5, socket_timeout=1.0,
                         retry=Retry(NoBackoff(), 0))
    deadline = time.monotonic() + timeout
    try:
        while True:
            if not server.alive():
                code = server.process.poll() if server.process is not None else None
                raise RuntimeError(f"redis-server on {server.host}:{server.port} exited (code {code}) while "
                                   f"starting; log {server.log}:\n{server.log_tail()}")
            try:
                if client.ping():
                    return
            except redis.exceptions.BusyLoadingError:
                pass  # still loading its append-only file: wait
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on {server.host}:{server.port} did not answer PING within "
                                   f"{timeout:g} s; log {server.log}:\n{server.log_tail()}")
            time.sleep(0.05)
    finally:
        client.close()


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the server leads its own process group (start_new_session)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


    try:  # a zombie counts as gone; the state follows the ")" that ends the command name
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])
