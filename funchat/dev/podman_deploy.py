"""Run the Helm chart in containers on this machine with `podman kube play` (`make deploy-test`).

The chart is rendered exactly as a cluster would get it, from `helm/funchat/values-dev-cpu.yaml`
plus the few values that podman needs (`podman_values`):

- pods reach each other by pod name on a podman network, not by Service name: podman names the pod
  of Deployment or StatefulSet `X` `X-pod-0`, so `orchestrator.addresses` points the orchestrator at
  `<model service>-pod-0:8001` and `<release>-redis-pod-0:6379`;
- the public gRPC port is published on 127.0.0.1 with `orchestrator.hostPort` (and the Realtime
  WebSocket's HTTP port with `hostPort.httpPort`, when asked), and no other port is published
  (`unpublished_ports`);
- the /dev/shm emptyDir is left to podman's own /dev/shm (`without_shm_volume`);
- no registry is reachable here, so Redis is the local `localhost/funchat-redis` image
  (`services/redis/Dockerfile`).

The chart's default `auth.mode: api_keys` mounts a Secret that the operator creates and the chart
does not render (`<release>-api-keys`, the key file of `funchat keys create`): `up` makes it from the
key file it is given (`api_keys_secret`; `--api-keys-file`, default $FUNCHAT_API_KEYS_FILE or
.run/api_keys), and refuses to play a render whose pods use a Secret nobody provides.

podman plays the Deployments, ConfigMaps and PersistentVolumeClaims (as named volumes), and the
Redis StatefulSet as the one-replica Deployment it amounts to (`as_podman_workloads`: podman 4.3
ignores StatefulSets). The chart's Secrets become podman secrets made here (`podman_secret_payload`): podman
4.3's kube play stores a Secret as YAML and then fails to read it back for `secretKeyRef` env
(containers/podman#16269), and it would write a volume's values still base64-encoded. What it cannot run (Services, NetworkPolicies, PodDisruptionBudgets, autoscalers,
RayService, InferenceService) is left out here and schema-checked by tests/unit/test_helm_chart.py.
podman does not act on readiness or startup probes, so `wait_ready` runs the chart's own probes
itself, inside each container (as the kubelet would against the pod), in Kubernetes' order: the
startupProbe until it passes (at most failureThreshold tries, periodSeconds apart), then the
readinessProbe.

    python -m funchat.dev.podman_deploy up [--checkpoint checkpoints/tiny] [--port 50071] [--api-keys-file F]
    python -m funchat.dev.podman_deploy down
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# The chart rendered as render_k8s renders it: release "funchat", so its fullname is "funchat"
# (objects funchat-llm, funchat-redis, ...).
from funchat.dev.render_k8s import CHART, RELEASE, REPO, chart_objects

CONTAINERS_CONF = REPO / "services" / "containers.conf"
NETWORK = "funchat-deploy"
MODELS = ("audio_tokenizer", "llm", "refined_head", "vocoder")
PLAYED_KINDS = ("ConfigMap", "PersistentVolumeClaim", "StatefulSet", "Deployment")
DEFAULT_PORT = 50071
STATE_FILE = REPO / ".run" / "podman-deploy.json"


class DeployError(RuntimeError):
    """The chart did not come up (or down); the message says which pod and why."""


def podman(*args: str, check: bool = True, timeout: float | None = 600, input: bytes | None = None
           ) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(CONTAINERS_CONF))
    proc = subprocess.run(["podman", *args], capture_output=True, timeout=timeout, env=env, input=input)
    if check and proc.returncode != 0:
        raise DeployError(f"podman {' '.join(args)} failed ({proc.returncode}): "
                          f"{proc.stderr.decode(errors='replace').strip()[-2000:]}")
    return proc


def pod_name(workload: str) -> str:
    """podman kube play names the (only) pod of Deployment or StatefulSet `workload` like this."""
    return f"{workload}-pod-0"


def container_name(pod: str, container: str) -> str:
    return f"{pod}-{container}"


def podman_values(port: int, http_port: int = 0) -> dict:
    """The values that the dev-cpu profile needs on top to run under podman (module docstring).
    http_port: where the Realtime WebSocket is published (0: not published)."""
    addresses = {m: pod_name(f"{RELEASE}-" + m.replace("_", "-")) + ":8001" for m in MODELS}
    addresses["redis"] = f"{pod_name(f'{RELEASE}-redis')}:6379"
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    return {
        "orchestrator": {"hostPort": {"enabled": True, "hostIP": "127.0.0.1", "port": port, "httpPort": http_port},
                         "addresses": addresses},
        "redis": {"internal": {"image": {"repository": "localhost/funchat-redis", "tag": str(app_version)}}},
    }


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def render(port: int, http_port: int = 0) -> list[dict]:
    """Every object of the chart rendered with values-dev-cpu.yaml + podman_values(port, http_port)."""
    values = deep_merge(yaml.safe_load((CHART / "values-dev-cpu.yaml").read_text()), podman_values(port, http_port))
    return chart_objects(values)


def images_of(objects: list[dict]) -> set[str]:
    return {c["image"] for _, spec in pod_templates(objects)
            for c in spec.get("initContainers", []) + spec["containers"]}


def pod_templates(objects: list[dict]) -> list[tuple[str, dict]]:
    """(workload name, pod spec) of each Deployment and StatefulSet."""
    return [(o["metadata"]["name"], o["spec"]["template"]["spec"]) for o in objects
            if o["kind"] in ("Deployment", "StatefulSet")]


def claim_names(objects: list[dict]) -> set[str]:
    """PersistentVolumeClaims the pods mount that the chart does not create (existingClaim)."""
    created = {o["metadata"]["name"] for o in objects if o["kind"] == "PersistentVolumeClaim"}
    used = {v["persistentVolumeClaim"]["claimName"] for _, spec in pod_templates(objects)
            for v in spec.get("volumes", []) if "persistentVolumeClaim" in v}
    return used - created


# -- probes -------------------------------------------------------------------------------------

_HTTP_GET = ("import sys, urllib.request\n"
             "try:\n"
             "    code = urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])).status\n"
             "except Exception as exc:\n"
             "    sys.exit(f'{sys.argv[1]}: {exc}')\n"
             "sys.exit(0 if 200 <= code < 400 else f'{sys.argv[1]}: HTTP {code}')\n")
_GRPC_HEALTH = ("import sys, grpc\n"
                "from grpc_health.v1 import health_pb2, health_pb2_grpc\n"
                "with grpc.insecure_channel(sys.argv[1]) as ch:\n"
                "    try:\n"
                "        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=sys.argv[2]),"
                " timeout=float(sys.argv[3]))\n"
                "    except grpc.RpcError as exc:\n"
                "        sys.exit(f'{sys.argv[1]}: {exc.code().name}')\n"
                "sys.exit(0 if r.status == health_pb2.HealthCheckResponse.SERVING else f'status {r.status}')\n")


def _port(value, container: dict) -> int:
    if isinstance(value, int):
        return value
    for p in container.get("ports", []):
        if p.get("name") == value:
            return int(p["containerPort"])
    raise DeployError(f"probe port {value!r} is not a named port of container {container['name']}")


def probe_command(probe: dict, container: dict) -> list[str]:
    """The command that runs `probe` inside `container` (python3 for HTTP and gRPC, bash for TCP)."""
    timeout = str(probe.get("timeoutSeconds", 1))
    if "exec" in probe:
        return list(probe["exec"]["command"])
    if "httpGet" in probe:
        get = probe["httpGet"]
        url = f"http://127.0.0.1:{_port(get['port'], container)}{get.get('path', '/')}"
        return ["python3", "-c", _HTTP_GET, url, timeout]
    if "tcpSocket" in probe:
        return ["bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{_port(probe['tcpSocket']['port'], container)}"]
    if "grpc" in probe:
        grpc = probe["grpc"]
        return ["python3", "-c", _GRPC_HEALTH, f"127.0.0.1:{grpc['port']}", grpc.get("service", ""), timeout]
    raise DeployError(f"container {container['name']}: probe kind not supported here: {sorted(probe)}")


@dataclass
class ProbeResult:
    passed: bool
    output: str


def run_probe(ctr: str, probe: dict, container: dict) -> ProbeResult:
    try:
        proc = podman("exec", ctr, *probe_command(probe, container), check=False, timeout=30)
    except subprocess.TimeoutExpired:
        return ProbeResult(False, "timed out")
    out = (proc.stdout + proc.stderr).decode(errors="replace").strip()
    return ProbeResult(proc.returncode == 0, out[-500:])


def container_state(ctr: str) -> str:
    proc = podman("inspect", "--format", "{{.State.Status}}", ctr, check=False, timeout=30)
    return proc.stdout.decode().strip() or "missing"


def logs_tail(ctr: str, lines: int = 40) -> str:
    proc = podman("logs", "--tail", str(lines), ctr, check=False, timeout=30)
    return (proc.stdout + proc.stderr).decode(errors="replace")


@dataclass
class Readiness:
    seconds: dict[str, float] = field(default_factory=dict)  # container -> seconds from `start` to ready


def wait_ready(objects: list[dict], start: float, timeout: float = 600.0) -> Readiness:
    """Every container's startupProbe, then readinessProbe, passing (module docstring). Containers
    are polled together; a container that exits, or a startupProbe over its failureThreshold, fails
    at once with the container's log."""
    pending = {}
    for workload, spec in pod_templates(objects):
        pod = pod_name(workload)
        for c in spec["containers"]:
            pending[container_name(pod, c["name"])] = {
                "container": c, "stage": "startupProbe" if "startupProbe" in c else "readinessProbe",
                "failures": 0, "next": 0.0}
    ready = Readiness()
    deadline = time.monotonic() + timeout
    while pending:
        now = time.monotonic()
        if now > deadline:
            raise DeployError(f"not ready after {timeout:.0f} s: {sorted(pending)}")
        for ctr, st in list(pending.items()):
            if now < st["next"]:
                continue
            state = container_state(ctr)
            if state not in ("running", "created", "configured", "initialized"):
                raise DeployError(f"{ctr} is {state}:\n{logs_tail(ctr)}")
            probe = st["container"].get(st["stage"])
            if probe is None:  # no probe: running is ready (as in Kubernetes)
                if state == "running":
                    ready.seconds[ctr] = time.monotonic() - start
                    del pending[ctr]
                continue
            result = run_probe(ctr, probe, st["container"]) if state == "running" else ProbeResult(False, state)
            st["next"] = time.monotonic() + float(probe.get("periodSeconds", 10))
            if result.passed and st["stage"] == "startupProbe":
                st["stage"], st["failures"], st["next"] = "readinessProbe", 0, 0.0
            elif result.passed:
                ready.seconds[ctr] = time.monotonic() - start
                print(f"  ready: {ctr} after {ready.seconds[ctr]:.1f} s", flush=True)
                del pending[ctr]
            elif st["stage"] == "startupProbe":
                st["failures"] += 1
                if st["failures"] >= int(probe.get("failureThreshold", 3)):
                    raise DeployError(f"{ctr}: startupProbe failed {st['failures']} times "
                                      f"({result.output}):\n{logs_tail(ctr)}")
        time.sleep(0.5)
    return ready


