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
import time

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
        yield {"orch": orch, "key": key, "run_dir": run_dir, "keys_file": keys_file,
               "base_url": f"http://127.0.0.1:{orch.http_port}/v1",
               "ws": f"ws://127.0.0.1:{orch.http_port}/v1/realtime", "page": f"http://127.0.0.1:{orch.http_port}/",
               "target": f"127.0.0.1:{port}"}
    finally:
        if orch is not None:
            orch.stop()
        redis_server.stop()


def stored_turns(stack, session_id: str) -> list:
    """The session's history as GetSession (gRPC, the same key) shows it."""
    async def get():
        async with grpc.aio.insecure_channel(stack["target"]) as ch:
            return await funchat_stub(ch, stack["key"]).GetSession(pb.GetSessionRequest(session_id=session_id))
    return list(asyncio.run(get()).turns)


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


async def manual_call(conn, **fields):
    """Wait for session.created, switch the session to manual turns of 16 kHz PCM16 (`manual_session`,
    plus any other session `fields`) and wait for session.updated; -> the session.created event."""
    created = (await until(conn, "session.created"))[-1]
    await conn.session.update(session={**manual_session(format={"type": "audio/pcm", "rate": 16000}), **fields})
    await until(conn, "session.updated")
    return created


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
    # (a previous reply's rate_limits.updated may come first)
    events = [e for e in await until(conn, "conversation.item.done") if e.type != "rate_limits.updated"]
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


@pytest.mark.parametrize("fmt, encode, rate", [
    ({"type": "audio/pcm", "rate": 24000}, "pcm16", 24000),  # the protocol's default format
    ({"type": "audio/pcmu"}, "pcmu", 8000),
    ({"type": "audio/pcma"}, "pcma", 8000),
])
def test_24_khz_and_g711_caller_audio_equal_the_oracle_on_the_audio_the_server_decoded(
        stack, tiny_pipeline, tiny_checkpoint, speech, fmt, encode, rate):
    import soxr

    from funchat.client.audio import encode_audio
    from funchat.orchestrator.audio_input import InputAudioStream, InputFormat
    from funchat.orchestrator.realtime.session import AUDIO_TYPES

    samples = soxr.resample(speech[:48000], 16000, rate).astype(np.float32)
    data = encode_audio(samples, encode)
    # what the server decodes: the same pieces of at most 1 s it cuts an append into
    server = InputAudioStream(InputFormat.from_proto(pb.AudioFormat(encoding=AUDIO_TYPES[fmt["type"]][0],
                                                                    sample_rate_hz=rate)), max_chunk_ms=1000)
    half = len(data) // 2 // (2 if encode == "pcm16" else 1) * (2 if encode == "pcm16" else 1)
    step = rate * (2 if encode == "pcm16" else 1)
    pieces = [p[k:k + step] for p in (data[:half], data[half:]) for k in range(0, len(p), step)]
    heard = np.concatenate([server.push(p) for p in pieces] + [server.flush()])

    async def main():
        async with connect(stack) as conn:
            await until(conn, "session.created")
            session = manual_session(format=fmt)
            if encode != "pcm16":  # telephony: G.711 both ways
                session["audio"]["output"] = {"format": fmt}
            await conn.session.update(session=session)
            updated = (await until(conn, "session.updated"))[-1]
            events = await spoken_turn(conn, data)
            return updated, events

    updated, events = asyncio.run(main())
    assert updated.session.audio.input.format.type == fmt["type"]
    ref = tiny_pipeline.respond(heard, gen=GenerationConfig.greedy(Mode.S2S, MAX_NEW))
    r = reply(events)
    if encode == "pcm16":
        assert_same_as_oracle(r, ref, tiny_checkpoint)
        return
    from funchat.client.audio import decode_audio

    assert updated.session.audio.output.format.type == fmt["type"]
    assert r["funchat"]["text_tokens"] == ref.text_tokens and r["funchat"]["speech_tokens"] == ref.speech_tokens
    assert r["funchat"]["vocoder_tokens"] == ref.vocoder_tokens and r["text"] == ref.text
    assert len(r["audio"]) == 320 * len(ref.vocoder_tokens)  # one byte a sample, 8 kHz
    got = decode_audio(r["audio"], encode)
    expected = soxr.resample(np.clip(oracle_audio(tiny_checkpoint, ref.vocoder_tokens), -1, 1), 24000, 8000)
    snr = 10 * np.log10(np.sum(expected ** 2) / max(np.sum((got - expected) ** 2), 1e-20))
    assert snr > 25, f"{encode} reply audio SNR {snr:.1f} dB against the oracle's audio resampled to 8 kHz"


