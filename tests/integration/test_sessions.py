"""The session store against a real redis-server (started once for this module on a free port).

No pytest-asyncio: each test runs its coroutine with asyncio.run, and each asyncio.run makes its own
SessionStore (a redis.asyncio client belongs to the event loop it first ran on).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import numpy as np
import pytest
import redis

from funchat.dev.redis_server import start_redis
from funchat.orchestrator.sessions import (ExpiredResumeToken, HistoryTurn, InvalidResumeToken, SessionNotFound,
                                           SessionStore, StoreUnavailable)
from funchat.dev.tritonserver import free_port

SECRET = "test-secret-" + "0" * 20
TTL_S = 3600
CONFIG = {"mode": "s2s", "instructions": "Be brief.", "voice": "alice", "tools": [],
          "generation": {"greedy": True, "seed": 0}, "turn_detection": {"manual": True},
          "input_audio_format": {"encoding": "pcm16", "sample_rate_hz": 16000}}


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def plain(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def run_with_store(url: str, body, **kwargs):
    """asyncio.run(body(store)) with a store made (and closed) inside that event loop."""
    async def main():
        async with SessionStore(url, **{"secret": SECRET, "ttl_s": TTL_S, **kwargs}) as store:
            return await body(store)
    return asyncio.run(main())


def rows(seed: int, n: int = 7, e: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, e)).astype(np.float32)


def test_create_get_round_trip(redis_server):
    async def body(store):
        created = await store.create(CONFIG)
        got = await store.get(created.session_id)
        return created, got, await store.exists(created.session_id), await store.exists("nope")

    created, got, exists, missing = run_with_store(redis_server.url, body)
    assert len(created.session_id) == 32 and created.turns == [] and created.state == "idle"
    assert got.session_id == created.session_id and got.created_at == created.created_at
    assert got.config == CONFIG and got.turns == [] and got.state == "idle"
    assert got.active is None and got.owner is None
    assert 3590 < got.expires_in_s <= 3600
    assert exists and not missing


def test_turns_with_audio_round_trip_bit_exact(redis_server):
    user_rows = rows(0)
    user_rows[0, :3] = [np.nan, -0.0, np.float32(1e-45)]  # NaN, negative zero, a denormal: bytes must survive
    user = HistoryTurn(role="user", audio_rows=user_rows, n_groups=7, audio_ms=560)
    assistant = HistoryTurn(role="assistant", text="Hello there, how can I help?", response_id="resp_1",
                            tool_calls=[{"name": "weather", "arguments": "{\"city\": \"Oslo\"}"}])

    async def body(store):
        sid = (await store.create(CONFIG, session_id="call-A_1")).session_id
        n = await store.append_turns(sid, [user, assistant])
        n2 = await store.append_turns(sid, [HistoryTurn(role="tool", text="12 C")])
        return n, n2, await store.get(sid)

    n, n2, got = run_with_store(redis_server.url, body)
    assert (n, n2) == (2, 3) and got.session_id == "call-A_1"
    u, a, t = got.turns
    assert u.audio_rows.dtype == np.float32 and u.audio_rows.shape == (7, 64)
    assert u.audio_rows.tobytes() == user_rows.tobytes()
    assert u.audio_rows.flags.writeable
    assert (u.role, u.text, u.n_groups, u.audio_ms, u.truncated, u.tool_calls, u.response_id) == \
        ("user", None, 7, 560, False, None, None)
    assert (a.role, a.text, a.audio_rows, a.truncated, a.tool_calls, a.response_id) == \
        ("assistant", assistant.text, None, False, assistant.tool_calls, "resp_1")
    assert (t.role, t.text, t.audio_rows) == ("tool", "12 C", None)


def test_update_turn_cuts_the_last_assistant_turn(redis_server):
    async def body(store):
        sid = (await store.create(CONFIG)).session_id
        await store.append_turns(sid, [HistoryTurn(role="user", audio_rows=rows(1), n_groups=7),
                                       HistoryTurn(role="assistant", text="one two three four", response_id="r1")])
        await store.update_turn(sid, -1, HistoryTurn(role="assistant", text="one two", truncated=True,
                                                     response_id="r1"))
        with pytest.raises(IndexError):
            await store.update_turn(sid, 2, HistoryTurn(role="assistant", text="x"))
        with pytest.raises(SessionNotFound):
            await store.update_turn("gone", -1, HistoryTurn(role="assistant", text="x"))
        return await store.get(sid)

    got = run_with_store(redis_server.url, body)
    assert len(got.turns) == 2 and got.turns[0].audio_rows.tobytes() == rows(1).tobytes()
    cut = got.turns[1]
    assert (cut.text, cut.truncated, cut.response_id) == ("one two", True, "r1")


def test_state_active_owner_and_config(redis_server):
    active = {"response_id": "r9", "llm": "127.0.0.1:1", "refined_head": "127.0.0.1:2", "correlation_id": "c",
              "replica": "orch-1", "started_at": 1.5}

    async def body(store):
        sid = (await store.create(CONFIG)).session_id
        await store.set_state(sid, "responding", active=active, owner="orch-1")
        during = await store.get(sid)
        await store.set_state(sid, "listening", active=None, owner="orch-2")
        await store.update_config(sid, {**CONFIG, "voice": "bob"})
        after = await store.get(sid)
        with pytest.raises(ValueError):
            await store.set_state(sid, "dancing")
        return during, after

    during, after = run_with_store(redis_server.url, body)
    assert (during.state, during.active, during.owner) == ("responding", active, "orch-1")
    assert (after.state, after.active, after.owner) == ("listening", None, "orch-2")
    assert after.config["voice"] == "bob" and after.config["mode"] == "s2s"


def test_keys_in_redis_follow_the_documented_layout(redis_server, plain):
    user_rows = rows(2)

    async def body(store):
        sid = (await store.create(CONFIG)).session_id
        await store.append_turns(sid, [HistoryTurn(role="user", audio_rows=user_rows, n_groups=7),
                                       HistoryTurn(role="assistant", text="hi"),
                                       HistoryTurn(role="user", audio_rows=rows(3, n=3), n_groups=3)])
        return sid

    sid = run_with_store(redis_server.url, body)
    base = f"funchat:session:{sid}"
    keys = sorted(k.decode() for k in plain.keys(f"{base}*"))
    assert keys == sorted([base, f"{base}:turns", f"{base}:audio:0", f"{base}:audio:2"])
    assert all(0 < plain.ttl(k) <= 3600 for k in keys)
    assert plain.type(base) == b"string" and plain.type(f"{base}:turns") == b"list"
    meta = json.loads(plain.get(base))
    assert meta["session_id"] == sid and meta["config"] == CONFIG and meta["state"] == "idle"
    turn0 = json.loads(plain.lindex(f"{base}:turns", 0))
    assert turn0["audio"] == {"shape": [7, 64], "dtype": "<f4"} and turn0["role"] == "user"
    assert plain.get(f"{base}:audio:0") == user_rows.astype("<f4").tobytes()
    assert plain.strlen(f"{base}:audio:2") == 3 * 64 * 4


def test_sliding_expiry_then_gone(redis_server, plain):
    async def create(store):
        sid = (await store.create(CONFIG)).session_id
        await store.append_turns(sid, [HistoryTurn(role="user", audio_rows=rows(4), n_groups=7),
                                       HistoryTurn(role="assistant", text="ok")])
        return sid, store.issue_resume_token(sid)

    sid, token = run_with_store(redis_server.url, create, ttl_s=1)
    base = f"funchat:session:{sid}"
    time.sleep(0.7)
    run_with_store(redis_server.url, lambda store: store.touch(sid), ttl_s=1)  # 1 s more from now
    time.sleep(0.7)  # 1.4 s after the last append: alive only because touch slid the expiry
    assert len(plain.keys(f"{base}*")) == 3
    time.sleep(1.5)

    async def after(store):
        with pytest.raises(SessionNotFound) as not_found:
            await store.get(sid)
        with pytest.raises(SessionNotFound):
            await store.append_turns(sid, [HistoryTurn(role="user", text="late")])
        with pytest.raises(ExpiredResumeToken) as expired:
            await store.verify_resume_token(token)  # the token itself is 2.9 s old but valid for an hour here
        return not_found.value, expired.value

    not_found, expired = run_with_store(redis_server.url, after)
    assert sid in str(not_found) and "expired" in str(expired)
    assert plain.keys(f"{base}*") == []


def test_resume_tokens(redis_server):
    async def body(store):
        sid = (await store.create(CONFIG)).session_id
        token = store.issue_resume_token(sid)
        results = {"ok": await store.verify_resume_token(token)}
        v, tid, issued, mac = token.split(".")
        forged_mac = mac[:-2] + ("AA" if mac[-2:] != "AA" else "BB")
        other = SessionStore(redis_server.url, secret="another-secret", ttl_s=TTL_S)
        bad = {"tampered mac": f"{v}.{tid}.{issued}.{forged_mac}",
               "other session": f"{v}.{'0' * 32}.{issued}.{mac}",
               "other time": f"{v}.{tid}.{int(issued) - 1}.{mac}",
               "other secret": other.issue_resume_token(sid),
               "empty": "", "garbage": "not-a-token", "v1": f"v1.{tid}.{issued}.{mac}",
               "extra part": token + ".x", "bad time": f"{v}.{tid}.12x.{mac}"}
        for name, t in bad.items():
            try:
                await store.verify_resume_token(t)
                results[name] = "accepted"
            except InvalidResumeToken as exc:
                results[name] = str(exc)
        old = store.issue_resume_token(sid, issued_at=int(time.time()) - 3601)
        with pytest.raises(ExpiredResumeToken) as too_old:
            await store.verify_resume_token(old)
        results["too old"] = str(too_old.value)
        return sid, results

    sid, results = run_with_store(redis_server.url, body)
    assert results.pop("ok") == sid
    assert "expired" in results.pop("too old")
    for name in ("tampered mac", "other session", "other time", "other secret"):
        assert "forged" in results[name], (name, results[name])
    for name in ("empty", "garbage", "v1", "extra part", "bad time"):
        assert "malformed" in results[name], (name, results[name])


def test_a_session_is_its_tenants_alone(redis_server):
    """Another tenant's session is not found (get, delete), and a resume token works only for the
    tenant it was issued to; the owner still has everything."""
    async def body(store):
        sid = (await store.create(CONFIG, tenant="acme")).session_id
        await store.append_turns(sid, [HistoryTurn(role="user", text="hello")])
        token = store.issue_resume_token(sid, tenant="acme")
        refused = {}
        for name, call in (("get", lambda: store.get(sid, tenant="other")),
                           ("get, no tenant", lambda: store.get(sid, tenant="")),
                           ("token", lambda: store.verify_resume_token(token, tenant="other"))):
            try:
                await call()
                refused[name] = "accepted"
            except (SessionNotFound, InvalidResumeToken) as exc:
                refused[name] = f"{type(exc).__name__}: {exc}"
        deleted_by_other = await store.delete(sid, tenant="other")
        owner = await store.get(sid, tenant="acme")
        return sid, refused, deleted_by_other, owner, await store.verify_resume_token(token, tenant="acme"), \
            await store.delete(sid, tenant="acme")

    sid, refused, deleted_by_other, owner, resumed, deleted = run_with_store(redis_server.url, body)
    assert refused["get"] == refused["get, no tenant"] == \
        f"SessionNotFound: no session {sid!r} (never created, deleted or expired)"  # as if it did not exist
    assert refused["token"].startswith("InvalidResumeToken: forged or altered") and "tenant" in refused["token"]
    assert deleted_by_other is False and owner.tenant == "acme" and [t.text for t in owner.turns] == ["hello"]
    assert resumed == sid and deleted is True


def test_delete(redis_server, plain):
    async def body(store):
        sid = (await store.create(CONFIG)).session_id
        await store.append_turns(sid, [HistoryTurn(role="user", audio_rows=rows(5), n_groups=7)])
        first, second = await store.delete(sid), await store.delete(sid)
        with pytest.raises(SessionNotFound):
            await store.get(sid)
        return sid, first, second, await store.exists(sid)

    sid, first, second, exists = run_with_store(redis_server.url, body)
    assert first is True and second is False and not exists
    assert plain.keys(f"funchat:session:{sid}*") == []


def test_unreachable_redis_is_store_unavailable():
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there

    async def body(store):
        assert await store.ping() is False
        with pytest.raises(StoreUnavailable) as exc:
            await store.create(CONFIG)
        return str(exc.value)

    t0 = time.monotonic()
    message = run_with_store(url, body)
    assert url in message and time.monotonic() - t0 < 5


def test_empty_secret_is_refused(redis_server, monkeypatch):
    for secret in ("", b""):
        with pytest.raises(ValueError, match="FUNCHAT_RESUME_SECRET"):
            SessionStore(redis_server.url, secret=secret, ttl_s=TTL_S)
    # the store takes its key from its caller only, never from the environment
    monkeypatch.setenv("FUNCHAT_RESUME_SECRET", SECRET)
    with pytest.raises(TypeError, match="secret"):
        SessionStore(redis_server.url, ttl_s=TTL_S)


def test_two_replicas_see_the_same_session(redis_server):
    async def body(_):
        async with SessionStore(redis_server.url, secret=SECRET, ttl_s=TTL_S) as a, \
                SessionStore(redis_server.url, secret=SECRET, ttl_s=TTL_S) as b:
            sid = (await a.create(CONFIG)).session_id
            await a.append_turns(sid, [HistoryTurn(role="user", audio_rows=rows(6), n_groups=7)])
            token = a.issue_resume_token(sid)
            assert await b.verify_resume_token(token) == sid  # the caller resumes on replica b
            await b.append_turns(sid, [HistoryTurn(role="assistant", text="from b")])
            await b.set_state(sid, "listening", owner="replica-b")
            # Concurrent appends from both replicas: none lost, each turn whole.
            await asyncio.gather(*(s.append_turns(sid, [HistoryTurn(role="user", text=f"{i}")])
                                   for i, s in enumerate([a, b] * 4)))
            return await a.get(sid)

    got = run_with_store(redis_server.url, body)
    assert got.owner == "replica-b" and got.turns[0].audio_rows.tobytes() == rows(6).tobytes()
    assert got.turns[1].text == "from b"
    assert sorted(t.text for t in got.turns[2:]) == [str(i) for i in range(8)]


def test_sessions_survive_a_killed_redis_with_the_append_only_file(tmp_path):
    """persist=True (`make up`'s default, as the chart's): kill -9 of redis-server, a new one on the
    same directory and port, and the acknowledged session is all there (the AOF is fsynced every
    second: writes older than that survive even a kill)."""
    async def create(store):
        sid = (await store.create(CONFIG, tenant="acme")).session_id
        await store.append_turns(sid, [HistoryTurn(role="user", audio_rows=rows(6), n_groups=7),
                                       HistoryTurn(role="assistant", text="kept")])
        return sid

    server = start_redis(tmp_path, persist=True)
    try:
        sid = run_with_store(server.url, create)
        time.sleep(1.5)  # one appendfsync everysec period, and some
        os.killpg(server.pid, signal.SIGKILL)
        server.stop()
        assert not server.alive()
        server = start_redis(tmp_path, port=server.port, persist=True)
        got = run_with_store(server.url, lambda store: store.get(sid, tenant="acme"))
    finally:
        server.stop()
    assert got.turns[0].audio_rows.tobytes() == rows(6).tobytes() and got.turns[1].text == "kept"
    assert got.tenant == "acme"


def test_redis_server_stop_ends_the_process(tmp_path):
    with start_redis(tmp_path) as server:
        client = redis.Redis.from_url(server.url)
        assert client.ping() and server.alive()
        client.close()
        pid = server.pid
    assert not server.alive()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    server.stop()  # a second stop does nothing


def test_redis_auth_with_the_password_on_its_own(tmp_path):
    """FUNCHAT_REDIS_PASSWORD: the URL without a password plus the password apart (the chart's way)."""
    password = 'p"a\\ss word'
    with start_redis(tmp_path) as server:
        admin = redis.Redis.from_url(server.url)
        admin.config_set("requirepass", password)

        async def create(store):
            return await store.create(CONFIG)

        assert run_with_store(server.url, create, password=password).session_id
        with pytest.raises(StoreUnavailable):  # no password: refused, as an unavailable store
            run_with_store(server.url, create)
        with_password = server.url.replace("redis://", f"redis://:{password}@")
        with pytest.raises(ValueError, match="keep one"):
            SessionStore(with_password, secret=SECRET, ttl_s=TTL_S, password=password)
