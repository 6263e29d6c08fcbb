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
from funchat.orchestrator.sessions import (ExpiredResumeToken, HistoryTurn, InvalidResumeToken, LeaseLost,
                                           SessionBusy, SessionNotFound, SessionStore, StoreUnavailable)
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


def test_delete_turn_keeps_every_later_turns_audio_with_it(redis_server, plain):
    """Audio is keyed by turn number: deleting a turn moves the later turns' audio down with them."""
    async def body(store):
        sid = (await store.create(CONFIG)).session_id
        await store.append_turns(sid, [
            HistoryTurn(role="user", audio_rows=rows(1), n_groups=7, item_id="u1"),
            HistoryTurn(role="assistant", text="one", response_id="r1"),
            HistoryTurn(role="user", text="typed", item_id="u2"),
            HistoryTurn(role="assistant", text="two", response_id="r2"),
            HistoryTurn(role="user", audio_rows=rows(3), n_groups=7, item_id="u3")])
        gone = [await store.delete_turn(sid, name) for name in ("u1", "r2", "nope")]
        return sid, gone, await store.get(sid)

    sid, gone, got = run_with_store(redis_server.url, body)
    assert gone == [True, True, False]
    assert [(t.role, t.text, t.item_id, t.response_id) for t in got.turns] == [
        ("assistant", "one", None, "r1"), ("user", "typed", "u2", None), ("user", None, "u3", None)]
    assert got.turns[2].audio_rows.tobytes() == rows(3).tobytes()
    audio_keys = sorted(k.decode() for k in plain.keys(f"funchat:session:{sid}:audio:*"))
    assert audio_keys == [f"funchat:session:{sid}:audio:2"]  # exactly one, where the last turn now is


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
    assert turn0["audio"] == {"shape": [7, 64], "dtype": "<f4", "model": None} and turn0["role"] == "user"
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


# ---- resume tokens are short-lived ----

def test_a_resume_token_lives_token_ttl_s_not_the_sessions_ttl(redis_server):
    async def body(store):
        sid = (await store.create(CONFIG, tenant="acme")).session_id
        fresh = store.issue_resume_token(sid, tenant="acme")
        stale = store.issue_resume_token(sid, issued_at=int(time.time()) - 61, tenant="acme")
        with pytest.raises(ExpiredResumeToken) as expired:
            await store.verify_resume_token(stale, tenant="acme")  # the session itself lives an hour
        return sid, await store.verify_resume_token(fresh, tenant="acme"), str(expired.value)

    sid, resumed, message = run_with_store(redis_server.url, body, token_ttl_s=60)
    assert resumed == sid
    assert "expired" in message and "tokens last 60 s" in message and "response_done" in message


# ---- leases: one turn at a time per session ----

def test_one_lease_at_a_time_across_replicas(redis_server):
    """Two replicas race for the same session: exactly one holds it; the other gets SessionBusy
    saying why, and so does a call opening the session meanwhile (update_config). The holder's
    writes go through; once released, the other takes it."""
    async def body(_):
        async with SessionStore(redis_server.url, secret=SECRET, ttl_s=TTL_S) as a, \
                SessionStore(redis_server.url, secret=SECRET, ttl_s=TTL_S) as b:
            sid = (await a.create(CONFIG)).session_id
            results = await asyncio.gather(*(s.acquire_lease(sid, 10.0) for s in (a, b, a, b)),
                                           return_exceptions=True)
            leases = [r for r in results if not isinstance(r, Exception)]
            refused = [r for r in results if isinstance(r, Exception)]
            with pytest.raises(SessionBusy) as opening:
                await b.update_config(sid, {**CONFIG, "voice": "bob"})
            holder = a if results.index(leases[0]) % 2 == 0 else b
            await holder.append_turns(sid, [HistoryTurn(role="user", audio_rows=rows(7), n_groups=7)],
                                      lease=leases[0])
            await holder.set_state(sid, "listening", lease=leases[0])
            released = await holder.release_lease(leases[0])
            after = await b.acquire_lease(sid, 10.0)
            await b.release_lease(after)
            await b.update_config(sid, {**CONFIG, "voice": "bob"})  # free again
            return leases, refused, str(opening.value), released, await a.get(sid)

    leases, refused, opening, released, got = run_with_store(redis_server.url, body)
    assert len(leases) == 1 and len(refused) == 3 and all(isinstance(r, SessionBusy) for r in refused)
    assert "another turn of this session is in progress" in str(refused[0])
    assert "another turn of this session is in progress" in opening
    assert released and len(got.turns) == 1 and got.config["voice"] == "bob"


