"""The public API end to end: a real redis-server, four real tritonservers, the Ray Serve orchestrator
(its own process, as `make up` runs it) and gRPC on 127.0.0.1.

Every exactness check compares with the in-process oracle (`ReferencePipeline`) under greedy
decoding: the same text and speech tokens, and audio within float tolerance of the oracle's tokens
run through the vocoder in process.
"""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import numpy as np
import pytest
import redis

from funchat.api import pb, pb_grpc
from funchat.audio_io import load_audio
from funchat.generation import GenerationConfig
from funchat.orchestrator.redis_server import start_redis
from funchat.orchestrator.stack import start_orchestrator
from funchat.orchestrator.vad import SpeechStopped, TurnDetector
from funchat.schedule import Mode
from funchat.serving.tritonserver import free_port, start_servers
from funchat.vocoder.checkpoint import load_vocoder, pick_speaker

MAX_NEW = 24
SECRET = "test-secret-" + "0" * 20


@pytest.fixture(scope="module")
def stack(tiny_checkpoint, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("stack")
    redis_server = start_redis(run_dir)
    cluster = start_servers(params={"*": {"checkpoint": str(tiny_checkpoint), "threads": "1"},
                                    "llm": {"idle_timeout_s": "30"}}, run_dir=run_dir / "triton", timeout=180)
    env = {"FUNCHAT_CHECKPOINT": str(tiny_checkpoint), "FUNCHAT_REDIS_URL": redis_server.url,
           "FUNCHAT_RESUME_SECRET": SECRET, "FUNCHAT_ENDPOINTS": json.dumps(cluster.endpoints),
           "FUNCHAT_MAX_CALLS": "6", "FUNCHAT_MAX_NEW_TOKENS": "512", "FUNCHAT_RUN_DIR": str(run_dir)}
    port = free_port()
    state = {"redis": redis_server, "cluster": cluster, "env": env, "run_dir": run_dir, "port": port,
             "target": f"127.0.0.1:{port}", "orch": None}
    try:
        state["orch"] = start_orchestrator(run_dir, env, port, timeout=180)
        yield state
    finally:
        if state["orch"] is not None:  # the current one: a test may have restarted it
            state["orch"].stop()
        cluster.stop()
        redis_server.stop()


@pytest.fixture(scope="module")
def speech(example_wav):
    return load_audio(example_wav)


def pcm16_bytes(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 1) * 32767.0).round().astype("<i2").tobytes()


def pcm16_samples(samples: np.ndarray) -> np.ndarray:
    """What the server decodes from our PCM16 bytes (the oracle must see the same samples)."""
    return np.frombuffer(pcm16_bytes(samples), dtype="<i2").astype(np.float32) / 32768.0


def config(manual=True, greedy=True, seed=0, max_new=MAX_NEW, resume_token="", mode=pb.MODE_SPEECH_TO_SPEECH,
           **kw) -> pb.SessionConfig:
    # 800 ms of silence ends a turn: the recording has a ~500 ms pause inside its first sentence
    td = pb.TurnDetection(manual=pb.ManualTurns()) if manual else \
        pb.TurnDetection(server_vad=pb.ServerVad(silence_duration_ms=800))
    return pb.SessionConfig(mode=mode, turn_detection=td, resume_token=resume_token,
                            generation=pb.Generation(greedy=greedy, seed=seed, max_new_tokens=max_new), **kw)


class Caller:
    """A scripted Converse client: send events whenever, read server events as they come."""

    def __init__(self, target: str):
        self.channel = grpc.aio.insecure_channel(target)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.call = None
        self.events: list[pb.ServerEvent] = []

    async def start(self, first: pb.ClientEvent) -> "Caller":
        async def requests():
            while True:
                item = await self.queue.get()
                if item is None:
                    return
                yield item
        self.call = pb_grpc.FunchatStub(self.channel).Converse(requests())
        await self.send(first)
        return self

    async def send(self, event: pb.ClientEvent | None) -> None:
        await self.queue.put(event)

    async def next(self, timeout: float = 60.0) -> pb.ServerEvent | None:
        event = await asyncio.wait_for(self.call.read(), timeout)
        if event is grpc.aio.EOF:
            return None
        self.events.append(event)
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

    # the session in Redis holds both exchanges as the model saw them
    r = redis.Redis.from_url(stack["redis"].url)
    keys = {k.decode() for k in r.keys(f"funchat:session:{created.session_id}*")}
    assert f"funchat:session:{created.session_id}" in keys
    assert all(r.ttl(k) > 0 for k in keys)

    async def get():
        async with grpc.aio.insecure_channel(stack["target"]) as ch:
            return await pb_grpc.FunchatStub(ch).GetSession(pb.GetSessionRequest(session_id=created.session_id))
    session = asyncio.run(get())
    assert [t.role for t in session.turns] == ["user", "assistant", "user", "assistant"]
    assert session.turns[1].text == ref1.text and session.turns[3].text == ref2.text
    assert session.turns[0].audio_ms == len(a) * 1000 // 16000
    assert session.state == "listening"


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
        t0 = time.monotonic()
        for chunk in np.array_split(np.concatenate([barge, silence]), 20):  # the caller talks over the reply
            await caller.send(pb.ClientEvent(audio=pb.InputAudioAppend(audio=pcm16_bytes(chunk))))
        upto_interrupt = await caller.until("interrupted")
        t_cancel = time.monotonic() - t0
        after = await caller.until("response_done")  # the interrupted reply's done event
        second = await caller.until("response_done")  # the answer to the barge-in
        await caller.close()
        return created, response_id, first + upto_interrupt, after, second, t_cancel

    created, rid, before, after, second, t_cancel = asyncio.run(main())
    interrupted = [e.interrupted for e in before if e.WhichOneof("event") == "interrupted"][0]
    assert interrupted.response_id == rid and interrupted.audio_end_ms == 440
    done = [e.response_done for e in after if e.WhichOneof("event") == "response_done"][0]
    assert done.response_id == rid and done.status == "interrupted"
    assert not [e for e in after + second if e.WhichOneof("event") == "audio_delta" and e.audio_delta.response_id == rid]
    assert len(done.speech_tokens) < 400 * 5  # generation stopped early
    assert t_cancel < 5.0  # speech detected and generation stopped (timing reported by bench-e2e, not asserted)

    async def get():
        async with grpc.aio.insecure_channel(stack["target"]) as ch:
            return await pb_grpc.FunchatStub(ch).GetSession(pb.GetSessionRequest(session_id=created.session_id))
    session = asyncio.run(get())
    assert [t.role for t in session.turns] == ["user", "assistant", "user", "assistant"]
    assert session.turns[1].truncated and session.turns[1].text == interrupted.kept_text
    assert len(interrupted.kept_text) < len(done.text) or done.text == ""


def test_respond_unary_multi_turn_and_session_calls(stack, tiny_pipeline, speech):
    a, b = pcm16_samples(speech[:32000]), pcm16_samples(speech[32000:64000])
    cfg = config()

    async def main():
        async with grpc.aio.insecure_channel(stack["target"]) as ch:
            stub = pb_grpc.FunchatStub(ch)
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
            stub = pb_grpc.FunchatStub(ch)
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