def test_truncate_cuts_the_reply_and_the_next_turn_is_answered_from_the_cut_history(
        stack, tiny_pipeline, tiny_checkpoint, speech):
    a, b = pcm16_samples(speech[:48000]), pcm16_samples(speech[40000:96000])

    async def main():
        async with connect(stack) as conn:
            created = await manual_call(conn)
            first = await spoken_turn(conn, pcm16_bytes(a))
            item = [e for e in first if e.type == "response.output_item.done"][-1].item
            heard_ms = reply(first)["funchat"]["audio_ms"] // 3
            await conn.conversation.item.truncate(item_id=item.id, content_index=0, audio_end_ms=heard_ms)
            truncated = (await until(conn, "conversation.item.truncated"))[-1]
            # a bad truncate: past the end of the reply's audio
            await conn.send({"type": "conversation.item.truncate", "event_id": "evt_past", "item_id": item.id,
                             "content_index": 0, "audio_end_ms": 10 ** 7})
            past = (await until(conn, "error"))[-1]
            second = await spoken_turn(conn, pcm16_bytes(b))
            return created.session.id, item.id, heard_ms, truncated, past, first, second

    session_id, item_id, heard_ms, truncated, past, first, second = asyncio.run(main())
    assert truncated.item_id == item_id and truncated.audio_end_ms == heard_ms
    assert past.error.code == "invalid_argument" and "past the end" in past.error.message
    assert past.error.event_id == "evt_past"

    turns = stored_turns(stack, session_id)
    assert [t.role for t in turns] == ["user", "assistant", "user", "assistant"]
    gen = GenerationConfig.greedy(Mode.S2S, MAX_NEW)
    ref1 = tiny_pipeline.respond(a, gen=gen)
    assert_same_as_oracle(reply(first), ref1, tiny_checkpoint)
    kept = turns[1].text
    # the text of the reply's first k tokens, for a k short of all (a cut can split a character's bytes)
    from funchat.text.tokenizer import TextTokenizer
    tokenizer = TextTokenizer.from_dir(tiny_checkpoint)
    prefixes = [tokenizer.decode(ref1.text_tokens[:k]) for k in range(len(ref1.text_tokens))]
    assert turns[1].truncated and kept in prefixes and kept != ref1.text
    ref2 = tiny_pipeline.respond(b, history=[{"role": "user", "content": a}, {"role": "assistant", "content": kept}],
                                 gen=gen)
    assert_same_as_oracle(reply(second), ref2, tiny_checkpoint)


