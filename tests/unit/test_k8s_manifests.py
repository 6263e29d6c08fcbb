"""k8s/: the plain manifests rendered from helm/funchat (`make k8s`, funchat/dev/render_k8s.py).

They are current; the base and both overlays build with `kubectl kustomize`; every built object
validates (core kinds with kubernetes-validate 1.33, custom kinds against tests/unit/schemas/);
each overlay, built, is the chart rendered with its profile, object for object; and --check
catches a hand edit."""

from __future__ import annotations

import copy
import functools
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from funchat.dev import render_k8s

import helm_python  # the test extra: helm-python-sdk, kubernetes-validate, jsonschema
import jsonschema
import kubernetes_validate
# One mapping of custom kinds to their vendored schemas, the chart test's (pytest puts this folder on sys.path).
from test_helm_chart import CUSTOM, KUBE, SCHEMAS  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
CHART = REPO / "helm" / "funchat"
PROFILES = render_k8s.PROFILES  # overlay -> values file
FOLDERS = ["base"] + [f"overlays/{p}" for p in PROFILES]
HELM_LABELS = ("helm.sh/chart", "app.kubernetes.io/managed-by")


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail("kubectl is not installed: install kubectl (it has kustomize built in) to test k8s/")
    return path


@functools.lru_cache(maxsize=None)
def _built(folder: str) -> str:
    proc = subprocess.run([kubectl(), "kustomize", str(K8S / folder)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize k8s/{folder} failed:\n{proc.stderr}"
    return proc.stdout


def built(folder: str) -> list[dict]:
    """The objects `kubectl kustomize k8s/<folder>` gives (fresh copies)."""
    return [d for d in yaml.safe_load_all(_built(folder)) if d]


@functools.lru_cache(maxsize=None)
def _chart(values_file: str | None) -> str:
    values = yaml.safe_load((CHART / values_file).read_text()) if values_file else {}
    with helm_python.Chart.load(str(CHART)) as chart:
        rendered = chart.render(values, name="funchat", namespace="funchat")
    return json.dumps([d for path, text in sorted(rendered.items()) if path.endswith(".yaml")
                       for d in yaml.safe_load_all(text) if d])


def chart(values_file: str | None = None) -> list[dict]:
    """The chart rendered straight with helm_python (not through render_k8s, so that the test does
    not trust the generator), less what k8s/ leaves out on purpose: the random Secrets and Helm's
    own labels."""
    objs = [o for o in json.loads(_chart(values_file)) if o["kind"] != "Secret"]
    for obj in objs:
        for labels in _label_maps(obj):
            for key in HELM_LABELS:
                labels.pop(key, None)
    return objs


def _label_maps(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "labels" and isinstance(value, dict):
                yield value
            yield from _label_maps(value)
    elif isinstance(node, list):
        for item in node:
            yield from _label_maps(item)


def by_ident(objs: list[dict]) -> dict[tuple[str, str], dict]:
    out = {}
    for obj in objs:
        key = (obj["kind"], obj["metadata"]["name"])
        assert key not in out, f"{key} twice"
        out[key] = obj
    return out


def without_namespace(objs: list[dict]) -> list[dict]:
    """The built objects, all in namespace funchat, with metadata.namespace dropped (the chart's
    templates leave it to `helm install -n`)."""
    objs = copy.deepcopy(objs)
    for obj in objs:
        assert obj["metadata"].pop("namespace", None) == "funchat", f"{obj['kind']}/{obj['metadata']['name']}"
    return objs


# -- current, complete, builds ---------------------------------------------------------------

def test_committed_k8s_is_what_the_chart_renders_now(capsys):
    rc = render_k8s.main(["--check"])
    assert rc == 0, capsys.readouterr().err


@pytest.mark.parametrize("folder", FOLDERS)
def test_every_file_is_part_of_the_build(folder):
    kustomization = yaml.safe_load((K8S / folder / "kustomization.yaml").read_text())
    listed = {r for r in kustomization["resources"] if not r.startswith("../")}
    listed |= {p["path"] for p in kustomization.get("patches", [])}
    files = {p.relative_to(K8S / folder).as_posix() for p in (K8S / folder).rglob("*.yaml")}
    assert files - {"kustomization.yaml"} == listed
    assert built(folder)


@pytest.mark.parametrize("folder", FOLDERS)
def test_every_built_object_validates(folder):
    for obj in built(folder):
        key = (obj["apiVersion"], obj["kind"])
        if key in CUSTOM:
            jsonschema.validate(obj, json.loads((SCHEMAS / CUSTOM[key]).read_text()))
        else:
            try:
                kubernetes_validate.validate(obj, KUBE, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                pytest.fail(f"{key}: no schema; add the kind to CUSTOM in tests/unit/test_helm_chart.py")


# -- the overlays are the chart's profiles ---------------------------------------------------

def test_base_is_the_chart_with_its_defaults():
    assert by_ident(without_namespace(built("base"))) == by_ident(chart())


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_overlay_is_the_chart_with_its_profile(profile):
    """Whole objects: the same (kind, name) set and every object equal, labels included (less Helm's)."""
    got = by_ident(without_namespace(built(f"overlays/{profile}")))
    want = by_ident(chart(PROFILES[profile]))
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key] == want[key], f"{key} differs from the chart's {PROFILES[profile]} render"


def workloads(objs: list[dict]) -> dict[str, dict]:
    """The key properties of each Deployment/StatefulSet, by name."""
    out = {}
    for obj in objs:
        if obj["kind"] not in ("Deployment", "StatefulSet"):
            continue
        pod = obj["spec"]["template"]["spec"]
        out[obj["metadata"]["name"]] = {
            "replicas": obj["spec"].get("replicas"),
            "images": [c["image"] for c in pod["containers"]],
            "resources": [c.get("resources") for c in pod["containers"]],
            "env": [c.get("env") for c in pod["containers"]],
            "nodeSelector": pod.get("nodeSelector"),
            "tolerations": pod.get("tolerations"),
            "runtimeClassName": pod.get("runtimeClassName"),
            "claims": [v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", [])
                       if "persistentVolumeClaim" in v],
        }
    return out


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_overlay_workloads_match_the_profile(profile):
    """The properties a reader cares about, one workload at a time (a readable failure where the
    whole-object comparison above gives a long diff)."""
    got = workloads(built(f"overlays/{profile}"))
    want = workloads(chart(PROFILES[profile]))
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], name


def test_overlays_really_change_the_base():
    """dev-cpu: one replica each, no GPU, the tiny checkpoint; prod-gpu: GPUs on the gpu pool,
    the LLM autoscaled, two orchestrators."""
    dev, gpu = workloads(built("overlays/dev-cpu")), workloads(built("overlays/prod-gpu"))
    assert all(w["replicas"] == 1 for w in dev.values())
    assert all("nvidia.com/gpu" not in str(w["resources"]) for w in dev.values())
    assert dev["funchat-llm"]["claims"] == ["funchat-checkpoint-tiny"]
    llm = gpu["funchat-llm"]
    assert llm["resources"][0]["limits"]["nvidia.com/gpu"] == 1 and llm["replicas"] is None  # the HPA's
    assert llm["nodeSelector"] == {"funchat.io/pool": "gpu"} and llm["tolerations"]
    assert gpu["funchat-orchestrator"]["replicas"] == 2
    assert ("HorizontalPodAutoscaler", "funchat-llm") in by_ident(built("overlays/prod-gpu"))


# -- --check ---------------------------------------------------------------------------------

def test_check_names_a_hand_edited_file(tmp_path, capsys):
    out = tmp_path / "k8s"
    shutil.copytree(K8S, out)
    assert render_k8s.main(["--out", str(out)]) == 0  # current, whatever the checkout holds
    assert render_k8s.main(["--check", "--out", str(out)]) == 0
    capsys.readouterr()

    edited = out / "base" / "llm.yaml"
    edited.write_text(edited.read_text().replace("memory: 4Gi", "memory: 5Gi", 1))
    (out / "overlays" / "dev-cpu" / "kustomization.yaml").unlink()
    (out / "overlays" / "prod-gpu" / "patches" / "by-hand.yaml").write_text("[]\n")
    assert render_k8s.main(["--check", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "make k8s" in err
    assert "stale:   base/llm.yaml" in err
    assert "missing: overlays/dev-cpu/kustomization.yaml" in err
    assert "extra:   overlays/prod-gpu/patches/by-hand.yaml" in err

    readme = (out / "README.md").read_text()
    assert render_k8s.main(["--out", str(out)]) == 0  # writing repairs all three
    assert render_k8s.main(["--check", "--out", str(out)]) == 0
    assert not (out / "overlays" / "prod-gpu" / "patches" / "by-hand.yaml").exists()
    assert (out / "README.md").read_text() == readme  # hand-written, not the generator's


def test_output_is_the_same_on_every_run():
    assert render_k8s.generate() == render_k8s.generate()


@pytest.mark.parametrize("folder", FOLDERS)
def test_kustomization_lists_every_secret_to_create_first(folder):
    """The generated Secrets (left out) and the operator's API-key Secret (never rendered) are in the
    header of each kustomization.yaml, and k8s/README.md says how to create each of them."""
    header = (K8S / folder / "kustomization.yaml").read_text().split("apiVersion:")[0]
    used = {v["secret"]["secretName"] for o in built(folder) for v in _secret_volumes(o)}
    assert used == {"funchat-resume", "funchat-api-keys"}
    for line in ("Secret funchat-resume (key resume-secret)", "Secret funchat-redis (key redis-password)",
                 "Secret funchat-api-keys (key api_keys)"):
        assert f"#   {line}\n" in header
    readme = (K8S / "README.md").read_text()
    assert "funchat keys create --tenant NAME --keys-file api_keys" in readme
    assert "create secret generic funchat-api-keys --from-file=api_keys=api_keys" in readme
    # as the manifests read it: the key file FUNCHAT_API_KEYS_FILE names, in the mounted directory
    orch = by_ident(built(folder))[("Deployment", "funchat-orchestrator")]["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in orch["containers"][0]["env"]}
    assert env["FUNCHAT_API_KEYS_FILE"] == "/etc/funchat/api-keys/api_keys"


def _secret_volumes(node):
    if isinstance(node, dict):
        if isinstance(node.get("secret"), dict) and "name" in node:
            yield node
        for value in node.values():
            yield from _secret_volumes(value)
    elif isinstance(node, list):
        for item in node:
            yield from _secret_volumes(item)