# -- up and down ----------------------------------------------------------------------------------

def unpublished_ports(obj: dict) -> dict:
    """A copy of `obj` whose containers list only the ports with a hostPort: podman 4.3's kube play
    publishes every other containerPort on all the host's addresses at the same number
    (getPodPorts in pkg/specgen/generate/kube), which would expose the model services and make the
    four of them collide on 8000-8002. On the podman network every port of a pod is reachable
    anyway, as on a Kubernetes pod network."""
    obj = copy.deepcopy(obj)
    if obj["kind"] in ("Deployment", "StatefulSet"):
        spec = obj["spec"]["template"]["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            published = [p for p in c.get("ports", []) if p.get("hostPort")]
            if published:
                c["ports"] = published
            else:
                c.pop("ports", None)
    return obj


def as_podman_workloads(obj: dict) -> list[dict]:
    """podman 4.3's kube play ignores StatefulSets: one becomes the Deployment it amounts to with
    one replica, its volumeClaimTemplates the PersistentVolumeClaims Kubernetes would make for
    replica 0 (`<template>-<statefulset>-0`), mounted under the same volume names."""
    if obj["kind"] != "StatefulSet":
        return [obj]
    name = obj["metadata"]["name"]
    spec = copy.deepcopy(obj["spec"])
    if spec.get("replicas", 1) != 1:
        raise DeployError(f"StatefulSet {name}: only one replica can be played here")
    claims = []
    for template in spec.pop("volumeClaimTemplates", []):
        claim = f"{template['metadata']['name']}-{name}-0"
        claims.append({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                       "metadata": {"name": claim, "labels": obj["metadata"].get("labels", {})},
                       "spec": template["spec"]})
        spec["template"]["spec"].setdefault("volumes", []).append(
            {"name": template["metadata"]["name"], "persistentVolumeClaim": {"claimName": claim}})
    for key in ("serviceName", "podManagementPolicy", "updateStrategy", "persistentVolumeClaimRetentionPolicy"):
        spec.pop(key, None)
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment",
                  "metadata": copy.deepcopy(obj["metadata"]), "spec": spec}
    return claims + [deployment]


