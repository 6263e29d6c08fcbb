"""The public API over TLS with client certificates (mTLS), end to end: a real redis-server, four
real tritonservers, `python -m funchat.orchestrator.app` (Ray Serve behind its gateway) with
FUNCHAT_TLS_* set, and the real client on 127.0.0.1. A greedy Respond turn and a Converse turn give
the oracle's tokens; callers without the right certificate, or in plaintext, are refused; and the
gateway's added latency is measured against Ray's proxy port reached directly.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from funchat.audio_io import load_audio
from funchat.client import AsyncClient, Client, FunchatClientError, TlsOptions, session_config
from funchat.dev.redis_server import start_redis
from funchat.dev.stack import OrchestratorProcess
from funchat.dev.tritonserver import PROJECT_ROOT, free_port
from funchat.gateway.server import GatewayThread
from funchat.gateway.settings import GatewaySettings
from funchat.oracle.generation import GenerationConfig
from funchat.turn.schedule import Mode
from tests.integration.pcm import pcm16_bytes, pcm16_samples

MAX_NEW = 24
SECRET = "test-secret-" + "1" * 20


def _start_orchestrator(run_dir, env: dict, target: str, tls: TlsOptions, timeout: float = 180.0):
    """`python -m funchat.orchestrator.app` in its own process group, healthy over TLS."""
    log = run_dir / "orchestrator.log"
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1",
                "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    full_env.pop("FUNCHAT_API_KEY", None)
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "funchat.orchestrator.app"], stdout=out,
                                stderr=subprocess.STDOUT, env=full_env, cwd=str(PROJECT_ROOT), start_new_session=True)
    orch = OrchestratorProcess(proc.pid, int(env["FUNCHAT_GRPC_PORT"]), log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the orchestrator exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        if Client(target, timeout=2, api_key="", tls=tls).health():
            return orch
        time.sleep(0.5)
    orch.stop()
    raise AssertionError(f"the orchestrator was not healthy over TLS in {timeout:g} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def stack(tiny_checkpoint, tmp_path_factory, make_api_key, pki, model_services):
    run_dir = tmp_path_factory.mktemp("tls-stack")
    keys_file, key = make_api_key(run_dir, "dev")
    cert, cert_key = pki["server"]
    port, proxy_port = free_port(), free_port()
    redis_server = start_redis(run_dir)
    cluster = model_services  # shared (tests/integration/conftest.py)
    env = {"FUNCHAT_CHECKPOINT": str(tiny_checkpoint), "FUNCHAT_REDIS_URL": redis_server.url,
           "FUNCHAT_RESUME_SECRET": SECRET, "FUNCHAT_ENDPOINTS": json.dumps(cluster.endpoints),
           "FUNCHAT_AUTH": "api_keys", "FUNCHAT_API_KEYS_FILE": str(keys_file),
           "FUNCHAT_GRPC_PORT": str(port), "FUNCHAT_PROXY_PORT": str(proxy_port),
           "FUNCHAT_HTTP_PORT": str(free_port()), "FUNCHAT_METRICS_PORT": "0",
           "FUNCHAT_TLS_CERT_FILE": str(cert), "FUNCHAT_TLS_KEY_FILE": str(cert_key),
           "FUNCHAT_TLS_CLIENT_CA_FILE": str(pki["ca_file"])}
    client_cert, client_key = pki["client"]
    tls = TlsOptions(ca_file=pki["ca_file"], cert_file=client_cert, key_file=client_key)
    target = f"127.0.0.1:{port}"
    orch = None
    try:
        orch = _start_orchestrator(run_dir, env, target, tls)
        yield {"target": target, "proxy": f"127.0.0.1:{proxy_port}", "tls": tls, "key": key, "log": orch.log}
    finally:
        if orch is not None:
            orch.stop()
        redis_server.stop()


def assert_oracle_tokens(reply, ref) -> None:
    assert reply.status == "completed"
    assert reply.text_tokens == ref.text_tokens
    assert reply.speech_tokens == ref.speech_tokens
    assert reply.vocoder_tokens == ref.vocoder_tokens
    assert reply.text == ref.text


def test_greedy_respond_over_mtls_equals_the_oracle(stack, tiny_pipeline, speech):
    data, heard = pcm16_bytes(speech[:32000]), pcm16_samples(speech[:32000])
    config = session_config(greedy=True, seed=0, max_new_tokens=MAX_NEW, turn_detection="manual")
    reply = Client(stack["target"], timeout=120, api_key=stack["key"], tls=stack["tls"]).respond(data, config)
    assert_oracle_tokens(reply, tiny_pipeline.respond(heard, gen=GenerationConfig.greedy(Mode.S2S, MAX_NEW)))
    assert len(reply.audio) == 960 * len(reply.vocoder_tokens) > 0


def test_cli_chat_over_mtls(stack, example_wav, tmp_path):
    """`funchat chat` with the TLS flags: the same greedy tokens as the Python client's."""
    client_cert, client_key = stack["tls"].cert_file, stack["tls"].key_file
    cli = [os.path.join(os.path.dirname(sys.executable), "funchat"), "chat", "--server", stack["target"],
           "--input", str(example_wav), "--greedy", "--seed", "0", "--max-new-tokens", str(MAX_NEW)]
    env = {**os.environ, "FUNCHAT_API_KEY": stack["key"]}
    chat = subprocess.run(cli + ["--tls-ca-file", str(stack["tls"].ca_file), "--tls-cert-file", str(client_cert),
                                 "--tls-key-file", str(client_key), "--output-tokens", str(tmp_path / "t.json")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert chat.returncode == 0, chat.stderr
    tokens = json.loads((tmp_path / "t.json").read_text())
    reply = Client(stack["target"], timeout=120, api_key=stack["key"], tls=stack["tls"]).respond(
        load_audio(example_wav), session_config(greedy=True, seed=0, max_new_tokens=MAX_NEW))
    assert tokens["text_tokens"] == reply.text_tokens and tokens["speech_tokens"] == reply.speech_tokens
    plaintext = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=60)
    assert plaintext.returncode == 2 and "cannot reach" in plaintext.stderr


def test_converse_over_mtls_equals_the_oracle(stack, tiny_pipeline, speech):
    data, heard = pcm16_bytes(speech[32000:64000]), pcm16_samples(speech[32000:64000])

    async def call():
        async with AsyncClient(stack["target"], api_key=stack["key"], tls=stack["tls"]) as client:
            config = session_config(greedy=True, seed=0, max_new_tokens=MAX_NEW, turn_detection="manual")
            async with client.converse(config) as conversation:
                await conversation.send_audio(data)
                await conversation.commit()
                return await asyncio.wait_for(conversation.next_reply(), 120)

    reply = asyncio.run(call())
    assert_oracle_tokens(reply, tiny_pipeline.respond(heard, gen=GenerationConfig.greedy(Mode.S2S, MAX_NEW)))


def test_callers_without_the_right_certificate_or_in_plaintext_are_refused(stack, pki):
    ca_only = TlsOptions(ca_file=pki["ca_file"])
    stranger = TlsOptions(ca_file=pki["ca_file"], cert_file=pki["other_client"][0], key_file=pki["other_client"][1])
    for tls in (False, ca_only, stranger):
        with pytest.raises(FunchatClientError) as refused:
            Client(stack["target"], timeout=5, api_key=stack["key"], tls=tls).get_session("sess_nope")
        assert refused.value.code == "UNAVAILABLE" and refused.value.unreachable
    # the right certificate but no API key: the replicas still check keys
    with pytest.raises(FunchatClientError) as unauthenticated:
        Client(stack["target"], timeout=5, api_key="", tls=stack["tls"]).get_session("sess_nope")
    assert unauthenticated.value.code == "UNAUTHENTICATED"


def _health_rtts(channel: grpc.Channel, n: int) -> list[float]:
    stub = health_pb2_grpc.HealthStub(channel)
    stub.Check(health_pb2.HealthCheckRequest(), timeout=10)  # connected (and handshaken) before timing
    rtts = []
    for _ in range(n):
        start = time.perf_counter()
        stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
        rtts.append(time.perf_counter() - start)
    return rtts


def test_gateway_latency(stack, speech, pki):
    """The gateway's cost: the health check's round trip and a Respond turn's first audio, directly
    to Ray's proxy (plaintext), through a plaintext gateway (a GatewayThread here, in front of the
    same proxy) and through the orchestrator's TLS + mTLS gateway, interleaved in one run."""
    host, port = stack["proxy"].rsplit(":", 1)
    plain_gateway = GatewayThread(GatewaySettings.load(grpc_host="127.0.0.1", grpc_port=free_port(),
                                                       proxy_host=host, proxy_port=int(port)))
    plain_gateway.start()
    try:
        paths = {"direct": (stack["proxy"], False),
                 "gateway": (f"127.0.0.1:{plain_gateway.gateway.settings.grpc_port}", False),
                 "gateway+mtls": (stack["target"], stack["tls"])}
        rtts = {name: [] for name in paths}
        channels = {name: (grpc.secure_channel(t, tls.credentials()) if tls else grpc.insecure_channel(t))
                    for name, (t, tls) in paths.items()}
        for _ in range(5):  # interleaved rounds: drift on a busy machine hits all paths alike
            for name, channel in channels.items():
                rtts[name] += _health_rtts(channel, 40)
        for channel in channels.values():
            channel.close()
        data = pcm16_bytes(speech[:32000])
        config = session_config(greedy=True, seed=0, max_new_tokens=MAX_NEW, turn_detection="manual")
        first_audio = {name: [] for name in paths}
        for _ in range(3):
            for name, (target, tls) in paths.items():
                reply = Client(target, timeout=120, api_key=stack["key"], tls=tls).respond(data, config)
                first_audio[name].append(reply.first_audio_s)
    finally:
        plain_gateway.stop()
    health_ms = {name: statistics.median(v) * 1e3 for name, v in rtts.items()}
    first_ms = {name: statistics.median(v) * 1e3 for name, v in first_audio.items()}
    print("\ngateway latency (median):")
    for name in paths:
        print(f"  {name:13s} health RTT {health_ms[name]:6.2f} ms ({health_ms[name] / health_ms['direct']:.2f}x)   "
              f"Respond first audio {first_ms[name]:7.1f} ms ({first_ms[name] / first_ms['direct']:.2f}x)")
    # one more local hop (and TLS): milliseconds, not tens of them. First audio is reported only: on a
    # 2-core machine shared with the model services its noise (hundreds of ms) hides a hop's cost
    assert health_ms["gateway+mtls"] - health_ms["direct"] < 20
