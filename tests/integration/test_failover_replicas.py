"""Two replicas of each generating model service: a turn survives one of them killed mid-turn.

One stack for the module: a real redis-server, real tritonservers (one audio_tokenizer; two llm,
two refined_head, two vocoder), the Ray Serve orchestrator (`python -m funchat.orchestrator.app`)
given both replicas of each in FUNCHAT_ENDPOINTS ("host:port,host:port"), and the real client over
gRPC on 127.0.0.1 with an API key.

Each test SIGKILLs one replica in the middle of a greedy turn and checks that the turn still
completes, with no error event, with exactly the oracle's tokens:

- llm / refined_head (stateful: the sequence lives in the killed replica): the turn is replayed
  from the prefill on the other replica (`latency_ms["replays"]`), nothing streamed twice;
- vocoder (stateless: the stream state travels with each push): the push that finds the dead
  replica is sent again to the other one.

The tests run in order and leave their replica dead: later turns also show that requests keep
avoiding a dead replica.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from funchat.audio_io import load_audio
from funchat.client import AsyncClient, session_config
from funchat.dev.redis_server import start_redis
from funchat.dev.stack import start_orchestrator
from funchat.dev.tritonserver import free_port, start_servers, tail
from funchat.oracle.generation import GenerationConfig
from funchat.turn.schedule import Mode

MAX_NEW = 48  # long enough that a kill after the first delta lands mid-turn
SECRET = "test-secret-" + "0" * 20
REPLICATED = ("llm", "refined_head", "vocoder")


@pytest.fixture(scope="module")
def stack(tiny_checkpoint, tmp_path_factory, make_api_key):
    run_dir = tmp_path_factory.mktemp("failover")
    keys_file, key = make_api_key(run_dir, "dev")
    redis_server = start_redis(run_dir)
    params = {"*": {"checkpoint": str(tiny_checkpoint), "threads": "1"}}
    jobs = {"a": ["audio_tokenizer", *REPLICATED], "b": list(REPLICATED)}
    clusters, orch = {}, None
    try:
        with ThreadPoolExecutor(len(jobs)) as pool:  # both sets start at once
            futures = {name: pool.submit(start_servers, models, params=params, run_dir=run_dir / f"triton-{name}",
                                         timeout=240) for name, models in jobs.items()}
            for name, future in futures.items():
                clusters[name] = future.result()
        a, b = clusters["a"].endpoints, clusters["b"].endpoints
        endpoints = {"audio_tokenizer": a["audio_tokenizer"], **{m: f"{a[m]},{b[m]}" for m in REPLICATED}}
        env = {"FUNCHAT_CHECKPOINT": str(tiny_checkpoint), "FUNCHAT_REDIS_URL": redis_server.url,
               "FUNCHAT_RESUME_SECRET": SECRET, "FUNCHAT_ENDPOINTS": json.dumps(endpoints),
               "FUNCHAT_AUTH": "api_keys", "FUNCHAT_API_KEYS_FILE": str(keys_file)}
        port = free_port()
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("FUNCHAT_API_KEY", key)  # the clients' key
            orch = start_orchestrator(run_dir, env, port, timeout=240)
            yield {"target": f"127.0.0.1:{port}", "clusters": clusters, "run_dir": run_dir}
    except BaseException:
        for path in [run_dir / "orchestrator.log", *sorted(run_dir.glob("triton-*/**/*.log"))]:
            print(f"---- {path} ----\n{tail(path, 60)}")
        raise
    finally:
        if orch is not None:
            orch.stop()
        for cluster in clusters.values():
            cluster.stop()
        redis_server.stop()


@pytest.fixture(scope="module")
def caller_audio(example_wav) -> np.ndarray:
    """A turn of caller speech, as the server decodes it from the client's PCM16 (the oracle hears the same)."""
    pcm = (np.clip(load_audio(example_wav)[:40000], -1, 1) * 32767.0).round().astype("<i2")
    return pcm.astype(np.float32) / 32768.0


@pytest.fixture(scope="module")
def oracle(tiny_pipeline, caller_audio):
    return tiny_pipeline.respond(caller_audio, history=[], gen=GenerationConfig.greedy(Mode.S2S, MAX_NEW))


def live_sequences(metrics_address: str, model: str) -> float:
    """A stateful replica's `funchat_<model>_live_sequences`: the calls whose KV cache it holds."""
    text = urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10).read().decode()
    return float(next(ln for ln in text.splitlines() if ln.startswith(f"funchat_{model}_live_sequences"))
                 .rsplit(" ", 1)[1])