def without_shm_volume(obj: dict) -> dict:
    """A copy of `obj` without the emptyDir mounted at /dev/shm: podman 4.3 creates it root-owned
    and mode 755 (Kubernetes makes emptyDirs world-writable), so Triton's Python backend and Ray's
    object store, run as the pods' non-root user, could not write it. Each podman pod has a
    writable /dev/shm tmpfs of its own (64 MiB), which the tiny checkpoint's models fit in; Ray
    falls back to /tmp for the rest of its object store."""
    obj = copy.deepcopy(obj)
    if obj["kind"] not in ("Deployment", "StatefulSet"):
        return obj
    spec = obj["spec"]["template"]["spec"]
    shm = set()
    for c in spec.get("initContainers", []) + spec["containers"]:
        mounts = c.get("volumeMounts", [])
        shm |= {m["name"] for m in mounts if m["mountPath"] == "/dev/shm"}
        c["volumeMounts"] = [m for m in mounts if m["mountPath"] != "/dev/shm"]
    spec["volumes"] = [v for v in spec.get("volumes", []) if not (v["name"] in shm and "emptyDir" in v)]
    return obj


def secret_uses(objects: list[dict]) -> dict[str, set[str]]:
    """Secret name -> how pods use it: {"env"} (secretKeyRef / envFrom) and/or {"volume"}."""
    uses: dict[str, set[str]] = {}
    for _, spec in pod_templates(objects):
        for c in spec.get("initContainers", []) + spec["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    uses.setdefault(ref["name"], set()).add("env")
            for e in c.get("envFrom", []):
                if "secretRef" in e:
                    uses.setdefault(e["secretRef"]["name"], set()).add("env")
        for v in spec.get("volumes", []):
            if "secret" in v:
                uses.setdefault(v["secret"]["secretName"], set()).add("volume")
    return uses


def podman_secret_payload(secret: dict, uses: set[str]) -> bytes:
    """What podman 4.3.1's kube play reads back from a podman secret (pkg/specgen/generate/kube):
    for env, a flat JSON map of base64 values; for a volume, a Secret whose `data` values it writes
    to the files as they are, so they must be plain, not base64. The chart's Secrets are stored
    in the one form their use needs."""
    values = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
    values.update(secret.get("stringData", {}))
    if uses == {"env"}:
        return json.dumps({k: base64.b64encode(v.encode()).decode() for k, v in values.items()}).encode()
    if uses == {"volume"}:
        return json.dumps({"apiVersion": "v1", "kind": "Secret", "metadata": secret["metadata"],
                           "data": values}).encode()
    raise DeployError(f"Secret {secret['metadata']['name']} is used as {sorted(uses) or 'nothing'}: "
                      "podman 4.3 can give a Secret to pods as env or as a volume, not both")


def api_keys_secret(objects: list[dict], keys_file: Path) -> dict | None:
    """The Secret the orchestrator mounts for its API keys (auth.mode api_keys), holding `keys_file`
    under the key FUNCHAT_API_KEYS_FILE names in the mount, as `kubectl create secret generic <name>
    --from-file=<key>=<file>` would make it; None when the render mounts none (auth.mode off)."""
    for _, spec in pod_templates(objects):
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            if not env.get("FUNCHAT_API_KEYS_FILE"):
                continue
            path = Path(env["FUNCHAT_API_KEYS_FILE"])
            mount = next((m for m in c.get("volumeMounts", []) if Path(m["mountPath"]) == path.parent), None)
            if mount is None or "secret" not in volumes.get(mount["name"], {}):
                raise DeployError(f"container {c['name']}: FUNCHAT_API_KEYS_FILE={path} is not in a Secret volume")
            try:
                content = keys_file.read_bytes()
            except OSError as exc:
                raise DeployError(f"API key file {keys_file}: {exc.strerror}; create one with `funchat keys "
                                  f"create --tenant NAME --keys-file {keys_file}`") from None
            return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                    "metadata": {"name": volumes[mount["name"]]["secret"]["secretName"]},
                    "data": {path.name: base64.b64encode(content).decode()}}
    return None


