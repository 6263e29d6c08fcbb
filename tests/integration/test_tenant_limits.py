"""Per-tenant limits, retry hints and garbage input, end to end: a real redis-server, the Ray Serve
orchestrator in its own process (as `make up` runs it) and gRPC on 127.0.0.1; and the limiter itself
(`funchat.orchestrator.tenant_limits`) against the same redis-server.

No model service is started: nothing here reaches one. Every call is refused, held open without a
turn or ended before one (the orchestrator connects to the model services on a call's first turn).

The stack: FUNCHAT_MAX_CALLS=4 per replica (one replica), FUNCHAT_TENANT_MAX_CALLS=2 (3 for the
tenant "vip", from the key file), a rate of 2 RPCs/s with a burst of 6, call slots leased for 3 s.
Each test uses tenants of its own, so that one test's calls and tokens never count against
another's. Clients are the public client (`funchat.client.AsyncClient`), which exposes the server's
retry hint as `FunchatClientError.retry_after_s`.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
import urllib.request

import grpc
import numpy as np
import pytest
import redis as sync_redis
import redis.asyncio as aioredis
from google.rpc import error_details_pb2, status_pb2

from funchat.api import pb
from funchat.api_keys import set_tenant_limits
from funchat.client import AsyncClient, FunchatClientError
from funchat.dev.redis_server import start_redis
from funchat.dev.stack import api_healthy, start_orchestrator
from funchat.dev.tritonserver import free_port
from funchat.orchestrator.tenant_limits import LimitExceeded, TenantLimiter, TenantLimits

SECRET = "test-secret-" + "0" * 20
TENANT_MAX_CALLS, RATE_PER_S, BURST, LEASE_S, REPLICA_MAX_CALLS = 2, 2.0, 6, 3.0, 4
TENANTS = ("health", "calls-a", "calls-b", "calls-c", "details", "rate", "garbage", "crash", "vip")
VIP_MAX_CALLS = 3  # tenant "vip"'s own limit, set in the key file (`funchat keys limits`)
NO_MODELS = {name: "127.0.0.1:1" for name in ("audio_tokenizer", "llm", "refined_head", "vocoder")}


@pytest.fixture(scope="module")
def stack(tiny_checkpoint, tmp_path_factory, make_api_key):
    run_dir = tmp_path_factory.mktemp("tenant-limits")
    keys = {tenant: make_api_key(run_dir, tenant)[1] for tenant in TENANTS}  # all in the file from the start
    keys_file, key = run_dir / "api_keys", keys["health"]
    set_tenant_limits(keys_file, "vip", max_calls=VIP_MAX_CALLS)
    redis_server = start_redis(run_dir)
    env = {"FUNCHAT_CHECKPOINT": str(tiny_checkpoint), "FUNCHAT_REDIS_URL": redis_server.url,
           "FUNCHAT_RESUME_SECRET": SECRET, "FUNCHAT_ENDPOINTS": json.dumps(NO_MODELS),
           "FUNCHAT_AUTH": "api_keys", "FUNCHAT_API_KEYS_FILE": str(keys_file),
           "FUNCHAT_MAX_CALLS": str(REPLICA_MAX_CALLS), "FUNCHAT_TENANT_MAX_CALLS": str(TENANT_MAX_CALLS),
           "FUNCHAT_TENANT_RATE_PER_S": str(RATE_PER_S), "FUNCHAT_TENANT_BURST": str(BURST),
           "FUNCHAT_TENANT_SLOT_LEASE_S": str(LEASE_S)}
    orch = None
    try:
        orch = start_orchestrator(run_dir, env, free_port(), timeout=180, api_key=key)
        yield {"orch": orch, "redis": redis_server, "key_for": keys.__getitem__}
    finally:
        if orch is not None:
            orch.stop()
        redis_server.stop()


def manual_config() -> pb.SessionConfig:
    return pb.SessionConfig(turn_detection=pb.TurnDetection(manual=pb.ManualTurns()))


def refusals(orch) -> dict[str, float]:
    """funchat_orchestrator_refusals_total by reason, from the orchestrator's /metrics."""
    text = urllib.request.urlopen(f"http://{orch.metrics_target}/metrics", timeout=10).read().decode()
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r'^funchat_orchestrator_refusals_total\{reason="(\w+)"\} (\S+)$', text, re.M)}


async def refused_call(client: AsyncClient) -> FunchatClientError:
    with pytest.raises(FunchatClientError) as err:
        await client.converse(manual_config()).start()
    return err.value