def replica_to_kill(stack, model: str) -> tuple[str, int]:
    """(cluster name, pid) of the replica of `model` to kill now: for a stateful service, the one
    holding the turn's sequence; for the vocoder, the first replica that is still alive (the pushes
    go round robin, so the turn's next pushes reach it)."""
    alive = {name: c for name, c in stack["clusters"].items() if c.alive(model)}
    assert len(alive) == 2, f"both {model} replicas should be alive before the kill: {list(alive)}"
    if model == "vocoder":
        name = "a"
    else:
        holding = [n for n, c in alive.items() if live_sequences(c.metrics_endpoints[model], model) > 0]
        assert len(holding) == 1, f"exactly one {model} replica should hold the turn's sequence: {holding}"
        name = holding[0]
    return name, stack["clusters"][name].pids[model]


def kill_group(pid: int) -> None:
    """SIGKILL a tritonserver and its Python backend stubs (a lost container)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        os.kill(pid, signal.SIGKILL)


KILL_AT = {"llm": "text_delta", "refined_head": "text_delta", "vocoder": "audio_delta"}


async def turn_with_kill(stack, model: str, audio: np.ndarray) -> tuple:
    """One greedy turn; at its first KILL_AT[model] event the replica serving it is SIGKILLed.
    -> (the reply, the events kinds seen after the kill, which replica was killed)."""
    killed: dict = {}
    after: list[str] = []
    async with AsyncClient(stack["target"]) as client:
        async with client.converse(session_config(turn_detection="manual", greedy=True, seed=0,
                                                  max_new_tokens=MAX_NEW)) as call:
            await call.send_audio(audio)
            await call.commit()
            async for event in call.events():
                kind = event.WhichOneof("event")
                if killed:
                    after.append(kind)
                elif kind == KILL_AT[model]:
                    killed["name"], pid = replica_to_kill(stack, model)
                    kill_group(pid)
                if kind == "response_done":
                    break
            return call.replies[-1], after, killed.get("name")


@pytest.mark.parametrize("model", list(KILL_AT))
def test_turn_survives_a_replica_killed_mid_turn(stack, model, oracle, caller_audio):
    t = time.monotonic()
    reply, after, killed = asyncio.run(asyncio.wait_for(turn_with_kill(stack, model, caller_audio), 180))
    seconds = time.monotonic() - t
    assert killed is not None, f"the turn had no {KILL_AT[model]} event to kill at"
    assert not stack["clusters"][killed].alive(model), f"the killed {model} replica is still running"
    assert reply.status == "completed", (reply.status, reply.errors)
    assert not reply.errors and "error" not in after, reply.errors
    # the kill landed mid-turn: more of the reply came after it
    assert after.count("text_delta") + after.count("audio_delta") >= 2, after
    assert reply.text_tokens == oracle.text_tokens
    assert reply.speech_tokens == oracle.speech_tokens
    assert reply.vocoder_tokens == oracle.vocoder_tokens
    assert reply.audio_ms > 0
    replays = reply.latency_ms.get("replays", 0)
    if model == "vocoder":
        assert replays == 0, "a vocoder push fails over by itself: the turn needs no replay"
    else:
        assert replays >= 1, f"the {model} sequence died with its replica: the turn must have been replayed"
    print(f"kill -9 {model} replica {killed} at the first {KILL_AT[model]}: turn completed in {seconds:.1f} s, "
          f"replays {replays:g}, {after.count('audio_delta')} audio / {after.count('text_delta')} text deltas "
          f"after the kill")


def test_turns_go_on_with_one_replica_of_each_left(stack, oracle, caller_audio):
    """Every generating service has lost a replica: the next turns go to the survivors at once."""
    async def two_turns():
        replies = []
        async with AsyncClient(stack["target"]) as client:
            for _ in range(2):
                async with client.converse(session_config(turn_detection="manual", greedy=True, seed=0,
                                                          max_new_tokens=MAX_NEW)) as call:
                    await call.send_audio(caller_audio)
                    await call.commit()
                    async for event in call.events():
                        if event.WhichOneof("event") == "response_done":
                            break
                    replies.append(call.replies[-1])
        return replies

    for model in REPLICATED:
        assert sum(c.alive(model) for c in stack["clusters"].values()) == 1, f"{model}: one replica should be left"
    for reply in asyncio.run(asyncio.wait_for(two_turns(), 120)):
        assert reply.status == "completed", (reply.status, reply.errors)
        assert reply.text_tokens == oracle.text_tokens
