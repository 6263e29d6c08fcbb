"""The load generator and `make loadtest` against a real stack: redis-server, the four tritonservers
and the Ray Serve orchestrator on 127.0.0.1 (tiny checkpoint, short replies).

- one scripted live call goes through every caller behaviour (listen, barge in, go silent, hang up)
  and one Respond call, with what each measured checked against what the server did;
- loadtests/run.py (what `make loadtest` runs) with both Locust users and barge-ins: Locust's CSV
  files and HTML report, summary.json, plot.png; a generous SLO passes, an impossible one fails;
- an unreachable target, no API key or a refused one: exit code 2 and one line.

The orchestrator takes only calls with an API key: the module's callers and loadtests/run.py send
the one in FUNCHAT_API_KEY, set for the module (a key of the stack's key file).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from funchat.dev.redis_server import start_redis
from funchat.dev.stack import start_orchestrator
from funchat.dev.tritonserver import free_port
from funchat.loadgen import CallerSettings, ConverseCaller, TurnPlan, respond_call
from funchat.loadgen.records import BARGE_IN, HANG_UP, SILENT
from funchat.loadgen.utterances import synthesize

REPO = Path(__file__).resolve().parents[2]
RUN = [sys.executable, str(REPO / "loadtests" / "run.py")]
MAX_NEW = 16  # ~3 s replies
# Replies barged into are longer (~8 s), so that speech 300 ms into one meets it while the LLM is
# still generating. (A barge-in that lands after the LLM loop, while the vocoder works through the
# last codes, is not honoured by the orchestrator: no `interrupted`, status completed, see
# loadtests/README.md; the load generator reports it as BARGE_IN_IGNORED.)
MAX_NEW_BARGED = 40
VAD_SILENCE_S = 0.5


@pytest.fixture(scope="module")
def stack(tiny_checkpoint, tmp_path_factory, make_api_key, model_services):
    run_dir = tmp_path_factory.mktemp("loadtest-stack")
    keys_file, key = make_api_key(run_dir, "loadtest")
    redis_server = start_redis(run_dir)
    cluster, orch = model_services, None  # the model services are shared (tests/integration/conftest.py)
    try:
        env = {"FUNCHAT_CHECKPOINT": str(tiny_checkpoint), "FUNCHAT_REDIS_URL": redis_server.url,
               "FUNCHAT_RESUME_SECRET": "loadtest-secret-" + "0" * 20,
               "FUNCHAT_ENDPOINTS": json.dumps(cluster.endpoints), "FUNCHAT_MAX_CALLS": "8",
               "FUNCHAT_AUTH": "api_keys", "FUNCHAT_API_KEYS_FILE": str(keys_file)}
        with pytest.MonkeyPatch.context() as mp:
            # the callers', and run.py's (start_orchestrator keeps it from the server)
            mp.setenv("FUNCHAT_API_KEY", key)
            orch = start_orchestrator(run_dir, env, free_port(), timeout=180)
            yield orch.target
    finally:
        if orch is not None:
            orch.stop()
        redis_server.stop()


@pytest.fixture(scope="module")
def sentences(tmp_path_factory):
    cache = tmp_path_factory.mktemp("utterances")
    return [synthesize(text, cache) for text in ("What is the weather like in Paris tomorrow",
                                                 "Please set a timer for ten minutes",
                                                 "How far is the moon from the earth",
                                                 "Translate good morning into Spanish")]


# -- the callers ----------------------------------------------------------------------------------

def test_a_live_call_barges_in_goes_silent_and_hangs_up(stack, sentences):
    plan = [TurnPlan(sentences[0], BARGE_IN, at_ms=300),
            TurnPlan(sentences[1], SILENT, at_ms=300, barges_in=True),
            TurnPlan(sentences[2], HANG_UP, at_ms=300)]
    settings = CallerSettings(max_new_tokens=MAX_NEW_BARGED, silent_s=1.0, vad_silence_ms=int(VAD_SILENCE_S * 1000))
    seen = []
    with grpc.insecure_channel(stack) as channel:
        call = ConverseCaller(channel, plan, settings, seed=3, on_turn=seen.append).run()
    turns = call.turns
    assert [t.error for t in turns] == ["", "", ""], [t.error_message for t in turns]
    assert sorted(t.index for t in seen) == [0, 1, 2]  # each reported once, when it was final
    barged, silent, hung = turns
    for t in turns:
        assert 0 < t.first_audio_s < 30
        # the caller's turn ended when the audio holding the VAD's decision point went out: the
        # listener's wait is the VAD silence more (to within a 100 ms chunk)
        assert t.speech_end_to_audio_s - t.first_audio_s == pytest.approx(VAD_SILENCE_S, abs=0.11)
    # talked over after 300 ms of it had played: the server stopped it and said so
    assert barged.behaviour == BARGE_IN and barged.status == "interrupted"
    assert barged.barge_in_s is not None and 0.05 < barged.barge_in_s < 3.0
    assert barged.rtf is None  # a cut reply has no real-time factor
    # the uplink went quiet for 1 s mid-reply; the reply was then heard to its end
    assert silent.behaviour == SILENT and silent.status == "completed" and silent.audio_s > 3.0
    assert silent.reply_s >= silent.first_audio_s and silent.rtf == pytest.approx(silent.reply_s / silent.audio_s)
    assert hung.behaviour == HANG_UP and hung.status == "hung_up" and hung.reply_s is None
    assert call.hung_up


def test_a_respond_call_is_measured(stack, sentences):
    with grpc.insecure_channel(stack) as channel:
        call = respond_call(channel, sentences[0], CallerSettings(max_new_tokens=MAX_NEW), seed=5)
    (t,) = call.turns
    assert t.error == "" and t.status == "completed" and t.kind == "respond"
    assert 0 < t.first_audio_s <= t.reply_s and t.audio_s > 1.0 and t.rtf > 0


def test_a_call_to_nothing_fails_with_its_grpc_status(sentences):
    with grpc.insecure_channel(f"127.0.0.1:{free_port()}") as channel:
        call = ConverseCaller(channel, [TurnPlan(sentences[0])], CallerSettings(connect_timeout_s=5)).run()
        respond = respond_call(channel, sentences[0], CallerSettings(turn_timeout_s=5))
    assert [t.error for t in call.turns] == ["UNAVAILABLE"]
    assert [t.error for t in respond.turns] == ["UNAVAILABLE"]


# -- make loadtest ---------------------------------------------------------------------------------

def run_loadtest(target: str, out: Path, *args: str, timeout: float = 240, env: dict | None = None
                 ) -> subprocess.CompletedProcess:
    # --endpoints: never the key of a `make up` stack of this checkout (.run/)
    return subprocess.run([*RUN, "--host", target, "--out", str(out), "--endpoints", str(out / "none.json"), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def test_loadtest_with_both_users_and_barge_ins_writes_every_output_and_passes_a_generous_slo(stack, tmp_path):
    # a Converse call: one turn barged into, then the barging turn listened to (~20 s). The generous
    # SLO tolerates errors too: on this 2-core machine a barge-in can land while the orchestrator
    # finishes a reply (see MAX_NEW_BARGED), which the load generator rightly counts as an error.
    proc = run_loadtest(stack, tmp_path, "--users", "2", "--duration", "15", "--first-audio-p95-ms", "60000",
                        "--max-underrun-turns", "1000", "--max-error-rate", "0.5", "--", "--recording", "",
                        "--max-new-tokens", str(MAX_NEW_BARGED), "--turns", "1", "--barge-in-share", "1",
                        "--silent-share", "0", "--hang-up-share", "0", "--behaviour-at-ms", "300-300")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("locust_stats.csv", "locust_stats_history.csv", "locust_failures.csv", "report.html",
                 "summary.json", "turns.jsonl", "plot.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((tmp_path / "summary.json").read_text())
    overall = summary["overall"]
    assert summary["verdict"] == {"passed": True, "violations": []}
    assert summary["target"] == stack and summary["shape"] == "steady"
    assert [lv["concurrency"] for lv in summary["levels"]] == [2]
    assert set(overall["by_kind"]) == {"converse", "respond"}
    assert overall["turns"] >= 3
    assert set(overall["errors_by_code"]) <= {"BARGE_IN_IGNORED"}, overall["error_messages"]
    assert overall["turns_with_audio"] >= 3 and 0 < overall["first_audio_ms_p50"] <= overall["first_audio_ms_p95"]
    assert overall["behaviours"].get("barge_in", 0) >= 1  # tried; measured unless the race above hit it
    assert overall["barge_ins"] == 0 or overall["barge_in_ms_p50"] > 0
    assert 0.0 <= overall["goodput"] <= 1.0 and overall["calls"] >= 1
    lines = (tmp_path / "turns.jsonl").read_text().splitlines()
    assert len(lines) == overall["turns"] and {json.loads(x)["kind"] for x in lines} == {"converse", "respond"}
    with open(tmp_path / "locust_stats.csv") as f:
        rows = {r["Name"]: r for r in csv.DictReader(f)}
    for name in ("Converse.first_audio", "Converse.turn", "Converse.barge_in", "Respond.first_audio", "Respond.turn"):
        assert rows[name]["Type"] == "grpc" and int(rows[name]["Request Count"]) >= 1, name


def test_loadtest_fails_when_the_slo_cannot_hold(stack, tmp_path):
    proc = run_loadtest(stack, tmp_path, "--users", "1", "--duration", "4", "--first-audio-p95-ms", "1",
                        "--max-underrun-turns", "1000", "--", "--recording", "", "--max-new-tokens", "8",
                        "--converse-weight", "0")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["overall"]["turns"] >= 1 and summary["overall"]["errors"] == 0
    assert summary["verdict"]["passed"] is False
    assert summary["verdict"]["violations"][0].startswith("first audio p95 ")
    assert "SLO FAILED: first audio p95" in proc.stdout


def test_an_unreachable_target_is_one_line_and_exit_code_2(tmp_path):
    port = free_port()
    proc = run_loadtest(f"127.0.0.1:{port}", tmp_path, "--duration", "5", timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [f"loadtest: cannot connect to 127.0.0.1:{port} (Connection refused); "
                                        "start the stack with `make up` or give HOST=host:port"]
    assert not (tmp_path / "summary.json").exists()
    proc = subprocess.run([*RUN, "--endpoints", str(tmp_path / "none.json")], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1
    assert proc.stderr.startswith("loadtest: no target: ")


def test_no_key_or_a_refused_one_is_one_line_and_exit_code_2(stack, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "FUNCHAT_API_KEY"}
    proc = run_loadtest(stack, tmp_path, "--duration", "5", timeout=60, env=env)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"loadtest: {stack} needs an API key (UNAUTHENTICATED: ")
    assert line.endswith("set FUNCHAT_API_KEY to a key of this server (`make up` writes one to .run/api_key)")
    wrong = "fck_aaaaaaaaaa_" + "a" * 52
    proc = run_loadtest(stack, tmp_path, "--duration", "5", timeout=60, env={**env, "FUNCHAT_API_KEY": wrong})
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"loadtest: {stack} refused the API key from FUNCHAT_API_KEY (UNAUTHENTICATED: ")
    assert "a" * 52 not in line
    assert not (tmp_path / "summary.json").exists()