# ---- through the API ----

def test_a_tenant_at_its_call_limit_is_refused_with_a_retry_hint_while_another_is_served(stack):
    orch = stack["orch"]
    key_a, key_b, key_c = (stack["key_for"](t) for t in ("calls-a", "calls-b", "calls-c"))
    before = refusals(orch)

    async def main():
        async with AsyncClient(orch.target, api_key=key_a) as a, AsyncClient(orch.target, api_key=key_b) as b, \
                AsyncClient(orch.target, api_key=key_c) as c:
            held = [a.converse(manual_config()) for _ in range(TENANT_MAX_CALLS)]
            for call in held:
                await call.start()
            over_tenant = await refused_call(a)
            respond_over_tenant = None
            with pytest.raises(FunchatClientError) as err:  # a Respond counts against the same limit
                await a.respond(np.zeros(1600, np.float32), manual_config())
            respond_over_tenant = err.value
            served_b = [b.converse(manual_config()) for _ in range(TENANT_MAX_CALLS)]
            for call in served_b:
                await call.start()  # tenant B is served while A is at its limit
            # 4 calls open: this replica's own limit (FUNCHAT_MAX_CALLS), hinted too
            over_replica = await refused_call(c)
            await held[0].close()  # A ends a call: its slot comes back at once
            again = a.converse(manual_config())
            await again.start()
            for call in held[1:] + served_b + [again]:
                await call.close()
            return over_tenant, respond_over_tenant, over_replica, again.session.session_id

    over_tenant, respond_over_tenant, over_replica, again = asyncio.run(main())
    for err in (over_tenant, respond_over_tenant):
        assert err.code == "RESOURCE_EXHAUSTED"
        assert "tenant 'calls-a'" in err.message and f"limit of {TENANT_MAX_CALLS} concurrent calls" in err.message
        assert err.retry_after_s == 1.0
    assert over_replica.code == "RESOURCE_EXHAUSTED" and f"limit of {REPLICA_MAX_CALLS}" in over_replica.message
    assert over_replica.retry_after_s == 1.0
    assert again
    after = refusals(orch)
    assert after["tenant_calls"] - before["tenant_calls"] == 2
    assert after["replica_calls"] - before["replica_calls"] == 1


def test_a_tenants_own_limit_from_the_key_file_replaces_the_default(stack):
    orch = stack["orch"]
    key = stack["key_for"]("vip")

    async def main():
        async with AsyncClient(orch.target, api_key=key) as client:
            held = [client.converse(manual_config()) for _ in range(VIP_MAX_CALLS)]
            for call in held:
                await call.start()  # over the default of 2
            refused = await refused_call(client)
            for call in held:
                await call.close()
            return refused

    refused = asyncio.run(main())
    assert refused.code == "RESOURCE_EXHAUSTED"
    assert f"tenant 'vip' is at its limit of {VIP_MAX_CALLS} concurrent calls" in refused.message


def test_the_retry_hint_is_standard_retry_info_in_the_status_details(stack):
    """Any gRPC client reads google.rpc.RetryInfo from grpc-status-details-bin: it crosses Ray's proxy."""
    orch = stack["orch"]
    key = stack["key_for"]("details")

    async def main():
        async with AsyncClient(orch.target, api_key=key) as client:
            held = [client.converse(manual_config()) for _ in range(TENANT_MAX_CALLS)]
            for call in held:
                await call.start()
            stream = client.stub.Converse(iter([pb.ClientEvent(session=manual_config())]))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stream:
                    pass
            for call in held:
                await call.close()
            return err.value

    err = asyncio.run(main())
    trailers = dict(err.trailing_metadata())
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and status.message == err.details()
    info = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info)
    assert info.retry_delay.ToMilliseconds() == 1000 and trailers["retry-after-ms"] == "1000"


def test_the_rate_limit_refuses_with_the_time_to_the_next_token_then_serves_again(stack):
    orch = stack["orch"]
    key = stack["key_for"]("rate")
    before = refusals(orch)

    async def main():
        async with AsyncClient(orch.target, api_key=key) as client:
            answers = []
            for _ in range(BURST + 1):  # the burst, then one more at once
                try:
                    await client.get_session("sess_nope")
                except FunchatClientError as exc:
                    answers.append(exc)
            refused = answers[-1]
            call_refused = await refused_call(client)  # a new call counts against the same rate
            await asyncio.sleep(call_refused.retry_after_s)
            with pytest.raises(FunchatClientError) as after_waiting:
                await client.get_session("sess_nope")
            return answers, refused, call_refused, after_waiting.value

    answers, refused, call_refused, after_waiting = asyncio.run(main())
    assert [a.code for a in answers[:BURST]] == ["NOT_FOUND"] * BURST  # through the limit to the store
    for err in (refused, call_refused):
        assert err.code == "RESOURCE_EXHAUSTED"
        assert "tenant 'rate'" in err.message and "rate limit of 2 requests per second (burst 6)" in err.message
        assert 0 < err.retry_after_s <= 1 / RATE_PER_S
    assert after_waiting.code == "NOT_FOUND"  # served again once a token is back
    after = refusals(orch)
    assert after["tenant_rate"] - before["tenant_rate"] == 2


