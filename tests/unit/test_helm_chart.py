"""The Helm chart helm/funchat, offline: rendered with the default values, each profile and each
switch (helm-python-sdk, no helm binary, no cluster), linted, every object validated (core kinds
with kubernetes-validate, custom kinds against tests/unit/schemas/), the schema's refusals, and
the chart's two init scripts run on the real model configs and on local files."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

helm_python = pytest.importorskip("helm_python")
kubernetes_validate = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")
try:  # Triton's ModelConfig message (the orchestrator extra's tritonclient), to parse configs
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2
except ImportError:  # pragma: no cover
    model_config_pb2 = None

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "funchat"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
KUBE = "1.33"
MODELS = ["audio_tokenizer", "llm", "refined_head", "vocoder"]
NAME, NAMESPACE = "fc", "funchat"
PREFIX = "fc-funchat"
CUSTOM = {
    ("ray.io/v1", "RayService"): "rayservice_ray.io_v1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor_monitoring.coreos.com_v1.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject_keda.sh_v1alpha1.json",
}
SHA_A = "a" * 64


def profile(name: str) -> dict:
    return yaml.safe_load((CHART / f"values-{name}.yaml").read_text())


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@functools.lru_cache(maxsize=None)
def _render(values_json: str) -> dict:
    with helm_python.Chart.load(str(CHART)) as chart:
        return chart.render(json.loads(values_json), name=NAME, namespace=NAMESPACE)


def render(values: dict | None = None) -> dict:
    return _render(json.dumps(values or {}, sort_keys=True))


def objects(values: dict | None = None) -> list[dict]:
    out = []
    for path, text in render(values).items():
        if path.endswith(".txt"):
            continue
        out.extend(d for d in yaml.safe_load_all(text) if d)
    return out


def find(objs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objs: list[dict], kind: str, name: str) -> dict:
    found = find(objs, kind, name)
    assert len(found) == 1, f"{kind}/{name}: {len(found)} rendered"
    return found[0]


def model_name(service: str) -> str:
    return f"{PREFIX}-{service.replace('_', '-')}"


def container(pod_spec: dict, name: str, init: bool = False) -> dict:
    return next(c for c in pod_spec["initContainers" if init else "containers"] if c["name"] == name)


def pod_specs(objs: list[dict]) -> list[tuple[str, dict]]:
    specs = []
    for o in objs:
        if o["kind"] in ("Deployment", "StatefulSet"):
            specs.append((o["metadata"]["name"], o["spec"]["template"]["spec"]))
        elif o["kind"] == "RayService":
            cluster = o["spec"]["rayClusterConfig"]
            specs.append(("head", cluster["headGroupSpec"]["template"]["spec"]))
            specs += [(g["groupName"], g["template"]["spec"]) for g in cluster.get("workerGroupSpecs", [])]
    return specs


def env_of(c: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


SCENARIOS = {
    "defaults": {},
    "profile-dev-cpu": profile("dev-cpu"),
    "profile-gpu": profile("gpu"),
    "rayservice": {"orchestrator": {"mode": "rayservice", "rayService": {"workerReplicas": 2}}},
    "redis-external-secret": {"redis": {"mode": "external", "external": {
        "url": "rediss://redis.example:6380/0", "existingSecret": "redis-auth"}}},
    "redis-external-open": {"redis": {"mode": "external", "external": {"url": "redis://redis.example:6379/1"}}},
    "monitoring": {"monitoring": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
                   "networkPolicy": {"metricsFrom": [{"namespaceSelector": {"matchLabels": {
                       "kubernetes.io/metadata.name": "monitoring"}}}]}},
    "hpa-pods": {"modelServiceDefaults": {"autoscaling": {"mode": "hpa"}}},
    "hpa-external": {"modelServiceDefaults": {"autoscaling": {"mode": "hpa", "hpa": {"metricType": "External"}}}},
    "keda": {"modelServiceDefaults": {"autoscaling": {"mode": "keda"}}},
    "download": {"modelStorage": {"mode": "download", "download": {"files": [
        {"path": "config.json", "url": "https://files.example/ckpt/config.json", "sha256": SHA_A},
        {"path": "vocoder/hift.pt", "url": "https://files.example/ckpt/vocoder/hift.pt", "sha256": "b" * 64}]}}},
    "download-rayservice": {"orchestrator": {"mode": "rayservice"},
                            "modelStorage": {"mode": "download", "download": {"claimName": "my-cache"}}},
    "launch-tritonserver": {"modelServiceDefaults": {"launch": "tritonserver", "parameters": {"threads": "2"}},
                            "modelServices": {"llm": {"configName": "gpu"}},
                            "modelStorage": {"mode": "download"}},
    "addresses-hostport": {"orchestrator": {
        "hostPort": {"enabled": True, "hostIP": "127.0.0.1", "port": 50061},
        "addresses": {"llm": "llm-host.example:9001", "redis": "fc-funchat-redis-pod-0:6379"}}},
    "everything-off": {"networkPolicy": {"enabled": False},
                       "modelServiceDefaults": {"podDisruptionBudget": {"enabled": False}},
                       "orchestrator": {"podDisruptionBudget": {"enabled": False}},
                       "secrets": {"resume": {"existingSecret": "my-resume"}},
                       "redis": {"internal": {"existingSecret": "my-redis"}}},
}


# -- lint and validation ---------------------------------------------------------------------

@pytest.mark.parametrize("scenario", ["defaults", "profile-dev-cpu", "profile-gpu", "rayservice"])
def test_lint_is_clean(scenario):
    result = helm_python.lint(str(CHART), SCENARIOS[scenario], strict=True, kube_version=f"v{KUBE}.0")
    assert not result["errors"], result
    # severity 1 is INFO ("icon is recommended"); WARNING (2) and ERROR (3) fail
    assert [m for m in result["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_rendered_object_validates(scenario):
    objs = objects(SCENARIOS[scenario])
    assert objs
    names = set()
    for obj in objs:
        key = (obj["apiVersion"], obj["kind"])
        if key in CUSTOM:
            schema = json.loads((SCHEMAS / CUSTOM[key]).read_text())
            jsonschema.validate(obj, schema)
        else:
            kubernetes_validate.validate(obj, KUBE, strict=True)
        ident = (obj["kind"], obj["metadata"]["name"])
        assert ident not in names, f"{ident} rendered twice"
        names.add(ident)
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == NAME


def test_notes_render():
    notes = render()["funchat/templates/NOTES.txt"]
    assert f"{PREFIX}-orchestrator:50051" in notes and "funchat chat --server" in notes
    assert "WARNING" in render({"modelStorage": {"mode": "download"}})["funchat/templates/NOTES.txt"]


# -- values and schema -----------------------------------------------------------------------

def test_every_value_is_documented():
    lines = (CHART / "values.yaml").read_text().splitlines()
    parents: list[tuple[int, str]] = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z_][A-Za-z0-9_]*):", line)
        if not m:
            continue
        indent, key = len(m.group(1)), m.group(2)
        parents = [(n, k) for n, k in parents if n < indent]
        parent = parents[-1][1] if parents else ""
        parents.append((indent, key))
        if parent in ("requests", "limits"):  # resource quantities under a documented map
            continue
        above = lines[i - 1].strip()
        assert above.startswith("#"), f"values.yaml line {i + 1}: {key} has no comment above it"


def test_schema_closes_every_object():
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(node, path):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node and "propertyNames" not in node:
                assert node.get("additionalProperties") is False, f"{path}: additionalProperties not false"
            for k, v in node.items():
                walk(v, f"{path}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}/{i}")

    walk(schema, "")
    with helm_python.Chart.load(str(CHART)) as chart:  # every profile passes the schema
        for name in ("dev-cpu", "gpu"):
            chart.render(profile(name), name=NAME, namespace=NAMESPACE)


@pytest.mark.parametrize("values, where, what", [
    ({"bogus": 1}, "at ''", "'bogus' not allowed"),
    ({"modelServices": {"llm": {"gpu": 1}}}, "/modelServices/llm", "'gpu' not allowed"),
    ({"modelServices": {"tts": {}}}, "/modelServices", "'tts' not allowed"),
    ({"modelServices": {"llm": {"gpus": "one"}}}, "/modelServices/llm/gpus", "want integer"),
    ({"orchestrator": {"replicas": -1}}, "/orchestrator/replicas", "minimum"),
    ({"modelServiceDefaults": {"replicas": -2}}, "/modelServiceDefaults/replicas", "minimum"),
    ({"orchestrator": {"mode": "kserve"}}, "/orchestrator/mode", "must be one of"),
    ({"redis": {"mode": "cluster"}}, "/redis/mode", "must be one of"),
    ({"modelStorage": {"mode": "s3"}}, "/modelStorage/mode", "must be one of"),
    ({"modelServiceDefaults": {"autoscaling": {"mode": "vpa"}}}, "/modelServiceDefaults/autoscaling/mode",
     "must be one of"),
    ({"redis": {"mode": "external", "external": {"url": "http://redis:6379"}}}, "/redis/external/url", "pattern"),
    ({"redis": {"mode": "external"}}, "/redis/external/url", "minLength"),
    ({"modelStorage": {"download": {"files": [{"path": "a", "url": "https://x/a", "sha256": "abc"}]}}},
     "/modelStorage/download/files/0/sha256", "pattern"),
    ({"modelStorage": {"download": {"files": [{"path": "../etc/passwd", "url": "https://x/a", "sha256": SHA_A}]}}},
     "/modelStorage/download/files/0/path", ""),
    ({"orchestrator": {"settings": {"redis_url": "redis://x"}}}, "/orchestrator/settings", ""),
    ({"orchestrator": {"addresses": {"llm": "llm"}}}, "/orchestrator/addresses/llm", "pattern"),
    ({"orchestrator": {"addresses": {"tts": "tts:8001"}}}, "/orchestrator/addresses", "'tts' not allowed"),
    ({"modelServiceDefaults": {"resources": {"limits": {"memory": "lots"}}}},
     "/modelServiceDefaults/resources/limits/memory", ""),
])
def test_schema_rejects_bad_values_naming_the_key(values, where, what):
    with pytest.raises(helm_python.HelmValuesError) as err:
        with helm_python.Chart.load(str(CHART)) as chart:
            chart.render(values, name=NAME, namespace=NAMESPACE)
    assert where in str(err.value) and what in str(err.value), str(err.value)


def test_per_service_values_override_defaults_even_when_empty():
    objs = objects({"modelServices": {"llm": {"podDisruptionBudget": {"enabled": False}, "replicas": 0},
                                      "vocoder": {"replicas": 3}}})
    assert not find(objs, "PodDisruptionBudget", model_name("llm"))
    assert one(objs, "PodDisruptionBudget", model_name("vocoder"))
    assert one(objs, "Deployment", model_name("llm"))["spec"]["replicas"] == 0
    assert one(objs, "Deployment", model_name("vocoder"))["spec"]["replicas"] == 3
    assert one(objs, "Deployment", model_name("audio_tokenizer"))["spec"]["replicas"] == 1


# -- model services --------------------------------------------------------------------------

@pytest.mark.parametrize("service", MODELS)
def test_model_service_deployment(service):
    objs = objects()
    name = model_name(service)
    dep = one(objs, "Deployment", name)
    spec = dep["spec"]["template"]["spec"]
    triton = container(spec, "tritonserver")
    # launch entrypoint: the image's entrypoint configures the model folder and starts tritonserver
    assert "command" not in triton and "initContainers" not in spec
    assert triton["args"] == [service, "--http-port=8000", "--grpc-port=8001", "--metrics-port=8002"]
    assert env_of(triton) == {"FUNCHAT_CHECKPOINT": "/models/checkpoint", "FUNCHAT_CONFIG": "",
                              "FUNCHAT_PARAMS": "", "FUNCHAT_RUN_DIR": "/tmp/funchat"}
    assert {p["name"]: p["containerPort"] for p in triton["ports"]} == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert triton["startupProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert triton["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert triton["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "1Gi"}
    mounts = {m["mountPath"]: m for m in triton["volumeMounts"]}
    assert mounts["/dev/shm"]["name"] == "shm" and mounts["/tmp"]["name"] == "tmp"
    assert mounts["/models/checkpoint"]["readOnly"] is True
    assert "/opt/funchat/services" not in mounts and "repository" not in volumes
    assert volumes["checkpoint"]["persistentVolumeClaim"] == {"claimName": "funchat-checkpoint", "readOnly": True}
    assert spec["serviceAccountName"] == name and one(objs, "ServiceAccount", name)
    assert "nvidia.com/gpu" not in json.dumps(triton["resources"])
    svc = one(objs, "Service", name)
    assert svc["spec"]["type"] == "ClusterIP"
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert one(objs, "PodDisruptionBudget", name)["spec"]["maxUnavailable"] == 1
    assert dep["spec"]["replicas"] == 1
    assert not find(objs, "HorizontalPodAutoscaler") and not find(objs, "ScaledObject")


@pytest.mark.parametrize("service", MODELS)
def test_model_service_launched_by_the_chart(service):
    objs = objects(SCENARIOS["launch-tritonserver"])
    spec = one(objs, "Deployment", model_name(service))["spec"]["template"]["spec"]
    triton = container(spec, "tritonserver")
    config = ["--model-config-name=gpu"] if service == "llm" else []
    assert triton["command"] == ["tritonserver", "--model-repository=/opt/funchat/services",
                                 "--model-control-mode=explicit", f"--load-model={service}", *config,
                                 "--http-port=8000", "--grpc-port=8001", "--metrics-port=8002"]
    assert "env" not in triton and "args" not in triton
    assert [c["name"] for c in spec["initContainers"]] == ["fetch-checkpoint", "configure-model"]
    configure = container(spec, "configure-model", init=True)
    assert configure["command"][:2] == ["python3", "/etc/funchat/model-config/configure_model.py"]
    assert configure["command"][2:5] == [f"/opt/funchat/services/{service}", f"/repository/{service}",
                                         "gpu" if service == "llm" else ""]
    assert json.loads(configure["command"][5]) == {"checkpoint": "/models/checkpoint", "threads": "2"}
    assert {"name": "repository", "mountPath": "/repository"} in configure["volumeMounts"]
    repo = next(m for m in triton["volumeMounts"] if m["name"] == "repository")
    assert repo == {"name": "repository", "mountPath": "/opt/funchat/services", "readOnly": True}
    cm = one(objs, "ConfigMap", f"{PREFIX}-model-config")
    assert cm["data"]["configure_model.py"] == (CHART / "files" / "configure_model.py").read_text().rstrip("\n")


def test_entrypoint_parameters_survive_the_shell_split():
    params = {"device": "cuda", "dtype": "bfloat16", "tensorrt_plans": "/plans/with space"}
    objs = objects({"modelServices": {"llm": {"parameters": params, "configName": "gpu"}}})
    env = env_of(container(one(objs, "Deployment", model_name("llm"))["spec"]["template"]["spec"], "tritonserver"))
    assert env["FUNCHAT_CONFIG"] == "gpu"
    # as services/triton/entrypoint.py reads it
    assert dict(item.partition("=")[::2] for item in shlex.split(env["FUNCHAT_PARAMS"])) == params


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_container_is_locked_down(scenario):
    for owner, spec in pod_specs(objects(SCENARIOS[scenario])):
        assert spec["securityContext"]["runAsNonRoot"] is True, owner
        assert spec["securityContext"]["runAsUser"] == 10001, owner  # the images' funchat user
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, owner
        assert spec["automountServiceAccountToken"] is False, owner
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True, (owner, c["name"])
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}, c["name"]
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, (owner, c["name"])
            assert "limits" in c["resources"] and "requests" in c["resources"], (owner, c["name"])


def test_gpu_resources_only_in_the_gpu_profile():
    for scenario in ("defaults", "profile-dev-cpu"):
        assert "nvidia.com/gpu" not in json.dumps(objects(SCENARIOS[scenario]))
    objs = objects(profile("gpu"))
    for service in ("audio_tokenizer", "llm", "refined_head"):
        spec = one(objs, "Deployment", model_name(service))["spec"]["template"]["spec"]
        res = container(spec, "tritonserver")["resources"]
        assert res["requests"]["nvidia.com/gpu"] == 1 and res["limits"]["nvidia.com/gpu"] == 1
        assert spec["runtimeClassName"] == "nvidia" and spec["nodeSelector"] == {"funchat.io/pool": "gpu"}
        assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert env_of(container(spec, "tritonserver"))["FUNCHAT_CONFIG"] == "gpu"
        assert one(objs, "HorizontalPodAutoscaler", model_name(service))
    vocoder = one(objs, "Deployment", model_name("vocoder"))["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in json.dumps(vocoder)
    assert "runtimeClassName" not in vocoder and "tolerations" not in vocoder
    assert env_of(container(vocoder, "tritonserver"))["FUNCHAT_CONFIG"] == ""
    assert one(objs, "HorizontalPodAutoscaler", model_name("llm"))["spec"]["maxReplicas"] == 8
    assert one(objs, "ServiceMonitor", f"{PREFIX}-model-services")


def test_dev_cpu_profile_is_small():
    objs = objects(profile("dev-cpu"))
    for service in MODELS:
        dep = one(objs, "Deployment", model_name(service))
        assert dep["spec"]["replicas"] == 1
        triton = container(dep["spec"]["template"]["spec"], "tritonserver")
        assert env_of(triton)["FUNCHAT_PARAMS"] == "threads='1'"
        assert not find(objs, "PodDisruptionBudget", model_name(service))
    assert one(objs, "Deployment", f"{PREFIX}-orchestrator")["spec"]["replicas"] == 1
    volumes = one(objs, "Deployment", model_name("llm"))["spec"]["template"]["spec"]["volumes"]
    assert {"claimName": "funchat-checkpoint-tiny", "readOnly": True} in [
        v.get("persistentVolumeClaim") for v in volumes]


def test_autoscaling_hpa_on_queue_time_with_cpu_fallback():
    objs = objects(SCENARIOS["hpa-pods"])
    for service in MODELS:
        name = model_name(service)
        assert "replicas" not in one(objs, "Deployment", name)["spec"]  # the HPA owns it
        hpa = one(objs, "HorizontalPodAutoscaler", name)
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        pods, cpu = hpa["spec"]["metrics"]
        assert pods["type"] == "Pods" and pods["pods"]["target"] == {"type": "AverageValue", "averageValue": "50000"}
        assert pods["pods"]["metric"]["name"] == "funchat_triton_queue_duration_us_per_request"
        assert cpu["resource"] == {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}}
    ext = one(objects(SCENARIOS["hpa-external"]), "HorizontalPodAutoscaler", model_name("llm"))
    assert ext["spec"]["metrics"][0]["type"] == "External"
    assert ext["spec"]["metrics"][0]["external"]["metric"]["selector"]["matchLabels"] == {"service": model_name("llm")}
    big = objects({"modelServices": {"llm": {"autoscaling": {"mode": "hpa", "queueTimeTargetUs": 2000000,
                                                             "cpuUtilization": 0}}}})
    metrics = one(big, "HorizontalPodAutoscaler", model_name("llm"))["spec"]["metrics"]
    assert [m["type"] for m in metrics] == ["Pods"] and metrics[0]["pods"]["target"]["averageValue"] == "2000000"
    assert len(find(big, "HorizontalPodAutoscaler")) == 1


def test_autoscaling_keda_prometheus_trigger():
    objs = objects(SCENARIOS["keda"])
    assert not find(objs, "HorizontalPodAutoscaler")
    so = one(objs, "ScaledObject", model_name("llm"))
    assert so["spec"]["scaleTargetRef"]["name"] == model_name("llm")
    assert (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]) == (1, 4)
    prom, cpu = so["spec"]["triggers"]
    assert prom["type"] == "prometheus" and prom["metadata"]["threshold"] == "50000"
    assert 'nv_inference_queue_duration_us{model="llm"' in prom["metadata"]["query"]
    assert cpu == {"type": "cpu", "metricType": "Utilization", "metadata": {"value": "80"}}


# -- model storage ---------------------------------------------------------------------------

def test_download_mode_fetches_into_a_cache_claim():
    objs = objects(SCENARIOS["download"])
    cm = one(objs, "ConfigMap", f"{PREFIX}-fetch")
    assert cm["data"]["manifest"].splitlines() == [
        f"{SHA_A} config.json https://files.example/ckpt/config.json",
        f"{'b' * 64} vocoder/hift.pt https://files.example/ckpt/vocoder/hift.pt"]
    assert cm["data"]["fetch_checkpoint.sh"] == (CHART / "files" / "fetch_checkpoint.sh").read_text().rstrip("\n")
    pvc = one(objs, "PersistentVolumeClaim", f"{PREFIX}-checkpoint-cache")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for name in [model_name(s) for s in MODELS] + [f"{PREFIX}-orchestrator"]:
        spec = one(objs, "Deployment", name)["spec"]["template"]["spec"]
        fetch = spec["initContainers"][0]
        assert fetch["name"] == "fetch-checkpoint"
        assert {m["name"]: m.get("readOnly", False) for m in fetch["volumeMounts"]} == {"checkpoint": False, "fetch": True}
        claim = next(v for v in spec["volumes"] if v["name"] == "checkpoint")["persistentVolumeClaim"]
        assert claim == {"claimName": f"{PREFIX}-checkpoint-cache", "readOnly": False}
        main = spec["containers"][0]
        assert next(m for m in main["volumeMounts"] if m["name"] == "checkpoint")["readOnly"] is True
    objs = objects(SCENARIOS["download-rayservice"])
    assert not find(objs, "PersistentVolumeClaim")
    head = next(spec for owner, spec in pod_specs(objs) if owner == "head")
    assert head["initContainers"][0]["name"] == "fetch-checkpoint"
    assert {"claimName": "my-cache", "readOnly": False} in [v.get("persistentVolumeClaim") for v in head["volumes"]]
    assert not find(objects(), "ConfigMap", f"{PREFIX}-fetch")


def _fake_wget(tmp_path: Path) -> dict:
    """A `wget -q -O DEST URL` that copies the local file URL names, counting its calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "wget").write_text('#!/bin/sh\necho x >> "$FETCH_LOG"\ncp "$4" "$3"\n')
    (bin_dir / "wget").chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FETCH_LOG": str(tmp_path / "log")}


