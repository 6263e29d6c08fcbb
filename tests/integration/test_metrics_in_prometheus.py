"""The orchestrator's Prometheus metrics, end to end: the stack as `make up` starts it
(`funchat.dev.stack up`: redis-server, four tritonservers, the Ray Serve orchestrator with two
replicas) and a real Prometheus (Debian's `prometheus`) scraping the orchestrator's endpoint from
`endpoints.json` and the four tritonservers' metrics ports. Calls go through the public gRPC API,
with the API key `up` made (<run_dir>/api_key); every value is read back through Prometheus' HTTP API.

FUNCHAT_MAX_CALLS=1 per replica: two calls held open are on different replicas, so the active
calls Prometheus reads are the sum over both replica processes (the multiprocess directory).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from funchat.api import pb, pb_grpc
from funchat.audio_io import load_audio
from funchat.client import authed_stub
from funchat.dev import stack as dev_stack
from funchat.dev.tritonserver import free_port
from tests.integration.pcm import pcm16_bytes

PROMETHEUS = "/usr/bin/prometheus"
REPLICAS = 2
MAX_CALLS = 1  # per replica
MAX_NEW = 24


def _http_get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def start_prometheus(run_dir: Path, orchestrator: str, triton: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """Prometheus on a free 127.0.0.1 port scraping every second; -> (process, host:port) once ready."""
    config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
              "scrape_configs": [
                  {"job_name": "orchestrator", "static_configs": [{"targets": [orchestrator]}]},
                  {"job_name": "triton", "static_configs": [{"targets": [address], "labels": {"service": model}}
                                                            for model, address in sorted(triton.items())]}]}
    (run_dir / "prometheus.yml").write_text(yaml.safe_dump(config))
    address = f"127.0.0.1:{free_port()}"
    log = open(run_dir / "prometheus.log", "wb")
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={run_dir / 'prometheus.yml'}",
                             f"--storage.tsdb.path={run_dir / 'tsdb'}", f"--web.listen-address={address}"],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, (run_dir / "prometheus.log").read_text()[-3000:]
        try:
            _http_get(f"http://{address}/-/ready")
            return proc, address
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("prometheus did not become ready:\n" + (run_dir / "prometheus.log").read_text()[-3000:])


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint, tmp_path_factory):
    assert shutil.which(PROMETHEUS), f"{PROMETHEUS} is missing (make setup installs Debian's prometheus)"
    run_dir = tmp_path_factory.mktemp("metrics-stack")
    args = ["--run-dir", str(run_dir)]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("FUNCHAT_MAX_CALLS", str(MAX_CALLS))  # the stack passes FUNCHAT_* settings on
        rc = dev_stack.main(["up", *args, "--checkpoint", str(tiny_checkpoint), "--grpc-port", str(free_port()),
                             "--replicas", str(REPLICAS)])
    prometheus = None
    try:
        assert rc == 0, (run_dir / "orchestrator.log").read_text()[-5000:] if (run_dir / "orchestrator.log").exists() \
            else "the stack did not start"
        endpoints = json.loads((run_dir / "endpoints.json").read_text())
        servers = json.loads((run_dir / "triton" / "servers.json").read_text())
        prometheus, address = start_prometheus(run_dir, endpoints["orchestrator_metrics"],
                                               {model: info["metrics"] for model, info in servers.items()})
        yield {"endpoints": endpoints, "prometheus": address, "run_dir": run_dir,
               "api_key": dev_stack.read_api_key(run_dir)}
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(timeout=30)
        dev_stack.main(["down", *args])


def query(prometheus: str, expr: str) -> list[dict]:
    url = f"http://{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    answer = json.loads(_http_get(url))
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def value_of(prometheus: str, expr: str) -> float | None:
    """The value of a query that selects one series (None when it selects none)."""
    result = query(prometheus, expr)
    assert len(result) <= 1, result
    return float(result[0]["value"][1]) if result else None


def eventually(prometheus: str, expr: str, ok, timeout: float = 30.0) -> float | None:
    """Query until ok(value) (scrapes come every second); the last value on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = value_of(prometheus, expr)
        if ok(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


def config() -> pb.SessionConfig:
    return pb.SessionConfig(mode=pb.MODE_SPEECH_TO_SPEECH, turn_detection=pb.TurnDetection(manual=pb.ManualTurns()),
                            generation=pb.Generation(greedy=True, seed=0, max_new_tokens=MAX_NEW))


class Call:
    """A Converse call: events sent when asked, server events read one at a time."""

    def __init__(self, channel: grpc.aio.Channel, api_key: str):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.rpc = authed_stub(pb_grpc.FunchatStub(channel), api_key).Converse(self._requests())

    async def _requests(self):
        while (event := await self.queue.get()) is not None:
            yield event

    async def send(self, event: pb.ClientEvent) -> None:
        await self.queue.put(event)

    async def until(self, kind: str, timeout: float = 120.0) -> list[pb.ServerEvent]:
        events = []
        while True:
            event = await asyncio.wait_for(self.rpc.read(), timeout)
            assert event is not grpc.aio.EOF, f"the call ended before a {kind} event"
            events.append(event)
            if event.WhichOneof("event") == kind:
                return events

    async def hang_up(self) -> None:
        await self.queue.put(None)
        self.rpc.cancel()


def test_make_up_names_the_metrics_endpoint_and_it_serves_the_orchestrator_metrics(cluster):
    # and the API key's file, made once in the run dir (owner only)
    key_file = cluster["run_dir"] / "api_key"
    assert cluster["endpoints"]["api_key_file"] == str(key_file) and cluster["api_key"].startswith("fck_")
    for path in (key_file, cluster["run_dir"] / "api_keys"):
        assert path.stat().st_mode & 0o777 == 0o600, path
    address = cluster["endpoints"]["orchestrator_metrics"]
    assert address.startswith("127.0.0.1:")
    text = _http_get(f"http://{address}/metrics")
    # every metric (errors appear with their first code), from the replicas' files, before any call
    for name in ("first_audio_seconds", "stage_seconds", "real_time_factor_ratio", "audio_underruns_total",
                 "barge_in_seconds", "active_calls", "calls_total", "model_queue_seconds",
                 "session_store_seconds", "turns_total"):
        assert f"# HELP funchat_orchestrator_{name} " in text, name
    assert 'funchat_orchestrator_stage_seconds_count{stage="llm_step"} 0.0' in text
    assert "funchat_orchestrator_active_calls 0.0" in text


def test_calls_over_the_limit_are_counted_refused_and_active_calls_sum_every_replica(cluster):
    prometheus = cluster["prometheus"]

    capacity = REPLICAS * MAX_CALLS

    async def main():
        async with grpc.aio.insecure_channel(cluster["endpoints"]["orchestrator"]) as channel:
            held, refusals = [], []
            # Calls until both replicas hold one, then one more, which no replica can take. Serve's
            # router may send a call to the full replica (its queue lengths are cached): refused, retried.
            for _ in range(30):
                call = Call(channel, cluster["api_key"])
                await call.send(pb.ClientEvent(session=config()))
                try:
                    await call.until("session_created")
                    held.append(call)
                except grpc.aio.AioRpcError as exc:
                    refusals.append(exc)
                    await call.hang_up()
                    if len(held) == capacity:
                        break
                    await asyncio.sleep(0.2)
            active = eventually(prometheus, "sum(funchat_orchestrator_active_calls)", lambda v: v == len(held))
            for call in held:
                await call.hang_up()
            return len(held), refusals, active

    admitted, refusals, active = asyncio.run(main())
    print(f"calls held open: {admitted}, refused: {len(refusals)}; active calls in Prometheus: {active}")
    assert admitted == capacity  # one per replica
    assert refusals and all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refusals)
    assert active == admitted  # one scrape sums the live calls of both replica processes
    assert eventually(prometheus, 'funchat_orchestrator_calls_total{outcome="refused"}',
                      lambda v: v == len(refusals)) == len(refusals)
    assert eventually(prometheus, 'funchat_orchestrator_errors_total{code="RESOURCE_EXHAUSTED"}',
                      lambda v: v == len(refusals)) == len(refusals)
    assert value_of(prometheus, 'funchat_orchestrator_calls_total{outcome="admitted"}') == admitted
    assert eventually(prometheus, "sum(funchat_orchestrator_active_calls)", lambda v: v == 0) == 0  # hung up


