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
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import helm_python  # the test extra: helm-python-sdk, kubernetes-validate, jsonschema
import jsonschema
import kubernetes_validate
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2  # Triton's ModelConfig message, to parse configs

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "funchat"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
KUBE = "1.33"
MODELS = ["audio_tokenizer", "llm", "refined_head", "vocoder"]
NAME, NAMESPACE = "fc", "funchat"
PREFIX = "fc-funchat"
# Custom kinds: JSON schemas converted from the operators' CRDs (tests/unit/schemas/README.md).
CUSTOM = {
    ("ray.io/v1", "RayService"): "rayservice_ray.io_v1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor_monitoring.coreos.com_v1.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor_monitoring.coreos.com_v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule_monitoring.coreos.com_v1.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject_keda.sh_v1alpha1.json",
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "servingruntime_serving.kserve.io_v1alpha1.json",
    ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservice_serving.kserve.io_v1beta1.json",
}
SHA_A = "a" * 64
# Triton's counters (triton-inference-server/core src/metrics.cc): the names every query and alert
# of the chart may use
TRITON_METRICS = {
    "nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count",
    "nv_inference_exec_count", "nv_inference_request_duration_us", "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us", "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us", "nv_inference_pending_request_count",
}


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


def orchestrator_containers(objs: list[dict]) -> list[dict]:
    """The orchestrator's containers: the Deployment's, or the RayService's head and workers."""
    return [c for _, spec in pod_specs(objs) for c in spec["containers"]
            if c["name"] in ("orchestrator", "ray-head", "ray-worker")]


def env_of(c: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


@functools.lru_cache(maxsize=None)
def custom_validator(schema_file: str):
    """A validator of a vendored CRD schema (checked once; the KServe ones are large)."""
    schema = json.loads((SCHEMAS / schema_file).read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def render_error(values: dict) -> str:
    """The message of a render the chart refuses (schema or `fail`)."""
    with pytest.raises(helm_python.HelmError) as err:
        with helm_python.Chart.load(str(CHART)) as chart:
            chart.render(values, name=NAME, namespace=NAMESPACE)
    return str(err.value)


KSERVE_MONITORING = {"monitoring": {"podMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}}}
TRACING = {"tracing": {"endpoint": "otel-collector.observability.svc:4317", "sampleRatio": 0.25,
                       "headersSecret": {"name": "otel-headers", "key": "api-headers"}}}


SCENARIOS = {
    "defaults": {},
    "profile-dev-cpu": profile("dev-cpu"),
    "profile-gpu": profile("gpu"),
    "rayservice": {"orchestrator": {"mode": "rayservice", "rayService": {"workerReplicas": 2}}},
    "redis-external-secret": {"redis": {"mode": "external", "external": {
        "url": "rediss://redis.example:6380/0", "existingSecret": "redis-auth"}}},
    "redis-external-open": {"redis": {"mode": "external", "external": {"url": "redis://redis.example:6379/1"}}},
    "redis-tls": {"orchestrator": {"mode": "rayservice", "rayService": {"workerReplicas": 1}},
                  "redis": {"internal": {"tls": {"secretName": "funchat-redis-tls"}}}},
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
    "kserve-raw": deep_merge(KSERVE_MONITORING, {
        "kserve": {"enabled": True},
        "modelServices": {"llm": {"autoscaling": {"mode": "hpa"}}, "vocoder": {"autoscaling": {"mode": "keda"}},
                          "refined_head": {"extraArgs": ["--log-verbose=1"], "parameters": {"threads": "2"}}},
        "networkPolicy": {"metricsFrom": [{"namespaceSelector": {"matchLabels": {
            "kubernetes.io/metadata.name": "monitoring"}}}]}}),
    "kserve-serverless": deep_merge(KSERVE_MONITORING, {
        "kserve": {"enabled": True, "deploymentMode": "Serverless"},
        "modelServices": {"audio_tokenizer": {"autoscaling": {"mode": "hpa", "maxReplicas": 3}}}}),
    "kserve-gpu": deep_merge(profile("gpu"), {
        "kserve": {"enabled": True}, "modelStorage": {"subPath": "fun-audio-chat-8b"},
        "monitoring": {"serviceMonitor": {"enabled": False}, "podMonitor": {"enabled": True}}}),
    "pod-monitor": {"monitoring": {"podMonitor": {"enabled": True, "interval": "30s", "labels": {"release": "prom"}}}},
    "rayservice-monitoring": {
        "orchestrator": {"mode": "rayservice", "rayService": {"workerReplicas": 1}},
        "monitoring": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
                       "podMonitor": {"enabled": True}}},
    "metrics-off": {"orchestrator": {"metricsPort": 0},
                    "monitoring": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}},
                    "networkPolicy": {"metricsFrom": [{"namespaceSelector": {"matchLabels": {
                        "kubernetes.io/metadata.name": "monitoring"}}}]}},
    "prometheus-rule": {"monitoring": {"serviceMonitor": {"enabled": True}, "prometheusRule": {
        "enabled": True, "labels": {"release": "prom"},
        "modelServiceDown": {"for": "3m"}, "queueTime": {"thresholdUs": 123456, "for": "7m"},
        "failureRatio": {"threshold": 0.2, "for": "9m"}, "orchestratorUnavailable": {"for": "11m"},
        "extraRules": [{"record": "funchat:orchestrator_calls:rate5m", "expr": "sum(rate(funchat_calls_total[5m]))"}]}}},
    "tracing": deep_merge(TRACING, {"modelServices": {"llm": {"launch": "tritonserver"}}}),
    "tracing-rayservice": deep_merge(TRACING, {"orchestrator": {"mode": "rayservice", "rayService": {
        "workerReplicas": 1}}}),
    "tracing-kserve": deep_merge(TRACING, {"kserve": {"enabled": True}}),
    "auth-off": {"auth": {"mode": "off"}},
    "realtime-ingress": {"orchestrator": {"realtime": {"ingress": {
        "enabled": True, "className": "nginx", "host": "chat.example.com", "tlsSecretName": "chat-tls",
        "annotations": {"nginx.ingress.kubernetes.io/proxy-read-timeout": "3600"}}}}},
    "realtime-off-rayservice": {"orchestrator": {"mode": "rayservice", "rayService": {"workerReplicas": 1},
                                                 "realtime": {"enabled": False}}},
    "auth-rayservice": {"orchestrator": {"mode": "rayservice", "rayService": {"workerReplicas": 1},
                                         "settings": {"max_message_bytes": 33554432}},
                        "auth": {"apiKeysSecret": {"name": "tenant-keys", "key": "keys.json"}}},
    "everything-off": {"networkPolicy": {"enabled": False},
                       "modelServiceDefaults": {"podDisruptionBudget": {"enabled": False}},
                       "orchestrator": {"podDisruptionBudget": {"enabled": False}},
                       "secrets": {"resume": {"existingSecret": "my-resume"}},
                       "redis": {"internal": {"existingSecret": "my-redis"}}},
}


# -- lint and validation ---------------------------------------------------------------------

@pytest.mark.parametrize("scenario", ["defaults", "profile-dev-cpu", "profile-gpu", "rayservice", "kserve-raw",
                                      "tracing", "realtime-ingress"])
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
            custom_validator(CUSTOM[key]).validate(obj)
        else:
            kubernetes_validate.validate(obj, KUBE, strict=True)
        ident = (obj["kind"], obj["metadata"]["name"])
        assert ident not in names, f"{ident} rendered twice"
        names.add(ident)
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == NAME


def test_notes_render():
    notes = render()["funchat/templates/NOTES.txt"]
    assert f"{PREFIX}-orchestrator:50051" in notes and "funchat chat --server" in notes
    assert f"ws://{PREFIX}-orchestrator:8000/v1/realtime?model=fun-audio-chat" in notes
    assert "Model services: Deployments" in notes and f"llm: {PREFIX}-llm:8001" in notes
    assert "Prometheus metrics: port 9464 (/metrics) of each orchestrator pod" in notes
    assert "Prometheus metrics" not in render({"orchestrator": {"metricsPort": 0}})["funchat/templates/NOTES.txt"]
    assert "WARNING" in render({"modelStorage": {"mode": "download"}})["funchat/templates/NOTES.txt"]
    notes = render(SCENARIOS["kserve-serverless"])["funchat/templates/NOTES.txt"]
    assert "KServe mode (Serverless)" in notes and f"ServingRuntime {PREFIX}-triton" in notes
    assert f"llm: {PREFIX}-llm-predictor.{NAMESPACE}.svc:80" in notes


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
    ({"orchestrator": {"settings": {"metrics_port": 1}}}, "/orchestrator/settings", ""),  # orchestrator.metricsPort
    ({"orchestrator": {"settings": {"auth": "off"}}}, "/orchestrator/settings", ""),  # auth.mode
    ({"orchestrator": {"settings": {"api_keys_file": "/k"}}}, "/orchestrator/settings", ""),  # auth.apiKeysSecret
    ({"orchestrator": {"settings": {"max_message_bytes": 65536}}}, "/orchestrator/settings/max_message_bytes",
     "minimum"),
    ({"orchestrator": {"settings": {"idle_timeout_s": 0}}}, "/orchestrator/settings/idle_timeout_s", ""),
    ({"auth": {"mode": "none"}}, "/auth/mode", "must be one of"),
    ({"auth": {"mode": False}}, "/auth/mode", ""),  # YAML's bare `off`
    ({"auth": {"apiKeysSecret": {"name": "Tenant_Keys"}}}, "/auth/apiKeysSecret/name", "pattern"),
    ({"auth": {"apiKeysSecret": {"key": "a/b"}}}, "/auth/apiKeysSecret/key", "pattern"),
    ({"auth": {"keys": []}}, "/auth", "'keys' not allowed"),
    ({"orchestrator": {"metricsPort": 70000}}, "/orchestrator/metricsPort", "maximum"),
    ({"orchestrator": {"metricsPort": "9464"}}, "/orchestrator/metricsPort", "want integer"),
    ({"modelStorage": {"download": {"baseUrl": "s3://bucket/ckpt"}}}, "/modelStorage/download/baseUrl", "pattern"),
    ({"orchestrator": {"addresses": {"llm": "llm"}}}, "/orchestrator/addresses/llm", "pattern"),
    ({"orchestrator": {"addresses": {"tts": "tts:8001"}}}, "/orchestrator/addresses", "'tts' not allowed"),
    ({"modelServiceDefaults": {"resources": {"limits": {"memory": "lots"}}}},
     "/modelServiceDefaults/resources/limits/memory", ""),
    ({"kserve": {"enabled": "yes"}}, "/kserve/enabled", "want boolean"),
    ({"kserve": {"deploymentMode": "Knative"}}, "/kserve/deploymentMode", "must be one of"),
    ({"kserve": {"runtime": "triton"}}, "/kserve", "'runtime' not allowed"),
    ({"kserve": {"modelFormat": {"name": "Triton Server"}}}, "/kserve/modelFormat/name", "pattern"),
    ({"kserve": {"serverless": {"scaleMetric": "cpu"}}}, "/kserve/serverless/scaleMetric", "must be one of"),
    ({"kserve": {"serverless": {"scaleTarget": 0}}}, "/kserve/serverless/scaleTarget", "minimum"),
    ({"kserve": {"serverless": {"dataPlaneFrom": {"namespaceSelector": {}}}}}, "/kserve/serverless/dataPlaneFrom",
     "want array"),
    ({"orchestrator": {"httpPort": 0}}, "/orchestrator/httpPort", "minimum"),
    ({"orchestrator": {"httpPort": "8000"}}, "/orchestrator/httpPort", "want integer"),
    ({"orchestrator": {"settings": {"http_host": "0.0.0.0"}}}, "/orchestrator/settings/http_host", ""),  # chart's
    ({"orchestrator": {"settings": {"http_port": 8080}}}, "/orchestrator/settings/http_port", ""),  # httpPort
    ({"orchestrator": {"settings": {"model_name": ""}}}, "/orchestrator/settings/model_name", "minLength"),
    ({"orchestrator": {"realtime": {"enabled": "yes"}}}, "/orchestrator/realtime/enabled", "want boolean"),
    ({"orchestrator": {"realtime": {"port": 8000}}}, "/orchestrator/realtime", "'port' not allowed"),
    ({"orchestrator": {"realtime": {"enabled": False, "ingress": {"enabled": True}}}},
     "/orchestrator/realtime/enabled", "must be true"),  # an Ingress to a port the Service lacks
    ({"orchestrator": {"realtime": {"ingress": {"tlsSecretName": "chat-tls"}}}},
     "/orchestrator/realtime/ingress/host", "minLength"),  # TLS needs the host its certificate names
    ({"orchestrator": {"realtime": {"ingress": {"host": "Chat_Host"}}}}, "/orchestrator/realtime/ingress/host",
     "pattern"),
    ({"orchestrator": {"realtime": {"ingress": {"tls": True}}}}, "/orchestrator/realtime/ingress",
     "'tls' not allowed"),
    ({"monitoring": {"podMonitor": {"enabled": 1}}}, "/monitoring/podMonitor/enabled", "want boolean"),
    ({"monitoring": {"podMonitor": {"interval": "soon"}}}, "/monitoring/podMonitor/interval", "pattern"),
    ({"monitoring": {"podMonitor": {"port": "metrics"}}}, "/monitoring/podMonitor", "'port' not allowed"),
    ({"monitoring": {"prometheusRule": {"enabled": "true"}}}, "/monitoring/prometheusRule/enabled", "want boolean"),
    ({"monitoring": {"prometheusRule": {"queueTime": {"thresholdUs": "high"}}}},
     "/monitoring/prometheusRule/queueTime/thresholdUs", "want integer"),
    ({"monitoring": {"prometheusRule": {"failureRatio": {"threshold": 2}}}},
     "/monitoring/prometheusRule/failureRatio/threshold", "maximum"),
    ({"monitoring": {"prometheusRule": {"modelServiceDown": {"for": "5 minutes"}}}},
     "/monitoring/prometheusRule/modelServiceDown/for", "pattern"),
    ({"monitoring": {"prometheusRule": {"latencySlo": {}}}}, "/monitoring/prometheusRule", "'latencySlo' not allowed"),
    ({"monitoring": {"prometheusRule": {"extraRules": [{"alert": "X"}]}}},
     "/monitoring/prometheusRule/extraRules/0", "missing property 'expr'"),
    ({"monitoring": {"prometheusRule": {"extraRules": [{"alert": "X", "expr": "up", "severity": "page"}]}}},
     "/monitoring/prometheusRule/extraRules/0", "'severity' not allowed"),
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
    # a mean per request, compared as it is (AverageValue would divide it by the replicas)
    assert ext["spec"]["metrics"][0]["external"]["target"] == {"type": "Value", "value": "50000"}
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
    assert prom["metricType"] == "Value"  # a mean per request: not divided by the replicas
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


def test_download_base_url_fills_the_urls_a_file_leaves_out():
    mirror = "https://hf-mirror.example/FunAudioLLM/Fun-Audio-Chat-8B/resolve/main/"
    objs = objects({"modelStorage": {"mode": "download", "download": {"baseUrl": mirror, "files": [
        {"path": "config.json", "sha256": SHA_A},
        {"path": "vocoder/hift.pt", "url": "https://elsewhere.example/hift.pt", "sha256": "b" * 64}]}}})
    assert one(objs, "ConfigMap", f"{PREFIX}-fetch")["data"]["manifest"].splitlines() == [
        f"{SHA_A} config.json {mirror}config.json",
        f"{'b' * 64} vocoder/hift.pt https://elsewhere.example/hift.pt"]
    with pytest.raises(helm_python.HelmError, match="config.json has no url and modelStorage.download.baseUrl"):
        objects({"modelStorage": {"mode": "download", "download": {"files": [{"path": "config.json",
                                                                              "sha256": SHA_A}]}}})


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
    assert env["FUNCHAT_REDIS_PASSWORD"]["secretKeyRef"] == {"name": f"{PREFIX}-redis", "key": "redis-password"}
    assert env["FUNCHAT_REDIS_URL"] == f"redis://{PREFIX}-redis:6379/0"  # no $(VAR): podman cannot expand it
    assert env["HOME"] == "/tmp"  # Ray writes ~/.ray; the root file system is read-only
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
    assert cm["FUNCHAT_METRICS_PORT"] == "9464"
    assert not any(k in cm for k in ("FUNCHAT_RESUME_SECRET", "FUNCHAT_REDIS_URL"))
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):  # Ray's proxy: kubelet speaks no TLS
        assert orch[probe]["grpc"] == {"port": 50052, "service": ""}
    assert cm["FUNCHAT_PROXY_PORT"] == "50052" and cm["FUNCHAT_KEEPALIVE_TIME_S"] == "30"
    assert orch["lifecycle"]["preStop"] == {"sleep": {"seconds": 10}}
    assert spec["terminationGracePeriodSeconds"] == 300
    assert orch["ports"] == [{"name": "grpc", "containerPort": 50051, "protocol": "TCP"},
                             {"name": "http", "containerPort": 8000, "protocol": "TCP"},
                             {"name": "metrics", "containerPort": 9464, "protocol": "TCP"}]
    assert cm["FUNCHAT_HTTP_PORT"] == "8000" and env["FUNCHAT_HTTP_HOST"] == "0.0.0.0"
    svc = one(objs, "Service", name)
    assert svc["spec"]["ports"] == [{"name": "grpc", "port": 50051, "targetPort": "grpc", "protocol": "TCP",
                                     "appProtocol": "kubernetes.io/h2c"},
                                    {"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP",
                                     "appProtocol": "http"}]
    assert one(objs, "PodDisruptionBudget", name)
    assert not find(objs, "RayService")
    assert not find(objs, "Service", f"{name}-metrics")  # only for the ServiceMonitor