def test_fetch_script_verifies_and_skips_verified_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}\n")
    (src / "w.pt").write_bytes(b"weights")
    digest = {n: hashlib.sha256((src / n).read_bytes()).hexdigest() for n in ("config.json", "w.pt")}
    manifest = tmp_path / "manifest"
    manifest.write_text(f"{digest['config.json']} config.json {src}/config.json\n"
                        f"{digest['w.pt']} vocoder/w.pt {src}/w.pt\n")
    dest = tmp_path / "cache"
    env = _fake_wget(tmp_path)
    script = str(CHART / "files" / "fetch_checkpoint.sh")
    run = lambda: subprocess.run(["sh", script, str(dest), str(manifest)], env=env, capture_output=True, text=True)
    first = run()
    assert first.returncode == 0, first.stderr
    assert (dest / "vocoder" / "w.pt").read_bytes() == b"weights"
    assert (tmp_path / "log").read_text().count("x") == 2
    second = run()
    assert second.returncode == 0 and "verified config.json" in second.stdout
    assert (tmp_path / "log").read_text().count("x") == 2  # nothing fetched again
    (dest / "config.json").write_text("tampered")  # a stale file is fetched again
    assert run().returncode == 0 and (dest / "config.json").read_text() == "{}\n"
    assert not list(dest.glob("**/*.part.*"))

    bad = "0" * 64
    manifest.write_text(f"{bad} other.bin {src}/w.pt\n")
    failed = run()
    assert failed.returncode != 0
    assert f"sha256 mismatch: other.bin: expected {bad}, got {digest['w.pt']}" in failed.stderr
    assert not (dest / "other.bin").exists() and not list(dest.glob("*.part.*"))