def test_bad_events_get_an_error_naming_them_and_the_call_goes_on(stack, tiny_pipeline, speech):
    a = pcm16_samples(speech[:32000])
    bad = [  # (raw message, expected code, words in the message)
        (json.dumps({"type": "conversation.make_coffee", "event_id": "e1"}), "unknown_event_type", "make_coffee"),
        ("{not json", "invalid_json", "not valid JSON"),
        ("[1, 2]", "invalid_event", "JSON object"),
        (json.dumps({"type": "session.update", "event_id": "e4",
                     "session": {"audio": {"input": {"format": {"type": "audio/wav"}}}}}),
         "unsupported_value", "session.audio.input.format.type"),
        (json.dumps({"type": "session.update", "session": {"audio": {"input": {"turn_detection":
                                                                                {"type": "semantic_vad"}}}}}),
         "unsupported_value", "semantic_vad"),
        (json.dumps({"type": "session.update", "session": {"audio": {"input": {"format":
                                                                                {"type": "audio/pcm", "rate": 44}}}}}),
         "unsupported_value", "rate"),
        (json.dumps({"type": "session.update", "session": {"prompt": {"id": "x"}}}), "unsupported_field",
         "session.prompt"),
        (json.dumps({"type": "session.update", "session": {"audio": {"output": {"voice": "nobody"}}}}),
         "invalid_argument", "nobody"),
        (json.dumps({"type": "input_audio_buffer.append", "audio": "***"}), "invalid_value", "base64"),
        # an oversized append: 61 s of 16 kHz PCM16 in one event (over FUNCHAT_MAX_TURN_S)
        (json.dumps({"type": "input_audio_buffer.append",
                     "audio": base64.b64encode(bytes(61 * 32000)).decode()}), "invalid_value", "smaller appends"),
        (json.dumps({"type": "input_audio_buffer.commit"}), "input_audio_buffer_commit_empty", "empty"),
        # nothing committed and no text or function output to answer: the response fails, saying so
        (json.dumps({"type": "response.create"}), "failed_precondition", "nothing to respond to"),
        (json.dumps({"type": "response.create", "response": {"instructions": "x"}}), "unsupported_field",
         "response.instructions"),
        (json.dumps({"type": "response.cancel"}), "failed_precondition", "no response"),
        (json.dumps({"type": "conversation.item.truncate", "item_id": "item_nope", "content_index": 0,
                     "audio_end_ms": 10}), "invalid_value", "item_nope"),
        (json.dumps({"type": "conversation.item.create",
                     "item": {"type": "message", "role": "system", "content": [{"type": "input_text", "text": "hi"}]}}),
         "unsupported_value", "message"),
        (json.dumps({"type": "conversation.item.create",
                     "item": {"type": "message", "role": "user", "content": [{"type": "input_audio", "audio": ""}]}}),
         "unsupported_value", "input_text"),
        (json.dumps({"type": "conversation.item.delete", "item_id": "x"}), "not_found", "no turn"),
    ]

    async def main():
        async with connect(stack) as conn:
            await manual_call(conn)
            errors = []
            for raw, code, _ in bad:
                await conn.send_raw(raw)
                errors.append((await until(conn, "error"))[-1])
                if code == "failed_precondition" and "response.create" in raw:
                    await until(conn, "response.done")  # the failed response ends before the next event
            await conn._connection.send(b"\x00\x01")  # a binary frame
            binary = (await until(conn, "error"))[-1]
            events = await spoken_turn(conn, pcm16_bytes(a))  # the call still answers
            return errors, binary, events

    errors, binary, events = asyncio.run(main())
    for (raw, code, words), error in zip(bad, errors):
        assert error.error.code == code and words in error.error.message, (raw[:80], error.error)
    assert errors[0].error.event_id == "e1" and errors[3].error.param == "session.audio.input.format.type"
    assert binary.error.code == "invalid_event" and "JSON text" in binary.error.message
    ref = tiny_pipeline.respond(a, gen=GenerationConfig.greedy(Mode.S2S, MAX_NEW))
    assert reply(events)["funchat"]["text_tokens"] == ref.text_tokens


def test_keys_and_the_model_name_are_checked(stack):
    import websockets

    async def first_event(headers=None, subprotocols=None, model=MODEL):
        url = stack["ws"] + f"?model={model}"
        async with websockets.connect(url, additional_headers=headers, subprotocols=subprotocols) as ws:
            event = json.loads(await ws.recv())
            if event["type"] == "error":
                await ws.wait_closed()
            return event, ws.close_code, ws.subprotocol

    no_key, code, _ = asyncio.run(first_event())
    assert no_key["error"]["code"] == "unauthenticated" and code == 1008
    wrong, code, _ = asyncio.run(first_event({"Authorization": "Bearer fck_wrong"}))
    assert wrong["error"]["code"] == "unauthenticated" and code == 1008
    assert "fck_wrong" not in json.dumps(wrong)  # a key is never echoed
    # a browser's way: the key as a subprotocol beside "realtime"
    created, _, protocol = asyncio.run(first_event(subprotocols=["realtime", f"openai-insecure-api-key.{stack['key']}"]))
    assert created["type"] == "session.created" and protocol == "realtime"
    other, code, _ = asyncio.run(first_event({"Authorization": f"Bearer {stack['key']}"}, model="gpt-realtime"))
    assert other["error"]["code"] == "model_not_found" and MODEL in other["error"]["message"] and code == 1008


def test_a_session_update_during_a_reply_applies_after_it_and_keeps_the_history(stack, speech):
    a = pcm16_samples(speech[:32000])

    async def main():
        async with connect(stack) as conn:
            created = await manual_call(conn)
            await conn.input_audio_buffer.append(audio=base64.b64encode(pcm16_bytes(a)).decode())
            await conn.input_audio_buffer.commit()
            await conn.response.create()
            await until(conn, "response.created")
            await conn.session.update(session={"type": "realtime", "instructions": "Answer briefly."})
            events = await until(conn, "session.updated")
            return created, events

    created, events = asyncio.run(main())
    types = [e.type for e in events]
    assert types.index("response.done") < types.index("session.updated")
    updated = events[-1]
    assert updated.session.id == created.session.id and updated.session.instructions == "Answer briefly."


