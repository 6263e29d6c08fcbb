"""loadtests/k8s/locust.yaml (Locust's master and workers in the cluster) checked offline: every object
against the Kubernetes 1.33 schemas (strict), and the wiring between them and the release."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "loadtests" / "k8s" / "locust.yaml"
KUBE = "1.33"


def objects() -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(MANIFEST.read_text()) if o}


@pytest.mark.parametrize("key", sorted(objects()))
def test_each_object_is_valid_kubernetes(key):
    kubernetes_validate.validate(objects()[key], KUBE, strict=True)


def test_the_schema_check_does_catch_a_misspelt_field():
    bad = objects()[("Deployment", "funchat-locust-worker")]
    bad["spec"]["template"]["spec"]["containers"][0]["argz"] = ["--worker"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBE, strict=True)


def container(name: str) -> dict:
    return objects()[("Deployment", name)]["spec"]["template"]["spec"]["containers"][0]


def test_master_and_workers_are_wired_to_each_other_and_to_the_orchestrator():
    objs = objects()
    assert set(objs) == {("Service", "funchat-locust-master"), ("Deployment", "funchat-locust-master"),
                         ("Deployment", "funchat-locust-worker")}
    service = objs[("Service", "funchat-locust-master")]
    master_pod = objs[("Deployment", "funchat-locust-master")]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= master_pod.items()
    ports = {p["name"]: p["containerPort"] for p in container("funchat-locust-master")["ports"]}
    assert {p["targetPort"]: p["port"] for p in service["spec"]["ports"]} == {"web": 8089, "workers": 5557}
    assert ports == {"web": 8089, "workers": 5557}
    master_args, worker_args = container("funchat-locust-master")["args"], container("funchat-locust-worker")["args"]
    assert "--master" in master_args and "--worker" in worker_args
    assert "--master-host=funchat-locust-master" in worker_args and "--master-port=5557" in worker_args
    # the orchestrator's Service as k8s/ (rendered from the chart) names it
    orchestrator = next(o for o in yaml.safe_load_all((REPO / "k8s" / "base" / "orchestrator.yaml").read_text())
                        if o and o["kind"] == "Service")
    grpc_port = next(p["port"] for p in orchestrator["spec"]["ports"] if p["name"] == "grpc")
    assert f"--host={orchestrator['metadata']['name']}:{grpc_port}" in master_args


def test_both_run_the_locustfile_from_the_configmap_on_a_read_only_root():
    for name in ("funchat-locust-master", "funchat-locust-worker"):
        pod = objects()[("Deployment", name)]["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["locustfile"]["configMap"]["name"] == "funchat-locustfile"
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert mounts["locustfile"] == "/mnt/locust"  # where the image's entrypoint reads locustfile.py
        assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
        assert mounts["tmp"] == "/tmp" and "emptyDir" in volumes["tmp"]  # espeak's cache, the summary
    assert "--locustfile=/mnt/locust/locustfile.py" in (REPO / "loadtests" / "Dockerfile").read_text()


def test_the_workers_send_the_api_key_of_the_loadtest_secret():
    env = {e["name"]: e for e in container("funchat-locust-worker")["env"]}
    assert env["FUNCHAT_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "funchat-loadtest-key", "key": "api_key"}
    assert "value" not in env["FUNCHAT_API_KEY"]  # never the key itself in the manifest
    # the master makes no calls: no key there
    assert all(e["name"] != "FUNCHAT_API_KEY" for e in container("funchat-locust-master").get("env", []))
