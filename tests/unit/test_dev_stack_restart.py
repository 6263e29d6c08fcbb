"""`python -m funchat.dev.stack restart SERVICE` (`make restart`): what it refuses, and the settings it
records for an orchestrator restart. The restarts themselves run against real processes in
tests/integration/test_faults_processes.py."""

from __future__ import annotations

import json

import pytest

from funchat.dev import stack
from funchat.dev.tritonserver import TritonServerError, restart_server


def test_an_unknown_service_is_refused_with_the_ones_there_are(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        stack.main(["restart", "postgres", "--run-dir", str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'postgres'" in err
    for service in ("redis", "audio_tokenizer", "llm", "refined_head", "vocoder", "orchestrator"):
        assert repr(service) in err


@pytest.mark.parametrize("service", stack.SERVICES)
def test_restart_without_a_running_stack_says_to_start_one(tmp_path, capsys, service):
    assert stack.main(["restart", service, "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"restart {service}: no stack is running in {tmp_path}" in err and "make up" in err


def test_a_model_server_up_never_started_is_named(tmp_path):
    (tmp_path / "triton").mkdir()
    (tmp_path / "triton" / "servers.json").write_text(json.dumps({"vocoder": {"grpc_port": 1}}))
    with pytest.raises(TritonServerError, match=r"no llm server was started in .* start the stack first"):
        restart_server(tmp_path, "llm")


def test_a_stack_json_without_the_orchestrator_settings_is_refused(tmp_path, capsys):
    (tmp_path / stack.STACK_FILE).write_text(json.dumps({"run_dir": str(tmp_path), "orchestrator_pid": 0}))
    assert stack.main(["restart", "orchestrator", "--run-dir", str(tmp_path)]) == 2
    assert "records no orchestrator settings: run `make down` and `make up`" in capsys.readouterr().err


def test_the_orchestrator_record_keeps_settings_and_leaves_out_secrets_and_the_client_key(monkeypatch):
    monkeypatch.setenv("FUNCHAT_REPLICAS", "2")               # a setting of the shell `up` ran in
    monkeypatch.setenv("FUNCHAT_API_KEY", "fck_client_key")    # a client's, not the server's
    monkeypatch.setenv("FUNCHAT_TRACING_HEADERS", "api-key=s3cret")
    orch = stack.OrchestratorProcess(pid=1, grpc_port=5001, log=None, metrics_port=5002, http_port=5003)
    record = stack._orchestrator_record(orch, {"FUNCHAT_CHECKPOINT": "/ckpt", "FUNCHAT_REDIS_PASSWORD": "pw",
                                               "FUNCHAT_REPLICAS": "3"})
    assert (record["grpc_port"], record["metrics_port"], record["http_port"]) == (5001, 5002, 5003)
    env = record["env"]
    assert env["FUNCHAT_CHECKPOINT"] == "/ckpt" and env["FUNCHAT_REPLICAS"] == "3"  # the stack's own win
    assert not {"FUNCHAT_API_KEY", "FUNCHAT_TRACING_HEADERS", "FUNCHAT_REDIS_PASSWORD", "FUNCHAT_RESUME_SECRET"} & set(env)
    assert "s3cret" not in json.dumps(record) and '"pw"' not in json.dumps(record)


def test_shared_memory_regions_no_process_maps_are_removed_after_a_kill(tmp_path):
    """A tritonserver killed with SIGKILL leaves its Python backend region in /dev/shm; stopping or
    restarting a server removes such regions, and never one a process maps or one just created."""
    import mmap
    import os
    import time
    import uuid

    from funchat.dev.tritonserver import SHM_DIR, SHM_REGION_PREFIX, remove_stale_shm_regions

    if not SHM_DIR.is_dir():
        pytest.skip("no /dev/shm on this machine")
    tag = uuid.uuid4().hex
    stale, mapped, fresh = (SHM_DIR / f"{SHM_REGION_PREFIX}test-{tag}-{n}" for n in ("stale", "mapped", "fresh"))
    old = time.time() - 120
    try:
        for f in (stale, mapped, fresh):
            f.write_bytes(b"\0" * 4096)
        for f in (stale, mapped):
            os.utime(f, (old, old))
        with open(mapped, "r+b") as handle, mmap.mmap(handle.fileno(), 4096) as view:
            view[0] = 1  # this process maps it, as a live server and its stub do
            os.utime(mapped, (old, old))
            removed = remove_stale_shm_regions(min_age_s=30.0)
            assert stale.name in removed and not stale.exists()
            assert mapped.exists() and fresh.exists()
            assert mapped.name not in removed and fresh.name not in removed
    finally:
        for f in (stale, mapped, fresh):
            f.unlink(missing_ok=True)