def fill_volume(name: str, source: Path) -> None:
    """A named volume (what kube play mounts for claim `name`) holding a copy of `source`, readable by
    the pods' non-root user."""
    podman("volume", "rm", "--force", name, check=False)
    podman("volume", "create", name)
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "volume.tar"
        with tarfile.open(archive, "w") as tar:
            for path in sorted(source.rglob("*")):
                info = tar.gettarinfo(str(path), arcname=str(path.relative_to(source)))
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mode = 0o755 if path.is_dir() else 0o644
                if path.is_dir():
                    tar.addfile(info)
                else:
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
        podman("volume", "import", name, str(archive))


def up(checkpoint: Path, port: int = DEFAULT_PORT, run_dir: Path | None = None, timeout: float = 600.0,
       api_keys_file: Path | None = None, http_port: int = 0) -> dict:
    """Render, play and wait until every container is ready; returns the state `down` needs.
    api_keys_file: the key file (`funchat.api_keys.create_key`) given to the orchestrator as the
    API-keys Secret the chart mounts (module docstring). http_port: publish the Realtime WebSocket
    there too (0: not)."""
    run_dir = run_dir or STATE_FILE.parent
    run_dir.mkdir(parents=True, exist_ok=True)
    objects = render(port, http_port)
    secrets = [o for o in objects if o["kind"] == "Secret"]
    keys_secret = api_keys_secret(objects, api_keys_file) if api_keys_file is not None else None
    if keys_secret is not None:
        secrets.append(keys_secret)
    unprovided = sorted(set(secret_uses(objects)) - {s["metadata"]["name"] for s in secrets})
    if unprovided:
        raise DeployError(f"the pods use Secrets {unprovided} that neither the chart nor this run provides "
                          "(the API keys: pass api_keys_file / --api-keys-file)")
    missing = [i for i in sorted(images_of(objects)) if podman("image", "exists", i, check=False).returncode]
    if missing:
        raise DeployError(f"images missing: {missing}; build them with `make deploy-images`")
    played = [w for o in objects if o["kind"] in PLAYED_KINDS for w in as_podman_workloads(o)]
    manifest = run_dir / "podman-deploy.yaml"
    manifest.write_text(yaml.safe_dump_all([without_shm_volume(unpublished_ports(o)) for o in played],
                                           sort_keys=False))
    claims = sorted(claim_names(objects))
    state = {"manifest": str(manifest), "claims": claims, "port": port, "target": f"127.0.0.1:{port}",
             "http_port": http_port,
             "skipped": sorted({o["kind"] for o in objects} - set(PLAYED_KINDS) - {"Secret", "StatefulSet"})}
    STATE_FILE.parent.mkdir(parents=True, exist_ok=True)
    STATE_FILE.write_text(json.dumps(state, indent=2))
    if podman("network", "exists", NETWORK, check=False).returncode:
        podman("network", "create", NETWORK)
    for claim in claims:
        fill_volume(claim, checkpoint)
    uses = secret_uses(objects)
    state["secrets"] = [s["metadata"]["name"] for s in secrets]
    for secret in secrets:
        name = secret["metadata"]["name"]
        podman("secret", "rm", name, check=False)
        podman("secret", "create", name, "-", input=podman_secret_payload(secret, uses.get(name, set())))
    start = time.monotonic()
    # k8s-file: container logs in files that `podman logs` reads (no journald here)
    podman("kube", "play", "--network", NETWORK, "--log-driver", "k8s-file", str(manifest))
    try:
        state["ready_s"] = wait_ready(played, start, timeout).seconds
    except BaseException:
        down(state)
        raise
    state["all_ready_s"] = max(state["ready_s"].values())
    state["play_started"] = start
    STATE_FILE.write_text(json.dumps(state, indent=2))
    return state


