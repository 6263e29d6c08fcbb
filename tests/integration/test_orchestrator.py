"""The public API end to end: a real redis-server, four real tritonservers, the Ray Serve orchestrator
(its own process, as `make up` runs it) and gRPC on 127.0.0.1.

Every exactness check compares with the in-process oracle (`ReferencePipeline`) under greedy
decoding: the same text and speech tokens, and audio within float tolerance of the oracle's tokens
run through the vocoder in process.

API keys: the orchestrator reads a key file in the run dir; every client of this module sends a key
of the tenant "dev" through FUNCHAT_API_KEY (set for the module, as a user's shell would), except
where a test gives its own (none, a wrong, a revoked or another tenant's key).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from funchat.api import pb, pb_grpc
from funchat.api_keys import revoke_key
from funchat.client import authed_stub
from funchat.oracle.generation import GenerationConfig
from funchat.dev.redis_server import start_redis
from funchat.dev.stack import start_orchestrator
from funchat.orchestrator.vad import SpeechStopped, TurnDetector
from funchat.turn.schedule import Mode
from funchat.dev.tritonserver import free_port
from funchat.vocoder.checkpoint import load_vocoder, pick_speaker
from tests.integration.pcm import pcm16_bytes, pcm16_samples
from tests.integration.scrape import metric

MAX_NEW = 24
SECRET = "test-secret-" + "0" * 20


@pytest.fixture(scope="module")
def stack(tiny_checkpoint, tmp_path_factory, make_api_key, model_services):
    run_dir = tmp_path_factory.mktemp("stack")
    keys_file, key = make_api_key(run_dir, "dev")
    redis_server = start_redis(run_dir)
    cluster = model_services  # shared (tests/integration/conftest.py); a test here restarts its llm
    env = {"FUNCHAT_CHECKPOINT": str(tiny_checkpoint), "FUNCHAT_REDIS_URL": redis_server.url,
           "FUNCHAT_RESUME_SECRET": SECRET, "FUNCHAT_ENDPOINTS": json.dumps(cluster.endpoints),
           "FUNCHAT_MAX_CALLS": "6", "FUNCHAT_MAX_NEW_TOKENS": "512", "FUNCHAT_AUTH": "api_keys",
           "FUNCHAT_API_KEYS_FILE": str(keys_file)}
    port = free_port()
    state = {"redis": redis_server, "cluster": cluster, "env": env, "run_dir": run_dir, "port": port,
             "target": f"127.0.0.1:{port}", "orch": None, "keys_file": keys_file, "key": key,
             "keys": [key]}  # every key this module made (none may show up in a log)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("FUNCHAT_API_KEY", key)  # the clients' (start_orchestrator keeps it from the server)
            state["orch"] = start_orchestrator(run_dir, env, port, timeout=180)
            yield state
    finally:
        if state["orch"] is not None:  # the current one: a test may have restarted it
            state["orch"].stop()
        redis_server.stop()


def funchat_stub(channel, api_key: str | None = None):
    """A FunchatStub whose calls send `api_key` (None: FUNCHAT_API_KEY, the dev tenant's here; "": none)."""
    return authed_stub(pb_grpc.FunchatStub(channel), api_key)


def config(manual=True, greedy=True, seed=0, max_new=MAX_NEW, resume_token="", mode=pb.MODE_SPEECH_TO_SPEECH,
           **kw) -> pb.SessionConfig:
    # 800 ms of silence ends a turn: the recording has a ~500 ms pause inside its first sentence
    td = pb.TurnDetection(manual=pb.ManualTurns()) if manual else \
        pb.TurnDetection(server_vad=pb.ServerVad(silence_duration_ms=800))
    return pb.SessionConfig(mode=mode, turn_detection=td, resume_token=resume_token,
                            generation=pb.Generation(greedy=greedy, seed=seed, max_new_tokens=max_new), **kw)


class Caller:
    """A scripted Converse client: send events whenever, read server events as they come. api_key: as
    funchat_stub's."""

    def __init__(self, target: str, api_key: str | None = None):
        self.api_key = api_key
        self.channel = grpc.aio.insecure_channel(target)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.call = None
        self.events: list[pb.ServerEvent] = []
        self.received_at: list[float] = []  # monotonic time each event arrived

    async def start(self, first: pb.ClientEvent) -> "Caller":
        async def requests():
            while True:
                item = await self.queue.get()
                if item is None:
                    return
                yield item
        self.call = funchat_stub(self.channel, self.api_key).Converse(requests())
        await self.send(first)
        return self

    async def send(self, event: pb.ClientEvent | None) -> None:
        await self.queue.put(event)

    async def next(self, timeout: float = 60.0) -> pb.ServerEvent | None:
        event = await asyncio.wait_for(self.call.read(), timeout)
        if event is grpc.aio.EOF:
            return None
        self.events.append(event)
        self.received_at.append(time.monotonic())
        return event

    async def until(self, kind: str, timeout: float = 60.0) -> list[pb.ServerEvent]:
        """Events up to and including the next one of `kind`."""
        seen = []
        while True:
            event = await self.next(timeout)
            assert event is not None, f"stream ended before a {kind} event; got {[e.WhichOneof('event') for e in seen]}"
            seen.append(event)
            if event.WhichOneof("event") == kind:
                return seen

    async def close(self) -> None:
        await self.queue.put(None)
        await self.channel.close()


def kinds(events) -> list[str]:
    return [e.WhichOneof("event") for e in events]


def reply_of(events) -> dict:
    """Text, tokens and 24 kHz audio of one response's events."""
    done = [e.response_done for e in events if e.WhichOneof("event") == "response_done"][-1]
    chunks = [e.audio_delta for e in events if e.WhichOneof("event") == "audio_delta"]
    assert [c.sequence for c in chunks] == list(range(len(chunks)))
    audio = np.concatenate([np.frombuffer(c.pcm16, "<i2").astype(np.float32) / 32768.0 for c in chunks]) \
        if chunks else np.zeros(0, np.float32)
    text = "".join(e.text_delta.delta for e in events if e.WhichOneof("event") == "text_delta")
    return {"done": done, "audio": audio, "text": text, "text_tokens": list(done.text_tokens),
            "speech_tokens": list(done.speech_tokens), "vocoder_tokens": list(done.vocoder_tokens)}


def oracle_audio(checkpoint, tokens: list[int]) -> np.ndarray:
    vocoder, speakers = load_vocoder(checkpoint)
    state = vocoder.start(pick_speaker(speakers, None))
    chunks = vocoder.push(state, tokens, final=True)
    return np.concatenate([c.numpy() for c in chunks]) if chunks else np.zeros(0, np.float32)


def assert_same_as_oracle(reply: dict, ref, checkpoint) -> None:
    assert reply["text_tokens"] == ref.text_tokens
    assert reply["speech_tokens"] == ref.speech_tokens
    assert reply["vocoder_tokens"] == ref.vocoder_tokens
    assert reply["done"].text == ref.text
    assert reply["text"] == ref.text  # the deltas add up to the whole text
    expected = oracle_audio(checkpoint, ref.vocoder_tokens)
    assert len(reply["audio"]) == len(expected) == 960 * len(ref.vocoder_tokens)
    if len(expected):
        assert np.abs(reply["audio"] - np.clip(expected, -1, 1)).max() < 2e-3  # PCM16 + float noise


async def converse_turns(target: str, turns: list[np.ndarray], cfg: pb.SessionConfig):
    caller = await Caller(target).start(pb.ClientEvent(session=cfg))
    created = (await caller.until("session_created"))[-1].session_created
    replies = []
    for audio in turns:
        for k in range(0, len(audio), 8000):  # 0.5 s chunks
            await caller.send(pb.ClientEvent(audio=pb.InputAudioAppend(audio=pcm16_bytes(audio[k:k + 8000]))))
        await caller.send(pb.ClientEvent(commit=pb.InputAudioCommit()))
        replies.append(reply_of(await caller.until("response_done")))
    await caller.send(pb.ClientEvent(end=pb.SessionEnd()))
    rest = []
    while (event := await caller.next()) is not None:
        rest.append(event)
    await caller.close()
    return created, replies, rest


def test_two_greedy_turns_through_converse_equal_the_oracle(stack, tiny_pipeline, tiny_checkpoint, speech):
    a, b = pcm16_samples(speech[:48000]), pcm16_samples(speech[40000:96000])
    created, replies, rest = asyncio.run(converse_turns(stack["target"], [a, b], config()))
    assert created.session_id and created.resume_token and not created.resumed
    assert kinds(rest) == []  # `end` closes the call cleanly
    gen = GenerationConfig.greedy(Mode.S2S, MAX_NEW)
    ref1 = tiny_pipeline.respond(a, gen=gen)
    assert_same_as_oracle(replies[0], ref1, tiny_checkpoint)
    history = [{"role": "user", "content": a}, {"role": "assistant", "content": ref1.text}]
    ref2 = tiny_pipeline.respond(b, history=history, gen=gen)
    assert_same_as_oracle(replies[1], ref2, tiny_checkpoint)
    assert replies[1]["done"].usage.input_tokens == ref2.prompt_tokens
    # the second turn continued the rows the services kept of the first prompt (and still equals
    # the oracle's whole-prompt prefill)
    assert replies[0]["done"].latency_ms["kept_prefix"] == 0
    assert 0 < replies[1]["done"].latency_ms["kept_prefix"] < ref2.prompt_tokens

    # the session in Redis holds both exchanges as the model saw them
    r = redis.Redis.from_url(stack["redis"].url)
    keys = {k.decode() for k in r.keys(f"funchat:session:{created.session_id}*")}
    assert f"funchat:session:{created.session_id}" in keys
    assert all(r.ttl(k) > 0 for k in keys)

    async def get():
        async with grpc.aio.insecure_channel(stack["target"]) as ch:
            return await funchat_stub(ch).GetSession(pb.GetSessionRequest(session_id=created.session_id))
    session = asyncio.run(get())
    assert [t.role for t in session.turns] == ["user", "assistant", "user", "assistant"]
    assert session.turns[1].text == ref1.text and session.turns[3].text == ref2.text
    assert session.turns[0].audio_ms == len(a) * 1000 // 16000
    assert session.state == "listening"


def test_long_turns_encoded_and_prefilled_while_spoken_equal_the_oracle(stack, tiny_pipeline, tiny_checkpoint,
                                                                       speech):
    """A 14 s turn: each 2 s encoder window is encoded and prefilled into the kept rows while the
    caller is still sending it, so the first turn already reuses a kept prefix, and the end of the
    turn encodes only its last window. The replies still equal the oracle's (which encodes and
    prefills each whole prompt at once)."""
    orch = stack["orch"].metrics_target
    a = pcm16_samples(np.tile(speech, 3)[:16000 * 14])
    b = pcm16_samples(np.tile(speech[::-1], 3)[:16000 * 13])
    count = lambda event: metric(orch, "funchat_orchestrator_caller_windows_total", event=event)  # noqa: E731
    before = {e: count(e) for e in ("encoded", "prefilled", "held", "stale")}

    async def main():
        caller = await Caller(stack["target"]).start(pb.ClientEvent(session=config()))
        await caller.until("session_created")
        replies = []
        for audio in (a, b):
            prefilled = count("prefilled")
            for k in range(0, len(audio), 8000):
                await caller.send(pb.ClientEvent(audio=pb.InputAudioAppend(audio=pcm16_bytes(audio[k:k + 8000]))))
            # a caller speaking in real time leaves the windows time to be prefilled: wait for them
            deadline = time.monotonic() + 60
            while count("prefilled") < prefilled + 6:
                assert time.monotonic() < deadline, "the turn's windows were not prefilled while it was sent"
                await asyncio.sleep(0.05)
            await caller.send(pb.ClientEvent(commit=pb.InputAudioCommit()))
            replies.append(reply_of(await caller.until("response_done")))
        await caller.close()
        return replies

    replies = asyncio.run(main())
    gen = GenerationConfig.greedy(Mode.S2S, MAX_NEW)
    ref1 = tiny_pipeline.respond(a, gen=gen)
    assert_same_as_oracle(replies[0], ref1, tiny_checkpoint)
    ref2 = tiny_pipeline.respond(b, history=[{"role": "user", "content": a}, {"role": "assistant", "content": ref1.text}],
                                 gen=gen)
    assert_same_as_oracle(replies[1], ref2, tiny_checkpoint)
    after = {e: count(e) for e in before}
    assert after["encoded"] - before["encoded"] == 6 + 6  # windows 0-5 of each turn (window 6 is its last)
    assert after["held"] + after["stale"] - before["held"] - before["stale"] == 12
    assert after["held"] - before["held"] >= 8  # the loudest moments come early: most windows held
    # turn 1 is a first turn, and still reuses the windows prefilled while it was spoken
    assert replies[0]["done"].latency_ms["kept_prefix"] > 0
    assert replies[1]["done"].latency_ms["kept_prefix"] > replies[0]["done"].latency_ms["kept_prefix"]


@pytest.mark.parametrize("encoding, name", [(pb.AUDIO_ENCODING_PCMU, "pcmu"), (pb.AUDIO_ENCODING_PCMA, "pcma")])
def test_a_telephony_turn_in_g711_at_8_khz_equals_the_oracle_on_the_audio_the_server_decoded(
        stack, tiny_pipeline, tiny_checkpoint, speech, encoding, name):
    import soxr

    from funchat.client.audio import encode_audio
    from funchat.orchestrator.audio_input import InputAudioStream, InputFormat

    narrow = soxr.resample(speech[:48000], 16000, 8000).astype(np.float32)  # 3 s, as a phone line carries it
    data = encode_audio(narrow, name)
    chunks = [data[k:k + 1600] for k in range(0, len(data), 1600)]  # 200 ms
    fmt = pb.AudioFormat(encoding=encoding, sample_rate_hz=8000)
    server = InputAudioStream(InputFormat.from_proto(fmt), max_chunk_ms=1000)  # what the server decodes
    heard = np.concatenate([server.push(c) for c in chunks] + [server.flush()])

    async def main():
        cfg = config()
        cfg.input_audio_format.CopyFrom(fmt)
        caller = await Caller(stack["target"]).start(pb.ClientEvent(session=cfg))
        await caller.until("session_created")
        for c in chunks:
            await caller.send(pb.ClientEvent(audio=pb.InputAudioAppend(audio=c)))
        await caller.send(pb.ClientEvent(commit=pb.InputAudioCommit()))
        events = await caller.until("response_done")
        await caller.close()
        return events

    events = asyncio.run(main())
    committed = next(e.committed for e in events if e.WhichOneof("event") == "committed")
    assert committed.audio_ms == len(heard) * 1000 // 16000
    ref = tiny_pipeline.respond(heard, gen=GenerationConfig.greedy(Mode.S2S, MAX_NEW))
    assert_same_as_oracle(reply_of(events), ref, tiny_checkpoint)


def test_s2t_mode_streams_text_only(stack, tiny_pipeline, speech):
    a = pcm16_samples(speech[:40000])
    _, replies, _ = asyncio.run(converse_turns(stack["target"], [a], config(mode=pb.MODE_SPEECH_TO_TEXT)))
    ref = tiny_pipeline.respond(a, mode=Mode.S2T, gen=GenerationConfig.greedy(Mode.S2T, MAX_NEW))
    assert replies[0]["text_tokens"] == ref.text_tokens
    assert replies[0]["speech_tokens"] == [] and len(replies[0]["audio"]) == 0


def test_server_vad_detects_the_turn_and_answers_it(stack, tiny_pipeline, speech):
    """Speech then silence, streamed in 100 ms chunks: the VAD ends the turn; the reply equals the
    oracle's for the utterance the VAD cut (the same detector run locally on the same stream)."""
    stream = np.concatenate([np.zeros(8000, np.float32), pcm16_samples(speech[:64000]), np.zeros(24000, np.float32)])
    stream = pcm16_samples(stream)
    local = TurnDetector(silence_duration_ms=800)
    utterances = [ev.audio for k in range(0, len(stream), 1600) for ev in local.feed(stream[k:k + 1600])
                  if isinstance(ev, SpeechStopped)]
    assert len(utterances) == 1

    async def main():
        caller = await Caller(stack["target"]).start(pb.ClientEvent(session=config(manual=False)))
        await caller.until("session_created")
        for k in range(0, len(stream), 1600):
            await caller.send(pb.ClientEvent(audio=pb.InputAudioAppend(audio=pcm16_bytes(stream[k:k + 1600]))))
        events = await caller.until("response_done")
        await caller.close()
        return events

    events = asyncio.run(main())
    assert kinds(events)[:4] == ["speech_started", "speech_stopped", "committed", "response_created"]
    ref = tiny_pipeline.respond(utterances[0], gen=GenerationConfig.greedy(Mode.S2S, MAX_NEW))
    assert reply_of(events)["text_tokens"] == ref.text_tokens


def test_barge_in_cancels_drops_audio_and_cuts_the_history(stack, tiny_pipeline, speech):
    """The caller speaks while the reply plays: generation stops, no more of that reply's audio comes,
    the assistant turn keeps only what the caller heard (the playback ack), and the new turn is answered
    with that history."""
    a = pcm16_samples(speech[:48000])
    silence = np.zeros(16000, np.float32)
    barge = pcm16_samples(speech[48000:80000])

    async def main():
        caller = await Caller(stack["target"]).start(pb.ClientEvent(session=config(manual=False, max_new=400)))
        created = (await caller.until("session_created"))[-1].session_created
        for chunk in np.array_split(np.concatenate([a, silence]), 40):
            await caller.send(pb.ClientEvent(audio=pb.InputAudioAppend(audio=pcm16_bytes(chunk))))
        first = await caller.until("audio_delta")
        response_id = first[-1].audio_delta.response_id
        await caller.until("audio_delta")
        await caller.send(pb.ClientEvent(playback=pb.PlaybackAck(response_id=response_id, played_ms=440)))
        for chunk in np.array_split(np.concatenate([barge, silence]), 20):  # the caller talks over the reply
            await caller.send(pb.ClientEvent(audio=pb.InputAudioAppend(audio=pcm16_bytes(chunk))))
        upto_interrupt = await caller.until("interrupted")
        after = await caller.until("response_done")  # the interrupted reply's done event
        second = await caller.until("response_done")  # the answer to the barge-in
        at = dict(zip(kinds(caller.events), caller.received_at))  # last arrival of each kind
        started = [t for e, t in zip(caller.events, caller.received_at) if e.WhichOneof("event") == "speech_started"][-1]
        await caller.close()
        return created, response_id, first + upto_interrupt, after, second, at["interrupted"] - started

    created, rid, before, after, second, t_cancel = asyncio.run(main())
    print(f"barge-in: speech_started -> interrupted {t_cancel * 1000:.0f} ms")
    interrupted = [e.interrupted for e in before if e.WhichOneof("event") == "interrupted"][0]
    assert interrupted.response_id == rid and interrupted.audio_end_ms == 440
    done = [e.response_done for e in after if e.WhichOneof("event") == "response_done"][0]
    assert done.response_id == rid and done.status == "interrupted"
    assert not [e for e in after + second if e.WhichOneof("event") == "audio_delta" and e.audio_delta.response_id == rid]
    assert len(done.speech_tokens) < 400 * 5  # generation stopped early
    # generation stopped (and the cut turn stored) soon after the caller's speech was detected; the
    # target is 200 ms, the bound is loose for loaded CI machines
    assert t_cancel < 1.0

    async def get():
        async with grpc.aio.insecure_channel(stack["target"]) as ch:
            return await funchat_stub(ch).GetSession(pb.GetSessionRequest(session_id=created.session_id))
    session = asyncio.run(get())
    assert [t.role for t in session.turns] == ["user", "assistant", "user", "assistant"]
    assert session.turns[1].truncated and session.turns[1].text == interrupted.kept_text
    assert len(interrupted.kept_text) < len(done.text) or done.text == ""


def test_respond_unary_multi_turn_and_session_calls(stack, tiny_pipeline, speech):
    a, b = pcm16_samples(speech[:32000]), pcm16_samples(speech[32000:64000])
    cfg = config()

    async def main():
        async with grpc.aio.insecure_channel(stack["target"]) as ch:
            stub = funchat_stub(ch)
            first = [e async for e in stub.Respond(pb.RespondRequest(config=cfg, audio=pcm16_bytes(a)))]
            sid = first[0].session_created.session_id
            second = [e async for e in stub.Respond(pb.RespondRequest(config=cfg, audio=pcm16_bytes(b),
                                                                      session_id=sid))]
            session = await stub.GetSession(pb.GetSessionRequest(session_id=sid))
            deleted = await stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.GetSession(pb.GetSessionRequest(session_id=sid))
            return first, second, session, deleted, err.value

    first, second, session, deleted, err = asyncio.run(main())
    gen = GenerationConfig.greedy(Mode.S2S, MAX_NEW)
    ref1 = tiny_pipeline.respond(a, gen=gen)
    ref2 = tiny_pipeline.respond(b, history=[{"role": "user", "content": a}, {"role": "assistant", "content": ref1.text}],
                                 gen=gen)
    assert reply_of(first)["text_tokens"] == ref1.text_tokens
    assert reply_of(second)["text_tokens"] == ref2.text_tokens
    assert second[0].session_created.resumed and second[0].session_created.turns == 2
    assert len(session.turns) == 4 and deleted.deleted
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_resume_after_the_orchestrator_restarts_and_reprefill_after_an_llm_restart(stack, tiny_pipeline,
                                                                                   tiny_checkpoint, speech):
    a, b = pcm16_samples(speech[:40000]), pcm16_samples(speech[50000:90000])
    created, replies, _ = asyncio.run(converse_turns(stack["target"], [a], config()))

    # a new orchestrator process (a new Ray cluster: nothing of the call survives but Redis) and a
    # restarted llm server (its KV caches are gone)
    stack["orch"].stop()
    cluster = stack["cluster"]
    cluster.restart("llm", timeout=120)
    stack["orch"] = start_orchestrator(stack["run_dir"], stack["env"], stack["port"], timeout=180)

    created2, replies2, _ = asyncio.run(converse_turns(stack["target"], [b],
                                                       config(resume_token=created.resume_token)))
    assert created2.session_id == created.session_id and created2.resumed and created2.turns == 2
    gen = GenerationConfig.greedy(Mode.S2S, MAX_NEW)
    ref1 = tiny_pipeline.respond(a, gen=gen)
    assert replies[0]["text_tokens"] == ref1.text_tokens
    ref2 = tiny_pipeline.respond(b, history=[{"role": "user", "content": a}, {"role": "assistant", "content": ref1.text}],
                                 gen=gen)
    assert_same_as_oracle(replies2[0], ref2, tiny_checkpoint)


def test_expired_session_and_resume_token(stack, speech):
    created, _, _ = asyncio.run(converse_turns(stack["target"], [pcm16_samples(speech[:16000])], config()))
    r = redis.Redis.from_url(stack["redis"].url)
    for key in r.keys(f"funchat:session:{created.session_id}*"):
        r.pexpire(key, 1)  # as if the TTL ran out
    time.sleep(0.05)

    async def main():
        async with grpc.aio.insecure_channel(stack["target"]) as ch:
            stub = funchat_stub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as get_err:
                await stub.GetSession(pb.GetSessionRequest(session_id=created.session_id))
            caller = await Caller(stack["target"]).start(
                pb.ClientEvent(session=config(resume_token=created.resume_token)))
            events = []
            with pytest.raises(grpc.aio.AioRpcError) as resume_err:
                while (e := await caller.next()) is not None:
                    events.append(e)
            await caller.close()
            return get_err.value, resume_err.value, events

    get_err, resume_err, events = asyncio.run(main())
    assert get_err.code() == grpc.StatusCode.NOT_FOUND
    assert resume_err.code() == grpc.StatusCode.NOT_FOUND and "expired" in resume_err.details()
    assert kinds(events) == ["error"]


# ---- bad input: a precise status, and the call (or server) stays usable ----


async def _fatal(target: str, first: pb.ClientEvent, api_key: str | None = None) -> tuple[grpc.aio.AioRpcError, list]:
    caller = await Caller(target, api_key).start(first)
    events = []
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            while (e := await caller.next()) is not None:
                events.append(e)
    finally:
        await caller.close()
    return err.value, events


@pytest.mark.parametrize("first, code, words", [
    (pb.ClientEvent(audio=pb.InputAudioAppend(audio=b"\0\0")), grpc.StatusCode.FAILED_PRECONDITION, "first event"),
    (pb.ClientEvent(session=pb.SessionConfig(input_audio_format=pb.AudioFormat(encoding=7))),
     grpc.StatusCode.INVALID_ARGUMENT, "encoding"),
    (pb.ClientEvent(session=pb.SessionConfig(input_audio_format=pb.AudioFormat(sample_rate_hz=4000))),
     grpc.StatusCode.INVALID_ARGUMENT, "sample rate"),
    (pb.ClientEvent(session=pb.SessionConfig(voice="nobody")), grpc.StatusCode.INVALID_ARGUMENT, "unknown voice"),
    (pb.ClientEvent(session=pb.SessionConfig(resume_token="v2.abc.123.forged")), grpc.StatusCode.INVALID_ARGUMENT,
     "forged"),
    (pb.ClientEvent(session=pb.SessionConfig(resume_token="garbage")), grpc.StatusCode.INVALID_ARGUMENT, "malformed"),
    (pb.ClientEvent(session=pb.SessionConfig(generation=pb.Generation(top_p=1.5))), grpc.StatusCode.INVALID_ARGUMENT,
     "top_p"),
])
def test_bad_first_event_ends_the_call_with_a_precise_status(stack, first, code, words):
    err, events = asyncio.run(_fatal(stack["target"], first))
    assert err.code() == code and words in err.details(), err.details()
    assert kinds(events) == ["error"] and events[0].error.code == code.name


def test_bad_events_fail_alone_and_the_call_goes_on(stack, tiny_pipeline, speech):
    a = pcm16_samples(speech[:32000])

    async def main():
        caller = await Caller(stack["target"]).start(pb.ClientEvent(session=config()))
        await caller.until("session_created")
        bad = [
            pb.ClientEvent(session=config()),                                          # second config
            pb.ClientEvent(audio=pb.InputAudioAppend(audio=b"\0" * (2 * 16000 * 2))),  # 2 s chunk: over the limit
            pb.ClientEvent(audio=pb.InputAudioAppend(audio=b"\0\0\0")),                # not whole PCM16 samples
            pb.ClientEvent(commit=pb.InputAudioCommit()),                              # empty turn
            pb.ClientEvent(cancel=pb.ResponseCancel()),                                # nothing to cancel
            pb.ClientEvent(playback=pb.PlaybackAck(response_id="resp_x", played_ms=5)),
            pb.ClientEvent(),                                                          # empty event
        ]
        errors = []
        for event in bad:
            await caller.send(event)
            errors.append((await caller.until("error"))[-1].error)
        # a turn too short to encode fails that turn only
        await caller.send(pb.ClientEvent(audio=pb.InputAudioAppend(audio=pcm16_bytes(a[:160]))))
        await caller.send(pb.ClientEvent(commit=pb.InputAudioCommit()))
        short = await caller.until("response_done")
        for k in range(0, len(a), 8000):
            await caller.send(pb.ClientEvent(audio=pb.InputAudioAppend(audio=pcm16_bytes(a[k:k + 8000]))))
        await caller.send(pb.ClientEvent(commit=pb.InputAudioCommit()))
        good = await caller.until("response_done")
        await caller.close()
        return errors, short, good

    errors, short, good = asyncio.run(main())
    assert [(e.code, e.event) for e in errors] == [
        ("FAILED_PRECONDITION", "session"), ("INVALID_ARGUMENT", "audio"), ("INVALID_ARGUMENT", "audio"),
        ("INVALID_ARGUMENT", "commit"), ("FAILED_PRECONDITION", "cancel"), ("INVALID_ARGUMENT", "playback"),
        ("INVALID_ARGUMENT", "")]
    assert "over the 1000 ms limit" in errors[1].message and "whole number" in errors[2].message
    assert "empty turn" in errors[3].message
    short_err = [e.error for e in short if e.WhichOneof("event") == "error"][0]
    assert short_err.code == "INVALID_ARGUMENT" and "too short" in short_err.message
    assert short[-1].response_done.status == "failed"
    ref = tiny_pipeline.respond(a, gen=GenerationConfig.greedy(Mode.S2S, MAX_NEW))
    assert reply_of(good)["text_tokens"] == ref.text_tokens  # the failed turn left no trace in the history


def test_nan_float32_audio_is_refused(stack):
    async def main():
        cfg = config()
        cfg.input_audio_format.CopyFrom(pb.AudioFormat(encoding=pb.AUDIO_ENCODING_FLOAT32, sample_rate_hz=16000))
        caller = await Caller(stack["target"]).start(pb.ClientEvent(session=cfg))
        await caller.until("session_created")
        await caller.send(pb.ClientEvent(audio=pb.InputAudioAppend(
            audio=np.array([0.1, np.nan, 0.2], "<f4").tobytes())))
        error = (await caller.until("error"))[-1].error
        await caller.close()
        return error

    error = asyncio.run(main())
    assert error.code == "INVALID_ARGUMENT" and "NaN" in error.message


def test_unknown_session_and_bad_respond_requests(stack, speech):
    async def main():
        async with grpc.aio.insecure_channel(stack["target"]) as ch:
            stub = funchat_stub(ch)
            errs = []
            for call in (lambda: stub.GetSession(pb.GetSessionRequest(session_id="nope")),
                         lambda: stub.DeleteSession(pb.DeleteSessionRequest(session_id="nope"))):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call()
                errs.append(err.value)
            for request in (pb.RespondRequest(config=config(), audio=pcm16_bytes(speech[:16000]), session_id="nope"),
                            pb.RespondRequest(config=config(), audio=b""),
                            pb.RespondRequest(config=config(), audio=b"\0")):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    async for _ in stub.Respond(request):
                        pass
                errs.append(err.value)
            return errs

    errs = asyncio.run(main())
    assert [e.code() for e in errs] == [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.NOT_FOUND,
                                        grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT,
                                        grpc.StatusCode.INVALID_ARGUMENT]
    assert "empty turn" in errs[3].details() and "whole number" in errs[4].details()


def test_oversized_respond_requests_are_refused_before_decoding(stack):
    """A turn over FUNCHAT_MAX_TURN_S is refused on its byte count; a message over
    FUNCHAT_MAX_MESSAGE_BYTES (16 MiB) by the proxy itself. The server keeps serving."""
    async def main():
        async with grpc.aio.insecure_channel(stack["target"]) as ch:
            stub = funchat_stub(ch)
            errs = []
            for audio in (b"\0\1" * (61 * 16000), b"\0" * (17 << 20)):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    async for _ in stub.Respond(pb.RespondRequest(config=config(), audio=audio)):
                        pass
                errs.append(err.value)
            return errs

    too_long, too_big = asyncio.run(main())
    assert too_long.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "61.0 s, over the 60 s limit" in too_long.details() and "1920000 bytes" in too_long.details()
    assert too_big.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_calls_over_the_admission_limit_are_refused_then_admitted_again(stack):
    """FUNCHAT_MAX_CALLS=6 in this stack. A call an earlier test hung up on holds its slot until the
    replica has stopped its reply and finished its cleanup: wait for none to be left first."""
    deadline = time.monotonic() + 30
    while (left := metric(stack["orch"].metrics_target, "funchat_orchestrator_active_calls")) != 0:
        assert time.monotonic() < deadline, f"{left:g} calls of earlier tests still active after 30 s"
        time.sleep(0.2)

    async def main():
        callers = []
        for _ in range(6):
            c = await Caller(stack["target"]).start(pb.ClientEvent(session=config()))
            await c.until("session_created")
            callers.append(c)
        err, events = await _fatal(stack["target"], pb.ClientEvent(session=config()))
        await callers[0].send(pb.ClientEvent(end=pb.SessionEnd()))
        while await callers[0].next() is not None:
            pass
        again = await Caller(stack["target"]).start(pb.ClientEvent(session=config()))
        created = (await again.until("session_created"))[-1]
        for c in callers[1:] + [again]:
            await c.close()
        return err, created

    err, created = asyncio.run(main())
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit of 6" in err.details()
    assert created.session_created.session_id


def test_cli_chat_and_call_through_the_api(stack, tiny_checkpoint, tmp_path, example_wav):
    import soundfile as sf

    cli = [str(Path(sys.executable).parent / "funchat")]
    chat = subprocess.run(cli + ["chat", "--server", stack["target"], "--input", str(example_wav), "--output",
                                 str(tmp_path / "reply.wav"), "--greedy", "--seed", "0", "--max-new-tokens", "24",
                                 "--output-tokens", str(tmp_path / "chat.json")], capture_output=True, text=True)
    assert chat.returncode == 0, chat.stderr
    local = subprocess.run(cli + ["respond", "--checkpoint", str(tiny_checkpoint), "--input", str(example_wav),
                                  "--greedy", "--seed", "0", "--max-new-tokens", "24", "--output-tokens",
                                  str(tmp_path / "local.json")], capture_output=True, text=True)
    assert local.returncode == 0, local.stderr
    remote, ref = json.loads((tmp_path / "chat.json").read_text()), json.loads((tmp_path / "local.json").read_text())
    for key in ("text", "text_tokens", "text_tokens_emitted", "speech_tokens", "vocoder_tokens"):
        assert remote[key] == ref[key], key
    wav, rate = sf.read(tmp_path / "reply.wav")
    assert rate == 24000 and len(wav) == 960 * len(ref["vocoder_tokens"])

    call = subprocess.run(cli + ["call", "--server", stack["target"], "--input", str(example_wav), "--output",
                                 str(tmp_path / "call.wav"), "--greedy", "--seed", "0", "--max-new-tokens", "24",
                                 "--no-realtime"], capture_output=True, text=True, timeout=300)
    assert call.returncode == 0, call.stderr
    assert "session_created" in call.stdout and "response_done" in call.stdout
    assert (tmp_path / "call.wav").exists()

    bad = subprocess.run(cli + ["chat", "--server", "127.0.0.1:1", "--input", str(example_wav)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "cannot reach" in bad.stderr



# ---- API keys: who may call, and whose sessions they see ----

NO_KEY_WORDS = "authorization: Bearer"  # the UNAUTHENTICATED message says what to send


async def _every_rpc(target: str, api_key: str | None, session_id: str = "nope",
                     audio: bytes = b"\0\0" * 16000) -> dict[str, grpc.aio.AioRpcError | None]:
    """GetSession, DeleteSession, Respond (on `session_id`) and Converse with `api_key`: each one's
    error (None when it succeeded; a Converse that opens is ended at once)."""
    errs: dict[str, grpc.aio.AioRpcError | None] = {}
    async with grpc.aio.insecure_channel(target) as ch:
        stub = funchat_stub(ch, api_key)
        calls = {"GetSession": lambda: stub.GetSession(pb.GetSessionRequest(session_id=session_id)),
                 "DeleteSession": lambda: stub.DeleteSession(pb.DeleteSessionRequest(session_id=session_id))}
        for name, call in calls.items():
            try:
                await call()
                errs[name] = None
            except grpc.aio.AioRpcError as exc:
                errs[name] = exc
        try:
            async for _ in stub.Respond(pb.RespondRequest(config=config(max_new=1), audio=audio,
                                                          session_id=session_id)):
                pass
            errs["Respond"] = None
        except grpc.aio.AioRpcError as exc:
            errs["Respond"] = exc
    caller = await Caller(target, api_key).start(pb.ClientEvent(session=config()))
    try:
        await caller.until("session_created", timeout=30)
        errs["Converse"] = None
    except grpc.aio.AioRpcError as exc:
        errs["Converse"] = exc
    finally:
        await caller.send(pb.ClientEvent(end=pb.SessionEnd()))
        await caller.close()
    return errs


def _codes(errs) -> dict[str, str]:
    return {name: (err.code().name if err is not None else "OK") for name, err in errs.items()}


async def _get_session_code(target: str, api_key: str) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(target) as ch:
        try:
            await funchat_stub(ch, api_key).GetSession(pb.GetSessionRequest(session_id="nope"))
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def _wait_for(target: str, api_key: str, code: grpc.StatusCode, timeout: float = 10.0, times: int = 4) -> float:
    """Poll GetSession of a session that does not exist with `api_key` until it answers `code` `times`
    in a row (every replica has reloaded the key file: it re-reads it every 2 s); -> seconds taken."""
    t0 = time.monotonic()
    streak = 0
    while streak < times:
        answer = asyncio.run(_get_session_code(target, api_key))
        streak = streak + 1 if answer == code else 0
        assert time.monotonic() - t0 < timeout, f"still {answer.name} after {timeout:g} s, expected {code.name}"
        time.sleep(0.2)
    return time.monotonic() - t0


def test_every_rpc_but_the_health_check_needs_a_key(stack, example_wav):
    errs = asyncio.run(_every_rpc(stack["target"], ""))
    assert _codes(errs) == dict.fromkeys(("GetSession", "DeleteSession", "Respond", "Converse"), "UNAUTHENTICATED")
    for name, err in errs.items():
        assert NO_KEY_WORDS in err.details(), (name, err.details())

    async def health():
        async with grpc.aio.insecure_channel(stack["target"]) as ch:  # no key at all
            return await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert asyncio.run(health()).status == health_pb2.HealthCheckResponse.SERVING

    # the key is taken: the same calls get past authentication (no such session)
    assert _codes(asyncio.run(_every_rpc(stack["target"], None))) == {
        "GetSession": "NOT_FOUND", "DeleteSession": "NOT_FOUND", "Respond": "NOT_FOUND", "Converse": "OK"}

    # `funchat chat` without a key: one line saying what to set
    env = {k: v for k, v in os.environ.items() if k != "FUNCHAT_API_KEY"}
    chat = subprocess.run([str(Path(sys.executable).parent / "funchat"), "chat", "--server", stack["target"],
                           "--input", str(example_wav)], capture_output=True, text=True, env=env, timeout=120)
    assert chat.returncode == 2 and len(chat.stderr.strip().splitlines()) == 1, chat.stderr
    assert "answered UNAUTHENTICATED" in chat.stderr and "set FUNCHAT_API_KEY" in chat.stderr


@pytest.mark.parametrize("authorization", [
    "Bearer fck_aaaaaaaaaa_" + "a" * 52,   # well-formed, no such key
    "Bearer not-a-key",                    # not a key at all
    "Basic dXNlcjpwYXNz",                  # another scheme
    "fck_aaaaaaaaaa_" + "a" * 52,          # the key without "Bearer"
])
def test_a_wrong_key_is_unauthenticated(stack, authorization):
    async def main():
        async with grpc.aio.insecure_channel(stack["target"]) as ch:
            stub = pb_grpc.FunchatStub(ch)  # the metadata as given, nothing added
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.GetSession(pb.GetSessionRequest(session_id="nope"),
                                      metadata=(("authorization", authorization),))
            with pytest.raises(grpc.aio.AioRpcError) as twice:
                await stub.GetSession(pb.GetSessionRequest(session_id="nope"),
                                      metadata=(("authorization", f"Bearer {stack['key']}"),
                                                ("authorization", f"Bearer {stack['key']}")))
            return err.value, twice.value

    err, twice = asyncio.run(main())
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err.details()
    assert authorization.split()[-1] not in err.details()  # never repeated
    assert twice.code() == grpc.StatusCode.UNAUTHENTICATED  # exactly one authorization entry


def test_a_new_key_is_taken_and_a_revoked_one_refused_without_a_restart(stack, make_api_key):
    _, key = make_api_key(stack["run_dir"], "dev")  # the key file the orchestrator reads
    stack["keys"].append(key)
    took = _wait_for(stack["target"], key, grpc.StatusCode.NOT_FOUND)
    print(f"a new key was taken after {took:.1f} s")
    entry, was_active = revoke_key(stack["keys_file"], key)
    assert was_active
    took = _wait_for(stack["target"], key, grpc.StatusCode.UNAUTHENTICATED)
    print(f"a revoked key was refused after {took:.1f} s")
    errs = asyncio.run(_every_rpc(stack["target"], key))
    assert set(_codes(errs).values()) == {"UNAUTHENTICATED"}
    assert all(entry.key_id in e.details() and key.rsplit("_", 1)[1] not in e.details() for e in errs.values())
    assert asyncio.run(_get_session_code(stack["target"], stack["key"])) == grpc.StatusCode.NOT_FOUND  # others stay


def test_another_tenant_sees_none_of_a_tenants_sessions(stack, make_api_key, speech):
    _, other = make_api_key(stack["run_dir"], "other")
    stack["keys"].append(other)
    _wait_for(stack["target"], other, grpc.StatusCode.NOT_FOUND)

    async def open_session():
        caller = await Caller(stack["target"]).start(pb.ClientEvent(session=config()))
        created = (await caller.until("session_created"))[-1].session_created
        await caller.send(pb.ClientEvent(end=pb.SessionEnd()))
        while await caller.next() is not None:
            pass
        await caller.close()
        return created

    created = asyncio.run(open_session())  # the dev tenant's
    audio = pcm16_bytes(pcm16_samples(speech[:16000]))
    theirs = asyncio.run(_every_rpc(stack["target"], other, created.session_id, audio))
    nobody = asyncio.run(_every_rpc(stack["target"], other, "sess_nobody", audio))
    assert _codes(theirs) == {"GetSession": "NOT_FOUND", "DeleteSession": "NOT_FOUND", "Respond": "NOT_FOUND",
                              "Converse": "OK"}
    for name in ("GetSession", "DeleteSession", "Respond"):  # as if it did not exist: the same answer
        assert theirs[name].details() == nobody[name].details().replace("sess_nobody", created.session_id), name

    # the owner still has it (DeleteSession by the other tenant removed nothing)
    async def get(api_key=None):
        async with grpc.aio.insecure_channel(stack["target"]) as ch:
            return await funchat_stub(ch, api_key).GetSession(pb.GetSessionRequest(session_id=created.session_id))
    assert asyncio.run(get()).session_id == created.session_id

    # the resume token is the dev tenant's: refused to the other one, honoured for its owner
    err, events = asyncio.run(_fatal(stack["target"], pb.ClientEvent(session=config(resume_token=created.resume_token)),
                                     other))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "resume token" in err.details(), err.details()
    assert kinds(events) == ["error"]

    async def resume():
        caller = await Caller(stack["target"]).start(pb.ClientEvent(session=config(resume_token=created.resume_token)))
        again = (await caller.until("session_created"))[-1].session_created
        await caller.close()
        return again
    again = asyncio.run(resume())
    assert again.resumed and again.session_id == created.session_id


def test_no_key_secret_is_in_any_log(stack):
    """Last in this module: every key it made (sent, wrong, revoked, another tenant's) has been used."""
    secrets = [key.rsplit("_", 1)[1].encode() for key in stack["keys"]]
    logs = [p for folder in (stack["run_dir"], stack["cluster"].run_dir) for p in folder.rglob("*")
            if p.is_file() and p.name != "api_keys"]
    assert any(p.name == "orchestrator.log" for p in logs)
    for path in logs:
        data = path.read_bytes()
        for secret in secrets:
            assert secret not in data, f"an API key's secret is in {path}"


def test_a_telephony_reply_in_g711_pcmu_at_8_khz_equals_the_oracle_resampled(stack, tiny_pipeline, tiny_checkpoint,
                                                                             speech):
    """output_audio_format PCMU at 8 kHz, through Converse and Respond: the tokens are the oracle's,
    the reply comes in `audio` (μ-law, one byte a sample) and decodes to the oracle's 24 kHz audio
    resampled to 8 kHz, within G.711's quantisation; the session record keeps the format."""
    import soxr

    from funchat.client import collect_reply, decode_audio
    from funchat.orchestrator.audio_output import ENCODERS, OutputFormat
    from funchat.orchestrator.call_config import CallConfig

    a = pcm16_samples(speech[:48000])
    cfg = config()
    cfg.output_audio_format.CopyFrom(pb.AudioFormat(encoding=pb.AUDIO_ENCODING_PCMU, sample_rate_hz=8000))

    async def main():
        caller = await Caller(stack["target"]).start(pb.ClientEvent(session=cfg))
        created = (await caller.until("session_created"))[-1].session_created
        for k in range(0, len(a), 8000):
            await caller.send(pb.ClientEvent(audio=pb.InputAudioAppend(audio=pcm16_bytes(a[k:k + 8000]))))
        await caller.send(pb.ClientEvent(commit=pb.InputAudioCommit()))
        events = await caller.until("response_done")
        await caller.close()
        async with grpc.aio.insecure_channel(stack["target"]) as ch:
            unary = [e async for e in funchat_stub(ch).Respond(pb.RespondRequest(config=cfg, audio=pcm16_bytes(a)))]
        return created, events, unary

    created, events, unary = asyncio.run(main())
    ref = tiny_pipeline.respond(a, gen=GenerationConfig.greedy(Mode.S2S, MAX_NEW))
    expected = soxr.resample(np.clip(oracle_audio(tiny_checkpoint, ref.vocoder_tokens), -1, 1), 24000, 8000,
                             quality="HQ")
    assert len(expected) == 320 * len(ref.vocoder_tokens) > 0  # 40 ms a code at 8 kHz
    for evs in (events, unary):
        chunks = [e.audio_delta for e in evs if e.WhichOneof("event") == "audio_delta"]
        assert chunks and all(not c.pcm16 and c.encoding == pb.AUDIO_ENCODING_PCMU and c.sample_rate_hz == 8000
                              for c in chunks)
        heard = np.cumsum([0] + [len(c.audio) for c in chunks])[:-1]
        assert [c.start_ms for c in chunks] == [int(n) * 1000 // 8000 for n in heard]  # ms, at 8 kHz
        reply = collect_reply(evs)
        assert reply.text_tokens == ref.text_tokens and reply.speech_tokens == ref.speech_tokens
        assert reply.vocoder_tokens == ref.vocoder_tokens and reply.text == ref.text
        assert reply.sample_rate == 8000 and len(reply.audio) == len(expected)
        assert np.array_equal(reply.audio, decode_audio(b"".join(c.audio for c in chunks), "pcmu"))
        err = reply.audio - expected
        # G.711 is lossy: each sample within μ-law's half step at its level ((|v| + 132) / 32 in 16-bit
        # units), plus 8 units for the services' float noise and PCM16 rounding (measured: 3.6); the
        # tiny model speaks quietly (peak ~0.02), so the bound is relative, not μ-law's top step
        assert np.all(np.abs(err) * 32768 <= (np.abs(expected) * 32768 + 132) / 32 + 8)
        assert 10 * np.log10(np.sum(expected ** 2) / np.sum(err ** 2)) > 25  # measured: 33 dB
        # and nearly every byte is the oracle's audio resampled and μ-law encoded as the server does
        # (measured: 99.9%; a byte differs where float noise crosses a quantisation level)
        same = np.frombuffer(ENCODERS["pcmu"](expected.astype(np.float32)), np.uint8) == \
            np.frombuffer(b"".join(c.audio for c in chunks), np.uint8)
        assert same.mean() > 0.99
        assert reply.audio_ms == len(ref.vocoder_tokens) * 40  # ms as before, whatever the format

    r = redis.Redis.from_url(stack["redis"].url)
    stored = json.loads(r.get(f"funchat:session:{created.session_id}"))["config"]
    assert CallConfig(**stored).output_format == OutputFormat("pcmu", 8000)