def test_public_tls_and_the_gateway():
    """tls.*: the Secrets mounted as directories (no subPath: rotation reaches the pod), the gateway's
    TLS settings where it runs (the orchestrator container; each Ray pod's sidecar), settings the
    gateway accepts, and mTLS without a certificate refused by the schema."""
    from funchat.gateway.settings import GatewaySettings

    name = f"{PREFIX}-orchestrator"
    tls = {"tls": {"secretName": "public-tls", "clientCASecret": "client-ca"}}
    objs = objects(tls)
    spec = one(objs, "Deployment", name)["spec"]["template"]["spec"]
    orch = container(spec, "orchestrator")
    env = env_of(orch)
    assert (env["FUNCHAT_TLS_CERT_FILE"], env["FUNCHAT_TLS_KEY_FILE"], env["FUNCHAT_TLS_CLIENT_CA_FILE"]) == \
        ("/etc/funchat/tls/tls.crt", "/etc/funchat/tls/tls.key", "/etc/funchat/client-ca/ca.crt")
    mounts = {m["name"]: m for m in orch["volumeMounts"]}
    for volume_name, secret, path in (("public-tls", "public-tls", "/etc/funchat/tls"),
                                      ("client-ca", "client-ca", "/etc/funchat/client-ca")):
        assert mounts[volume_name]["mountPath"] == path and "subPath" not in mounts[volume_name]
        volume = next(v for v in spec["volumes"] if v["name"] == volume_name)
        assert volume["secret"]["secretName"] == secret
    assert "appProtocol" not in one(objs, "Service", name)["spec"]["ports"][0]  # not h2c any more
    cm = one(objs, "ConfigMap", name)["data"]
    gateway_env = {k: v for k, v in {**cm, **env}.items() if k.startswith("FUNCHAT_")}
    settings = GatewaySettings(**{k.removeprefix("FUNCHAT_").lower(): v for k, v in gateway_env.items()
                                  if k.removeprefix("FUNCHAT_").lower() in GatewaySettings.model_fields})
    assert settings.tls and settings.proxy_port == 50052 and settings.grpc_port == 50051
    assert settings.keepalive_time_s == 30 and settings.max_connection_age_grace_s == 3600

    ray = objects(deep_merge(tls, {"orchestrator": {"mode": "rayservice", "rayService": {"workerReplicas": 1}}}))
    cluster = one(ray, "RayService", name)["spec"]["rayClusterConfig"]
    for group in (cluster["headGroupSpec"], cluster["workerGroupSpecs"][0]):
        pod = group["template"]["spec"]
        assert [c["name"] for c in pod["containers"]][0] in ("ray-head", "ray-worker")  # KubeRay's containers[0]
        sidecar = container(pod, "gateway")
        assert sidecar["command"] == ["python", "-m", "funchat.gateway"]
        assert sidecar["ports"] == [{"name": "grpc", "containerPort": 50051, "protocol": "TCP"}]
        assert sidecar["readinessProbe"]["grpc"] == {"port": 50052, "service": ""}
        assert env_of(sidecar)["FUNCHAT_TLS_CLIENT_CA_FILE"] == "/etc/funchat/client-ca/ca.crt"
        assert {v["name"] for v in pod["volumes"]} >= {"public-tls", "client-ca"}
    assert yaml.safe_load(one(ray, "RayService", name)["spec"]["serveConfigV2"])["grpc_options"]["port"] == 50052
    plain = container(one(objects(), "Deployment", name)["spec"]["template"]["spec"], "orchestrator")
    assert not any(k.startswith("FUNCHAT_TLS") for k in env_of(plain))
    with pytest.raises(Exception, match="secretName"):
        objects({"tls": {"secretName": "", "clientCASecret": "client-ca"}})


def test_redis_external_with_its_own_ca():
    """redis.external.caSecret: the orchestrators verify an external rediss:// Redis with that CA,
    mounted alone; with a plain redis:// url the chart refuses it and says why."""
    external = {"redis": {"mode": "external", "external": {"url": "rediss://redis.example:6380/0",
                                                           "caSecret": "corp-ca", "caKey": "root.pem"}}}
    objs = objects(external)
    spec = one(objs, "Deployment", f"{PREFIX}-orchestrator")["spec"]["template"]["spec"]
    orch = container(spec, "orchestrator")
    assert env_of(orch)["FUNCHAT_REDIS_CA_FILE"] == "/etc/funchat/redis-tls/ca.crt"
    assert {"name": "redis-ca", "mountPath": "/etc/funchat/redis-tls", "readOnly": True} in orch["volumeMounts"]
    volume = next(v for v in spec["volumes"] if v["name"] == "redis-ca")["secret"]
    assert volume["secretName"] == "corp-ca" and volume["items"] == [{"key": "root.pem", "path": "ca.crt"}]
    plain = deep_merge(external, {"redis": {"external": {"url": "redis://redis.example:6379/0"}}})
    assert "redis.external.caSecret is set but redis.external.url is not rediss://" in render_error(plain)


def test_model_service_addresses_may_list_replicas():
    """A model service's address may be a comma-separated replica list (the orchestrator fails over
    between them); Redis' may not."""
    replicas = "llm-a.example:8001,llm-b.example:8001"
    objs = objects({"orchestrator": {"addresses": {"llm": replicas}}})
    endpoints = json.loads(one(objs, "ConfigMap", f"{PREFIX}-orchestrator")["data"]["FUNCHAT_ENDPOINTS"])
    assert endpoints["llm"] == replicas
    assert "/orchestrator/addresses/redis" in render_error({"orchestrator": {"addresses": {"redis": "a:1,b:2"}}})
    assert "/orchestrator/addresses/llm" in render_error({"orchestrator": {"addresses": {"llm": "a:1,"}}})


def test_orchestrator_addresses_and_host_port_override_the_derived_ones():
    objs = objects(SCENARIOS["addresses-hostport"])
    name = f"{PREFIX}-orchestrator"
    endpoints = json.loads(one(objs, "ConfigMap", name)["data"]["FUNCHAT_ENDPOINTS"])
    assert endpoints == {**{s: f"{model_name(s)}:8001" for s in MODELS}, "llm": "llm-host.example:9001"}
    orch = container(one(objs, "Deployment", name)["spec"]["template"]["spec"], "orchestrator")
    assert env_of(orch)["FUNCHAT_REDIS_URL"] == "redis://fc-funchat-redis-pod-0:6379/0"
    assert orch["ports"] == [{"name": "grpc", "containerPort": 50051, "protocol": "TCP",
                              "hostIP": "127.0.0.1", "hostPort": 50061},
                             {"name": "http", "containerPort": 8000, "protocol": "TCP"},  # not published
                             {"name": "metrics", "containerPort": 9464, "protocol": "TCP"}]  # not published