def _configure(tmp_path: Path, service: str, config_name: str, params: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHART / "files" / "configure_model.py"),
                           str(REPO / "services" / service), str(tmp_path / service), config_name,
                           json.dumps(params)], capture_output=True, text=True)


@pytest.mark.parametrize("service", MODELS)
def test_configure_model_sets_the_checkpoint_of_each_real_config(tmp_path, service):
    configs = [""] + [p.stem for p in (REPO / "services" / service / "configs").glob("*.pbtxt")]
    for config_name in configs:
        done = _configure(tmp_path, service, config_name, {"checkpoint": "/models/checkpoint", "threads": "2"})
        assert done.returncode == 0, done.stderr
        rel = "config.pbtxt" if not config_name else f"configs/{config_name}.pbtxt"
        text = (tmp_path / service / rel).read_text()
        if model_config_pb2 is not None:  # Triton's own message parses the result
            config = text_format.Parse(text, model_config_pb2.ModelConfig())
            reference = text_format.Parse((REPO / "services" / service / rel).read_text(), model_config_pb2.ModelConfig())
            params = {k: v.string_value for k, v in config.parameters.items()}
            before = {k: v.string_value for k, v in reference.parameters.items()}
            assert params == {**before, "checkpoint": "/models/checkpoint", "threads": "2"}, rel
            assert config.name == reference.name and list(config.input) == list(reference.input)
        assert len(re.findall(r'key:\s*"checkpoint"', text)) == 1
        original = (REPO / "services" / service / rel).read_text()
        added = 0 if re.search(r'key:\s*"threads"', original) else 1  # a parameter it lacks is appended
        assert len(text.splitlines()) == len(original.splitlines()) + added
    assert (tmp_path / service / "1" / "model.py").is_file()


