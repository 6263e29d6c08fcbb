"""The pure parts of funchat.dev.podman_deploy: what changes between the rendered chart and what
podman 4.3's kube play is given, and how the chart's probes are run. The real run is
tests/deploy/test_chart_in_podman.py."""

from __future__ import annotations

import base64
import json

import pytest

from funchat.dev import podman_deploy as pd

PORT = 50099


@pytest.fixture(scope="module")
def rendered():
    return pd.render(PORT)


def workload(objs, kind, name):
    return next(o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name)


def test_podman_values_point_the_orchestrator_at_pod_names(rendered):
    cm = workload(rendered, "ConfigMap", "funchat-orchestrator")["data"]
    assert json.loads(cm["FUNCHAT_ENDPOINTS"]) == {
        "audio_tokenizer": "funchat-audio-tokenizer-pod-0:8001", "llm": "funchat-llm-pod-0:8001",
        "refined_head": "funchat-refined-head-pod-0:8001", "vocoder": "funchat-vocoder-pod-0:8001"}
    orch = workload(rendered, "Deployment", "funchat-orchestrator")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in orch["env"]}
    assert env["FUNCHAT_REDIS_URL"] == "redis://funchat-redis-pod-0:6379/0"
    assert orch["ports"][0]["hostIP"] == "127.0.0.1" and orch["ports"][0]["hostPort"] == PORT
    redis = workload(rendered, "StatefulSet", "funchat-redis")["spec"]["template"]["spec"]["containers"][0]
    assert redis["image"].startswith("localhost/funchat-redis:")
    # the dev-cpu profile underneath: no GPU anywhere
    assert "nvidia.com/gpu" not in json.dumps(rendered)


def test_statefulset_becomes_a_one_replica_deployment_with_its_claims(rendered):
    sts = workload(rendered, "StatefulSet", "funchat-redis")
    claim, deployment = pd.as_podman_workloads(sts)
    assert claim["kind"] == "PersistentVolumeClaim" and claim["metadata"]["name"] == "data-funchat-redis-0"
    assert claim["spec"] == sts["spec"]["volumeClaimTemplates"][0]["spec"]
    assert deployment["kind"] == "Deployment" and deployment["metadata"]["name"] == "funchat-redis"
    assert "volumeClaimTemplates" not in deployment["spec"] and "serviceName" not in deployment["spec"]
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "data-funchat-redis-0"}} in volumes
    assert deployment["spec"]["template"]["spec"]["containers"] == sts["spec"]["template"]["spec"]["containers"]
    assert pd.as_podman_workloads(workload(rendered, "Deployment", "funchat-llm")) == \
        [workload(rendered, "Deployment", "funchat-llm")]
    with pytest.raises(pd.DeployError, match="one replica"):
        pd.as_podman_workloads({**sts, "spec": {**sts["spec"], "replicas": 2}})


def test_only_host_ports_stay_and_shm_is_podmans_own(rendered):
    llm = workload(rendered, "Deployment", "funchat-llm")
    played = pd.without_shm_volume(pd.unpublished_ports(llm))
    c = played["spec"]["template"]["spec"]["containers"][0]
    assert "ports" not in c
    assert all(m["mountPath"] != "/dev/shm" for m in c["volumeMounts"])
    names = {v["name"] for v in played["spec"]["template"]["spec"]["volumes"]}
    assert "shm" not in names and "checkpoint" in names
    assert llm["spec"]["template"]["spec"]["containers"][0]["ports"]  # the rendered object is untouched
    orch = pd.unpublished_ports(workload(rendered, "Deployment", "funchat-orchestrator"))
    assert [p["hostPort"] for p in orch["spec"]["template"]["spec"]["containers"][0]["ports"]] == [PORT]


