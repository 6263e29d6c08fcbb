"""The load generator's API key: its callers send FUNCHAT_API_KEY (or the key given), the probe tells
a server that refuses it in one line, and `make loadtest` (loadtests/run.py) finds the local stack's
key. Against the stand-in server of tests/conftest.py, which takes only its own key."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from funchat.loadgen import CallerSettings, ConverseCaller, TurnPlan, Utterance, auth_problem, respond_call

REPO = Path(__file__).resolve().parents[2]
SPEECH = Utterance("tone", (0.3 * np.sin(np.arange(8000) / 10)).astype(np.float32))
MANUAL = CallerSettings(turn_detection="manual", realtime=False, turn_timeout_s=10, connect_timeout_s=10)


def _run_py():
    spec = importlib.util.spec_from_file_location("loadtests_run", REPO / "loadtests" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_callers_send_the_key_of_the_environment_or_the_one_given(stand_in, monkeypatch):
    monkeypatch.setenv("FUNCHAT_API_KEY", stand_in.key)
    with grpc.insecure_channel(stand_in.target) as channel:
        respond = respond_call(channel, SPEECH, MANUAL)
        converse = ConverseCaller(channel, [TurnPlan(SPEECH)], MANUAL).run()
        monkeypatch.delenv("FUNCHAT_API_KEY")
        given = respond_call(channel, SPEECH, MANUAL, api_key=stand_in.key)
        refused = respond_call(channel, SPEECH, MANUAL)
        refused_call = ConverseCaller(channel, [TurnPlan(SPEECH)], MANUAL, api_key="").run()
    assert [t.error for t in respond.turns + converse.turns + given.turns] == ["", "", ""]
    assert [t.status for t in respond.turns + converse.turns] == ["completed", "completed"]
    assert [(t.error, t.error_message) for t in refused.turns + refused_call.turns] == \
        [("UNAUTHENTICATED", stand_in.refused)] * 2
    assert [v for _, v in stand_in.seen] == [[f"Bearer {stand_in.key}"]] * 3 + [[], []]


def test_the_probe_says_in_one_line_why_the_key_is_not_taken(stand_in, monkeypatch):
    monkeypatch.delenv("FUNCHAT_API_KEY", raising=False)
    assert auth_problem(stand_in.target, stand_in.key) is None
    missing = auth_problem(stand_in.target)
    assert missing == (f"{stand_in.target} needs an API key (UNAUTHENTICATED: {stand_in.refused}); set "
                       f"FUNCHAT_API_KEY to a key of this server (`make up` writes one to .run/api_key)")
    wrong = "fck_abcdefgh23_" + "w" * 52
    monkeypatch.setenv("FUNCHAT_API_KEY", wrong)
    refused = auth_problem(stand_in.target)
    assert refused.startswith(f"{stand_in.target} refused the API key from FUNCHAT_API_KEY (UNAUTHENTICATED: ")
    assert "w" * 52 not in refused and "\n" not in refused
    assert [m for m, _ in stand_in.seen] == ["GetSession"] * 3
    # a server that does not answer at all is unreachable_reason's business, not this one's
    assert auth_problem("127.0.0.1:1", stand_in.key, timeout_s=2) is None


def test_run_py_uses_the_local_stacks_key_only_for_the_local_stack(tmp_path):
    run = _run_py()
    key_file = tmp_path / "keys" / "api_key"
    key_file.parent.mkdir()
    key_file.write_text("fck_x\n")
    endpoints = tmp_path / "endpoints.json"
    endpoints.write_text(json.dumps({"orchestrator": "127.0.0.1:50051", "api_key_file": str(key_file)}))
    assert run.local_api_key("127.0.0.1:50051", endpoints) == "fck_x"
    assert run.local_api_key("10.0.0.7:50051", endpoints) is None  # another server: not our key
    endpoints.write_text(json.dumps({"orchestrator": "127.0.0.1:50051"}))  # an older endpoints.json
    assert run.local_api_key("127.0.0.1:50051", endpoints) is None
    (tmp_path / "api_key").write_text("fck_y\n")
    assert run.local_api_key("127.0.0.1:50051", endpoints) == "fck_y"  # next to endpoints.json
    assert run.local_api_key("127.0.0.1:50051", tmp_path / "none.json") is None


def test_run_py_stops_on_a_refused_key_with_one_line_and_exit_code_2(stand_in, tmp_path, monkeypatch, capsys):
    run = _run_py()
    monkeypatch.delenv("FUNCHAT_API_KEY", raising=False)
    endpoints = tmp_path / "endpoints.json"
    endpoints.write_text(json.dumps({"orchestrator": stand_in.target}))
    assert run.main(["--host", stand_in.target, "--endpoints", str(endpoints), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"loadtest: {stand_in.target} needs an API key (UNAUTHENTICATED: "
                                f"{stand_in.refused}); set FUNCHAT_API_KEY to a key of this server (`make up` "
                                f"writes one to .run/api_key)"]
    (tmp_path / "api_key").write_text("fck_abcdefgh23_" + "w" * 52 + "\n")  # the local stack's, but a wrong one
    assert run.main(["--endpoints", str(endpoints), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "refused the API key from the local stack's key file" in err
    assert "w" * 52 not in err
    monkeypatch.setenv("FUNCHAT_API_KEY", "two words")
    assert run.main(["--host", stand_in.target, "--endpoints", str(endpoints)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "FUNCHAT_API_KEY holds characters" in err and "two words" not in err
    assert not (tmp_path / "out").exists()  # Locust never started


def test_run_py_passes_the_key_to_locust(stand_in, tmp_path, monkeypatch):
    run = _run_py()
    monkeypatch.delenv("FUNCHAT_API_KEY", raising=False)
    (tmp_path / "api_key").write_text(stand_in.key + "\n")
    endpoints = tmp_path / "endpoints.json"
    endpoints.write_text(json.dumps({"orchestrator": stand_in.target}))
    started = {}

    class Done:
        returncode = 0

    def fake_run(cmd, cwd, env):
        started.update(cmd=cmd, env=env)
        return Done()

    monkeypatch.setattr(run.subprocess, "run", fake_run)
    assert run.main(["--endpoints", str(endpoints), "--out", str(tmp_path / "out")]) == 0
    assert started["env"]["FUNCHAT_API_KEY"] == stand_in.key
    assert stand_in.key not in " ".join(started["cmd"])  # not on Locust's command line
    assert sys.executable == started["cmd"][0]