# -- orchestrator ----------------------------------------------------------------------------

def test_orchestrator_deployment():
    objs = objects()
    name = f"{PREFIX}-orchestrator"
    dep = one(objs, "Deployment", name)
    spec = dep["spec"]["template"]["spec"]
    orch = container(spec, "orchestrator")
    assert orch["command"] == ["python", "-m", "funchat.orchestrator.app"]
    assert orch["envFrom"] == [{"configMapRef": {"name": name}}]
    env = env_of(orch)
    assert list(env)[:2] == ["REDIS_PASSWORD", "FUNCHAT_REDIS_URL"]  # $(REDIS_PASSWORD) defined first
    assert env["REDIS_PASSWORD"]["secretKeyRef"] == {"name": f"{PREFIX}-redis", "key": "redis-password"}
    assert env["FUNCHAT_REDIS_URL"] == f"redis://:$(REDIS_PASSWORD)@{PREFIX}-redis:6379/0"
    secret_file = env["FUNCHAT_RESUME_SECRET_FILE"]
    mount = next(m for m in orch["volumeMounts"] if m["name"] == "resume-secret")
    assert secret_file == f"{mount['mountPath']}/resume-secret" and mount["readOnly"] is True
    volume = next(v for v in spec["volumes"] if v["name"] == "resume-secret")
    assert volume["secret"]["secretName"] == f"{PREFIX}-resume"
    assert "resume-secret" in one(objs, "Secret", f"{PREFIX}-resume")["data"]
    cm = one(objs, "ConfigMap", name)["data"]
    assert json.loads(cm["FUNCHAT_ENDPOINTS"]) == {s: f"{model_name(s)}:8001" for s in MODELS}
    assert cm["FUNCHAT_CHECKPOINT"] == "/models/checkpoint" and cm["FUNCHAT_GRPC_PORT"] == "50051"
    assert cm["FUNCHAT_MAX_CALLS"] == "16" and cm["FUNCHAT_REPLICAS"] == "1"
    assert not any(k in cm for k in ("FUNCHAT_RESUME_SECRET", "FUNCHAT_REDIS_URL"))
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert orch[probe]["grpc"] == {"port": 50051, "service": ""}
    assert orch["lifecycle"]["preStop"] == {"sleep": {"seconds": 10}}
    assert spec["terminationGracePeriodSeconds"] == 300
    assert orch["ports"] == [{"name": "grpc", "containerPort": 50051, "protocol": "TCP"}]
    svc = one(objs, "Service", name)
    assert svc["spec"]["ports"] == [{"name": "grpc", "port": 50051, "targetPort": "grpc", "protocol": "TCP",
                                     "appProtocol": "kubernetes.io/h2c"}]
    assert one(objs, "PodDisruptionBudget", name)
    assert not find(objs, "RayService")


