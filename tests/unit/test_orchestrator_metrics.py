"""funchat/orchestrator/metrics.py: the pure logic (playback underruns, the real-time factor, updates
that never raise), and the multiprocess exposition with real processes writing one directory, served
over HTTP by whichever process binds the port first."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from funchat.dev.tritonserver import free_port
from funchat.orchestrator import metrics
from funchat.orchestrator.errors import ApiError

REPO = Path(__file__).resolve().parents[2]


def sample(name: str, **labels) -> float:
    """A sample of this (single-process) test's default registry; 0 when it has none yet."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


# ---- playback underruns ----

def test_chunks_ahead_of_playback_never_starve():
    clock = metrics.PlaybackClock()
    # 0.5 s chunks every 0.3 s: the player always has audio left
    assert [clock.chunk(0.3 * k, 0.5) for k in range(10)] == [False] * 10


def test_a_late_chunk_is_one_underrun_and_playback_resumes_from_it():
    clock = metrics.PlaybackClock()
    assert clock.chunk(10.0, 0.2) is False        # first chunk: plays 10.0 .. 10.2
    assert clock.chunk(10.2, 0.2) is False        # exactly when the audio runs out: no gap
    assert clock.chunk(10.9, 0.2) is True         # 10.4 .. 10.9 silent
    assert clock.chunk(11.0, 0.2) is False        # playback restarted at 10.9: audio until 11.1, then 11.3
    assert clock.chunk(11.25, 0.2) is False       # queued behind it: until 11.5
    assert clock.runs_out_at == pytest.approx(11.5)
    assert clock.chunk(11.6, 0.2) is True         # the second gap counts too


def test_reply_audio_observes_first_audio_once_and_counts_underruns():
    first_before = sample("funchat_orchestrator_first_audio_seconds_count", mode="s2s")
    under_before = sample("funchat_orchestrator_audio_underruns_total")
    reply = metrics.ReplyAudio("s2s", turn_ended_at=100.0)
    reply.sent(0.6, now=100.4)   # first audio 0.4 s after the turn ended
    reply.sent(0.6, now=100.9)
    reply.sent(0.6, now=102.0)   # audio ran out at 101.6
    reply.sent(0.6, now=102.1)
    assert sample("funchat_orchestrator_first_audio_seconds_count", mode="s2s") == first_before + 1
    assert sample("funchat_orchestrator_audio_underruns_total") == under_before + 1


# ---- the real-time factor ----

def test_real_time_factor_is_generation_time_over_audio_time():
    assert metrics.real_time_factor(2.0, 4.0) == 0.5
    assert metrics.real_time_factor(3.0, 1.5) == 2.0
    assert metrics.real_time_factor(1.0, 0.0) is None  # a reply without audio has no ratio


def test_reply_generated_observes_the_ratio_only_with_audio():
    count = sample("funchat_orchestrator_real_time_factor_ratio_count")
    total = sample("funchat_orchestrator_real_time_factor_ratio_sum")
    metrics.reply_generated(1.0, 4.0)
    metrics.reply_generated(1.0, 0.0)
    assert sample("funchat_orchestrator_real_time_factor_ratio_count") == count + 1
    assert sample("funchat_orchestrator_real_time_factor_ratio_sum") == pytest.approx(total + 0.25)
    assert sample("funchat_orchestrator_real_time_factor_ratio_bucket", le="0.3") >= 1


# ---- updates: counted where they are sent, never raising into a call ----

def test_errors_are_counted_once_per_error_sent():
    before = sample("funchat_orchestrator_errors_total", code="NOT_FOUND")
    ApiError("NOT_FOUND", "no such session").event_message()
    ApiError("NOT_FOUND", "no such session").end_rpc(None)
    assert sample("funchat_orchestrator_errors_total", code="NOT_FOUND") == before + 2
    internal = sample("funchat_orchestrator_errors_total", code="INTERNAL")
    with pytest.raises(RuntimeError):
        with metrics.unexpected_errors_counted():
            raise RuntimeError("bug")
    with pytest.raises(GeneratorExit):  # the caller went away: no error sent
        with metrics.unexpected_errors_counted():
            raise GeneratorExit
    assert sample("funchat_orchestrator_errors_total", code="INTERNAL") == internal + 1