def test_a_greedy_turn_is_read_back_through_prometheus_with_triton_metrics(cluster, example_wav):
    prometheus = cluster["prometheus"]
    speech = load_audio(example_wav)[:32000]

    async def main():
        async with grpc.aio.insecure_channel(cluster["endpoints"]["orchestrator"]) as channel:
            call = Call(channel, cluster["api_key"])
            await call.send(pb.ClientEvent(session=config()))
            await call.until("session_created")
            for k in range(0, len(speech), 8000):
                await call.send(pb.ClientEvent(audio=pb.InputAudioAppend(audio=pcm16_bytes(speech[k:k + 8000]))))
            await call.send(pb.ClientEvent(commit=pb.InputAudioCommit()))
            events = await call.until("response_done")
            await call.hang_up()
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await authed_stub(pb_grpc.FunchatStub(channel), cluster["api_key"]).GetSession(
                    pb.GetSessionRequest(session_id="nope"))
            return events, missing.value

    events, missing = asyncio.run(main())
    done = events[-1].response_done
    assert done.status == "completed" and done.audio_ms > 0
    assert missing.code() == grpc.StatusCode.NOT_FOUND

    at_least_one = lambda v: v is not None and v >= 1  # noqa: E731
    # counted last of the turn's metrics: a scrape that has it has the rest
    assert eventually(prometheus, 'funchat_orchestrator_turns_total{mode="s2s",status="completed"}',
                      at_least_one) >= 1
    assert value_of(prometheus, 'funchat_orchestrator_first_audio_seconds_count{mode="s2s"}') >= 1
    first_audio = value_of(prometheus, 'funchat_orchestrator_first_audio_seconds_sum{mode="s2s"}')
    assert 0 < first_audio <= done.latency_ms["total"] / 1000  # the turn's first audio, in seconds
    for stage in ("audio_tokenizer", "llm_prefill", "llm_step", "refined_head", "vocoder"):
        assert value_of(prometheus, f'funchat_orchestrator_stage_seconds_count{{stage="{stage}"}}') >= 1, stage
    steps = value_of(prometheus, 'funchat_orchestrator_stage_seconds_count{stage="llm_step"}')
    assert value_of(prometheus, "funchat_orchestrator_real_time_factor_ratio_count") >= 1
    assert value_of(prometheus, 'funchat_orchestrator_calls_total{outcome="admitted"}') >= 1
    assert value_of(prometheus, 'funchat_orchestrator_model_queue_seconds_count{service="vocoder"}') >= 1
    assert value_of(prometheus, 'funchat_orchestrator_model_queue_seconds_count{service="llm"}') >= steps
    assert value_of(prometheus, 'funchat_orchestrator_session_store_seconds_count{op="append_turns"}') >= 1
    assert eventually(prometheus, 'funchat_orchestrator_errors_total{code="NOT_FOUND"}', at_least_one) >= 1
    # the model services' own Triton metrics, scraped by the same Prometheus
    assert eventually(prometheus, 'sum(nv_inference_request_success{service="llm"})', at_least_one) >= steps
    assert len(query(prometheus, 'up{job="triton"} == 1')) == 4
    assert len(query(prometheus, 'up{job="orchestrator"} == 1')) == 1