def test_the_realtime_port_is_published_on_loopback_when_asked():
    orch = pd.unpublished_ports(workload(pd.render(PORT, PORT + 1), "Deployment", "funchat-orchestrator"))
    ports = orch["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert [(p["name"], p["hostIP"], p["hostPort"]) for p in ports] == [("grpc", "127.0.0.1", PORT),
                                                                         ("http", "127.0.0.1", PORT + 1)]


def test_secrets_are_stored_in_the_form_their_use_needs(rendered):
    uses = pd.secret_uses(rendered)
    assert uses == {"funchat-redis": {"env"}, "funchat-resume": {"volume"}, "funchat-api-keys": {"volume"}}
    redis_secret = workload(rendered, "Secret", "funchat-redis")
    env_payload = json.loads(pd.podman_secret_payload(redis_secret, {"env"}))
    assert env_payload == redis_secret["data"]  # a flat map of base64 values
    resume = workload(rendered, "Secret", "funchat-resume")
    volume_payload = json.loads(pd.podman_secret_payload(resume, {"volume"}))
    key = next(iter(resume["data"]))
    assert volume_payload["data"][key] == base64.b64decode(resume["data"][key]).decode()  # plain
    with pytest.raises(pd.DeployError, match="not both"):
        pd.podman_secret_payload(resume, {"env", "volume"})


def test_the_api_keys_secret_is_made_from_the_key_file(rendered, tmp_path):
    from funchat.api_keys import KeyStore, create_key

    keys_file = tmp_path / "keys" / "api_keys"
    key, entry = create_key(keys_file, "deploy")
    secret = pd.api_keys_secret(rendered, keys_file)
    # what the orchestrator mounts: the name of its Secret volume, the key FUNCHAT_API_KEYS_FILE names
    assert secret["metadata"]["name"] == "funchat-api-keys" and list(secret["data"]) == ["api_keys"]
    assert base64.b64decode(secret["data"]["api_keys"]) == keys_file.read_bytes()
    payload = json.loads(pd.podman_secret_payload(secret, pd.secret_uses(rendered)["funchat-api-keys"]))
    played = tmp_path / "played"  # the file kube play writes into the Secret's volume: plain
    played.write_text(payload["data"]["api_keys"])
    assert KeyStore(played).verify_key(key) == "deploy"
    with pytest.raises(pd.DeployError, match="funchat keys create"):
        pd.api_keys_secret(rendered, tmp_path / "missing")
    assert pd.api_keys_secret([o for o in rendered if o["kind"] != "Deployment"], keys_file) is None


def test_up_refuses_a_render_whose_secret_nobody_provides(tmp_path):
    # before any podman command: the API-keys Secret is the operator's, so the run must bring it
    with pytest.raises(pd.DeployError, match=r"\['funchat-api-keys'\].*api_keys_file"):
        pd.up(tmp_path / "checkpoint", PORT, run_dir=tmp_path / "run")


def test_probe_commands_follow_the_chart(rendered):
    llm = workload(rendered, "Deployment", "funchat-llm")["spec"]["template"]["spec"]["containers"][0]
    cmd = pd.probe_command(llm["readinessProbe"], llm)
    assert cmd[:2] == ["python3", "-c"] and cmd[3] == "http://127.0.0.1:8000/v2/health/ready"  # port "http"
    orch = workload(rendered, "Deployment", "funchat-orchestrator")["spec"]["template"]["spec"]["containers"][0]
    assert pd.probe_command(orch["startupProbe"], orch)[3:5] == ["127.0.0.1:50052", ""]  # Ray's proxy
    redis = workload(rendered, "StatefulSet", "funchat-redis")["spec"]["template"]["spec"]["containers"][0]
    assert pd.probe_command(redis["readinessProbe"], redis) == redis["readinessProbe"]["exec"]["command"]
    assert pd.probe_command(redis["livenessProbe"], redis) == ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/6379"]
    with pytest.raises(pd.DeployError, match="named port"):
        pd.probe_command({"httpGet": {"port": "nope", "path": "/"}}, llm)