def test_orchestrator_settings_accept_the_rendered_environment(tmp_path, monkeypatch, no_funchat_env):
    from funchat.orchestrator.settings import OrchestratorSettings

    settings = _load_rendered_settings(objects(), tmp_path, monkeypatch)
    assert settings.redis_url == f"redis://{PREFIX}-redis:6379/0"
    assert settings.redis_password.get_secret_value() == "pw"
    assert settings.max_calls == 16 and settings.metrics_port == 9464
    assert (settings.http_host, settings.http_port) == ("0.0.0.0", 8000)  # Ray's HTTP proxy: the Realtime port
    assert settings.auth == "api_keys" and settings.api_keys_file == tmp_path / "api-keys" / "api_keys"
    assert settings.max_message_bytes == 16 << 20


def _load_rendered_settings(objs: list[dict], tmp_path: Path, monkeypatch):
    """OrchestratorSettings from the orchestrator container's rendered ConfigMap and env, as the
    kubelet would give them: secretKeyRefs as values, each file of a mounted Secret (a path under a
    Secret volume's mountPath) under tmp_path/<volume>/ instead."""
    from funchat.api_keys import create_key
    from funchat.orchestrator.settings import OrchestratorSettings

    name = f"{PREFIX}-orchestrator"
    cm = one(objs, "ConfigMap", name)["data"]
    spec = one(objs, "Deployment", name)["spec"]["template"]["spec"]
    orch = container(spec, "orchestrator")
    secret_volumes = {v["name"] for v in spec["volumes"] if "secret" in v}
    mounts = {m["mountPath"]: m["name"] for m in orch["volumeMounts"] if m["name"] in secret_volumes}
    for k, v in cm.items():
        monkeypatch.setenv(k, v)
    for e in orch["env"]:
        value = e.get("value")
        if "valueFrom" in e:
            assert e["name"] == "FUNCHAT_REDIS_PASSWORD", e
            value = "pw"  # what the kubelet sets from the secretKeyRef
        elif e["name"] in ("FUNCHAT_RESUME_SECRET_FILE", "FUNCHAT_API_KEYS_FILE"):
            path = Path(value)
            assert str(path.parent) in mounts, f"{e['name']}={value} is not in a mounted Secret"
            local = tmp_path / mounts[str(path.parent)] / path.name
            local.parent.mkdir(exist_ok=True)
            if e["name"] == "FUNCHAT_API_KEYS_FILE":
                create_key(local, "acme")
            else:
                local.write_text("k" * 40)
            value = str(local)
        monkeypatch.setenv(e["name"], value)
    return OrchestratorSettings.load()


def test_orchestrator_settings_accept_the_rendered_environment_without_auth(tmp_path, monkeypatch,
                                                                             no_funchat_env):
    values = {"auth": {"mode": "off"}, "orchestrator": {"settings": {
        "max_message_bytes": 33554432, "idle_timeout_s": 120, "max_call_s": 7200.5}}}
    settings = _load_rendered_settings(objects(values), tmp_path, monkeypatch)
    assert settings.auth == "off" and settings.api_keys_file is None
    # whole numbers stay whole (not 3.3554432e+07, what toString makes of a float64 of 8 digits)
    assert settings.max_message_bytes == 33554432 and settings.idle_timeout_s == 120
    assert settings.max_call_s == 7200.5