def test_a_lost_lease_writes_nothing(redis_server, plain):
    """A turn whose lease expired cannot write (append, update, state), even after another turn took
    the lease and ended; its renewal and release fail without touching the new holder's lease."""
    async def body(store):
        sid = (await store.create(CONFIG)).session_id
        await store.append_turns(sid, [HistoryTurn(role="assistant", text="before")])
        stale = await store.acquire_lease(sid, 0.2)
        await asyncio.sleep(0.4)  # expired: the turn stalled
        refused = []
        for write in (lambda: store.append_turns(sid, [HistoryTurn(role="user", text="late")], lease=stale),
                      lambda: store.update_turn(sid, -1, HistoryTurn(role="assistant", text="x"), lease=stale),
                      lambda: store.set_state(sid, "responding", lease=stale)):
            with pytest.raises(LeaseLost) as lost:
                await write()
            refused.append(str(lost.value))
        current = await store.acquire_lease(sid, 10.0)  # the next turn
        with pytest.raises(LeaseLost):
            await store.append_turns(sid, [HistoryTurn(role="user", text="late")], lease=stale)
        renewed, released = await store.renew_lease(stale), await store.release_lease(stale)
        holder = plain.get(f"funchat:session:{sid}:lease")
        return current, refused, renewed, released, holder, await store.get(sid)

    current, refused, renewed, released, holder, got = run_with_store(redis_server.url, body)
    assert all("lost its lease" in m and "nothing of the turn was stored" in m for m in refused)
    assert [t.text for t in got.turns] == ["before"] and got.state == "idle"
    assert renewed is False and released is False and holder == current.token.encode()


def test_a_renewed_lease_outlives_its_ttl(redis_server):
    async def body(store):
        sid = (await store.create(CONFIG)).session_id
        lease = await store.acquire_lease(sid, 0.3)
        for _ in range(6):  # 0.6 s in all, twice the lease
            await asyncio.sleep(0.1)
            assert await store.renew_lease(lease)
        await store.append_turns(sid, [HistoryTurn(role="user", text="kept")], lease=lease)
        return await store.get(sid)

    assert [t.text for t in run_with_store(redis_server.url, body).turns] == ["kept"]


# ---- session size: trimming, compact audio, the model that encoded it ----

def test_trimming_drops_the_oldest_turns_and_their_audio(redis_server, plain):
    """append_turns(drop_oldest=k): the k oldest turns and their audio keys go in the same write; the
    audio of the turns kept keeps its key (numbered over the session's life) and its bytes."""
    async def body(store):
        sid = (await store.create(CONFIG)).session_id
        for i in range(3):
            await store.append_turns(sid, [HistoryTurn(role="user", audio_rows=rows(10 + i), n_groups=7),
                                           HistoryTurn(role="assistant", text=f"reply {i}")])
        n = await store.append_turns(sid, [HistoryTurn(role="user", audio_rows=rows(13), n_groups=7),
                                           HistoryTurn(role="assistant", text="reply 3")], drop_oldest=4)
        await store.update_turn(sid, -1, HistoryTurn(role="assistant", text="reply 3, cut", truncated=True))
        return sid, n, await store.get(sid)

    sid, n, got = run_with_store(redis_server.url, body)
    base = f"funchat:session:{sid}"
    assert n == 4 and got.dropped == 4
    assert [t.text for t in got.turns] == [None, "reply 2", None, "reply 3, cut"]
    assert got.turns[0].audio_rows.tobytes() == rows(12).tobytes()
    assert got.turns[2].audio_rows.tobytes() == rows(13).tobytes()
    assert sorted(k.decode() for k in plain.keys(f"{base}*")) == sorted(
        [base, f"{base}:turns", f"{base}:audio:4", f"{base}:audio:6"])
    assert json.loads(plain.get(base))["dropped"] == 4 and json.loads(plain.get(base))["v"] == 2