def test_random_bytes_get_invalid_argument_and_the_server_keeps_serving(stack):
    """Ray's proxy used to end a Converse of random bytes OK, and a Respond of them UNKNOWN."""
    orch = stack["orch"]
    key = stack["key_for"]("garbage")
    metadata = (("authorization", f"Bearer {key}"),)
    # 0x0f: field 1 of wire type 7, which does not exist: never a protobuf message, whatever follows
    garbage = b"\x0f" + np.random.default_rng(0).integers(0, 256, 399, dtype=np.uint8).tobytes()

    async def main():
        async with grpc.aio.insecure_channel(orch.target) as channel:
            raw = dict(request_serializer=None, response_deserializer=None)
            converse = channel.stream_stream("/funchat.v1.Funchat/Converse", **raw)
            respond = channel.unary_stream("/funchat.v1.Funchat/Respond", **raw)
            answers = []
            for call in (converse(iter([garbage, garbage]), metadata=metadata),
                         respond(garbage, metadata=metadata),
                         # a valid config first, then garbage in the middle of the call
                         converse(iter([pb.ClientEvent(session=manual_config()).SerializeToString(), garbage]),
                                  metadata=metadata)):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    async for _ in call:
                        pass
                answers.append(err.value)
            return answers

    for err, what in zip(asyncio.run(main()), ("ClientEvent", "RespondRequest", "ClientEvent")):
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.details() == (f"a 400-byte message could not be parsed as funchat.v1.{what}: send messages "
                                 "serialized from funchat/v1/funchat.proto")
    assert api_healthy(orch.target, api_key=key)


def test_the_slot_of_a_replica_that_died_comes_back_when_its_lease_lapses(stack):
    """kill -9 of the replica serving one of a tenant's calls: nothing gives that slot back but its
    lease, while the tenant's other slot, held by another replica that lives on, stays."""
    orch = stack["orch"]
    key = stack["key_for"]("crash")
    slots_key = "funchat:tenant:crash:calls"

    async def main():
        store = aioredis.Redis.from_url(stack["redis"].url)
        other_replica = TenantLimiter(store, TenantLimits(max_calls=TENANT_MAX_CALLS), LEASE_S)
        kept = await other_replica.acquire_call("crash")  # renewed all along, so the set never expires whole
        client = AsyncClient(orch.target, api_key=key)
        call = client.converse(manual_config())
        await call.start()  # the tenant's second slot, on the orchestrator's replica
        assert await store.zcard(slots_key) == TENANT_MAX_CALLS
        os.kill(_replica_pid(orch.pid), signal.SIGKILL)
        killed_at = time.monotonic()
        held_after_kill = await store.zcard(slots_key)
        call.abort()
        await client.close()
        # Serve starts a new replica; until then calls fail (UNAVAILABLE), then one is admitted
        async with AsyncClient(orch.target, api_key=key) as again:
            while True:
                call = again.converse(manual_config())
                try:
                    await call.start()
                    break
                except FunchatClientError as exc:
                    since_kill = time.monotonic() - killed_at
                    assert since_kill < 120, f"no call admitted 120 s after the kill: {exc}"
                    assert "concurrent calls" not in exc.message or since_kill < LEASE_S + 2, \
                        f"the dead replica's slot did not lapse: {exc}"
                    await asyncio.sleep(max(0.5, exc.retry_after_s or 0))
            held_after = await store.zcard(slots_key)  # the kept slot and the new call's
            await call.close()
        await other_replica.release(kept)
        await other_replica.close()
        left = await store.zcard(slots_key)
        await store.aclose()
        return held_after_kill, held_after, left

    held_after_kill, held_after, left = asyncio.run(main())
    assert held_after_kill == TENANT_MAX_CALLS  # the dead replica gave nothing back itself
    assert held_after == TENANT_MAX_CALLS and left == 0