def test_text_only_output_streams_output_text_events(stack, tiny_pipeline, speech):
    a = pcm16_samples(speech[:32000])

    async def main():
        async with connect(stack) as conn:
            await manual_call(conn, output_modalities=["text"])
            return await spoken_turn(conn, pcm16_bytes(a))

    events = asyncio.run(main())
    types = [e.type for e in events]
    assert "response.output_audio.delta" not in types and "response.output_audio_transcript.delta" not in types
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = [e for e in events if e.type == "response.output_text.done"][-1]
    ref = tiny_pipeline.respond(a, mode="s2t", gen=GenerationConfig.greedy(Mode.S2T, MAX_NEW))
    assert text == done.text == ref.text
    response = [e for e in events if e.type == "response.done"][-1].response
    assert response.output_modalities == ["text"] and response.output[0].content[0].text == ref.text
    assert response.model_extra["funchat"]["text_tokens"] == ref.text_tokens


def test_audio_sent_before_the_session_is_configured_is_taken_in_the_default_format(stack, speech):
    """The Realtime session exists from the connection: audio appended at once, before the client has
    read session.created or sent a session.update, is 24 kHz PCM16 under server VAD (the protocol's
    defaults), not an error."""
    import soxr

    audio = pcm16_bytes(soxr.resample(speech[:48000], 16000, 24000).astype(np.float32))

    async def main():
        async with connect(stack) as conn:
            await conn.input_audio_buffer.append(audio=base64.b64encode(audio).decode())
            return await until(conn, "input_audio_buffer.speech_started")

    events = asyncio.run(main())
    assert [e.type for e in events][0] == "session.created"
    assert events[0].session.audio.input.format.rate == 24000
    assert events[0].session.audio.input.turn_detection.type == "server_vad"
    assert not [e for e in events if e.type == "error"]


def test_a_caller_who_hangs_up_mid_reply_frees_the_call_at_once(stack, speech):
    from tests.integration.scrape import metric

    orch = stack["orch"].metrics_target
    a = pcm16_samples(speech[:32000])

    async def main():
        async with connect(stack) as conn:
            await manual_call(conn, max_output_tokens=400)  # a long reply: still generating when the caller goes
            await conn.input_audio_buffer.append(audio=base64.b64encode(pcm16_bytes(a)).decode())
            await conn.input_audio_buffer.commit()
            await conn.response.create()
            await until(conn, "response.output_audio.delta")
            assert metric(orch, "funchat_orchestrator_active_calls") >= 1
        hung_up = time.monotonic()
        while metric(orch, "funchat_orchestrator_active_calls") > 0:
            # the abandoned-call watchdog would take 10 s: this is the hang-up itself
            assert time.monotonic() - hung_up < 5, "the call was not ended when the WebSocket closed"
            await asyncio.sleep(0.1)

    asyncio.run(main())


def post_client_secret(stack, body: dict | None, key: str | None) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(stack["base_url"] + "/realtime/client_secrets", method="POST",
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read())


def test_a_browser_connects_with_a_short_lived_client_secret_never_the_api_key(stack, make_api_key):
    import websockets

    from funchat.api_keys import revoke_key

    _, key = make_api_key(stack["run_dir"], "dev")  # this test's own key: it is revoked at the end
    deadline = time.monotonic() + 30
    while (created := post_client_secret(stack, {"session": {"type": "realtime", "instructions": "Be brief."},
                                                 "expires_after": {"anchor": "created_at", "seconds": 60}},
                                          key))[0] == 401:
        assert time.monotonic() < deadline, "the new key was not taken"
        time.sleep(0.5)
    status, secret = created
    assert status == 200 and secret["value"].startswith("ek_") and key not in secret["value"]
    assert 0 < secret["expires_at"] - time.time() <= 60
    assert secret["session"]["instructions"] == "Be brief."

    async def first_event(token: str):
        async with websockets.connect(stack["ws"], subprotocols=["realtime", f"openai-insecure-api-key.{token}"]) as ws:
            event = json.loads(await ws.recv())
            if event["type"] == "error":
                await ws.wait_closed()
            return event, ws.close_code

    opened, _ = asyncio.run(first_event(secret["value"]))
    assert opened["type"] == "session.created" and opened["session"]["instructions"] == "Be brief."
    tampered, code = asyncio.run(first_event(secret["value"][:-2] + ("AA" if not secret["value"].endswith("AA")
                                                                       else "BB")))
    assert tampered["error"]["code"] == "unauthenticated" and "signature" in tampered["error"]["message"]
    assert code == 1008

    # bad requests for a secret: no key, a client secret in the key's place, a bad session, a bad expiry
    assert post_client_secret(stack, {}, None)[0] == 401
    assert post_client_secret(stack, {}, secret["value"])[0] == 401  # a secret cannot mint secrets
    status, bad = post_client_secret(stack, {"session": {"audio": {"input": {"format": {"type": "audio/wav"}}}}}, key)
    assert status == 400 and bad["error"]["param"] == "session.audio.input.format.type"
    status, bad = post_client_secret(stack, {"session": {"audio": {"output": {"voice": "nobody"}}}}, key)
    assert status == 400 and bad["error"]["code"] == "invalid_argument" and "nobody" in bad["error"]["message"]
    status, bad = post_client_secret(stack, {"expires_after": {"seconds": 10 ** 6}}, key)
    assert status == 400 and bad["error"]["param"] == "expires_after"

    # revoking the API key ends its secrets too
    revoke_key(stack["keys_file"], key)
    deadline = time.monotonic() + 30
    while True:
        event, code = asyncio.run(first_event(secret["value"]))
        if event["type"] == "error":
            break
        assert time.monotonic() < deadline, "the revoked key's client secret still opens calls"
        time.sleep(0.5)
    assert event["error"]["code"] == "unauthenticated" and "revoked" in event["error"]["message"] and code == 1008