def test_rayservice_mode():
    objs = objects(SCENARIOS["rayservice"])
    name = f"{PREFIX}-orchestrator"
    assert not find(objs, "Deployment", name) and not find(objs, "PodDisruptionBudget", name)
    rs = one(objs, "RayService", name)
    serve = yaml.safe_load(rs["spec"]["serveConfigV2"])
    reference = yaml.safe_load((REPO / "services" / "orchestrator" / "serve_config.yaml").read_text())
    assert serve["grpc_options"] == reference["grpc_options"]
    assert serve["http_options"] == {"host": "0.0.0.0", "port": 8000}  # the Realtime port, on the pod's address
    app, ref_app = serve["applications"][0], reference["applications"][0]
    for key in ("name", "route_prefix", "import_path", "args", "runtime_env"):
        assert app[key] == ref_app[key], key
    assert app["import_path"] == "funchat.orchestrator.app:app_builder"
    assert app["deployments"] == ref_app["deployments"]  # the defaults equal serve_config.yaml's
    cluster = rs["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]
    ports = {p["name"]: p["containerPort"] for p in head["spec"]["containers"][0]["ports"]}
    assert ports["serve-grpc"] == 50052  # Ray's proxy, behind each Ray pod's gateway sidecar
    assert ports["serve"] == 8000  # Ray's HTTP proxy (KubeRay's name for it), the Service's port http
    # the first Serve replica of each Ray pod serves the pod's metrics: every Ray pod declares the port
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        assert {"name": "metrics", "containerPort": 9464} in group["template"]["spec"]["containers"][0]["ports"]
    assert app["runtime_env"]["env_vars"]["PROMETHEUS_MULTIPROC_DIR"] == "/tmp/funchat-metrics"
    mounts = {m["mountPath"]: m["name"] for m in head["spec"]["containers"][0]["volumeMounts"]}
    assert mounts["/tmp"] == "tmp"  # the metrics directory is on the pod's own emptyDir
    assert head["metadata"]["labels"]["app.kubernetes.io/component"] == "orchestrator"
    assert cluster["workerGroupSpecs"][0]["replicas"] == 2
    env = env_of(head["spec"]["containers"][0])
    assert env["FUNCHAT_RESUME_SECRET_FILE"] == "/etc/funchat/resume/resume-secret"
    svc = one(objs, "Service", name)
    assert svc["spec"]["ports"][0]["targetPort"] == "grpc"  # the gateway sidecar
    assert svc["spec"]["ports"][0]["appProtocol"] == "kubernetes.io/h2c"
    assert one(objs, "ConfigMap", name)["data"]["FUNCHAT_REPLICAS"] == "1"
    assert one(objs, "ConfigMap", name)["data"]["FUNCHAT_METRICS_PORT"] == "9464"  # app_builder reads it
    scaled = objects({"orchestrator": {"mode": "rayservice", "replicas": 3, "settings": {"max_calls": 8}}})
    deployment = yaml.safe_load(one(scaled, "RayService", name)["spec"]["serveConfigV2"])["applications"][0]
    assert deployment["deployments"][0]["num_replicas"] == 3
    assert deployment["deployments"][0]["max_ongoing_requests"] == 24
    assert "workerGroupSpecs" not in one(scaled, "RayService", name)["spec"]["rayClusterConfig"]


# -- the Realtime port (HTTP) ----------------------------------------------------------------

def orchestrator_pod_templates(objs: list[dict]) -> list[tuple[str, dict]]:
    """(pod, pod template) of the orchestrator's pods: the Deployment's, the Ray head's and workers'."""
    out = [(o["metadata"]["name"], o["spec"]["template"]) for o in find(objs, "Deployment", f"{PREFIX}-orchestrator")]
    for rs in find(objs, "RayService"):
        cluster = rs["spec"]["rayClusterConfig"]
        out.append(("head", cluster["headGroupSpec"]["template"]))
        out += [(g["groupName"], g["template"]) for g in cluster.get("workerGroupSpecs", [])]
    return out


def admitting_rules(objs: list[dict], labels: dict, ports: dict, port: int) -> list:
    """The `from` of every NetworkPolicy rule that lets TCP traffic to `port` into a pod with these
    labels and container ports (name -> number): None where a rule admits anyone."""
    found = []
    for policy in find(objs, "NetworkPolicy"):
        spec = policy["spec"]
        if not spec["podSelector"]["matchLabels"].items() <= labels.items() or "Ingress" not in spec["policyTypes"]:
            continue
        for rule in spec.get("ingress", []):
            rule_ports = rule.get("ports")
            if rule_ports is None or any(p.get("protocol", "TCP") == "TCP" and ports.get(p["port"], p["port"]) == port
                                         for p in rule_ports):
                found.append(rule.get("from"))
    return found


def _realtime_values(profile_name: str, mode: str) -> dict:
    extra = {"orchestrator": {"mode": mode}}
    if mode == "rayservice":
        extra["orchestrator"]["rayService"] = {"workerReplicas": 1}
    return deep_merge(profile(profile_name), extra)


@pytest.mark.parametrize("mode", ["deployment", "rayservice"])
@pytest.mark.parametrize("profile_name", ["dev-cpu", "gpu"])
def test_realtime_port_is_exposed_on_the_pods_the_service_and_the_network_policy(
        profile_name, mode, tmp_path, monkeypatch, no_funchat_env):
    """The Realtime WebSocket's port (orchestrator.httpPort, 8000) in both modes and both profiles:
    Ray Serve's HTTP proxy binds it on all the pod's interfaces (FUNCHAT_HTTP_HOST=0.0.0.0 for the
    process of mode deployment, serveConfigV2's http_options in the Ray pods), every orchestrator pod
    declares it, the public Service's port http reaches it on every pod it selects, and the
    NetworkPolicy admits it from wherever it admits the gRPC port."""
    objs = objects(_realtime_values(profile_name, mode))
    for obj in objs:  # these renders are no SCENARIOS: validated here
        key = (obj["apiVersion"], obj["kind"])
        if key in CUSTOM:
            custom_validator(CUSTOM[key]).validate(obj)
        else:
            kubernetes_validate.validate(obj, KUBE, strict=True)
    name = f"{PREFIX}-orchestrator"
    cm = one(objs, "ConfigMap", name)["data"]
    assert cm["FUNCHAT_HTTP_PORT"] == "8000"
    svc = one(objs, "Service", name)
    http = next(p for p in svc["spec"]["ports"] if p["name"] == "http")
    assert (http["port"], http["protocol"], http["appProtocol"]) == (8000, "TCP", "http")
    assert [p["name"] for p in svc["spec"]["ports"]] == ["grpc", "http"]
    pods = orchestrator_pod_templates(objs)
    assert len(pods) == (1 if mode == "deployment" else 2)
    for pod, template in pods:
        assert svc["spec"]["selector"].items() <= template["metadata"]["labels"].items(), pod
        main = template["spec"]["containers"][0]  # the orchestrator container, or KubeRay's Ray container
        ports = {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
        # the Service's targetPort names a port of this pod: the HTTP proxy's, on the Ray container for KubeRay
        assert ports[http["targetPort"]] == 8000, pod
        assert http["targetPort"] in [p["name"] for p in main.get("ports", [])], pod
        assert http["targetPort"] == ("http" if mode == "deployment" else "serve")  # "serve": KubeRay's name
        grpc_from = admitting_rules(objs, template["metadata"]["labels"], ports, 50051)
        assert None in grpc_from  # networkPolicy.publicFrom [] : anyone
        assert admitting_rules(objs, template["metadata"]["labels"], ports, 8000) == grpc_from, pod
        env = env_of(main)
        if mode == "deployment":
            assert main["command"] == ["python", "-m", "funchat.orchestrator.app"]
            assert env["FUNCHAT_HTTP_HOST"] == "0.0.0.0", pod  # not the setting's 127.0.0.1: unreachable
        else:
            assert "FUNCHAT_HTTP_HOST" not in env, pod  # no such process in a Ray pod: http_options decide
    if mode == "deployment":  # what the process reads from the rendered ConfigMap and env
        settings = _load_rendered_settings(objs, tmp_path, monkeypatch)
        assert (settings.http_host, settings.http_port) == ("0.0.0.0", 8000)
    else:
        from ray.serve.schema import ServeDeploySchema

        raw = yaml.safe_load(one(objs, "RayService", name)["spec"]["serveConfigV2"])
        serve = ServeDeploySchema.model_validate(raw)  # what KubeRay hands Ray's dashboard
        assert (serve.http_options.host, serve.http_options.port) == ("0.0.0.0", 8000)
        assert raw["http_options"] == {"host": "0.0.0.0", "port": 8000}  # nothing else: Ray's defaults
        assert serve.proxy_location.value == "EveryNode"  # a proxy, so the port, on every Ray pod


@pytest.mark.parametrize("mode", ["deployment", "rayservice"])
def test_realtime_port_value_and_public_peers_reach_every_place(mode):
    peers = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "edge"}}}]
    values = {"orchestrator": {"mode": mode, "httpPort": 8080}, "networkPolicy": {"publicFrom": peers}}
    objs = objects(values)
    name = f"{PREFIX}-orchestrator"
    assert one(objs, "ConfigMap", name)["data"]["FUNCHAT_HTTP_PORT"] == "8080"
    http = next(p for p in one(objs, "Service", name)["spec"]["ports"] if p["name"] == "http")
    assert http["port"] == 8080
    for pod, template in orchestrator_pod_templates(objs):
        ports = {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
        assert ports[http["targetPort"]] == 8080, pod
        assert 8000 not in ports.values(), pod  # the Ray pods' "serve" port too
        public = [f for f in admitting_rules(objs, template["metadata"]["labels"], ports, 8080) if f != [
            {"podSelector": {"matchLabels": one(objs, "Service", name)["spec"]["selector"]}}]]
        assert public == [peers], pod  # publicFrom, as for gRPC
        assert admitting_rules(objs, template["metadata"]["labels"], ports, 50051) == \
            admitting_rules(objs, template["metadata"]["labels"], ports, 8080), pod
    if mode == "rayservice":
        serve = yaml.safe_load(one(objs, "RayService", name)["spec"]["serveConfigV2"])
        assert serve["http_options"] == {"host": "0.0.0.0", "port": 8080}
    notes = render(values)["funchat/templates/NOTES.txt"]
    assert f"ws://{name}:8080/v1/realtime?model=fun-audio-chat" in notes
    assert f"port-forward svc/{name} 50051 8080" in notes


def test_realtime_disabled_keeps_the_public_service_grpc_only():
    """orchestrator.realtime.enabled false: no port http on the Service, no NetworkPolicy rule for it;
    mode deployment binds the HTTP proxy on the pod's loopback (no container port), mode rayservice
    keeps it on "serve" (KubeRay probes it on the pod's address) but admits it only among Ray pods."""
    name = f"{PREFIX}-orchestrator"
    objs = objects({"orchestrator": {"realtime": {"enabled": False}}})
    assert [p["name"] for p in one(objs, "Service", name)["spec"]["ports"]] == ["grpc"]
    orch = container(one(objs, "Deployment", name)["spec"]["template"]["spec"], "orchestrator")
    assert "http" not in [p["name"] for p in orch["ports"]]
    assert env_of(orch)["FUNCHAT_HTTP_HOST"] == "127.0.0.1"
    assert one(objs, "NetworkPolicy", name)["spec"]["ingress"] == [{"ports": [{"port": 50051, "protocol": "TCP"}]}]
    notes = render({"orchestrator": {"realtime": {"enabled": False}}})["funchat/templates/NOTES.txt"]
    assert "ws://" not in notes and "not exposed (orchestrator.realtime.enabled false)" in notes
    assert f"port-forward svc/{name} 50051\n" in notes

    ray = objects(SCENARIOS["realtime-off-rayservice"])
    assert [p["name"] for p in one(ray, "Service", name)["spec"]["ports"]] == ["grpc"]
    serve = yaml.safe_load(one(ray, "RayService", name)["spec"]["serveConfigV2"])
    assert serve["http_options"] == {"host": "0.0.0.0", "port": 8000}
    for pod, template in orchestrator_pod_templates(ray):
        ports = {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
        assert ports["serve"] == 8000, pod
        selector = one(ray, "Service", name)["spec"]["selector"]
        assert admitting_rules(ray, template["metadata"]["labels"], ports, 8000) == [
            [{"podSelector": {"matchLabels": selector}}]], pod  # the Ray pods among themselves only


def test_realtime_ingress():
    """orchestrator.realtime.ingress: an Ingress to the Service's port http, TLS ended there with
    tlsSecretName; off by default; refused without realtime.enabled, TLS refused without a host."""
    assert not find(objects(), "Ingress")
    objs = objects(SCENARIOS["realtime-ingress"])
    name = f"{PREFIX}-orchestrator"
    ing = one(objs, "Ingress", name)
    assert ing["metadata"]["annotations"] == {"nginx.ingress.kubernetes.io/proxy-read-timeout": "3600"}
    assert ing["metadata"]["labels"]["app.kubernetes.io/component"] == "orchestrator"
    spec = ing["spec"]
    assert spec["ingressClassName"] == "nginx"
    assert spec["tls"] == [{"hosts": ["chat.example.com"], "secretName": "chat-tls"}]
    [rule] = spec["rules"]
    assert rule["host"] == "chat.example.com"
    [path] = rule["http"]["paths"]
    assert (path["path"], path["pathType"]) == ("/", "Prefix")  # /v1/realtime and the web page
    backend = path["backend"]["service"]
    assert backend["name"] == name
    assert backend["port"]["name"] in [p["name"] for p in one(objs, "Service", name)["spec"]["ports"]]
    notes = render(SCENARIOS["realtime-ingress"])["funchat/templates/NOTES.txt"]
    assert "wss://chat.example.com/v1/realtime?model=fun-audio-chat" in notes and "WARNING" not in notes
    bare = objects({"orchestrator": {"realtime": {"ingress": {"enabled": True}}}})
    spec = one(bare, "Ingress", name)["spec"]
    assert "tls" not in spec and "ingressClassName" not in spec and "host" not in spec["rules"][0]
    kubernetes_validate.validate(one(bare, "Ingress", name), KUBE, strict=True)
    notes = render({"orchestrator": {"realtime": {"ingress": {"enabled": True}}}})["funchat/templates/NOTES.txt"]
    assert "WARNING: the Ingress has no TLS" in notes


def test_realtime_model_name_in_the_notes():
    values = {"orchestrator": {"settings": {"model_name": "gpt-realtime"}}}
    cm = one(objects(values), "ConfigMap", f"{PREFIX}-orchestrator")["data"]
    assert cm["FUNCHAT_MODEL_NAME"] == "gpt-realtime"
    assert "/v1/realtime?model=gpt-realtime" in render(values)["funchat/templates/NOTES.txt"]


@pytest.mark.parametrize("ports, message", [
    ({"httpPort": 50051}, "orchestrator.grpcPort and orchestrator.httpPort are both 50051"),
    ({"httpPort": 50052}, "orchestrator.httpPort and orchestrator.proxyPort are both 50052"),
    ({"httpPort": 9464}, "orchestrator.httpPort and orchestrator.metricsPort are both 9464"),
])
def test_orchestrator_ports_must_differ(ports, message):
    assert message in render_error({"orchestrator": ports})
    assert render({"orchestrator": {"httpPort": 9464, "metricsPort": 0}})  # metricsPort 0 is off, no port


# -- API keys (auth) -------------------------------------------------------------------------

def orchestrator_pods(objs: list[dict]) -> list[tuple[str, dict, dict]]:
    """(pod, pod spec, container) of every orchestrator container: the Deployment's, the Ray head's
    and workers'."""
    return [(pod, spec, c) for pod, spec in pod_specs(objs) for c in spec["containers"]
            if c["name"] in ("orchestrator", "ray-head", "ray-worker")]


@pytest.mark.parametrize("scenario, secret, key, pods", [
    ("defaults", f"{PREFIX}-api-keys", "api_keys", 1),
    ("profile-dev-cpu", f"{PREFIX}-api-keys", "api_keys", 1),
    ("rayservice", f"{PREFIX}-api-keys", "api_keys", 2),  # the head and the worker group
    ("auth-rayservice", "tenant-keys", "keys.json", 2),
])
def test_api_keys_secret_is_mounted_as_a_directory_in_every_orchestrator_container(scenario, secret, key, pods):
    objs = objects(SCENARIOS[scenario])
    found = orchestrator_pods(objs)
    assert len(found) == pods
    for pod, spec, c in found:
        env = env_of(c)
        assert env["FUNCHAT_AUTH"] == "api_keys", pod
        volume = next(v for v in spec["volumes"] if v["name"] == "api-keys")
        # the whole Secret, not items or a subPath: the kubelet's updates must reach the file
        assert volume["secret"] == {"secretName": secret, "defaultMode": 0o400, "optional": False}, pod
        mount = next(m for m in c["volumeMounts"] if m["name"] == "api-keys")
        assert mount == {"name": "api-keys", "mountPath": "/etc/funchat/api-keys", "readOnly": True}, pod
        assert env["FUNCHAT_API_KEYS_FILE"] == f"/etc/funchat/api-keys/{key}", pod
    # the operator's Secret: never rendered (its keys exist only where `funchat keys create` ran)
    assert not find(objs, "Secret", secret)
    cm = one(objs, "ConfigMap", f"{PREFIX}-orchestrator")["data"]
    assert not {"FUNCHAT_AUTH", "FUNCHAT_API_KEYS_FILE"} & set(cm)


@pytest.mark.parametrize("extra", [{}, {"orchestrator": {"mode": "rayservice", "rayService": {"workerReplicas": 1}}}])
def test_auth_off_renders_no_keys_and_warns(extra):
    values = deep_merge(SCENARIOS["auth-off"], extra)
    objs = objects(values)
    found = orchestrator_pods(objs)
    assert found
    for pod, spec, c in found:
        env = env_of(c)
        assert env["FUNCHAT_AUTH"] == "off" and "FUNCHAT_API_KEYS_FILE" not in env, pod
        assert all(v["name"] != "api-keys" for v in spec["volumes"]), pod
        assert all(m["name"] != "api-keys" for m in c["volumeMounts"]), pod
    assert 'value: "off"' in "".join(render(values).values())  # a string: a bare off is YAML's false
    notes = render(values)["funchat/templates/NOTES.txt"]
    assert "WARNING: auth.mode is off" in notes and "FUNCHAT_API_KEY=" not in notes


def test_notes_tell_how_to_create_and_rotate_the_keys():
    notes = render()["funchat/templates/NOTES.txt"]
    assert "funchat keys create --tenant NAME --keys-file api_keys" in notes
    assert f"kubectl -n {NAMESPACE} create secret generic {PREFIX}-api-keys --from-file=api_keys=api_keys" in notes
    assert "--dry-run=client -o yaml | kubectl apply -f -" in notes and "without a restart" in notes
    assert "export FUNCHAT_API_KEY=" in notes and "WARNING" not in notes
    notes = render(SCENARIOS["auth-rayservice"])["funchat/templates/NOTES.txt"]
    assert "create secret generic tenant-keys --from-file=keys.json=api_keys" in notes


@pytest.mark.parametrize("scenario, size", [("rayservice", "16777216"), ("auth-rayservice", "33554432")])
def test_ray_pods_get_the_grpc_message_limit(scenario, size):
    """No `python -m funchat.orchestrator.app` in the Ray pods to export FUNCHAT_MAX_MESSAGE_BYTES to
    Ray Serve's proxy: the chart sets RAY_SERVE_GRPC_MAX_MESSAGE_SIZE on the head and the workers."""
    objs = objects(SCENARIOS[scenario])
    found = orchestrator_pods(objs)
    assert {pod for pod, _, _ in found} >= {"head", "orchestrator"}
    for pod, _, c in found:
        assert env_of(c)["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"] == size, pod
    from funchat.orchestrator.settings import OrchestratorSettings

    cm = one(objs, "ConfigMap", f"{PREFIX}-orchestrator")["data"]
    default = OrchestratorSettings.model_fields["max_message_bytes"].default
    assert int(cm.get("FUNCHAT_MAX_MESSAGE_BYTES", default)) == int(size)  # what the replicas enforce
    # the Deployment's process exports it itself (funchat/orchestrator/app.py)
    dep = orchestrator_pods(objects())
    assert "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE" not in env_of(dep[0][2])


# -- redis, secrets, network, monitoring -----------------------------------------------------

def test_redis_internal_statefulset():
    objs = objects()
    sts = one(objs, "StatefulSet", f"{PREFIX}-redis")
    redis = container(sts["spec"]["template"]["spec"], "redis")
    assert redis["command"] == ["sh", "-c"] and "--appendonly yes" in redis["args"][0]
    assert "REDIS_PASSWORD" not in redis["args"][0].split("requirepass")[-1]  # not on the command line
    assert env_of(redis)["REDIS_PASSWORD"]["secretKeyRef"]["name"] == f"{PREFIX}-redis"
    claim = sts["spec"]["volumeClaimTemplates"][0]
    assert claim["metadata"]["name"] == "data" and claim["spec"]["resources"]["requests"]["storage"] == "8Gi"
    assert {"name": "data", "mountPath": "/data"} in redis["volumeMounts"]
    assert redis["resources"]["limits"]["memory"] == "1Gi"
    assert one(objs, "Service", f"{PREFIX}-redis-headless")["spec"]["clusterIP"] == "None"
    assert sts["spec"]["serviceName"] == f"{PREFIX}-redis-headless"


@pytest.mark.parametrize("password", ["plainAlnum32", 'with "quotes" \\ and spaces', "dollar$HOME`x`"])
def test_redis_start_script_sets_the_password_from_the_environment(tmp_path, password):
    """The StatefulSet's shell command, run as rendered (on this machine's redis-server, with its
    port and directory moved into tmp_path): AUTH works with the Secret's value, however quoted."""
    import redis as redis_client

    from funchat.dev.tritonserver import free_port

    if not shutil.which("redis-server"):
        pytest.fail("redis-server is not installed (make test installs it)", pytrace=False)
    script = container(one(objects(), "StatefulSet", f"{PREFIX}-redis")["spec"]["template"]["spec"],
                       "redis")["args"][0]
    port = free_port()
    script = (script.replace("/tmp/redis.conf", str(tmp_path / "redis.conf"))
              .replace("--dir /data", f"--dir {tmp_path} --port {port} --bind 127.0.0.1"))
    proc = subprocess.Popen(["sh", "-c", script], env={**os.environ, "REDIS_PASSWORD": password})
    try:
        client = redis_client.Redis(port=port, password=password, socket_connect_timeout=1)
        for _ in range(100):
            try:
                assert client.ping()
                break
            except redis_client.ConnectionError:
                time.sleep(0.1)
        else:
            pytest.fail("redis-server did not answer")
        assert oct((tmp_path / "redis.conf").stat().st_mode & 0o777) == "0o600"
        with pytest.raises(redis_client.AuthenticationError):
            redis_client.Redis(port=port, password="wrong").ping()
        assert client.config_get("appendonly") == {"appendonly": "yes"}
    finally:
        proc.terminate()
        proc.wait(10)


def test_redis_internal_tls():
    """redis.internal.tls.secretName: Redis serves TLS only, every orchestrator container connects with
    rediss:// and verifies the server with ca.crt, mounted alone (Redis' key stays in Redis' pod)."""
    objs = objects(SCENARIOS["redis-tls"])
    spec = one(objs, "StatefulSet", f"{PREFIX}-redis")["spec"]["template"]["spec"]
    redis = container(spec, "redis")
    assert "--port 0 --tls-port 6379" in redis["args"][0] and "--tls-auth-clients no" in redis["args"][0]
    assert "--tls --cacert /etc/redis-tls/ca.crt" in redis["readinessProbe"]["exec"]["command"][2]
    assert {"name": "tls", "mountPath": "/etc/redis-tls", "readOnly": True} in redis["volumeMounts"]
    assert next(v for v in spec["volumes"] if v["name"] == "tls")["secret"]["secretName"] == "funchat-redis-tls"
    pods = orchestrator_pods(objs)
    assert len(pods) == 2  # the Ray head and the workers
    for _, pod, orch in pods:
        env = env_of(orch)
        assert env["FUNCHAT_REDIS_URL"] == f"rediss://{PREFIX}-redis:6379/0"
        assert env["FUNCHAT_REDIS_CA_FILE"] == "/etc/funchat/redis-tls/ca.crt"
        assert {"name": "redis-ca", "mountPath": "/etc/funchat/redis-tls", "readOnly": True} in orch["volumeMounts"]
        volume = next(v for v in pod["volumes"] if v["name"] == "redis-ca")["secret"]
        assert volume["secretName"] == "funchat-redis-tls" and volume["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
    plain = objects()  # without the value nothing of it
    assert "--tls-port" not in container(one(plain, "StatefulSet", f"{PREFIX}-redis")["spec"]["template"]["spec"],
                                         "redis")["args"][0]
    assert "FUNCHAT_REDIS_CA_FILE" not in env_of(container(one(plain, "Deployment", f"{PREFIX}-orchestrator")[
        "spec"]["template"]["spec"], "orchestrator"))


def test_redis_tls_start_script_and_probe_work_as_rendered(tmp_path):
    """The TLS StatefulSet's shell command and readiness probe, run as rendered on this machine's
    redis-server (certificates from funchat.dev.redis_server in place of the Secret): plaintext is
    refused, rediss:// with the CA and the password answers, and so does the probe."""
    import redis as redis_client

    from funchat.dev.redis_server import ensure_tls_files
    from funchat.dev.tritonserver import free_port

    if not shutil.which("redis-server"):
        pytest.fail("redis-server is not installed (make test installs it)", pytrace=False)
    files = ensure_tls_files(tmp_path / "tls", hosts=("127.0.0.1", f"{PREFIX}-redis"))
    (tmp_path / "tls" / "tls.crt").write_bytes(files.cert_file.read_bytes())
    (tmp_path / "tls" / "tls.key").write_bytes(files.key_file.read_bytes())
    redis = container(one(objects(SCENARIOS["redis-tls"]), "StatefulSet", f"{PREFIX}-redis")["spec"]["template"][
        "spec"], "redis")
    port = free_port()

    def local(text: str) -> str:
        return text.replace("/etc/redis-tls", str(tmp_path / "tls")).replace("/tmp/redis.conf",
                                                                             str(tmp_path / "redis.conf"))
    script = local(redis["args"][0]).replace("--dir /data", f"--dir {tmp_path} --bind 127.0.0.1").replace(
        "--tls-port 6379", f"--tls-port {port}")
    probe = local(redis["readinessProbe"]["exec"]["command"][2]).replace("redis-cli", f"redis-cli -p {port}", 1)
    env = {**os.environ, "REDIS_PASSWORD": "pw"}
    proc = subprocess.Popen(["sh", "-c", script], env=env)
    try:
        client = redis_client.Redis(host="127.0.0.1", port=port, password="pw", ssl=True, socket_timeout=2,
                                    ssl_ca_certs=str(files.ca_file), socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                assert client.ping()
                break
            except redis_client.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not answer over TLS"
                time.sleep(0.1)
        assert subprocess.run(["sh", "-c", probe], env=env, timeout=10).returncode == 0
        with pytest.raises(redis_client.ConnectionError):
            redis_client.Redis(host="127.0.0.1", port=port, password="pw", socket_timeout=2).ping()
    finally:
        proc.terminate()
        proc.wait(10)


def test_redis_external():
    objs = objects(SCENARIOS["redis-external-secret"])
    assert not find(objs, "StatefulSet") and not find(objs, "Secret", f"{PREFIX}-redis")
    assert not find(objs, "NetworkPolicy", f"{PREFIX}-redis")
    env = env_of(container(one(objs, "Deployment", f"{PREFIX}-orchestrator")["spec"]["template"]["spec"],
                           "orchestrator"))
    assert env["FUNCHAT_REDIS_URL"] == "rediss://redis.example:6380/0"
    assert env["FUNCHAT_REDIS_PASSWORD"]["secretKeyRef"] == {"name": "redis-auth", "key": "redis-password"}
    objs = objects(SCENARIOS["redis-external-open"])
    env = env_of(container(one(objs, "Deployment", f"{PREFIX}-orchestrator")["spec"]["template"]["spec"],
                           "orchestrator"))
    assert env["FUNCHAT_REDIS_URL"] == "redis://redis.example:6379/1" and "FUNCHAT_REDIS_PASSWORD" not in env


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
    assert public["ingress"] == [{"ports": [{"port": 50051, "protocol": "TCP"}, {"port": 8000, "protocol": "TCP"}]}]
    monitored = objects(SCENARIOS["monitoring"])
    ingress = one(monitored, "NetworkPolicy", f"{PREFIX}-model-services")["spec"]["ingress"]
    assert ingress[1]["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    prometheus = SCENARIOS["monitoring"]["networkPolicy"]["metricsFrom"]
    ingress = one(monitored, "NetworkPolicy", f"{PREFIX}-orchestrator")["spec"]["ingress"]
    assert ingress == [{"ports": [{"port": 50051, "protocol": "TCP"}, {"port": 8000, "protocol": "TCP"}]},
                       {"from": prometheus, "ports": [{"port": 9464, "protocol": "TCP"}]}]
    ray = one(objects(SCENARIOS["rayservice"]), "NetworkPolicy", f"{PREFIX}-orchestrator")["spec"]["ingress"]
    assert ray[1] == {"from": [{"podSelector": {"matchLabels": orch_labels}}]}  # Ray pods among themselves


def test_service_monitor_only_when_enabled():
    assert not find(objects(), "ServiceMonitor")
    sm = one(objects(SCENARIOS["monitoring"]), "ServiceMonitor", f"{PREFIX}-model-services")
    assert sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    assert sm["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/instance": NAME, "funchat.io/tier": "model"}
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}


@pytest.mark.parametrize("scenario", ["monitoring", "rayservice-monitoring"])
def test_service_monitor_scrapes_the_orchestrator_through_its_metrics_service(scenario):
    objs = objects(SCENARIOS[scenario])
    name = f"{PREFIX}-orchestrator"
    sm = one(objs, "ServiceMonitor", name)
    assert sm["metadata"]["labels"]["release"] == "prom"
    selected = [svc for svc in find(objs, "Service")
                if sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()]
    # the headless metrics Service only: the public one may be a LoadBalancer
    assert [svc["metadata"]["name"] for svc in selected] == [f"{name}-metrics"]
    [metrics_svc] = selected
    assert metrics_svc["spec"]["clusterIP"] == "None"
    assert metrics_svc["spec"]["ports"] == [{"name": "metrics", "port": 9464, "targetPort": "metrics",
                                             "protocol": "TCP"}]
    # the Service's pods: the orchestrator's (Deployment or Ray pods), whose container port metrics it targets
    assert metrics_svc["spec"]["selector"] == one(objs, "Service", name)["spec"]["selector"]
    containers = orchestrator_containers(objs)
    assert len(containers) == (2 if scenario == "rayservice-monitoring" else 1)
    for c in containers:
        assert "metrics" in [p["name"] for p in c["ports"]]
    [endpoint] = sm["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"], endpoint["interval"]) == ("metrics", "/metrics", "15s")
    # service=<fullname>-orchestrator, from the Service's component label (the PodMonitor's convention)
    assert endpoint["relabelings"] == [{
        "sourceLabels": ["__meta_kubernetes_service_label_app_kubernetes_io_component"],
        "targetLabel": "service", "replacement": f"{PREFIX}-${{1}}"}]
    assert metrics_svc["metadata"]["labels"]["app.kubernetes.io/component"] == "orchestrator"


@pytest.mark.parametrize("scenario", ["defaults", "profile-dev-cpu", "profile-gpu"])
def test_entrypoint_environment_configures_each_real_model(tmp_path, scenario):
    """The env the chart gives the image's entrypoint, applied as it applies it
    (funchat.dev.tritonserver.prepare_model_repo), yields a config with the mounted checkpoint."""
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


# -- KServe mode -----------------------------------------------------------------------------

def kserve_objects(scenario: str) -> tuple[list[dict], dict, dict]:
    """The objects of a KServe scenario, its ServingRuntime and its InferenceServices by model service."""
    objs = objects(SCENARIOS[scenario])
    runtime = one(objs, "ServingRuntime", f"{PREFIX}-triton")
    return objs, runtime, {s: one(objs, "InferenceService", model_name(s)) for s in MODELS}


@pytest.mark.parametrize("scenario", ["kserve-raw", "kserve-serverless", "kserve-gpu"])
def test_kserve_replaces_the_model_service_workloads(scenario):
    objs, _, _ = kserve_objects(scenario)
    assert len(find(objs, "ServingRuntime")) == 1 and len(find(objs, "InferenceService")) == 4
    for service in MODELS:
        name = model_name(service)
        for kind in ("Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ScaledObject"):
            assert not find(objs, kind, name), (kind, name)
        assert one(objs, "ServiceAccount", name)["automountServiceAccountToken"] is False
    assert one(objs, "Deployment", f"{PREFIX}-orchestrator")
    assert not find(objs, "ServiceMonitor") and not find(objs, "HorizontalPodAutoscaler")
    assert not find(objects(), "ServingRuntime") and not find(objects(), "InferenceService")


def test_kserve_serving_runtime():
    _, runtime, _ = kserve_objects("kserve-raw")
    spec = runtime["spec"]
    assert spec["protocolVersions"] == ["grpc-v2", "v2"]
    assert spec["supportedModelFormats"] == [{"name": "triton", "version": "2", "autoSelect": False}]
    [c] = spec["containers"]
    assert c["name"] == "kserve-container" and c["image"] == "localhost/funchat-model-services:0.1.0"
    assert c["args"] == ["--http-port=8000", "--grpc-port=8001", "--metrics-port=8002"]
    # gRPC first: KServe's raw Service gives the first port Service port 80 (the orchestrator's address)
    assert [(p["name"], p["containerPort"]) for p in c["ports"]] == [("h2c", 8001), ("http", 8000), ("metrics", 8002)]
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]},
                                    "seccompProfile": {"type": "RuntimeDefault"}}
    assert c["startupProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert c["resources"] == {"requests": {"cpu": "500m", "memory": "2Gi"}, "limits": {"memory": "4Gi"}}
    assert {m["mountPath"]: m["name"] for m in c["volumeMounts"]} == {"/dev/shm": "shm", "/tmp": "tmp"}
    assert {v["name"]: v["emptyDir"] for v in spec["volumes"]} == {
        "shm": {"medium": "Memory", "sizeLimit": "1Gi"}, "tmp": {"sizeLimit": "1Gi"}}
    # the runtime never requests a GPU: KServe merges resource maps, a CPU-only service could not drop it
    _, gpu_runtime, _ = kserve_objects("kserve-gpu")
    assert "nvidia.com/gpu" not in json.dumps(gpu_runtime)
    assert gpu_runtime["spec"]["containers"][0]["resources"]["requests"] == {"cpu": "4", "memory": "32Gi"}


@pytest.mark.parametrize("service", MODELS)
def test_kserve_inference_service(service):
    _, runtime, isvcs = kserve_objects("kserve-raw")
    isvc = isvcs[service]
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    assert "networking.kserve.io/visibility" not in isvc["metadata"]["labels"]
    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"] == {"name": "triton", "version": "2"}
    assert model["protocolVersion"] == "grpc-v2"
    assert model["storageUri"] == "pvc://funchat-checkpoint"
    params = "threads='2'" if service == "refined_head" else ""
    assert env_of(model) == {"FUNCHAT_MODEL": service, "FUNCHAT_CHECKPOINT": "/mnt/models", "FUNCHAT_CONFIG": "",
                             "FUNCHAT_PARAMS": params, "FUNCHAT_RUN_DIR": "/tmp/funchat"}
    # KServe appends the InferenceService's args to the runtime's: only the service's extra ones
    assert model.get("args", []) == (["--log-verbose=1"] if service == "refined_head" else [])
    assert model["resources"] == {"requests": {"cpu": "500m", "memory": "2Gi"}, "limits": {"memory": "4Gi"}}
    assert model["startupProbe"]["failureThreshold"] == 60
    assert predictor["serviceAccountName"] == model_name(service)
    assert predictor["automountServiceAccountToken"] is False
    assert predictor["securityContext"]["runAsUser"] == 10001 and predictor["securityContext"]["runAsNonRoot"]
    assert predictor["terminationGracePeriodSeconds"] == 60
    assert predictor["labels"] == {"app.kubernetes.io/name": "funchat", "app.kubernetes.io/instance": NAME,
                                   "app.kubernetes.io/component": service.replace("_", "-"),
                                   "funchat.io/tier": "model"}
    assert {v["name"] for v in predictor["volumes"]} == {"shm", "tmp"}
    for key in ("nodeSelector", "tolerations", "runtimeClassName", "affinity"):
        assert key not in predictor


def test_kserve_takes_each_service_settings_from_its_values():
    _, _, isvcs = kserve_objects("kserve-gpu")
    for service in ("audio_tokenizer", "llm", "refined_head"):
        predictor = isvcs[service]["spec"]["predictor"]
        model = predictor["model"]
        assert model["resources"]["requests"]["nvidia.com/gpu"] == 1 and model["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert predictor["runtimeClassName"] == "nvidia" and predictor["nodeSelector"] == {"funchat.io/pool": "gpu"}
        assert predictor["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert env_of(model)["FUNCHAT_CONFIG"] == "gpu"
        assert model["startupProbe"]["failureThreshold"] == 90
        assert model["storageUri"] == "pvc://funchat-checkpoint-8b/fun-audio-chat-8b"
    llm = isvcs["llm"]["spec"]["predictor"]
    assert llm["model"]["resources"]["requests"]["memory"] == "64Gi"
    assert {v["name"]: v["emptyDir"].get("sizeLimit") for v in llm["volumes"]}["shm"] == "16Gi"
    # autoscaling hpa in the profile: KServe's own HPA on CPU, bounds from the service's values
    assert (llm["minReplicas"], llm["maxReplicas"], llm["scaleMetric"], llm["scaleTarget"]) == (1, 8, "cpu", 80)
    vocoder = isvcs["vocoder"]["spec"]["predictor"]
    assert "nvidia.com/gpu" not in json.dumps(vocoder)
    assert vocoder["nodeSelector"] == {"funchat.io/pool": "cpu"}
    assert "runtimeClassName" not in vocoder and "tolerations" not in vocoder
    assert env_of(vocoder["model"])["FUNCHAT_CONFIG"] == ""


def test_kserve_autoscaling_maps_each_mode():
    objs = objects({"kserve": {"enabled": True}, "modelServices": {"audio_tokenizer": {"replicas": 3}}})
    fixed = one(objs, "InferenceService", model_name("audio_tokenizer"))["spec"]["predictor"]
    assert (fixed["minReplicas"], fixed["maxReplicas"]) == (3, 3)  # mode none: replicas, both bounds
    assert not {"scaleMetric", "scaleTarget", "autoScaling"} & fixed.keys()
    _, _, isvcs = kserve_objects("kserve-raw")
    keda = isvcs["vocoder"]
    assert keda["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "keda"
    predictor = keda["spec"]["predictor"]
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (1, 4) and "scaleMetric" not in predictor
    queue, cpu = predictor["autoScaling"]["metrics"]
    assert queue["type"] == "External" and queue["external"]["target"] == {"type": "Value", "value": "50000"}
    metric = queue["external"]["metric"]
    assert metric["backend"] == "prometheus" and metric["serverAddress"] == "http://prometheus-operated.monitoring.svc:9090"
    assert f'nv_inference_queue_duration_us{{model="vocoder",service="{model_name("vocoder")}"}}' in metric["query"]
    assert cpu == {"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization",
                                                                              "averageUtilization": 80}}}
    assert "serving.kserve.io/autoscalerClass" not in isvcs["llm"]["metadata"]["annotations"]
    _, _, serverless = kserve_objects("kserve-serverless")
    knative = serverless["audio_tokenizer"]["spec"]["predictor"]
    assert (knative["minReplicas"], knative["maxReplicas"]) == (1, 3)
    assert (knative["scaleMetric"], knative["scaleTarget"]) == ("concurrency", 16)
    tuned = objects({"kserve": {"enabled": True, "deploymentMode": "Serverless",
                                "serverless": {"scaleMetric": "rps", "scaleTarget": 40}},
                     "modelServiceDefaults": {"autoscaling": {"mode": "hpa"}}})
    predictor = one(tuned, "InferenceService", model_name("llm"))["spec"]["predictor"]
    assert (predictor["scaleMetric"], predictor["scaleTarget"]) == ("rps", 40)


def test_kserve_serverless_fits_knative():
    objs, runtime, isvcs = kserve_objects("kserve-serverless")
    [c] = runtime["spec"]["containers"]
    # Knative: one container port (h2c), probes on it only, no gRPC probes
    assert c["ports"] == [{"name": "h2c", "containerPort": 8001, "protocol": "TCP"}]
    assert c["readinessProbe"]["tcpSocket"] == {"port": 8001}
    assert "startupProbe" not in c and "livenessProbe" not in c
    for service, isvc in isvcs.items():
        assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Serverless"
        assert isvc["metadata"]["labels"]["networking.kserve.io/visibility"] == "cluster-local"
        predictor = isvc["spec"]["predictor"]
        assert predictor["model"]["readinessProbe"] == {"tcpSocket": {"port": 8001}, "periodSeconds": 5,
                                                        "failureThreshold": 3}
        assert "startupProbe" not in predictor["model"] and "terminationGracePeriodSeconds" not in predictor
        # the startupProbe's budget (10 s x 60) as Knative's progress deadline
        assert predictor["annotations"] == {"serving.knative.dev/progress-deadline": "600s"}
    assert not find(objs, "ScaledObject")


def test_kserve_orchestrator_dials_the_predictors_unless_told_otherwise():
    for scenario in ("kserve-raw", "kserve-serverless"):
        cm = one(objects(SCENARIOS[scenario]), "ConfigMap", f"{PREFIX}-orchestrator")["data"]
        # KServe's <isvc>-predictor Service, port 80 (gRPC, h2c), namespaced for Knative's local gateway
        assert json.loads(cm["FUNCHAT_ENDPOINTS"]) == {
            s: f"{model_name(s)}-predictor.{NAMESPACE}.svc:80" for s in MODELS}
    objs = objects(deep_merge(SCENARIOS["kserve-raw"], SCENARIOS["addresses-hostport"]))
    endpoints = json.loads(one(objs, "ConfigMap", f"{PREFIX}-orchestrator")["data"]["FUNCHAT_ENDPOINTS"])
    assert endpoints["llm"] == "llm-host.example:9001"  # orchestrator.addresses still wins
    assert endpoints["vocoder"] == f"{model_name('vocoder')}-predictor.{NAMESPACE}.svc:80"


def test_kserve_network_policy_admits_only_the_orchestrator_to_the_predictors():
    objs, _, isvcs = kserve_objects("kserve-raw")
    orch_labels = one(objs, "Deployment", f"{PREFIX}-orchestrator")["spec"]["selector"]["matchLabels"]
    policy = one(objs, "NetworkPolicy", f"{PREFIX}-model-services")["spec"]
    for isvc in isvcs.values():  # the predictor pods carry the selected labels
        assert policy["podSelector"]["matchLabels"].items() <= isvc["spec"]["predictor"]["labels"].items()
    # port numbers: KServe's pods name the gRPC port h2c
    assert policy["ingress"][0] == {"from": [{"podSelector": {"matchLabels": orch_labels}}],
                                    "ports": [{"port": 8001, "protocol": "TCP"}, {"port": 8000, "protocol": "TCP"}]}
    assert policy["ingress"][1]["ports"] == [{"port": 8002, "protocol": "TCP"}]  # networkPolicy.metricsFrom
    assert len(policy["ingress"]) == 2
    serverless = one(objects(SCENARIOS["kserve-serverless"]), "NetworkPolicy", f"{PREFIX}-model-services")["spec"]
    assert serverless["ingress"][0]["from"] == [{"podSelector": {"matchLabels": orch_labels}}]
    # Knative's data plane delivers the requests in Serverless mode
    assert serverless["ingress"][1] == {"from": [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "knative-serving"}}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "istio-system"}}}]}
    closed = objects(deep_merge(SCENARIOS["kserve-serverless"], {"kserve": {"serverless": {"dataPlaneFrom": []}}}))
    ingress = one(closed, "NetworkPolicy", f"{PREFIX}-model-services")["spec"]["ingress"]
    assert all(rule.get("from") for rule in ingress)  # never a rule open to every peer