def _replica_pid(orchestrator_pid: int) -> int:
    """The pid of the (one) Serve replica under the orchestrator process `orchestrator_pid` (its Ray's
    raylet starts the replica; other stacks on this machine have replicas of their own)."""
    pids = [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
            if b"ServeReplica:funchat:Orchestrator" in _read(f"/proc/{pid}/cmdline")
            and orchestrator_pid in _ancestors(pid)]
    assert len(pids) == 1, f"expected one replica process, found {pids}"
    return pids[0]


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:  # a process that ended meanwhile
        return b""


def _ancestors(pid: int) -> list[int]:
    chain = []
    while pid > 1:
        fields = _read(f"/proc/{pid}/stat").rsplit(b")", 1)[-1].split()
        if len(fields) < 2:
            break
        pid = int(fields[1])  # the parent's pid
        chain.append(pid)
    return chain


# ---- the limiter against the same redis-server ----

def run_limiters(url: str, body, *limits_and_leases):
    """asyncio.run(body(*limiters)): one TenantLimiter per (limits, lease_s), each with its own client
    (as separate replicas have), made and closed inside that event loop."""
    async def main():
        clients = [aioredis.Redis.from_url(url) for _ in limits_and_leases]
        limiters = [TenantLimiter(c, limits, lease_s) for c, (limits, lease_s) in zip(clients, limits_and_leases)]
        try:
            return await body(*limiters)
        finally:
            for limiter, client in zip(limiters, clients):
                await limiter.close()
                await client.aclose()
    return asyncio.run(main())


def test_limiter_counts_calls_across_replicas_and_per_tenant(stack):
    limits = TenantLimits(max_calls=2)

    async def body(one, two):
        a1 = await one.acquire_call("lim-a")
        a2 = await two.acquire_call("lim-a")  # another replica, the same tenant: one count
        with pytest.raises(LimitExceeded) as over:
            await one.acquire_call("lim-a")
        b = await two.acquire_call("lim-b")  # another tenant is not affected
        await one.release(a1)
        a3 = await two.acquire_call("lim-a")
        for limiter, slot in ((two, a2), (two, b), (two, a3)):
            await limiter.release(slot)
        return over.value

    over = run_limiters(stack["redis"].url, body, (limits, 30.0), (limits, 30.0))
    assert over.reason == "tenant_calls" and over.retry_after_s == 1.0
    assert str(over) == ("tenant 'lim-a' is at its limit of 2 concurrent calls (2 open across all servers); "
                         "end one or retry later")
    client = sync_redis.Redis.from_url(stack["redis"].url)
    assert client.zcard("funchat:tenant:lim-a:calls") == client.zcard("funchat:tenant:lim-b:calls") == 0
    client.close()


def test_limiter_renews_held_slots_and_lets_abandoned_ones_lapse(stack):
    """Two replicas hold a slot each of one tenant's two; one dies. Its slot lapses on its own while
    the live one's, renewed, stays (and keeps the set from expiring whole)."""
    limits = TenantLimits(max_calls=2)

    async def body(holder, crashed, other):
        kept = await holder.acquire_call("lease")
        await crashed.acquire_call("lease")
        await crashed.close()  # a replica that dies: no renewals, no release
        await asyncio.sleep(2.5)  # over twice the 1 s lease
        taken = await other.acquire_call("lease")  # the lapsed slot came back
        with pytest.raises(LimitExceeded):  # the renewed one did not
            await other.acquire_call("lease")
        await holder.release(kept)
        await other.release(taken)

    run_limiters(stack["redis"].url, body, (limits, 1.0), (limits, 1.0), (limits, 1.0))


def test_limiter_token_bucket_refuses_past_the_burst_and_refills_at_the_rate(stack):
    limits = TenantLimits(rate_per_s=4.0, burst=3)

    async def body(limiter):
        for _ in range(3):
            await limiter.take_request("bucket")
        with pytest.raises(LimitExceeded) as over:
            await limiter.take_request("bucket")
        await limiter.take_request("bucket-other")  # its own bucket
        await asyncio.sleep(over.value.retry_after_s)
        await limiter.take_request("bucket")  # one token back after the hinted wait
        return over.value

    over = run_limiters(stack["redis"].url, body, (limits, 30.0))
    assert over.reason == "tenant_rate" and 0.2 <= over.retry_after_s <= 0.25  # 1 token at 4/s: 250 ms
    assert "tenant 'bucket' is over its rate limit of 4 requests per second (burst 3)" in str(over)
