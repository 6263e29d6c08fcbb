"""The chart's PrometheusRule and Grafana dashboard against real tools and the real metric names:
the rendered rules pass `promtool check rules`, and `promtool test rules` (Debian's prometheus
package) replays synthetic series through them: the SLO burn-rate alerts fire on a burning budget
and stay quiet on a healthy one; a model service with no target up fires. Every metric a rule or a
dashboard panel reads is one the orchestrator (funchat.orchestrator.metrics) or Triton exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml

from funchat.orchestrator import metrics as orchestrator_metrics
from test_helm_chart import CHART, NAMESPACE, PREFIX, TRITON_METRICS, objects, one

MONITORING = {"monitoring": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True},
                             "grafanaDashboard": {"enabled": True}}}
ORCH = f'namespace="{NAMESPACE}",service="{PREFIX}-orchestrator"'
DCGM = {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED"}
KUBE_STATE = {"kube_deployment_status_replicas_unavailable", "up"}
PROMQL_WORDS = {"sum", "rate", "by", "and", "or", "vector", "histogram_quantile", "avg", "le", "label_values",
                "namespace", "bool", "max", "min", "without", "on", "ignoring", "count"}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed (Debian's prometheus package: make setup installs it)", pytrace=False)
    return path


def rules_file(tmp_path, values=MONITORING):
    rule = one(objects(values), "PrometheusRule", PREFIX)
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    return rule, path


def alert(rule: dict, name: str) -> dict:
    return next(r for g in rule["spec"]["groups"] for r in g["rules"] if r.get("alert") == name)


def orchestrator_metric_names() -> set[str]:
    """The series names the orchestrator's metric objects export (counters get _total)."""
    names = set()
    for value in vars(orchestrator_metrics).values():
        name, kind = getattr(value, "_name", None), getattr(value, "_type", None)
        if isinstance(name, str) and name.startswith("funchat_orchestrator_") and kind:
            names.add(name + ("_total" if kind == "counter" else ""))
    return names


def known_series() -> set[str]:
    out = set(DCGM) | KUBE_STATE | set(TRITON_METRICS)
    for name in orchestrator_metric_names():
        out |= {name, f"{name}_bucket", f"{name}_count", f"{name}_sum"}
    return out


def metric_names(expr: str) -> set[str]:
    expr = re.sub(r'"[^"]*"', '""', expr)       # label values
    expr = re.sub(r"\[[^\]]*\]", "", expr)       # range selectors
    expr = re.sub(r"\{[^}]*\}", "", expr)        # label matchers
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # grouping labels
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr))
    return {w for w in words if w not in PROMQL_WORDS and not re.fullmatch(r"e\d*", w)}


def test_the_orchestrator_metrics_are_those_the_rules_expect():
    names = orchestrator_metric_names()
    for expected in ("funchat_orchestrator_first_audio_seconds", "funchat_orchestrator_turns_total",
                     "funchat_orchestrator_stage_seconds", "funchat_orchestrator_errors_total"):
        assert expected in names, sorted(names)


def test_rules_pass_promtool_check(tmp_path):
    _, path = rules_file(tmp_path)
    out = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_rule_reads_real_metrics(tmp_path):
    rule, _ = rules_file(tmp_path)
    for r in (r for g in rule["spec"]["groups"] for r in g["rules"]):
        unknown = metric_names(r["expr"]) - known_series()
        assert not unknown, f"{r.get('alert')}: {unknown}"


def _test_case(rule: dict, series: list[dict], eval_time: str, firing: list[str], quiet: list[str]) -> dict:
    tests = []
    for name in firing + quiet:
        r = alert(rule, name)
        expected = [{"exp_labels": r["labels"], "exp_annotations": r["annotations"]}] if name in firing else []
        tests.append({"eval_time": eval_time, "alertname": name, "exp_alerts": expected})
    return {"interval": "1m", "input_series": series, "alert_rule_test": tests}


