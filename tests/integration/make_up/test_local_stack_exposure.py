"""What the local stack exposes: the stack started the way `make up` starts it (make_up/conftest.py:
redis-server, the four tritonservers, the Ray Serve orchestrator), every listening socket of every
one of its processes (children and re-parented ones included), and the secrets it holds.

Nothing but the public API may listen beyond loopback. Two ports cannot be bound to loopback, because
Ray binds them on all interfaces whatever it is told; each is allowed here by the process that owns
it, with what guards it, and the guard is tested:

- Ray Serve's gRPC proxy (`ray::ProxyActor`, `[::]`: ray/serve/_private/grpc_util.py): the public
  API itself, or the port behind a gateway that serves it. Every RPC but the health check needs an
  API key, checked in the replicas.
- Each replica's own gRPC server (`ray::ServeReplica:…`, `[::]:0`: ray/serve/_private/replica.py,
  for calls between deployments, which this application makes none of): Ray's token
  authentication refuses every call without the cluster's token (~/.ray/auth_token).

Everything else (the tritonservers, redis-server, Ray's GCS, raylet, agents and workers, /metrics)
must listen on loopback only: the test fails as soon as one of them binds a wider address (e.g. a
tritonserver started without its --*-address flags, or Ray without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0).
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
import pytest

from funchat.api import pb, pb_grpc
from funchat.dev import stack as dev_stack

# process title prefix -> (why it may listen beyond loopback, how many such ports it may have)
ALLOWED_BEYOND_LOOPBACK = {
    "ray::ProxyActor": ("Ray Serve's gRPC proxy: Ray binds [::]; API keys guard every RPC", 1),
    "ray::ServeReplica:": ("a replica's inter-deployment gRPC server: Ray binds [::]:0; Ray's token guards it", 1),
}
# the files that hold a secret by design (and must be mode 0600); nothing else may contain one
SECRET_FILES = ("redis_password", "api_key", "resume_secret", "redis/redis.conf", "tls/redis.key")


@dataclass(frozen=True)
class Listener:
    ip: str
    port: int
    pid: int
    title: str  # the process's command line, as `ps` shows it

    @property
    def loopback(self) -> bool:
        address = ipaddress.ip_address(self.ip.split("%")[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return address.is_loopback

    def __str__(self) -> str:
        return f"{self.ip}:{self.port} (pid {self.pid}: {self.title[:80]})"


@pytest.fixture(scope="module")
def stack(make_up_stack) -> Path:
    return make_up_stack["run_dir"]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def stack_processes(run_dir: Path) -> dict[int, psutil.Process]:
    """Every process of the stack: the parts `up` started, their descendants, and whatever else runs
    in the sessions they lead (a daemon that left the tree stays in its session)."""
    state = read_json(run_dir / "stack.json")
    roots = [state["redis_pid"], state["orchestrator_pid"], *read_json(run_dir / "triton" / "pids.json").values()]
    found: dict[int, psutil.Process] = {}
    for pid in roots:
        root = psutil.Process(pid)
        for process in (root, *root.children(recursive=True)):
            found[process.pid] = process
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) in roots:
                found[process.pid] = process
        except (ProcessLookupError, PermissionError):
            pass
    return found


def title(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline()) or process.name()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return "(gone)"


def listeners(processes: dict[int, psutil.Process]) -> list[Listener]:
    """TCP sockets listening, and UDP sockets bound, in any of these processes."""
    found = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.pid not in processes or not conn.laddr:
            continue
        if conn.type == socket.SOCK_STREAM and conn.status != psutil.CONN_LISTEN:
            continue
        found.append(Listener(conn.laddr.ip, conn.laddr.port, conn.pid, title(processes[conn.pid])))
    return found


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def test_nothing_but_the_public_api_listens_beyond_loopback(stack):
    processes = stack_processes(stack)
    found = listeners(processes)
    endpoints = read_json(stack / "endpoints.json")
    public_port = port_of(endpoints["orchestrator"])
    unexplained, allowed = [], {prefix: {} for prefix in ALLOWED_BEYOND_LOOPBACK}
    for listener in (x for x in found if not x.loopback):
        kind = next((p for p in ALLOWED_BEYOND_LOOPBACK if listener.title.startswith(p)), None)
        if kind is not None:
            allowed[kind].setdefault(listener.pid, set()).add(listener.port)
        elif listener.port != public_port:
            unexplained.append(listener)
    assert not unexplained, "listening beyond loopback, and neither the public API nor an allowed Ray port:\n" + \
        "\n".join(map(str, unexplained))
    for kind, (why, most) in ALLOWED_BEYOND_LOOPBACK.items():
        for pid, ports in allowed[kind].items():
            assert len(ports) <= most, f"{kind} (pid {pid}; {why}) listens beyond loopback on {sorted(ports)}"
    # the public API is reachable from outside: that is the one port meant to be
    assert any(x.port == public_port and not x.loopback for x in found), [str(x) for x in found]

    # the census saw the stack: every port the stack announces is among the sockets found, on loopback
    servers = read_json(stack / "triton" / "servers.json")
    announced = {port_of(endpoints["orchestrator_metrics"]), port_of(endpoints["redis"].rsplit("/", 1)[0]),
                 port_of(endpoints["web"].rstrip("/"))}
    for info in servers.values():
        announced |= {info["grpc_port"], info["http_port"], info["metrics_port"]}
    on_loopback = {x.port for x in found if x.loopback}
    assert announced <= on_loopback, f"not found listening on loopback: {sorted(announced - on_loopback)}; " \
                                     f"found: {[str(x) for x in found]}"
    titles = [title(p) for p in processes.values()]
    assert any("gcs_server" in t for t in titles) and any("raylet" in t for t in titles), titles


def test_a_replicas_own_port_refuses_calls_without_rays_token(stack):
    replica_ports = {listener.port for listener in listeners(stack_processes(stack))
                     if not listener.loopback and listener.title.startswith("ray::ServeReplica:")}
    assert replica_ports, "no replica gRPC server found (the census or the stack changed)"
    for port in replica_ports:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/ray.serve.ASGIService/HandleRequest")
            with pytest.raises(grpc.RpcError) as refused:
                call(b"", timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, refused.value


def test_the_public_api_refuses_calls_without_a_key(stack):
    endpoints = read_json(stack / "endpoints.json")
    key = dev_stack.read_api_key(stack)
    with grpc.insecure_channel(endpoints["orchestrator"]) as channel:
        stub = pb_grpc.FunchatStub(channel)
        request = pb.GetSessionRequest(session_id="nobody")
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetSession(request, timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as not_found:  # with the key the same call gets through
            stub.GetSession(request, metadata=[("authorization", f"Bearer {key}")], timeout=30)
        assert not_found.value.code() == grpc.StatusCode.NOT_FOUND


def test_the_realtime_websocket_is_announced_and_refuses_a_caller_without_a_key(stack):
    import asyncio

    import websockets

    endpoints = read_json(stack / "endpoints.json")
    assert endpoints["realtime"] == endpoints["web"].replace("http://", "ws://") + "v1/realtime"
    assert endpoints["realtime"].startswith("ws://127.0.0.1:")

    async def call(headers: dict) -> tuple[dict, int | None]:
        async with websockets.connect(endpoints["realtime"] + "?model=fun-audio-chat",
                                      additional_headers=headers) as ws:
            first = json.loads(await ws.recv())
            if first["type"] == "error":
                await ws.wait_closed()
            return first, ws.close_code

    refused, code = asyncio.run(call({}))
    assert refused["type"] == "error" and refused["error"]["code"] == "unauthenticated", refused
    assert code == 1008
    created, _ = asyncio.run(call({"Authorization": f"Bearer {dev_stack.read_api_key(stack)}"}))
    assert created["type"] == "session.created", created


def test_redis_wants_tls_and_the_password(stack):
    endpoints = read_json(stack / "endpoints.json")
    assert endpoints["redis"].startswith("rediss://127.0.0.1:")
    assert Path(endpoints["redis_ca_file"]).is_file() and Path(endpoints["redis_password_file"]).is_file()


def test_no_secret_in_a_log_or_on_a_command_line(stack):
    # a refused call and an accepted one first, so that both paths have written their logs
    test_the_public_api_refuses_calls_without_a_key(stack)
    secrets = {name: (stack / name).read_text().strip() for name in ("redis_password", "api_key", "resume_secret")}
    assert all(len(value) >= 16 for value in secrets.values()), secrets.keys()
    for name in SECRET_FILES:
        assert stat.S_IMODE((stack / name).stat().st_mode) == 0o600, name
    holders = {stack / name for name in SECRET_FILES}
    processes = stack_processes(stack)
    # Ray's own logs too (the replicas' output is there): the GCS names their folder
    ray_logs = {Path(arg.split("=", 1)[1]) for process in processes.values() for arg in process.cmdline()
                if arg.startswith("--log_dir=")}
    assert ray_logs, "Ray's log folder not found on the GCS's command line"
    scanned = 0
    for path in sorted(p for folder in (stack, *ray_logs) for p in folder.rglob("*")):
        if not path.is_file() or path in holders:
            continue
        data = path.read_bytes()
        scanned += 1
        for name, value in secrets.items():
            assert value.encode() not in data, f"the {name} is in {path}"
    assert scanned >= 10, scanned  # the logs of redis, the tritonservers, the orchestrator and Ray at least
    for pid, process in processes.items():
        line = title(process)
        for name, value in secrets.items():
            assert value not in line, f"the {name} is on the command line of pid {pid}: {line[:80]}"