def test_a_user_text_message_is_answered_on_response_create_as_the_oracle(stack, tiny_pipeline, tiny_checkpoint,
                                                                          speech):
    """conversation.item.create with a user message of text joins the history; response.create answers
    it without new speech; the reply equals the oracle's for that history."""
    a = pcm16_samples(speech[:48000])
    question = "And what about tomorrow?"

    async def main():
        async with connect(stack) as conn:
            created = await manual_call(conn)
            first = await spoken_turn(conn, pcm16_bytes(a))
            await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": question}]})
            added = [e for e in await until(conn, "conversation.item.done") if e.type != "rate_limits.updated"]
            await conn.response.create()
            second = await until(conn, "response.done")
            # bad: an empty text
            await conn.send({"type": "conversation.item.create", "event_id": "evt_empty",
                             "item": {"type": "message", "role": "user", "content": [{"type": "input_text",
                                                                                      "text": " "}]}})
            empty = (await until(conn, "error"))[-1]
            return created.session.id, first, added, second, empty

    session_id, first, added, second, empty = asyncio.run(main())
    assert [e.type for e in added] == ["conversation.item.added", "conversation.item.done"]
    assert added[-1].item.role == "user" and added[-1].item.content[0].text == question
    assert "input_buffer" not in " ".join(e.type for e in second)  # no speech committed for it
    gen = GenerationConfig.greedy(Mode.S2S, MAX_NEW)
    ref1 = tiny_pipeline.respond(a, gen=gen)
    assert_same_as_oracle(reply(first), ref1, tiny_checkpoint)
    ref2 = tiny_pipeline.respond(None, history=[{"role": "user", "content": a}, {"role": "assistant", "content": ref1.text},
                                                {"role": "user", "content": question}], gen=gen)
    assert_same_as_oracle(reply(second), ref2, tiny_checkpoint)
    assert empty.error.code == "invalid_argument" and empty.error.event_id == "evt_empty"

    turns = stored_turns(stack, session_id)
    assert [(t.role, t.text) for t in turns] == [("user", ""), ("assistant", ref1.text), ("user", question),
                                                 ("assistant", ref2.text)]