@pytest.mark.parametrize("scenario", ["kserve-raw", "kserve-serverless", "kserve-gpu"])
def test_kserve_pods_are_locked_down(scenario):
    _, runtime, isvcs = kserve_objects(scenario)
    sc = runtime["spec"]["containers"][0]["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    for isvc in isvcs.values():
        predictor = isvc["spec"]["predictor"]
        assert predictor["securityContext"]["runAsNonRoot"] is True
        assert predictor["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert predictor["automountServiceAccountToken"] is False
        assert "limits" in predictor["model"]["resources"] and "requests" in predictor["model"]["resources"]
        assert "securityContext" not in predictor["model"]  # the runtime's applies (KServe merges it)


@pytest.mark.parametrize("values, message", [
    ({"modelStorage": {"mode": "download"}}, "kserve.enabled: modelStorage.mode must be existingClaim"),
    ({"monitoring": {"serviceMonitor": {"enabled": True}}}, "kserve.enabled: monitoring.serviceMonitor has no"),
    ({"modelServices": {"llm": {"launch": "tritonserver"}}}, "modelServices.llm.launch"),
    ({"kserve": {"deploymentMode": "Serverless"}, "modelServiceDefaults": {"autoscaling": {"mode": "keda"}}},
     "modelServices.audio_tokenizer.autoscaling.mode (or modelServiceDefaults.autoscaling.mode) keda needs "
     "kserve.deploymentMode RawDeployment"),
])
def test_kserve_refuses_what_it_cannot_run(values, message):
    assert message in render_error(deep_merge({"kserve": {"enabled": True}}, values))


# -- tracing ---------------------------------------------------------------------------------

def traced_containers(objs: list[dict]) -> dict[str, dict]:
    """Every container the FUNCHAT_TRACING_* env must reach, by owner: the orchestrator's
    (Deployment, Ray head and workers) and the model services' (Deployments, or the KServe runtime)."""
    out = {}
    for owner, spec in pod_specs(objs):
        for c in spec["containers"]:
            if c["name"] in ("orchestrator", "ray-head", "ray-worker", "tritonserver"):
                out[f"{owner}/{c['name']}"] = c
    for runtime in find(objs, "ServingRuntime"):
        out[f"{runtime['metadata']['name']}/kserve-container"] = runtime["spec"]["containers"][0]
    return out


@pytest.mark.parametrize("scenario", ["defaults", "profile-dev-cpu", "profile-gpu", "rayservice", "kserve-raw",
                                      "launch-tritonserver"])
def test_tracing_is_off_by_default(scenario):
    rendered = render(SCENARIOS[scenario])
    assert not [path for path, text in rendered.items() if "FUNCHAT_TRACING" in text]
    if scenario == "defaults":  # the other tracing values do nothing without an endpoint
        quiet = objects({"tracing": {"sampleRatio": 0.5, "headersSecret": {"key": "other"}}})
        assert [o for o in quiet if o["kind"] != "Secret"] == [o for o in objects() if o["kind"] != "Secret"]


@pytest.mark.parametrize("scenario, owners", [
    ("tracing", [f"{PREFIX}-orchestrator/orchestrator", *(f"{model_name(s)}/tritonserver" for s in MODELS)]),
    ("tracing-rayservice", ["head/ray-head", "orchestrator/ray-worker",
                            *(f"{model_name(s)}/tritonserver" for s in MODELS)]),
    ("tracing-kserve", [f"{PREFIX}-orchestrator/orchestrator", f"{PREFIX}-triton/kserve-container"]),
])
def test_tracing_env_reaches_every_orchestrator_and_model_service_container(scenario, owners):
    objs = objects(SCENARIOS[scenario])
    containers = traced_containers(objs)
    assert sorted(containers) == sorted(owners)
    for owner, c in containers.items():
        env = env_of(c)
        assert env["FUNCHAT_TRACING_ENDPOINT"] == "otel-collector.observability.svc:4317", owner
        assert env["FUNCHAT_TRACING_SAMPLE_RATIO"] == "0.25", owner
        assert env["FUNCHAT_TRACING_HEADERS"] == {"secretKeyRef": {"name": "otel-headers", "key": "api-headers",
                                                                   "optional": False}}, owner
    # the headers only ever as a secretKeyRef: not a plain value, not in the orchestrator's ConfigMap
    text = json.dumps(objs)
    assert text.count('"FUNCHAT_TRACING_HEADERS"') == len(owners)
    assert "TRACING" not in json.dumps(one(objs, "ConfigMap", f"{PREFIX}-orchestrator")["data"])
    # KServe: each InferenceService leaves the runtime's tracing env to KServe's merge, unchanged
    for isvc in find(objs, "InferenceService"):
        assert not [k for k in env_of(isvc["spec"]["predictor"]["model"]) if k.startswith("FUNCHAT_TRACING")]
    # the NetworkPolicies restrict ingress only: the pods reach the collector (values.yaml, tracing)
    assert {tuple(p["spec"]["policyTypes"]) for p in find(objs, "NetworkPolicy")} == {("Ingress",)}


def test_tracing_entrypoint_launch_keeps_its_own_env():
    objs = objects(SCENARIOS["tracing"])
    entry = env_of(container(one(objs, "Deployment", model_name("vocoder"))["spec"]["template"]["spec"],
                             "tritonserver"))
    assert {"FUNCHAT_CHECKPOINT", "FUNCHAT_CONFIG", "FUNCHAT_PARAMS", "FUNCHAT_RUN_DIR"} <= entry.keys()
    launched = env_of(container(one(objs, "Deployment", model_name("llm"))["spec"]["template"]["spec"],
                                "tritonserver"))  # launch tritonserver: the tracing env alone
    assert sorted(launched) == ["FUNCHAT_TRACING_ENDPOINT", "FUNCHAT_TRACING_HEADERS", "FUNCHAT_TRACING_SAMPLE_RATIO"]


@pytest.mark.parametrize("tracing, ratio", [
    ({"endpoint": "https://api.vendor.example:443", "headersSecret": {"name": "otel-headers"}}, 1.0),
    ({"endpoint": "http://10.0.0.7:4317", "sampleRatio": 0}, 0.0),  # 0 is a ratio, not "unset"
    ({"endpoint": "otel:4317", "sampleRatio": 0.001}, 0.001),
])
def test_rendered_tracing_env_is_what_funchat_tracing_reads(tracing, ratio):
    from funchat.tracing import TracingConfig

    objs = objects({"tracing": tracing})
    for owner, c in traced_containers(objs).items():
        environ = {}
        for name, value in env_of(c).items():
            if name.startswith("FUNCHAT_TRACING_"):  # what the kubelet sets from the secretKeyRef
                environ[name] = "x-api-key=k123" if isinstance(value, dict) else value
        config = TracingConfig.from_env(environ)
        assert config.enabled and config.endpoint == tracing["endpoint"], owner
        assert config.sample_ratio == ratio, owner
        assert config.headers == ((("x-api-key", "k123"),) if "headersSecret" in tracing else ()), owner


@pytest.mark.parametrize("values, where, what", [
    ({"tracing": {"sampleRatio": 1.5}}, "/tracing/sampleRatio", "maximum"),
    ({"tracing": {"sampleRatio": -0.1}}, "/tracing/sampleRatio", "minimum"),
    ({"tracing": {"sampleRatio": "10%"}}, "/tracing/sampleRatio", "want number"),
    ({"tracing": {"endpoint": "otel-collector"}}, "/tracing/endpoint", "pattern"),  # no port
    ({"tracing": {"endpoint": "grpc://otel:4317"}}, "/tracing/endpoint", "pattern"),
    ({"tracing": {"headers": "x-api-key=k"}}, "/tracing", "'headers' not allowed"),  # a secret, never a value
    ({"tracing": {"headersSecret": {"name": "Otel_Headers"}}}, "/tracing/headersSecret/name", "pattern"),
    ({"orchestrator": {"settings": {"tracing_headers": "x-api-key=k"}}}, "/orchestrator/settings", ""),
    ({"orchestrator": {"settings": {"tracing_endpoint": "otel:4317"}}}, "/orchestrator/settings", ""),
])
def test_tracing_schema_rejects_bad_values_naming_the_key(values, where, what):
    test_schema_rejects_bad_values_naming_the_key(values, where, what)


@pytest.mark.parametrize("extra", [{}, {"orchestrator": {"mode": "rayservice"}}, {"kserve": {"enabled": True}}])
def test_tracing_headers_secret_needs_an_endpoint(extra):
    message = render_error(deep_merge({"tracing": {"headersSecret": {"name": "otel-headers"}}}, extra))
    assert "tracing.headersSecret.name is set but tracing.endpoint is empty" in message


# -- monitoring: PodMonitor, PrometheusRule, prometheus-adapter ------------------------------

def test_pod_monitor_only_when_enabled():
    assert not find(objects(), "PodMonitor")
    pm = one(objects(SCENARIOS["pod-monitor"]), "PodMonitor", f"{PREFIX}-model-services")
    assert pm["metadata"]["labels"]["release"] == "prom"
    assert pm["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/instance": NAME, "funchat.io/tier": "model"}
    assert pm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    [endpoint] = pm["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"], endpoint["interval"]) == ("metrics", "/metrics", "30s")
    # the targets get service=<fullname>-<component>, like the ServiceMonitor's (the alerts select on it)
    assert endpoint["relabelings"] == [{
        "sourceLabels": ["__meta_kubernetes_pod_label_app_kubernetes_io_component"],
        "targetLabel": "service", "replacement": f"{PREFIX}-${{1}}"}]
    for service in MODELS:  # the Deployments' pods: a named metrics port and the labels selected
        template = one(objects(), "Deployment", model_name(service))["spec"]["template"]
        assert pm["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
        assert "metrics" in [p["name"] for p in template["spec"]["containers"][0]["ports"]]
    raw = one(objects(SCENARIOS["kserve-raw"]), "PodMonitor", f"{PREFIX}-model-services")
    assert raw["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"  # the runtime declares it
    assert one(objects(SCENARIOS["kserve-raw"]), "PodMonitor", f"{PREFIX}-orchestrator")  # both tiers there too
    serverless = one(objects(SCENARIOS["kserve-serverless"]), "PodMonitor", f"{PREFIX}-model-services")
    [endpoint] = serverless["spec"]["podMetricsEndpoints"]
    # Knative pods declare h2c only: that target, moved to Triton's metrics port
    assert endpoint["port"] == "h2c"
    assert endpoint["relabelings"][1] == {"sourceLabels": ["__address__"], "regex": "(.+):[0-9]+",
                                          "targetLabel": "__address__", "replacement": "${1}:8002"}
    for address in ("10.0.0.7:8001", "[fd00::7]:8001"):  # Prometheus anchors the regex
        moved = re.fullmatch(endpoint["relabelings"][1]["regex"], address).expand(r"\1:8002")
        assert moved == address.replace(":8001", ":8002")


@pytest.mark.parametrize("scenario", ["pod-monitor", "rayservice-monitoring"])
def test_pod_monitor_scrapes_the_orchestrator_pods(scenario):
    objs = objects(SCENARIOS[scenario])
    pm = one(objs, "PodMonitor", f"{PREFIX}-orchestrator")
    interval = SCENARIOS[scenario]["monitoring"]["podMonitor"].get("interval", "15s")
    [endpoint] = pm["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"], endpoint["interval"]) == ("metrics", "/metrics", interval)
    assert endpoint["relabelings"] == [{
        "sourceLabels": ["__meta_kubernetes_pod_label_app_kubernetes_io_component"],
        "targetLabel": "service", "replacement": f"{PREFIX}-${{1}}"}]
    assert pm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    templates = [o["spec"]["template"] for o in find(objs, "Deployment")]
    for o in find(objs, "RayService"):
        cluster = o["spec"]["rayClusterConfig"]
        templates += [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    wanted = pm["spec"]["selector"]["matchLabels"].items()
    selected = [t for t in templates if wanted <= t["metadata"]["labels"].items()]
    # the orchestrator's pods (one Deployment, or the Ray head and workers), none of the model services'
    assert len(selected) == (2 if scenario == "rayservice-monitoring" else 1)
    for template in selected:
        assert template["metadata"]["labels"]["app.kubernetes.io/component"] == "orchestrator"
        assert "metrics" in [p["name"] for p in template["spec"]["containers"][0]["ports"]]


def test_metrics_port_0_turns_the_orchestrator_endpoint_and_its_monitors_off():
    name = f"{PREFIX}-orchestrator"
    for scenario in (SCENARIOS["metrics-off"],
                     deep_merge(SCENARIOS["metrics-off"], {"orchestrator": {"mode": "rayservice"}})):
        objs = objects(scenario)
        assert one(objs, "ConfigMap", name)["data"]["FUNCHAT_METRICS_PORT"] == "0"
        containers = orchestrator_containers(objs)
        assert containers and all("metrics" not in [p["name"] for p in c["ports"]] for c in containers)
        assert not find(objs, "ServiceMonitor", name) and not find(objs, "PodMonitor", name)
        assert not find(objs, "Service", f"{name}-metrics")
        ingress = one(objs, "NetworkPolicy", name)["spec"]["ingress"]
        ports = [p["port"] for rule in ingress for p in rule.get("ports", [])]
        assert ports == [50051, 8000]  # the public ports, gRPC and Realtime, no metrics
        # the model services' monitors stay
        assert one(objs, "ServiceMonitor", f"{PREFIX}-model-services")
        assert one(objs, "PodMonitor", f"{PREFIX}-model-services")


def test_metrics_port_value_reaches_every_place_it_is_used():
    objs = objects(deep_merge(SCENARIOS["monitoring"], {"orchestrator": {"metricsPort": 9100}}))
    name = f"{PREFIX}-orchestrator"
    assert one(objs, "ConfigMap", name)["data"]["FUNCHAT_METRICS_PORT"] == "9100"
    orch = container(one(objs, "Deployment", name)["spec"]["template"]["spec"], "orchestrator")
    assert {"name": "metrics", "containerPort": 9100, "protocol": "TCP"} in orch["ports"]
    assert one(objs, "Service", f"{name}-metrics")["spec"]["ports"][0]["port"] == 9100
    assert one(objs, "NetworkPolicy", name)["spec"]["ingress"][-1]["ports"] == [{"port": 9100, "protocol": "TCP"}]


def _rules(values: dict) -> dict[str, list[dict]]:
    rule = one(objects(values), "PrometheusRule", PREFIX)
    [group] = rule["spec"]["groups"]
    out: dict[str, list[dict]] = {}
    for r in group["rules"]:
        out.setdefault(r.get("alert") or r["record"], []).append(r)
    return out


def test_prometheus_rule_only_when_enabled_with_thresholds_from_values():
    assert not find(objects(), "PrometheusRule") and not find(objects(SCENARIOS["monitoring"]), "PrometheusRule")
    rule = one(objects(SCENARIOS["prometheus-rule"]), "PrometheusRule", PREFIX)
    assert rule["metadata"]["labels"]["release"] == "prom"
    rules = _rules(SCENARIOS["prometheus-rule"])
    down = rules["FunchatModelServiceDown"]
    assert [r["labels"]["service"] for r in down] == [model_name(s) for s in MODELS]
    for r in down:
        assert r["expr"] == f'(sum(up{{namespace="{NAMESPACE}",service="{r["labels"]["service"]}"}}) or vector(0)) == 0'
        assert r["for"] == "3m" and r["labels"]["severity"] == "critical"
    services = "|".join(model_name(s) for s in MODELS)
    sel = f'namespace="{NAMESPACE}",service=~"{services}"'
    [queue] = rules["FunchatTritonQueueTimeHigh"]
    assert queue["for"] == "7m" and queue["expr"].endswith("> 0) > 123456")
    assert f"rate(nv_inference_queue_duration_us{{{sel}}}[5m])" in queue["expr"]
    assert f"rate(nv_inference_request_success{{{sel}}}[5m])" in queue["expr"]
    [failures] = rules["FunchatTritonFailureRatioHigh"]
    assert failures["for"] == "9m" and failures["expr"].endswith("> 0) > 0.2")
    assert failures["expr"].count(f"rate(nv_inference_request_failure{{{sel}}}[5m])") == 2
    [orch] = rules["FunchatOrchestratorUnavailable"]  # kube-state-metrics' series
    assert orch["for"] == "11m"
    assert orch["expr"] == (f'kube_deployment_status_replicas_unavailable{{namespace="{NAMESPACE}",'
                            f'deployment="{PREFIX}-orchestrator"}} > 0')
    # the hook for later rules (the orchestrator's latency SLO)
    assert rules["funchat:orchestrator_calls:rate5m"] == [
        {"record": "funchat:orchestrator_calls:rate5m", "expr": "sum(rate(funchat_calls_total[5m]))"}]
    defaults = _rules({"monitoring": {"prometheusRule": {"enabled": True}}})
    assert defaults["FunchatTritonQueueTimeHigh"][0]["expr"].endswith("> 250000")
    assert defaults["FunchatTritonQueueTimeHigh"][0]["for"] == "10m"
    assert defaults["FunchatTritonFailureRatioHigh"][0]["expr"].endswith("> 0.05")
    # no Deployment to watch in rayservice mode; off when there is no kube-state-metrics
    assert "FunchatOrchestratorUnavailable" not in _rules(
        {"orchestrator": {"mode": "rayservice"}, "monitoring": {"prometheusRule": {"enabled": True}}})
    assert "FunchatOrchestratorUnavailable" not in _rules(
        {"monitoring": {"prometheusRule": {"enabled": True, "orchestratorUnavailable": {"enabled": False}}}})
    # the same alerts select the PodMonitor's targets in KServe mode
    assert _rules(SCENARIOS["kserve-raw"])["FunchatModelServiceDown"][1]["labels"]["service"] == model_name("llm")


def _adapter_rules() -> dict:
    return yaml.safe_load((CHART / "files" / "prometheus-adapter-rules.yaml").read_text())["rules"]


@pytest.mark.parametrize("scenario, kind", [("hpa-pods", "custom"), ("hpa-external", "external")])
def test_prometheus_adapter_rules_serve_the_metric_the_hpa_asks_for(scenario, kind):
    objs = objects(SCENARIOS[scenario])
    asked = set()
    for hpa in find(objs, "HorizontalPodAutoscaler"):
        metric = hpa["spec"]["metrics"][0]
        asked.add((metric["type"], metric[metric["type"].lower()]["metric"]["name"]))
    [rule] = _adapter_rules()[kind]
    assert asked == {("Pods" if kind == "custom" else "External", rule["name"]["as"])}
    assert rule["name"]["matches"] == "^nv_inference_queue_duration_us$"
    assert rule["seriesQuery"].startswith("nv_inference_queue_duration_us{")
    # Pods: per pod (custom metrics API); External: per model service, by the HPA's service selector
    overrides = rule["resources"]["overrides"]
    assert set(overrides) == ({"namespace", "pod"} if kind == "custom" else {"namespace"})
    if kind == "external":
        selector = find(objs, "HorizontalPodAutoscaler")[0]["spec"]["metrics"][0]["external"]["metric"]["selector"]
        assert set(selector["matchLabels"]) == {"service"} and 'service!=""' in rule["seriesQuery"]
    query = rule["metricsQuery"]
    assert query.count("{<<.LabelMatchers>>}") == 2 and query.count("sum by (<<.GroupBy>>)") == 2
    assert "rate(nv_inference_queue_duration_us{" in query and "rate(nv_inference_request_success{" in query


def test_every_query_uses_real_triton_metrics():
    queries = [r["metricsQuery"] + r["seriesQuery"] for kind in ("custom", "external") for r in _adapter_rules()[kind]]
    queries += [so["spec"]["triggers"][0]["metadata"]["query"] for so in find(objects(SCENARIOS["keda"]), "ScaledObject")]
    queries += [m["external"]["metric"]["query"] for isvc in find(objects(SCENARIOS["kserve-raw"]), "InferenceService")
                for m in isvc["spec"]["predictor"].get("autoScaling", {}).get("metrics", []) if m["type"] == "External"]
    queries += [r["expr"] for rules in _rules(SCENARIOS["prometheus-rule"]).values() for r in rules
                if "nv_" in r["expr"]]
    used = {name for q in queries for name in re.findall(r"\bnv_[a-z_]+", q)}
    assert used == {"nv_inference_queue_duration_us", "nv_inference_request_success", "nv_inference_request_failure"}
    assert used <= TRITON_METRICS


# -- vendored CRD schemas --------------------------------------------------------------------

# (scenario, kind, path to a nested object of the kind) per vendored schema
CLOSED_PATHS = {
    "RayService": ("rayservice", ["spec", "rayClusterConfig", "headGroupSpec", "template", "spec", "containers", 0]),
    "ServiceMonitor": ("monitoring", ["spec", "endpoints", 0]),
    "PodMonitor": ("pod-monitor", ["spec", "podMetricsEndpoints", 0]),
    "PrometheusRule": ("prometheus-rule", ["spec", "groups", 0, "rules", 0]),
    "ScaledObject": ("keda", ["spec", "scaleTargetRef"]),
    "ServingRuntime": ("kserve-raw", ["spec", "containers", 0]),
    "InferenceService": ("kserve-raw", ["spec", "predictor", "model"]),
}


def test_every_custom_kind_has_a_closed_schema():
    assert sorted(CLOSED_PATHS) == sorted(kind for _, kind in CUSTOM)
    assert sorted(p.name for p in SCHEMAS.glob("*.json")) == sorted(CUSTOM.values())


@pytest.mark.parametrize("kind", sorted(CLOSED_PATHS))
def test_vendored_schemas_refuse_a_misspelled_field(kind):
    """The CRDs leave unknown fields to the API server's pruning (dropped silently); the vendored
    schemas are closed, so a misspelled field fails here, at any depth."""
    scenario, path = CLOSED_PATHS[kind]
    obj = next(o for o in objects(SCENARIOS[scenario]) if o["kind"] == kind)
    validator = custom_validator(CUSTOM[(obj["apiVersion"], kind)])
    validator.validate(obj)
    for depth in (["spec"], path):
        bad = json.loads(json.dumps(obj))
        node = bad
        for key in depth:
            node = node[key]
        node["imagePullPolice"] = "Always"
        errors = list(validator.iter_errors(bad))
        assert errors and "imagePullPolice" in str(errors[0].message), (kind, depth)
    bad = json.loads(json.dumps(obj))
    bad["status"] = {}  # the chart never renders a status
    assert list(validator.iter_errors(bad))
    bad = {**obj, "metadata": {**obj["metadata"], "finalizers": ["x"]}}  # metadata is checked loosely
    validator.validate(bad)


def _vendor_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("vendor_crd_schemas", SCHEMAS / "vendor_crd_schemas.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_crd_conversion(tmp_path):
    vendor = _vendor_module()
    container = {"type": "object", "description": "a container", "required": ["name"], "properties": {
        "name": {"type": "string", "description": "its name", "default": "main"},
        "image": {"type": "string", "nullable": True},
        "policy": {"type": "string", "pattern": "^(?i)(abort|warn)?$"},
        "ports": {"type": "array", "x-kubernetes-list-type": "map", "items": {"type": "integer", "format": "int32"}},
        "env": {"type": "object", "additionalProperties": {"type": "string"}},
        "extra": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"a": {"type": "string"}}},
        "padding": {"type": "string", "enum": ["x" * 500]},
    }}
    crd = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
           "metadata": {"name": "widgets.example.io"},
           "spec": {"group": "example.io", "names": {"kind": "Widget"}, "versions": [
               {"name": "v1alpha1", "served": True, "storage": False, "schema": {"openAPIV3Schema": {"type": "object"}}},
               {"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                   "type": "object", "properties": {
                       "apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"},
                       "spec": {"type": "object", "x-kubernetes-validations": [{"rule": "self.a == 1"}],
                                "properties": {"main": container, "sidecar": container}},
                       "status": {"type": "object"}}}}}]}}
    path = tmp_path / "crd.yaml"
    path.write_text(yaml.safe_dump(crd))
    assert vendor.main([str(path), "--out", str(tmp_path / "widget.json")]) == 0
    schema = json.loads((tmp_path / "widget.json").read_text())
    text = json.dumps(schema)
    assert "description" not in text and "x-kubernetes" not in text and '"default"' not in text
    assert "status" not in schema["properties"] and schema["additionalProperties"] is False
    assert schema["properties"]["apiVersion"] == {"const": "example.io/v1"}
    assert schema["required"] == ["apiVersion", "kind", "metadata", "spec"]
    # the repeated container moved to $defs once, referenced twice
    spec = schema["properties"]["spec"]
    assert spec["properties"]["main"] == spec["properties"]["sidecar"] == {"$ref": "#/$defs/main"}
    shared = schema["$defs"]["main"]
    assert shared["additionalProperties"] is False  # closed: properties, no preserve-unknown-fields
    assert "additionalProperties" not in shared["properties"]["extra"]  # preserve-unknown-fields: open
    assert shared["properties"]["env"]["additionalProperties"] == {"type": "string"}
    assert shared["properties"]["image"]["type"] == ["string", "null"]
    assert shared["properties"]["policy"]["pattern"] == "(?i)^(abort|warn)?$"
    validator = jsonschema.Draft202012Validator(schema)
    good = {"apiVersion": "example.io/v1", "kind": "Widget", "metadata": {"name": "w", "uid": "1"},
            "spec": {"main": {"name": "a", "image": None, "policy": "WARN", "extra": {"b": 1}}}}
    validator.validate(good)
    assert not validator.is_valid({**good, "spec": {"main": {"name": "a", "imagee": "x"}}})
    assert not validator.is_valid({**good, "spec": {"main": {"name": "a", "policy": "drop"}}})
    assert not validator.is_valid({**good, "kind": "Gadget"})
    v1alpha1 = vendor.crd_schema(crd, "v1alpha1")[0]
    assert v1alpha1["properties"]["apiVersion"] == {"const": "example.io/v1alpha1"}