def test_orchestrator_addresses_and_host_port_override_the_derived_ones():
    objs = objects(SCENARIOS["addresses-hostport"])
    name = f"{PREFIX}-orchestrator"
    endpoints = json.loads(one(objs, "ConfigMap", name)["data"]["FUNCHAT_ENDPOINTS"])
    assert endpoints == {**{s: f"{model_name(s)}:8001" for s in MODELS}, "llm": "llm-host.example:9001"}
    orch = container(one(objs, "Deployment", name)["spec"]["template"]["spec"], "orchestrator")
    assert env_of(orch)["FUNCHAT_REDIS_URL"] == "redis://:$(REDIS_PASSWORD)@fc-funchat-redis-pod-0:6379/0"
    assert orch["ports"] == [{"name": "grpc", "containerPort": 50051, "protocol": "TCP",
                              "hostIP": "127.0.0.1", "hostPort": 50061}]


def test_orchestrator_settings_accept_the_rendered_environment(tmp_path, monkeypatch, no_funchat_env):
    from funchat.orchestrator.settings import OrchestratorSettings

    objs = objects()
    cm = one(objs, "ConfigMap", f"{PREFIX}-orchestrator")["data"]
    env = env_of(container(one(objs, "Deployment", f"{PREFIX}-orchestrator")["spec"]["template"]["spec"],
                           "orchestrator"))
    secret = tmp_path / "resume-secret"
    secret.write_text("k" * 40)
    for k, v in cm.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("FUNCHAT_REDIS_URL", env["FUNCHAT_REDIS_URL"].replace("$(REDIS_PASSWORD)", "pw"))
    monkeypatch.setenv("FUNCHAT_RESUME_SECRET_FILE", str(secret))
    settings = OrchestratorSettings.load()
    assert settings.redis_url == f"redis://:pw@{PREFIX}-redis:6379/0"
    assert settings.max_calls == 16