def test_server_vad_without_create_response_commits_the_turn_and_answers_it_on_response_create(
        stack, tiny_pipeline, tiny_checkpoint, speech):
    """create_response false: the VAD commits the caller's turn (speech_started, speech_stopped,
    committed) and nothing answers it until response.create; the answer equals the oracle's for the
    utterance the VAD cut (the same detector run locally on the same stream). Then idle_timeout_ms:
    once that reply has played out, the caller's silence is committed as their turn and answered."""
    from funchat.orchestrator.vad import SpeechStopped, TurnDetector

    stream = pcm16_samples(np.concatenate([np.zeros(8000, np.float32), speech[:64000], np.zeros(24000, np.float32)]))
    local = TurnDetector(silence_duration_ms=800)
    utterances = [ev.audio for k in range(0, len(stream), 1600) for ev in local.feed(stream[k:k + 1600])
                  if isinstance(ev, SpeechStopped)]
    assert len(utterances) == 1
    session = {"type": "realtime", "max_output_tokens": MAX_NEW, "generation": {"greedy": True, "seed": 0},
               "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}, "turn_detection": {
                   "type": "server_vad", "silence_duration_ms": 800, "create_response": False,
                   "idle_timeout_ms": 1000}}}}

    async def main():
        async with connect(stack) as conn:
            await until(conn, "session.created")
            await conn.session.update(session=session)
            updated = (await until(conn, "session.updated"))[-1]
            for k in range(0, len(stream), 1600):
                await conn.input_audio_buffer.append(audio=base64.b64encode(pcm16_bytes(stream[k:k + 1600])).decode())
            committed = await until(conn, "conversation.item.done")
            with pytest.raises(asyncio.TimeoutError):  # not answered on its own
                await until(conn, "response.created", timeout=1.5)
            await conn.response.create()
            answered = await until(conn, "response.done")
            audio_s = reply(answered)["funchat"]["audio_ms"] / 1000
            # the reply plays out (as the server counts it, from its first audio), then 1 s of silence
            await asyncio.sleep(audio_s)
            silence = np.zeros(1600, np.float32)
            for _ in range(15):
                await conn.input_audio_buffer.append(audio=base64.b64encode(pcm16_bytes(silence)).decode())
            idle = await until(conn, "response.done")
            return updated, committed, answered, idle

    updated, committed, answered, idle = asyncio.run(main())
    assert updated.session.audio.input.turn_detection.create_response is False
    assert [e.type for e in committed][-5:] == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                                                "input_audio_buffer.committed", "conversation.item.added",
                                                "conversation.item.done"]
    ref = tiny_pipeline.respond(utterances[0], gen=GenerationConfig.greedy(Mode.S2S, MAX_NEW))
    assert_same_as_oracle(reply(answered), ref, tiny_checkpoint)
    types = [e.type for e in idle]
    assert types.index("input_audio_buffer.timeout_triggered") < types.index("input_audio_buffer.committed") \
        < types.index("response.created")
    triggered = next(e for e in idle if e.type == "input_audio_buffer.timeout_triggered")
    assert triggered.audio_end_ms - triggered.audio_start_ms == 1000
    assert reply(idle)["done"].response.status == "completed"


def test_deleted_items_leave_the_history_and_the_next_turn_is_answered_without_them(
        stack, tiny_pipeline, tiny_checkpoint, speech):
    a, b, c = pcm16_samples(speech[:48000]), pcm16_samples(speech[40000:96000]), pcm16_samples(speech[16000:56000])

    async def main():
        async with connect(stack) as conn:
            created = await manual_call(conn)
            first = await spoken_turn(conn, pcm16_bytes(a))
            second = await spoken_turn(conn, pcm16_bytes(b))
            user_item = next(e for e in first if e.type == "input_audio_buffer.committed").item_id
            reply_item = [e for e in first if e.type == "response.output_item.done"][-1].item.id
            deleted = []
            for item in (user_item, reply_item):
                await conn.conversation.item.delete(item_id=item)
                deleted.append((await until(conn, "conversation.item.deleted"))[-1].item_id)
            await conn.send({"type": "conversation.item.delete", "event_id": "evt_again", "item_id": user_item})
            again = (await until(conn, "error"))[-1]
            third = await spoken_turn(conn, pcm16_bytes(c))
            return created.session.id, (user_item, reply_item), deleted, again, second, third

    session_id, items, deleted, again, second, third = asyncio.run(main())
    assert deleted == list(items)
    assert again.error.code == "not_found" and again.error.event_id == "evt_again"
    gen = GenerationConfig.greedy(Mode.S2S, MAX_NEW)
    ref1 = tiny_pipeline.respond(a, gen=gen)
    ref2 = tiny_pipeline.respond(b, history=[{"role": "user", "content": a}, {"role": "assistant", "content": ref1.text}],
                                 gen=gen)
    assert_same_as_oracle(reply(second), ref2, tiny_checkpoint)
    ref3 = tiny_pipeline.respond(c, history=[{"role": "user", "content": b}, {"role": "assistant", "content": ref2.text}],
                                 gen=gen)
    assert_same_as_oracle(reply(third), ref3, tiny_checkpoint)

    turns = stored_turns(stack, session_id)
    assert [(t.role, t.text) for t in turns] == [("user", ""), ("assistant", ref2.text), ("user", ""),
                                                 ("assistant", ref3.text)]
