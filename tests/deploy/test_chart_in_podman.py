"""`make deploy-test`: the Helm chart, rendered with its dev-cpu profile, really run in containers
with `podman kube play` (funchat.dev.podman_deploy), ready through the chart's own probes, then a
greedy spoken turn through the published public API whose tokens equal the in-process oracle's.

Needs the three local images (`make deploy-images`) and podman; the checkpoint volume gets this
session's tiny checkpoint, the same one the oracle loads. The chart authenticates callers by default
(auth.mode api_keys): the run makes a key file with funchat.api_keys.create_key and gives it to the
orchestrator as the Secret an operator would create; the turns send that key, and a call without it
(or with a key not in the file) is refused UNAUTHENTICATED.
"""

from __future__ import annotations

import json
import shutil
import time

import grpc
import numpy as np
import pytest

from funchat.api import pb, pb_grpc
from funchat.api_keys import create_key
from funchat.audio_io import load_audio
from funchat.client import Client
from funchat.client.config import session_config
from funchat.dev import podman_deploy
from funchat.dev.tritonserver import free_port
from funchat.oracle.generation import GenerationConfig
from funchat.turn.schedule import Mode

MAX_NEW = 24

if shutil.which("podman") is None:
    pytest.fail("podman is not installed: `make deploy-test` installs it (apt)", pytrace=False)


@pytest.fixture(scope="module")
def deployed(tiny_checkpoint, tmp_path_factory):
    port, http_port = free_port(), free_port()
    run_dir = tmp_path_factory.mktemp("podman-deploy")
    keys_file = run_dir / "api_keys"
    key, _ = create_key(keys_file, "deploy-test")
    state = podman_deploy.up(tiny_checkpoint, port, run_dir=run_dir, timeout=600, api_keys_file=keys_file,
                             http_port=http_port)
    try:
        yield {**state, "api_key": key, "run_dir": run_dir}
    finally:
        podman_deploy.down(state)


def pcm16_samples(samples: np.ndarray) -> np.ndarray:
    """What the server decodes from the PCM16 bytes the client sends (the oracle sees the same)."""
    pcm = (np.clip(samples, -1, 1) * 32767.0).round().astype("<i2")
    return pcm.astype(np.float32) / 32768.0


def test_the_rendered_chart_answers_a_greedy_turn_like_the_oracle(deployed, tiny_pipeline, example_wav):
    speech = load_audio(example_wav)[: 16000 * 4]
    config = session_config(greedy=True, seed=0, max_new_tokens=MAX_NEW, turn_detection="manual")
    t0 = time.monotonic()
    reply = Client(deployed["target"], timeout=120, api_key=deployed["api_key"]).respond(speech, config)
    turn_s = time.monotonic() - t0
    ref = tiny_pipeline.respond(pcm16_samples(speech), gen=GenerationConfig.greedy(Mode.S2S, MAX_NEW))
    assert reply.status == "completed", reply.errors
    assert reply.text_tokens == ref.text_tokens
    assert reply.speech_tokens == ref.speech_tokens
    assert reply.vocoder_tokens == ref.vocoder_tokens
    assert len(reply.audio) == 960 * len(ref.vocoder_tokens)
    first_turn_s = time.monotonic() - deployed["play_started"]
    print(json.dumps({"ready_s": deployed["ready_s"], "all_ready_s": round(deployed["all_ready_s"], 1),
                      "turn_s": round(turn_s, 2), "kube_play_to_first_answered_turn_s": round(first_turn_s, 1),
                      "not_played": deployed["skipped"]}, indent=2))


def test_the_session_is_in_the_in_chart_redis(deployed, example_wav):
    """The turn's session went to the StatefulSet's Redis (AUTH from the chart's Secret), and a
    second turn continues it."""
    speech = load_audio(example_wav)[: 16000 * 2]
    client = Client(deployed["target"], timeout=120, api_key=deployed["api_key"])
    first = client.respond(speech, session_config(greedy=True, seed=0, max_new_tokens=8, turn_detection="manual"))
    session = client.get_session(first.session_id)
    assert session.session_id == first.session_id and len(session.turns) >= 1
    second = client.respond(speech, session_config(greedy=True, seed=0, max_new_tokens=8, turn_detection="manual"),
                            session_id=first.session_id)
    assert second.status == "completed"
    assert len(client.get_session(first.session_id).turns) > len(session.turns)


def test_calls_without_the_key_are_unauthenticated(deployed, example_wav):
    """The key file reached the orchestrator through the Secret: its key opens the tenant's session,
    no key or a key not in the file gets UNAUTHENTICATED (the health check needs none: the probes)."""
    speech = load_audio(example_wav)[: 16000]
    config = session_config(greedy=True, seed=0, max_new_tokens=4, turn_detection="manual")
    session_id = Client(deployed["target"], timeout=120, api_key=deployed["api_key"]).respond(speech, config).session_id
    stranger, _ = create_key(deployed["run_dir"] / "other" / "api_keys", "stranger")  # well-formed, not deployed
    with grpc.insecure_channel(deployed["target"]) as channel:
        stub = pb_grpc.FunchatStub(channel)
        request = pb.GetSessionRequest(session_id=session_id)
        assert stub.GetSession(request, timeout=30, metadata=(("authorization", f"Bearer {deployed['api_key']}"),)
                               ).session_id == session_id
        for metadata in ((), (("authorization", f"Bearer {stranger}"),)):
            with pytest.raises(grpc.RpcError) as err:
                stub.GetSession(request, timeout=30, metadata=metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value
            assert deployed["api_key"] not in (err.value.details() or "")


def test_the_realtime_websocket_answers_a_greedy_turn_like_the_oracle(deployed, tiny_pipeline, example_wav):
    """The chart's HTTP port (orchestrator.httpPort, published with hostPort.httpPort): the official
    openai SDK holds a greedy manual turn over /v1/realtime with the deployed key, equal to the oracle."""
    import asyncio
    import base64

    from openai import AsyncOpenAI

    speech = pcm16_samples(load_audio(example_wav)[: 16000 * 3])
    session = {"type": "realtime", "max_output_tokens": MAX_NEW, "generation": {"greedy": True, "seed": 0},
               "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}, "turn_detection": None}}}

    async def main():
        client = AsyncOpenAI(base_url=f"http://127.0.0.1:{deployed['http_port']}/v1", api_key=deployed["api_key"])
        async with client.realtime.connect(model="fun-audio-chat") as conn:
            async def until(kind):
                while (event := await asyncio.wait_for(conn.recv(), 120)).type != kind:
                    assert event.type != "error", event
                return event
            await until("session.created")
            await conn.session.update(session=session)
            await until("session.updated")
            pcm = (np.clip(speech, -1, 1) * 32767.0).round().astype("<i2").tobytes()
            await conn.input_audio_buffer.append(audio=base64.b64encode(pcm).decode())
            await conn.input_audio_buffer.commit()
            await conn.response.create()
            return await until("response.done")

    done = asyncio.run(main())
    ref = tiny_pipeline.respond(speech, gen=GenerationConfig.greedy(Mode.S2S, MAX_NEW))
    tokens = done.response.model_extra["funchat"]
    assert done.response.status == "completed"
    assert tokens["text_tokens"] == ref.text_tokens and tokens["speech_tokens"] == ref.speech_tokens