def test_rayservice_mode():
    objs = objects(SCENARIOS["rayservice"])
    name = f"{PREFIX}-orchestrator"
    assert not find(objs, "Deployment", name) and not find(objs, "PodDisruptionBudget", name)
    rs = one(objs, "RayService", name)
    serve = yaml.safe_load(rs["spec"]["serveConfigV2"])
    reference = yaml.safe_load((REPO / "services" / "orchestrator" / "serve_config.yaml").read_text())
    assert serve["grpc_options"] == reference["grpc_options"]
    app, ref_app = serve["applications"][0], reference["applications"][0]
    for key in ("name", "route_prefix", "import_path", "args", "runtime_env"):
        assert app[key] == ref_app[key], key
    assert app["import_path"] == "funchat.orchestrator.app:app_builder"
    assert app["deployments"] == ref_app["deployments"]  # the defaults equal serve_config.yaml's
    cluster = rs["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]
    ports = {p["name"]: p["containerPort"] for p in head["spec"]["containers"][0]["ports"]}
    assert ports["serve-grpc"] == 50051
    assert head["metadata"]["labels"]["app.kubernetes.io/component"] == "orchestrator"
    assert cluster["workerGroupSpecs"][0]["replicas"] == 2
    env = env_of(head["spec"]["containers"][0])
    assert env["FUNCHAT_RESUME_SECRET_FILE"] == "/etc/funchat/resume/resume-secret"
    svc = one(objs, "Service", name)
    assert svc["spec"]["ports"][0]["targetPort"] == "serve-grpc"
    assert svc["spec"]["ports"][0]["appProtocol"] == "kubernetes.io/h2c"
    assert one(objs, "ConfigMap", name)["data"]["FUNCHAT_REPLICAS"] == "1"
    scaled = objects({"orchestrator": {"mode": "rayservice", "replicas": 3, "settings": {"max_calls": 8}}})
    deployment = yaml.safe_load(one(scaled, "RayService", name)["spec"]["serveConfigV2"])["applications"][0]
    assert deployment["deployments"][0]["num_replicas"] == 3
    assert deployment["deployments"][0]["max_ongoing_requests"] == 24
    assert "workerGroupSpecs" not in one(scaled, "RayService", name)["spec"]["rayClusterConfig"]


# -- redis, secrets, network, monitoring -----------------------------------------------------

def test_redis_internal_statefulset():
    objs = objects()
    sts = one(objs, "StatefulSet", f"{PREFIX}-redis")
    redis = container(sts["spec"]["template"]["spec"], "redis")
    args = redis["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert env_of(redis)["REDIS_PASSWORD"]["secretKeyRef"]["name"] == f"{PREFIX}-redis"
    claim = sts["spec"]["volumeClaimTemplates"][0]
    assert claim["metadata"]["name"] == "data" and claim["spec"]["resources"]["requests"]["storage"] == "8Gi"
    assert {"name": "data", "mountPath": "/data"} in redis["volumeMounts"]
    assert redis["resources"]["limits"]["memory"] == "1Gi"
    assert one(objs, "Service", f"{PREFIX}-redis-headless")["spec"]["clusterIP"] == "None"
    assert sts["spec"]["serviceName"] == f"{PREFIX}-redis-headless"


def test_redis_external():
    objs = objects(SCENARIOS["redis-external-secret"])
    assert not find(objs, "StatefulSet") and not find(objs, "Secret", f"{PREFIX}-redis")
    assert not find(objs, "NetworkPolicy", f"{PREFIX}-redis")
    env = env_of(container(one(objs, "Deployment", f"{PREFIX}-orchestrator")["spec"]["template"]["spec"],
                           "orchestrator"))
    assert env["FUNCHAT_REDIS_URL"] == "rediss://:$(REDIS_PASSWORD)@redis.example:6380/0"
    assert env["REDIS_PASSWORD"]["secretKeyRef"] == {"name": "redis-auth", "key": "redis-password"}
    objs = objects(SCENARIOS["redis-external-open"])
    env = env_of(container(one(objs, "Deployment", f"{PREFIX}-orchestrator")["spec"]["template"]["spec"],
                           "orchestrator"))
    assert env["FUNCHAT_REDIS_URL"] == "redis://redis.example:6379/1" and "REDIS_PASSWORD" not in env


def test_existing_secrets_are_used_not_generated():
    objs = objects(SCENARIOS["everything-off"])
    assert not find(objs, "Secret")
    spec = one(objs, "Deployment", f"{PREFIX}-orchestrator")["spec"]["template"]["spec"]
    assert next(v for v in spec["volumes"] if v["name"] == "resume-secret")["secret"]["secretName"] == "my-resume"
    sts = one(objs, "StatefulSet", f"{PREFIX}-redis")
    assert env_of(sts["spec"]["template"]["spec"]["containers"][0])["REDIS_PASSWORD"]["secretKeyRef"]["name"] == "my-redis"
    assert not find(objs, "NetworkPolicy") and not find(objs, "PodDisruptionBudget")


def test_network_policies():
    objs = objects()
    orch_labels = one(objs, "Deployment", f"{PREFIX}-orchestrator")["spec"]["selector"]["matchLabels"]
    models = one(objs, "NetworkPolicy", f"{PREFIX}-model-services")["spec"]
    assert models["podSelector"]["matchLabels"] == {"app.kubernetes.io/instance": NAME, "funchat.io/tier": "model"}
    for service in MODELS:  # the policy selects every model pod and no other
        labels = one(objs, "Deployment", model_name(service))["spec"]["template"]["metadata"]["labels"]
        assert models["podSelector"]["matchLabels"].items() <= labels.items()
    assert models["ingress"] == [{"from": [{"podSelector": {"matchLabels": orch_labels}}],
                                  "ports": [{"port": "grpc", "protocol": "TCP"}, {"port": "http", "protocol": "TCP"}]}]
    redis = one(objs, "NetworkPolicy", f"{PREFIX}-redis")["spec"]
    assert redis["ingress"] == [{"from": [{"podSelector": {"matchLabels": orch_labels}}],
                                 "ports": [{"port": 6379, "protocol": "TCP"}]}]
    public = one(objs, "NetworkPolicy", f"{PREFIX}-orchestrator")["spec"]
    assert public["podSelector"]["matchLabels"] == orch_labels
    assert public["ingress"] == [{"ports": [{"port": 50051, "protocol": "TCP"}]}]
    monitored = objects(SCENARIOS["monitoring"])
    ingress = one(monitored, "NetworkPolicy", f"{PREFIX}-model-services")["spec"]["ingress"]
    assert ingress[1]["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    ray = one(objects(SCENARIOS["rayservice"]), "NetworkPolicy", f"{PREFIX}-orchestrator")["spec"]["ingress"]
    assert ray[1] == {"from": [{"podSelector": {"matchLabels": orch_labels}}]}  # Ray pods among themselves


def test_service_monitor_only_when_enabled():
    assert not find(objects(), "ServiceMonitor")
    sm = one(objects(SCENARIOS["monitoring"]), "ServiceMonitor", f"{PREFIX}-model-services")
    assert sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    assert sm["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/instance": NAME, "funchat.io/tier": "model"}
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}


@pytest.mark.parametrize("scenario", ["defaults", "profile-dev-cpu", "profile-gpu"])
def test_entrypoint_environment_configures_each_real_model(tmp_path, scenario):
    """The env the chart gives the image's entrypoint, applied as it applies it
    (funchat.dev.tritonserver.prepare_model_repo), yields a config with the mounted checkpoint."""
    pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from funchat.dev.tritonserver import prepare_model_repo

    objs = objects(SCENARIOS[scenario])
    for service in MODELS:
        env = env_of(container(one(objs, "Deployment", model_name(service))["spec"]["template"]["spec"],
                               "tritonserver"))
        params = dict(item.partition("=")[::2] for item in shlex.split(env["FUNCHAT_PARAMS"]))
        params["checkpoint"] = env["FUNCHAT_CHECKPOINT"]
        out = prepare_model_repo(service, REPO / "services", tmp_path, params=params,
                                 config_name=env["FUNCHAT_CONFIG"] or None)
        config = text_format.Parse((out / service / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert config.parameters["checkpoint"].string_value == "/models/checkpoint"
        if scenario == "profile-gpu" and service != "vocoder":
            assert config.parameters["device"].string_value == "cuda"
            assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