def test_trimming_keeps_every_prompt_the_same(tiny_checkpoint):
    """What unusable_history says to trim, no prompt could hold: for any mode, persona, tools and
    clip, the prompt built from the trimmed history equals the one built from the whole history."""
    from funchat.turn.prompt import PromptBuilder

    builder = PromptBuilder.from_checkpoint(tiny_checkpoint)
    history = []
    for i in range(40):
        history += [HistoryTurn(role="user", n_groups=5 + i % 7),
                    HistoryTurn(role="assistant", text=f"answer number {i}: " + "words " * (3 + i % 11))]
    k = builder.unusable_history(history)
    assert 0 < k < len(history) and history[k].role == "user"
    assert builder.unusable_history(history[:6]) == 0  # a short history is all usable
    tools = [{"name": "weather", "description": "the weather in a city", "parameters": {"type": "object"}}]
    for mode in ("s2t", "s2s"):
        for persona, tool_list, n_groups in ((None, None, 1), ("Be brief.", None, 40), (None, tools, 3)):
            whole = builder.build(mode, persona, tool_list, history, n_groups, 64)
            trimmed = builder.build(mode, persona, tool_list, history[k:], n_groups, 64)
            assert whole.ids == trimmed.ids and whole.dropped == k + trimmed.dropped
    # the smallest prompt there can be holds the first turn kept: trimming one exchange more would
    # change a prompt
    smallest = builder.build("s2t", None, None, history[k:], 1, 1)
    assert smallest.dropped == 0


@pytest.mark.parametrize("dtype, nbytes", [("float32", 4), ("float16", 2)])
def test_audio_rows_are_stored_with_their_dtype_and_model(redis_server, plain, dtype, nbytes):
    user_rows = rows(20)

    async def body(store):
        sid = (await store.create(CONFIG)).session_id
        await store.append_turns(sid, [HistoryTurn(role="user", audio_rows=user_rows, n_groups=7,
                                                   audio_model="sha256:0123456789abcdef")])
        return sid, await store.get(sid)

    sid, got = run_with_store(redis_server.url, body, audio_dtype=dtype)
    turn = got.turns[0]
    doc = json.loads(plain.lindex(f"funchat:session:{sid}:turns", 0))
    assert doc["audio"] == {"shape": [7, 64], "dtype": "<f4" if dtype == "float32" else "<f2",
                            "model": "sha256:0123456789abcdef"}
    assert plain.strlen(f"funchat:session:{sid}:audio:0") == 7 * 64 * nbytes
    assert turn.audio_model == "sha256:0123456789abcdef" and turn.audio_rows.dtype == np.float32
    assert turn.audio_rows.tobytes() == user_rows.astype(dtype).astype(np.float32).tobytes()
    with pytest.raises(ValueError, match="audio_dtype"):
        SessionStore(redis_server.url, secret=SECRET, ttl_s=TTL_S, audio_dtype="int8")


def test_a_version_1_session_is_read_and_written(redis_server, plain):
    """A session stored before version 2 (no "dropped", audio without a model) reads as version 2
    with nothing dropped and its audio of no known model; appends go to the right keys."""
    sid = "v1-session"
    base = f"funchat:session:{sid}"
    old_rows = rows(30)
    plain.set(base, json.dumps({"v": 1, "session_id": sid, "created_at": 1.0, "config": CONFIG, "state": "idle",
                                "active": None, "owner": None, "tenant": ""}), ex=TTL_S)
    plain.rpush(f"{base}:turns", json.dumps({"role": "user", "text": None, "n_groups": 7, "audio_ms": 560,
                                             "truncated": False, "tool_calls": None, "response_id": None,
                                             "audio": {"shape": [7, 64], "dtype": "<f4"}}))
    plain.set(f"{base}:audio:0", old_rows.tobytes(), ex=TTL_S)

    async def body(store):
        await store.append_turns(sid, [HistoryTurn(role="assistant", text="hi"),
                                       HistoryTurn(role="user", audio_rows=rows(31), n_groups=7, audio_model="m")])
        return await store.get(sid)

    got = run_with_store(redis_server.url, body)
    assert got.dropped == 0 and [t.role for t in got.turns] == ["user", "assistant", "user"]
    assert got.turns[0].audio_rows.tobytes() == old_rows.tobytes() and got.turns[0].audio_model is None
    assert got.turns[2].audio_model == "m" and plain.get(f"{base}:audio:2") == rows(31).tobytes()