def down(state: dict | None = None) -> None:
    """Remove the pods, the volumes they made or were given, and the network."""
    if state is None:
        if not STATE_FILE.exists():
            return
        state = json.loads(STATE_FILE.read_text())
    manifest = Path(state["manifest"])
    if manifest.exists():
        podman("kube", "down", str(manifest), check=False)
        # the volumes kube play made for the claims, and the ones filled here
        objects = list(yaml.safe_load_all(manifest.read_text()))
        made = [o["metadata"]["name"] for o in objects if o["kind"] == "PersistentVolumeClaim"]
        for name in made + list(state.get("claims", [])):
            podman("volume", "rm", "--force", name, check=False)
    for name in state.get("secrets", []):
        podman("secret", "rm", name, check=False)
        podman("volume", "rm", "--force", name, check=False)  # what kube play made of a secret volume
    podman("network", "rm", "--force", NETWORK, check=False)
    STATE_FILE.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="render the dev-cpu chart, kube play it, wait for its probes")
    p_up.add_argument("--checkpoint", type=Path, default=REPO / "checkpoints" / "tiny")
    p_up.add_argument("--port", type=int, default=DEFAULT_PORT)
    p_up.add_argument("--http-port", type=int, default=0, help="publish the Realtime WebSocket here (0: not)")
    p_up.add_argument("--timeout", type=float, default=600.0)
    p_up.add_argument("--api-keys-file", type=Path, default=None,
                      help="the API key file given to the orchestrator as its Secret (default: "
                           "$FUNCHAT_API_KEYS_FILE, else .run/api_keys; `funchat keys create` makes one)")
    sub.add_parser("down", help="remove what `up` started")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            from funchat.api_keys import DEFAULT_KEYS_FILE, default_keys_file

            keys = args.api_keys_file or default_keys_file()
            if keys == DEFAULT_KEYS_FILE:  # .run/api_keys of the checkout, as `make up` makes it
                keys = REPO / keys
            state = up(args.checkpoint, args.port, timeout=args.timeout, api_keys_file=keys, http_port=args.http_port)
            print(f"ready in {state['all_ready_s']:.1f} s; public API on {state['target']} "
                  f"(not played: {', '.join(state['skipped'])})")
        else:
            down()
    except DeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