def test_spawned_tasks_are_counted_until_they_end_however_they_end():
    async def main():
        before = sample("funchat_orchestrator_tasks")
        release = asyncio.Event()

        async def waits():
            await release.wait()

        async def fails():
            raise RuntimeError("turn failed")

        tasks = [metrics.spawn(waits(), "a"), metrics.spawn(waits(), "b"), metrics.spawn(fails(), "c")]
        for _ in range(2):  # the tasks run, then the failed one's done callback
            await asyncio.sleep(0)
        assert sample("funchat_orchestrator_tasks") == before + 2  # the failed one is done
        tasks[1].cancel()
        release.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0)  # done callbacks run on the next loop iteration
        assert sample("funchat_orchestrator_tasks") == before
        assert tasks[0].get_name() == "a"

    asyncio.run(main())


def test_a_failing_metric_never_raises_into_the_call(monkeypatch, caplog):
    class Broken:
        def labels(self, *a):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(metrics, "CALLS", Broken())
    monkeypatch.setattr(metrics, "_failed", set())
    with caplog.at_level("ERROR", logger="funchat.orchestrator.metrics"):
        assert metrics.call_admitted() is None
        assert metrics.call_refused() is None
    assert len([r for r in caplog.records if "call_admitted failed" in r.getMessage()]) == 1
    assert len([r for r in caplog.records if "call_refused failed" in r.getMessage()]) == 1


def test_session_store_ops_are_timed_by_name_failed_ones_too():
    class Store:
        @metrics.session_store_op
        async def get(self, fail: bool):
            await asyncio.sleep(0.02)
            if fail:
                raise ConnectionError("redis is down")
            return "record"

    before = sample("funchat_orchestrator_session_store_seconds_count", op="get")
    slow_before = sample("funchat_orchestrator_session_store_seconds_bucket", op="get", le="0.01")
    assert asyncio.run(Store().get(False)) == "record"
    with pytest.raises(ConnectionError):
        asyncio.run(Store().get(True))
    assert sample("funchat_orchestrator_session_store_seconds_count", op="get") == before + 2
    # both took >= 20 ms: neither is in the 10 ms bucket
    assert sample("funchat_orchestrator_session_store_seconds_bucket", op="get", le="0.01") == slow_before


# ---- multiprocess exposition: real processes, one directory ----