def run_promtool_tests(tmp_path, path, cases):
    spec = tmp_path / "tests.yaml"
    spec.write_text(yaml.safe_dump({"rule_files": [str(path)], "evaluation_interval": "1m", "tests": cases},
                                   sort_keys=False))
    out = subprocess.run([promtool(), "test", "rules", str(spec)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_slo_burn_alerts_fire_on_a_burning_budget_and_not_otherwise(tmp_path):
    rule, path = rules_file(tmp_path)
    count = f'funchat_orchestrator_first_audio_seconds_count{{{ORCH},mode="s2s"}}'
    within = f'funchat_orchestrator_first_audio_seconds_bucket{{{ORCH},mode="s2s",le="1.0"}}'

    def turns(status: str) -> str:
        return f'funchat_orchestrator_turns_total{{{ORCH},mode="s2s",status="{status}"}}'

    burning = [  # 60 turns a minute, half of them late and a tenth failed
        {"series": count, "values": "0+60x90"}, {"series": within, "values": "0+30x90"},
        {"series": turns("completed"), "values": "0+54x90"}, {"series": turns("failed"), "values": "0+6x90"}]
    healthy = [  # every turn in time, none failed
        {"series": count, "values": "0+60x90"}, {"series": within, "values": "0+60x90"},
        {"series": turns("completed"), "values": "0+60x90"}, {"series": turns("failed"), "values": "0+0x90"}]
    fast = ["FunchatFirstAudioSloFastBurn", "FunchatTurnSuccessSloFastBurn"]
    run_promtool_tests(tmp_path, path, [
        _test_case(rule, burning, "80m", firing=fast, quiet=[]),
        _test_case(rule, healthy, "80m", firing=[], quiet=fast),
    ])


def test_a_model_service_with_no_target_up_fires(tmp_path):
    rule, path = rules_file(tmp_path)
    llm = f"{PREFIX}-llm"
    down = next(r for g in rule["spec"]["groups"] for r in g["rules"]
                if r.get("alert") == "FunchatModelServiceDown" and r["labels"]["service"] == llm)
    series = [{"series": f'up{{namespace="{NAMESPACE}",service="{llm}",pod="p"}}', "values": "1x5 0x20"}]
    spec = {"interval": "1m", "input_series": series, "alert_rule_test": [
        {"eval_time": "4m", "alertname": "FunchatModelServiceDown", "exp_alerts": []},
        {"eval_time": "20m", "alertname": "FunchatModelServiceDown",
         "exp_alerts": [{"exp_labels": down["labels"], "exp_annotations": down["annotations"]}]}]}
    # the other three services have no series at all: they fire too (no target is an outage)
    others = [r for g in rule["spec"]["groups"] for r in g["rules"]
              if r.get("alert") == "FunchatModelServiceDown" and r["labels"]["service"] != llm]
    spec["alert_rule_test"][1]["exp_alerts"] += [{"exp_labels": r["labels"], "exp_annotations": r["annotations"]}
                                                 for r in others]
    spec["alert_rule_test"][0]["exp_alerts"] = []
    run_promtool_tests(tmp_path, path, [spec])


def test_tasks_left_running_with_no_call_open_fire_and_tasks_of_open_calls_do_not(tmp_path):
    rule, path = rules_file(tmp_path)

    def gauges(tasks: str, calls: str) -> list[dict]:  # two replicas' livesum gauges, one pod
        return [{"series": f'funchat_orchestrator_tasks{{{ORCH},pod="p"}}', "values": tasks},
                {"series": f'funchat_orchestrator_active_calls{{{ORCH},pod="p"}}', "values": calls}]

    leaked = gauges("3x40", "2x5 0x35")  # the calls ended at 5m, 3 tasks stayed
    busy = gauges("6x40", "2x40")  # tasks of open calls
    idle = gauges("3x5 0x35", "2x5 0x35")  # the tasks ended with the calls
    run_promtool_tests(tmp_path, path, [
        _test_case(rule, leaked, "30m", firing=["FunchatOrchestratorTasksLeaked"], quiet=[]),
        _test_case(rule, leaked, "10m", firing=[], quiet=["FunchatOrchestratorTasksLeaked"]),  # not for 15m yet
        _test_case(rule, busy, "30m", firing=[], quiet=["FunchatOrchestratorTasksLeaked"]),
        _test_case(rule, idle, "30m", firing=[], quiet=["FunchatOrchestratorTasksLeaked"]),
    ])


def test_slo_threshold_must_be_a_histogram_bucket():
    import helm_python

    schema = json.loads((CHART / "values.schema.json").read_text())
    enum = schema["properties"]["monitoring"]["properties"]["prometheusRule"]["properties"]["slo"]["properties"][
        "firstAudio"]["properties"]["thresholdSeconds"]["enum"]
    assert tuple(enum) == orchestrator_metrics.LATENCY_BUCKETS
    with pytest.raises(helm_python.HelmValuesError, match="thresholdSeconds"):
        objects({"monitoring": {"prometheusRule": {"enabled": True, "slo": {"firstAudio": {"thresholdSeconds": 0.9}}}}})
    rule = one(objects({"monitoring": {"prometheusRule": {"enabled": True, "slo": {"firstAudio": {
        "thresholdSeconds": 2, "objective": 0.95}}}}}), "PrometheusRule", PREFIX)
    assert 'le="2.0"' in alert(rule, "FunchatFirstAudioSloFastBurn")["expr"]
    assert ") / 0.05)" in alert(rule, "FunchatFirstAudioSloFastBurn")["expr"]
    quiet = one(objects({"monitoring": {"prometheusRule": {"enabled": True, "slo": {"enabled": False}}}}),
                "PrometheusRule", PREFIX)
    assert not [r for g in quiet["spec"]["groups"] for r in g["rules"] if "Slo" in r.get("alert", "")]


def test_the_dashboard_has_the_panels_and_reads_real_metrics():
    cm = one(objects(MONITORING), "ConfigMap", f"{PREFIX}-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["funchat.json"])
    assert dashboard == json.loads((CHART / "files" / "grafana-dashboard.json").read_text())
    titles = " | ".join(p["title"] for p in dashboard["panels"])
    for words in ("First audio", "Real-time factor", "underruns", "Barge-in", "Active calls", "Errors",
                  "Latency per stage", "Triton queue time", "Triton compute time", "GPU utilisation"):
        assert words in titles, words
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs
    for expr in exprs:
        expr = expr.replace("$__rate_interval", "5m").replace("$namespace", ".*")
        unknown = metric_names(expr) - known_series()
        assert not unknown, f"{expr}: {unknown}"
    assert not find_dashboard(objects())


def find_dashboard(objs):
    return [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("grafana-dashboard")]
