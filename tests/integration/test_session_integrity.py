"""Session integrity end to end: a real redis-server, four real tritonservers, the Ray Serve
orchestrator (its own process, as `make up` runs it) and gRPC on 127.0.0.1.

- one turn at a time per session: a Respond, or a second call resumed with the token, during a live
  Converse turn gets ABORTED; the live turn completes and the session is as it left it;
- each response_done carries a fresh resume token, which the client keeps and which resumes the
  session; a token older than FUNCHAT_RESUME_TOKEN_TTL_S is refused, saying so;
- a session holding speech encoded by another model is refused with FAILED_PRECONDITION;
- a history longer than the context is trimmed on write, and every prompt stays the one the whole
  history gives (the oracle's);
- with the llm service down, the caller's turn is kept in the history (and the lease freed at
  once), and once it is back the next turn is answered with it, as the oracle does.

The store-level parts (leases, trimming, the audio's dtype and model) are in test_sessions.py.
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
from funchat.client import AsyncClient, FunchatClientError, authed_stub, session_config
from funchat.dev.redis_server import start_redis
from funchat.dev.stack import start_orchestrator
from funchat.dev.tritonserver import free_port, stop_pids
from funchat.oracle.generation import GenerationConfig
from funchat.orchestrator.sessions import HistoryTurn, SessionStore
from funchat.turn.schedule import Mode
from tests.integration.pcm import pcm16_bytes, pcm16_samples

MAX_NEW = 24
SECRET = "test-secret-" + "1" * 20
TOKEN_TTL_S = 6  # short, so that a token really expires within the test


@pytest.fixture(scope="module")
def stack(tiny_checkpoint, tmp_path_factory, make_api_key, model_services):
    run_dir = tmp_path_factory.mktemp("integrity")
    keys_file, key = make_api_key(run_dir, "dev")
    redis_server = start_redis(run_dir)
    cluster = model_services  # shared (tests/integration/conftest.py); a test here restarts its llm
    env = {"FUNCHAT_CHECKPOINT": str(tiny_checkpoint), "FUNCHAT_REDIS_URL": redis_server.url,
           "FUNCHAT_RESUME_SECRET": SECRET, "FUNCHAT_ENDPOINTS": json.dumps(cluster.endpoints),
           "FUNCHAT_MAX_NEW_TOKENS": "512", "FUNCHAT_AUTH": "api_keys", "FUNCHAT_API_KEYS_FILE": str(keys_file),
           "FUNCHAT_RESUME_TOKEN_TTL_S": str(TOKEN_TTL_S)}
    port = free_port()
    orch = None
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("FUNCHAT_API_KEY", key)  # the clients'
            orch = start_orchestrator(run_dir, env, port, timeout=180)
            yield {"redis": redis_server, "cluster": cluster, "target": f"127.0.0.1:{port}", "orch": orch}
    finally:
        if orch is not None:
            orch.stop()
        redis_server.stop()


def config(max_new: int = MAX_NEW, resume_token: str = "", instructions: str = "", mode: str = "s2s"
           ) -> pb.SessionConfig:
    return session_config(mode=mode, turn_detection="manual", greedy=True, seed=0, max_new_tokens=max_new,
                          resume_token=resume_token, instructions=instructions)


def kinds(events) -> list[str]:
    return [e.WhichOneof("event") for e in events]


async def respond(target: str, audio: np.ndarray, session_id: str = "", instructions: str = ""):
    """-> (the Respond's events, its error status or None)."""
    events = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = authed_stub(pb_grpc.FunchatStub(channel), None)
        try:
            async for event in stub.Respond(pb.RespondRequest(config=config(instructions=instructions),
                                                              audio=pcm16_bytes(audio), session_id=session_id)):
                events.append(event)
        except grpc.aio.AioRpcError as exc:
            return events, exc
    return events, None


def done_of(events) -> pb.ResponseDone:
    return [e.response_done for e in events if e.WhichOneof("event") == "response_done"][-1]


def test_a_second_turn_during_a_live_turn_is_aborted_and_the_live_turn_completes(stack, speech):
    a, b = pcm16_samples(speech[:48000]), pcm16_samples(speech[48000:80000])

    async def main():
        async with AsyncClient(stack["target"]) as client:
            # a long text reply (no vocoder: its work would only slow a loaded machine down)
            call = client.converse(config(max_new=300, instructions="Be brief.", mode="s2t"))
            created = await call.start()
            await call.send_audio(a)
            await call.commit()
            async for event in call.events():  # the reply is being generated: its turn holds the session
                if event.WhichOneof("event") == "text_delta":
                    break
            respond_events, respond_err = await respond(stack["target"], b, session_id=created.session_id,
                                                        instructions="Answer at length.")
            second = client.converse(config(resume_token=created.resume_token))
            with pytest.raises(FunchatClientError) as resume_err:
                await second.start()
            reply = await call.next_reply()
            await call.close()
            session = await client.get_session(created.session_id)
            after_events, after_err = await respond(stack["target"], b, session_id=created.session_id)
            return respond_events, respond_err, resume_err.value, reply, session, after_events, after_err

    respond_events, respond_err, resume_err, reply, session, after_events, after_err = asyncio.run(main())
    # the second writers: refused, saying why, before any model work
    assert respond_err is not None and respond_err.code() == grpc.StatusCode.ABORTED
    assert "another turn of this session is in progress" in respond_err.details()
    assert kinds(respond_events) == ["error"]
    assert resume_err.code == "ABORTED" and "another turn of this session is in progress" in resume_err.message
    # the first turn: whole, stored, the session's config untouched by the refused calls
    assert reply.status == "completed" and reply.text, reply.errors
    assert [t.role for t in session.turns] == ["user", "assistant"] and session.turns[1].text == reply.text
    assert session.instructions == "Be brief." and session.state == "listening"
    # the lease was released with the turn: the session takes the next one
    assert after_err is None and done_of(after_events).status == "completed"


def test_response_done_carries_a_fresh_resume_token_and_an_old_one_expires(stack, speech):
    a = pcm16_samples(speech[:32000])

    async def main():
        async with AsyncClient(stack["target"]) as client:
            async with client.converse(config()) as call:
                first, t_first = call.resume_token, time.time()
                await asyncio.sleep(1.2)  # a token names the second it was issued in
                await call.send_audio(a)
                await call.commit()
                reply = await call.next_reply()
            fresh = call.resume_token
            async with client.converse(config(resume_token=fresh)) as resumed:
                resumed_session = resumed.session
            await asyncio.sleep(max(0.0, int(t_first) + TOKEN_TTL_S + 1.2 - time.time()))
            with pytest.raises(FunchatClientError) as expired:
                await client.converse(config(resume_token=first)).start()
            return call.session, first, reply, fresh, resumed_session, expired.value

    session, first, reply, fresh, resumed, expired = asyncio.run(main())
    assert first == session.resume_token and reply.status == "completed"
    done = [e.response_done for e in reply.events if e.WhichOneof("event") == "response_done"][0]
    assert fresh == done.resume_token and fresh != first  # the client kept the newest token
    assert int(fresh.split(".")[2]) > int(first.split(".")[2])
    assert resumed.session_id == session.session_id and resumed.resumed and resumed.turns == 2
    assert expired.code == "NOT_FOUND"
    assert "expired" in expired.message and f"tokens last {TOKEN_TTL_S} s" in expired.message
    assert "newest" in expired.message


def test_a_session_holding_another_models_speech_is_refused(stack, speech):
    a = pcm16_samples(speech[:32000])
    events, err = asyncio.run(respond(stack["target"], a))
    assert err is None
    sid = events[0].session_created.session_id
    r = redis.Redis.from_url(stack["redis"].url)
    key = f"funchat:session:{sid}:turns"
    user = json.loads(r.lindex(key, 0))
    assert user["audio"]["model"].startswith("sha256:")  # recorded with the rows
    user["audio"]["model"] = "sha256:0000000000000000"  # as if an older model had encoded it
    r.lset(key, 0, json.dumps(user))

    events, err = asyncio.run(respond(stack["target"], a, session_id=sid))
    assert err is not None and err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "another model (sha256:0000000000000000" in err.details() and "start a new session" in err.details()
    assert done_of(events).status == "failed" and r.llen(key) == 2  # nothing more stored


def test_a_long_history_is_trimmed_on_write_and_every_prompt_stays_the_oracles(stack, tiny_pipeline, speech):
    a, b, c = pcm16_samples(speech[:32000]), pcm16_samples(speech[32000:64000]), pcm16_samples(speech[64000:96000])
    gen = GenerationConfig.greedy(Mode.S2S, MAX_NEW)
    first, err = asyncio.run(respond(stack["target"], a))
    assert err is None
    sid, reply_a = first[0].session_created.session_id, done_of(first).text
    filler = []  # a long conversation, well past the 2048-position context
    for i in range(60):
        filler += [HistoryTurn(role="user", text=f"question {i}: " + "tell me more " * 4),
                   HistoryTurn(role="assistant", text=f"answer {i}: " + "here is more " * 6)]

    async def seed():
        async with SessionStore(stack["redis"].url, secret=SECRET, ttl_s=3600) as store:
            await store.append_turns(sid, filler)
    asyncio.run(seed())
    second, err_b = asyncio.run(respond(stack["target"], b, session_id=sid))
    third, err_c = asyncio.run(respond(stack["target"], c, session_id=sid))
    assert err_b is None and err_c is None

    history = [{"role": "user", "content": a}, {"role": "assistant", "content": reply_a}] + \
        [{"role": t.role, "content": t.text} for t in filler]
    ref_b = tiny_pipeline.respond(b, history=history, gen=gen)
    history += [{"role": "user", "content": b}, {"role": "assistant", "content": ref_b.text}]
    ref_c = tiny_pipeline.respond(c, history=history, gen=gen)
    for got, ref in ((done_of(second), ref_b), (done_of(third), ref_c)):
        assert list(got.text_tokens) == ref.text_tokens and got.usage.input_tokens == ref.prompt_tokens
    r = redis.Redis.from_url(stack["redis"].url)
    meta = json.loads(r.get(f"funchat:session:{sid}"))
    stored = r.llen(f"funchat:session:{sid}:turns")
    # trimmed (c's prompt came from the trimmed history, and is the oracle's all the same), nothing lost
    # but the oldest turns
    assert meta["dropped"] > 0 and meta["dropped"] + stored == len(history) + 2  # + c and its reply
    assert json.loads(r.lindex(f"funchat:session:{sid}:turns", -2))["audio"] is not None  # c's speech


def answered_again(target: str, audio: np.ndarray, timeout: float = 120.0) -> None:
    """Wait until the orchestrator reaches the restarted server again (its channel may be backing off
    from the failed connections), with turns of throwaway sessions."""
    deadline = time.monotonic() + timeout
    while (err := asyncio.run(respond(target, audio))[1]) is not None:
        assert time.monotonic() < deadline, f"not answered {timeout:g} s after the restart: {err.details()}"
        time.sleep(1.0)


def test_with_the_llm_down_the_callers_turn_is_kept_and_answered_later(stack, tiny_pipeline, speech):
    """Generation fails (the llm server is stopped): the caller hears UNAVAILABLE saying its turn is
    kept, and a next turn right away is refused the same way (not ABORTED: the failed turn freed the
    session). Once the llm is back, the next turn is answered with both kept turns in its history,
    exactly as the oracle answers it."""
    a, b, c = pcm16_samples(speech[:32000]), pcm16_samples(speech[32000:64000]), pcm16_samples(speech[64000:96000])
    cluster = stack["cluster"]
    stop_pids([cluster.servers["llm"].pid])
    try:
        first, first_err = asyncio.run(respond(stack["target"], a))
        sid = first[0].session_created.session_id
        second, second_err = asyncio.run(respond(stack["target"], b, session_id=sid))

        async def get():
            async with AsyncClient(stack["target"]) as client:
                return await client.get_session(sid)
        kept = asyncio.run(get())
    finally:
        cluster.restart("llm", timeout=120)
    answered_again(stack["target"], pcm16_samples(speech[:16000]))
    third, third_err = asyncio.run(respond(stack["target"], c, session_id=sid))

    for events, err in ((first, first_err), (second, second_err)):
        assert err is not None and err.code() == grpc.StatusCode.UNAVAILABLE, err
        assert "your turn is kept in the session's history" in err.details()
        done = done_of(events)
        assert done.status == "failed" and done.resume_token.startswith(f"v2.{sid}.")
    assert [t.role for t in kept.turns] == ["user", "user"] and kept.state == "listening"
    assert kept.turns[0].audio_ms == len(a) * 1000 // 16000
    assert third_err is None and done_of(third).status == "completed"
    history = [{"role": "user", "content": a}, {"role": "user", "content": b}]
    ref = tiny_pipeline.respond(c, history=history, gen=GenerationConfig.greedy(Mode.S2S, MAX_NEW))
    assert list(done_of(third).text_tokens) == ref.text_tokens
    assert done_of(third).usage.input_tokens == ref.prompt_tokens