def _process(multiproc_dir: Path, code: str, wait: bool = False) -> subprocess.Popen:
    """A Python process with the directory in its environment (as a replica's runtime_env gives it)
    that runs `code` with the metrics module imported as `m`, prints "ready", then (wait) blocks on stdin."""
    script = "import sys\nimport funchat.orchestrator.metrics as m\n" + textwrap.dedent(code) + \
        "\nprint('ready', flush=True)\n" + ("sys.stdin.read()\n" if wait else "")
    env = {**os.environ, metrics.MULTIPROC_ENV: str(multiproc_dir), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def scrape(text: str) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def exposed(path: Path) -> dict[tuple, float]:
    from prometheus_client import generate_latest
    return scrape(generate_latest(metrics.exposition_registry(str(path))).decode())


def test_the_exposition_sums_every_process_and_drops_the_live_gauge_of_dead_ones(tmp_path):
    # a replica that died with two calls in flight, and one that runs with one
    dead = _process(tmp_path, """
        m.call_admitted(); m.call_admitted(); m.call_refused()
        m.stage("llm_step", 0.02); m.ReplyAudio("s2s", 0.0).sent(0.5, now=0.3)
    """)
    dead.wait(timeout=30)
    alive = _process(tmp_path, """
        m.call_admitted(); m.stage("llm_step", 0.04); m.turn_finished("s2s", "completed")
    """, wait=True)
    try:
        assert (tmp_path / f"gauge_livesum_{dead.pid}.db").exists()
        values = exposed(tmp_path)
        assert values[("funchat_orchestrator_calls_total", (("outcome", "admitted"),))] == 3
        assert values[("funchat_orchestrator_calls_total", (("outcome", "refused"),))] == 1
        assert values[("funchat_orchestrator_active_calls", ())] == 1  # not 3: the dead one's 2 are gone
        assert values[("funchat_orchestrator_stage_seconds_count", (("stage", "llm_step"),))] == 2
        assert values[("funchat_orchestrator_stage_seconds_sum", (("stage", "llm_step"),))] == pytest.approx(0.06)
        assert values[("funchat_orchestrator_first_audio_seconds_bucket", (("le", "0.3"), ("mode", "s2s")))] == 1
        assert values[("funchat_orchestrator_turns_total", (("mode", "s2s"), ("status", "completed")))] == 1
        # the dead process's counters stay (totals never go down); its live gauge file is gone
        assert not (tmp_path / f"gauge_livesum_{dead.pid}.db").exists()
        assert (tmp_path / f"counter_{dead.pid}.db").exists()
    finally:
        alive.communicate("", timeout=30)
    after = exposed(tmp_path)
    assert ("funchat_orchestrator_active_calls", ()) not in after  # no live process, no live gauge
    assert after[("funchat_orchestrator_calls_total", (("outcome", "admitted"),))] == 3


def test_a_process_reusing_a_dead_pid_does_not_inherit_its_calls(tmp_path):
    """An emptyDir outlives a container restart, whose processes get the old pids again."""
    stale = _process(tmp_path, "m.call_admitted(); m.call_admitted()")
    stale.wait(timeout=30)
    source = tmp_path / f"gauge_livesum_{stale.pid}.db"
    # the new process finds "its" pid's gauge file from before, then imports the metrics
    code = (f"import os, shutil; shutil.copy({str(source)!r}, "
            f"os.path.join({str(tmp_path)!r}, f'gauge_livesum_{{os.getpid()}}.db'))\n"
            "import funchat.orchestrator.metrics as m\n"
            "print(m.ACTIVE_CALLS._value.get())")
    env = {**os.environ, metrics.MULTIPROC_ENV: str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip()) == 0.0


def _get(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def test_the_first_exporter_to_bind_serves_and_a_replica_takes_over_when_it_goes(tmp_path, monkeypatch):
    writer = _process(tmp_path, "m.call_admitted()", wait=True)
    port = free_port()
    first = metrics.start_exporter(port, str(tmp_path))
    try:
        assert first is not None
        assert scrape(_get(port))[("funchat_orchestrator_active_calls", ())] == 1  # 127.0.0.1 over the :: socket
        assert metrics.start_exporter(port, str(tmp_path)) is None  # taken: another process serves the pod

        # a replica starting now finds the port taken and keeps trying
        monkeypatch.setenv(metrics.MULTIPROC_ENV, str(tmp_path))
        monkeypatch.setattr(metrics, "_replica_exporter_started", False)
        assert metrics.start_replica_exporter(port, rebind_s=0.05) is False
        assert metrics.start_replica_exporter(port, rebind_s=0.05) is False  # once per process
    finally:
        first.shutdown()
        first.server_close()
    deadline = time.monotonic() + 10
    while True:  # the replica's retry binds the port the first exporter let go
        try:
            text = _get(port)
            break
        except OSError:
            assert time.monotonic() < deadline, "no replica took over the metrics port"
            time.sleep(0.05)
    assert scrape(text)[("funchat_orchestrator_calls_total", (("outcome", "admitted"),))] == 1
    writer.communicate("", timeout=30)


def test_a_replica_without_the_directory_or_with_port_0_serves_nothing(monkeypatch, caplog):
    monkeypatch.setattr(metrics, "_replica_exporter_started", False)
    assert metrics.start_replica_exporter(0) is False
    monkeypatch.delenv(metrics.MULTIPROC_ENV, raising=False)
    with caplog.at_level("WARNING", logger="funchat.orchestrator.metrics"):
        assert metrics.start_replica_exporter(free_port()) is False
    assert "PROMETHEUS_MULTIPROC_DIR is not set" in caplog.text


def test_a_new_directory_per_orchestrator_process_and_those_of_dead_ones_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    (tmp_path / f"funchat-metrics-{dead_pid}-k2j4").mkdir()      # a process killed before it removed its own
    (tmp_path / f"funchat-metrics-{dead_pid}-k2j4" / "counter_1.db").write_bytes(b"x")
    (tmp_path / f"funchat-metrics-{os.getpid()}-ab_9").mkdir()   # a live one's
    (tmp_path / "funchat-metrics-other").mkdir()                 # not named by a process: left alone
    made = Path(metrics.new_multiprocess_dir())
    assert made.parent == tmp_path and made.name.startswith(f"funchat-metrics-{os.getpid()}-")
    assert made.is_dir() and not any(made.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [made.name, f"funchat-metrics-{os.getpid()}-ab_9", "funchat-metrics-other"])


def test_the_replicas_get_the_directory_in_their_runtime_env():
    from funchat.orchestrator import app

    assert app.RUNTIME_ENV["env_vars"][metrics.MULTIPROC_ENV] == metrics.DEFAULT_MULTIPROC_DIR
    env = app.replica_runtime_env("/tmp/fresh")
    assert env["env_vars"] == {**app.RUNTIME_ENV["env_vars"], metrics.MULTIPROC_ENV: "/tmp/fresh"}
    assert app.RUNTIME_ENV["env_vars"][metrics.MULTIPROC_ENV] == metrics.DEFAULT_MULTIPROC_DIR  # not changed
    json.dumps(env)  # a runtime_env is JSON
