"""The OpenAI Realtime-compatible WebSocket endpoint end to end, with the official `openai` package
as the client, unmodified (`AsyncOpenAI(base_url=..., api_key=...).realtime.connect(model=...)`):
a real redis-server, the shared tritonservers, the Ray Serve orchestrator (its own process, as
`make up` runs it), its HTTP ingress on 127.0.0.1.

Exactness: a greedy turn's tokens (the `funchat` extension of `response.done`) equal the in-process
oracle's, as through the gRPC API.
"""

from __future__ import annotations

import asyncio
import base64
import json

import grpc
import numpy as np
import pytest
from openai import AsyncOpenAI

from funchat.api import pb
from funchat.dev.redis_server import start_redis
from funchat.dev.stack import start_orchestrator
from funchat.dev.tritonserver import free_port
from funchat.oracle.generation import GenerationConfig
from funchat.turn.schedule import Mode
from tests.integration.pcm import pcm16_bytes, pcm16_samples
from tests.integration.test_orchestrator import SECRET, funchat_stub, oracle_audio

MAX_NEW = 24
MODEL = "fun-audio-chat"


@pytest.fixture(scope="module")
def stack(tiny_checkpoint, tmp_path_factory, make_api_key, model_services):
    run_dir = tmp_path_factory.mktemp("realtime")
    keys_file, key = make_api_key(run_dir, "dev")
    redis_server = start_redis(run_dir)
    env = {"FUNCHAT_CHECKPOINT": str(tiny_checkpoint), "FUNCHAT_REDIS_URL": redis_server.url,
           "FUNCHAT_RESUME_SECRET": SECRET, "FUNCHAT_ENDPOINTS": json.dumps(model_services.endpoints),
           "FUNCHAT_MAX_NEW_TOKENS": "512", "FUNCHAT_AUTH": "api_keys", "FUNCHAT_API_KEYS_FILE": str(keys_file)}
    port = free_port()
    orch = None
    try:
        orch = start_orchestrator(run_dir, env, port, timeout=180)
        yield {"orch": orch, "key": key, "base_url": f"http://127.0.0.1:{orch.http_port}/v1",
               "ws": f"ws://127.0.0.1:{orch.http_port}/v1/realtime", "target": f"127.0.0.1:{port}"}
    finally:
        if orch is not None:
            orch.stop()
        redis_server.stop()


def connect(stack, api_key: str | None = None, model: str = MODEL):
    client = AsyncOpenAI(base_url=stack["base_url"], api_key=api_key or stack["key"])
    return client.realtime.connect(model=model)


def manual_session(**audio_input) -> dict:
    """Turns the client commits and answers (turn_detection null), greedy and seeded."""
    return {"type": "realtime", "audio": {"input": {"turn_detection": None, **audio_input}},
            "max_output_tokens": MAX_NEW, "generation": {"greedy": True, "seed": 0}}


async def until(conn, kind: str, seen: list | None = None, timeout: float = 60.0):
    """Events up to and including the next of `kind` (appended to `seen`)."""
    seen = [] if seen is None else seen
    while True:
        event = await asyncio.wait_for(conn.recv(), timeout)
        seen.append(event)
        if event.type == kind:
            return seen


def reply(events) -> dict:
    done = [e for e in events if e.type == "response.done"][-1]
    audio = b"".join(base64.b64decode(e.delta) for e in events if e.type == "response.output_audio.delta")
    text = "".join(e.delta for e in events if e.type == "response.output_audio_transcript.delta")
    return {"done": done, "funchat": done.response.model_extra["funchat"], "audio": audio, "text": text}


def assert_same_as_oracle(r: dict, ref, checkpoint) -> None:
    assert r["funchat"]["text_tokens"] == ref.text_tokens
    assert r["funchat"]["speech_tokens"] == ref.speech_tokens
    assert r["funchat"]["vocoder_tokens"] == ref.vocoder_tokens
    assert r["text"] == ref.text
    audio = np.frombuffer(r["audio"], "<i2").astype(np.float32) / 32768.0
    expected = oracle_audio(checkpoint, ref.vocoder_tokens)
    assert len(audio) == len(expected) == 960 * len(ref.vocoder_tokens)
    if len(expected):
        assert np.abs(audio - np.clip(expected, -1, 1)).max() < 2e-3


async def spoken_turn(conn, data: bytes, pieces: int = 2) -> list:
    """Append `data` in `pieces` appends, commit, ask for the response; -> events to response.done."""
    step = -(-len(data) // pieces)
    step += step % 2
    for k in range(0, len(data), step):
        await conn.input_audio_buffer.append(audio=base64.b64encode(data[k:k + step]).decode())
    await conn.input_audio_buffer.commit()
    events = await until(conn, "conversation.item.done")
    assert [e.type for e in events] == ["input_audio_buffer.committed", "conversation.item.added",
                                        "conversation.item.done"]
    await conn.response.create()
    return events + await until(conn, "response.done")


def test_a_greedy_spoken_conversation_over_the_sdk_equals_the_oracle(stack, tiny_pipeline, tiny_checkpoint, speech):
    a, b = pcm16_samples(speech[:48000]), pcm16_samples(speech[40000:96000])

    async def main():
        async with connect(stack) as conn:
            created = await conn.recv()
            await conn.session.update(session=manual_session(format={"type": "audio/pcm", "rate": 16000}))
            updated = await conn.recv()
            first = await spoken_turn(conn, pcm16_bytes(a))
            limits = await conn.recv()  # after each response.done
            second = await spoken_turn(conn, pcm16_bytes(b), pieces=5)
            return created, updated, first, second, limits

    created, updated, first, second, limits = asyncio.run(main())
    assert created.type == "session.created" and created.session.id
    assert updated.type == "session.updated" and updated.session.id == created.session.id
    assert updated.session.audio.input.turn_detection is None
    assert updated.session.audio.input.format.rate == 16000
    types = [e.type for e in first]
    assert types[3:8] == ["response.created", "response.output_item.added", "conversation.item.added",
                          "response.content_part.added", types[7]]
    assert types[-6:] == ["response.output_audio.done", "response.output_audio_transcript.done",
                          "response.content_part.done", "response.output_item.done", "conversation.item.done",
                          "response.done"]
    assert "response.output_audio.delta" in types and "response.output_audio_transcript.delta" in types
    assert limits.type == "rate_limits.updated"
    assert {r.name for r in limits.rate_limits} >= {"calls", "requests_per_second"}

    gen = GenerationConfig.greedy(Mode.S2S, MAX_NEW)
    ref1 = tiny_pipeline.respond(a, gen=gen)
    r1 = reply(first)
    assert_same_as_oracle(r1, ref1, tiny_checkpoint)
    done = r1["done"].response
    assert done.status == "completed" and done.usage.input_tokens == ref1.prompt_tokens
    assert done.output[0].content[0].transcript == ref1.text
    ref2 = tiny_pipeline.respond(b, history=[{"role": "user", "content": a}, {"role": "assistant", "content": ref1.text}],
                                 gen=gen)
    assert_same_as_oracle(reply(second), ref2, tiny_checkpoint)
