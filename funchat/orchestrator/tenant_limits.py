"""Per-tenant limits shared by every orchestrator replica, kept in Redis: concurrent calls and
request rate.

- **Calls** (Converse calls open and Respond RPCs in flight): a semaphore per tenant, a sorted set
  whose members are the slots held and whose scores are when each slot's lease ends (Redis's own
  clock, so the replicas' clocks do not matter). A replica renews the leases of the calls it serves
  every `lease_s / 3`; a call that ends gives its slot back at once (ZREM), and the slots of a
  replica that died without giving them back lapse within `lease_s`: no exit path leaks a slot for
  longer than that.
- **Rate** (every RPC but the health check: new calls, Respond, GetSession, DeleteSession): a token
  bucket per tenant, `rate_per_s` tokens a second up to `burst`. A refused request is told how long
  until the next token.

Each check is one Lua script, atomic in Redis, one round trip. Over a limit: `LimitExceeded`,
naming the limit and the tenant, with a retry hint (`retry_after_s`) that the API sends as
google.rpc.RetryInfo (`funchat.orchestrator.errors`).

Key layout (`prefix` "funchat:", like the sessions'):

    {prefix}tenant:<tenant>:calls   sorted set  slot id -> lease end (ms, Redis's clock)
    {prefix}tenant:<tenant>:rate    hash        tokens, at (ms): the bucket when last drawn from

Both expire on their own when a tenant goes quiet (the set with its last lease, the bucket once
it would be full again), so idle tenants cost nothing.

A limit of 0 means no limit of that kind. The same limits apply to every tenant (FUNCHAT_TENANT_*),
except where the API key file sets some of a tenant's own (`funchat keys limits`, funchat.api_keys).
One `TenantLimiter` per replica (per event loop: it
shares the session store's redis.asyncio client).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass, replace
from typing import Callable, Mapping

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from funchat.orchestrator import metrics

log = logging.getLogger(__name__)

# How long to suggest waiting when a tenant is at its call limit: when one of its calls ends is
# unknown, and a second keeps retries cheap without making a caller wait long for a freed slot.
CALLS_RETRY_AFTER_S = 1.0

# KEYS[1]: the tenant's slot set. ARGV: slot id, limit, lease (ms). Returns {1, held} when the slot
# is taken, {0, held} when the tenant already holds `limit` live slots. Lapsed leases go first.
_ACQUIRE_SLOT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZCARD', KEYS[1])
if held >= tonumber(ARGV[2]) then
  return {0, held}
end
redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
redis.call('PEXPIRE', KEYS[1], lease)
return {1, held + 1}
"""

# KEYS[1]: the tenant's slot set. ARGV: lease (ms), then the slot ids to renew. XX: a slot that
# already lapsed (or was given back) is not brought back. Returns how many were renewed.
_RENEW_SLOTS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
local renewed = 0
for i = 2, #ARGV do
  renewed = renewed + redis.call('ZADD', KEYS[1], 'XX', 'CH', now + lease, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], lease)
return renewed
"""

# KEYS[1]: the tenant's bucket. ARGV: tokens per second, burst. Takes one token and returns 0, or
# returns the milliseconds until one is there (and takes nothing).
_TAKE_TOKEN = """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(bucket[1]) or burst
local at = tonumber(bucket[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate / 1000)
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = math.ceil((1 - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return wait
"""


@dataclass(frozen=True)
class TenantLimits:
    """One tenant's limits; 0 = none of that kind."""

    max_calls: int = 0        # Converse calls + Respond RPCs at once, across all replicas
    rate_per_s: float = 0.0   # RPCs per second, sustained
    burst: int = 0            # RPCs at once after a quiet spell (the bucket's size; at least 1)


class LimitExceeded(Exception):
    """A tenant over one of its limits. str(exc) names the limit and the tenant (fit for the caller:
    RESOURCE_EXHAUSTED); reason ("tenant_calls" or "tenant_rate") fits a metric label;
    retry_after_s is the retry hint."""

    def __init__(self, reason: str, message: str, retry_after_s: float):
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class CallSlot:
    """A call's place under its tenant's call limit; give it back with `TenantLimiter.release`."""

    key: str
    slot_id: str


class TenantLimiter:
    """The limits of every tenant (see the module docstring). limits: the defaults; overrides(tenant):
    that tenant's own limits, some or all of TenantLimits' fields (the key file's)."""

    def __init__(self, redis: aioredis.Redis, limits: TenantLimits, lease_s: float = 30.0,
                 prefix: str = "funchat:", overrides: Callable[[str], Mapping[str, int | float]] | None = None):
        if limits.rate_per_s > 0 and limits.burst < 1:
            raise ValueError(f"a rate limit needs a burst of at least 1, got {limits.burst}")
        if lease_s <= 0:
            raise ValueError(f"lease_s must be positive, got {lease_s}")
        self.redis = redis
        self.limits = limits
        self.overrides = overrides
        self.lease_ms = max(1, int(lease_s * 1000))
        self.prefix = prefix
        self._acquire = redis.register_script(_ACQUIRE_SLOT)
        self._renew = redis.register_script(_RENEW_SLOTS)
        self._take = redis.register_script(_TAKE_TOKEN)
        self._held: dict[str, set[str]] = {}  # slot set key -> this replica's live slots in it
        self._renewer: asyncio.Task | None = None

    def limits_of(self, tenant: str) -> TenantLimits:
        """The defaults, with what the tenant's overrides set."""
        own = self.overrides(tenant) if self.overrides is not None else None
        return replace(self.limits, **own) if own else self.limits

    def _key(self, tenant: str, kind: str) -> str:
        return f"{self.prefix}tenant:{tenant}:{kind}"

    async def take_request(self, tenant: str) -> None:
        """Count one RPC against the tenant's rate; LimitExceeded when its bucket is empty."""
        limits = self.limits_of(tenant)
        if limits.rate_per_s <= 0:
            return
        wait_ms = int(await self._take(keys=[self._key(tenant, "rate")], args=[limits.rate_per_s, limits.burst]))
        if wait_ms > 0:
            raise LimitExceeded("tenant_rate", f"tenant {tenant!r} is over its rate limit of {limits.rate_per_s:g} "
                                               f"requests per second (burst {limits.burst}); retry in "
                                               f"{wait_ms} ms", retry_after_s=wait_ms / 1000)

    async def acquire_call(self, tenant: str) -> CallSlot | None:
        """A slot under the tenant's call limit (None when there is no limit); LimitExceeded when all
        its slots are held. The slot is renewed until `release`."""
        limits = self.limits_of(tenant)
        if limits.max_calls <= 0:
            return None
        slot = CallSlot(self._key(tenant, "calls"), uuid.uuid4().hex)
        taken, held = await self._acquire(keys=[slot.key], args=[slot.slot_id, limits.max_calls, self.lease_ms])
        if not int(taken):
            raise LimitExceeded("tenant_calls", f"tenant {tenant!r} is at its limit of {limits.max_calls} concurrent "
                                                f"calls ({int(held)} open across all servers); end one or retry "
                                                "later", retry_after_s=CALLS_RETRY_AFTER_S)
        self._held.setdefault(slot.key, set()).add(slot.slot_id)
        self._start_renewing()
        return slot

    async def release(self, slot: CallSlot | None) -> None:
        """Give a slot back. Never raises: a slot that cannot be removed now (Redis unreachable) is no
        longer renewed, so it lapses within the lease."""
        if slot is None:
            return
        held = self._held.get(slot.key)
        if held is not None:
            held.discard(slot.slot_id)
            if not held:
                del self._held[slot.key]
        try:
            await self.redis.zrem(slot.key, slot.slot_id)
        except (RedisError, OSError) as exc:
            log.warning("tenant limits: could not give back a call slot (%s: %s); it lapses within %.1f s",
                        type(exc).__name__, exc, self.lease_ms / 1000)

    def _start_renewing(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = metrics.spawn(self._renew_forever(), "tenant_limits.renew")

    async def _renew_forever(self) -> None:
        """Renew this replica's slots every lease/3 while it holds any; a failed renewal is retried at
        the next tick (two more before a slot lapses)."""
        while self._held:
            await asyncio.sleep(self.lease_ms / 3000)
            await self.renew()

    async def renew(self) -> None:
        """Extend the lease of every slot this replica holds (one script call per tenant)."""
        for key, slots in list(self._held.items()):
            if not slots:
                continue
            try:
                await self._renew(keys=[key], args=[self.lease_ms, *slots])
            except (RedisError, OSError) as exc:
                log.warning("tenant limits: could not renew call slots of %s (%s: %s)", key, type(exc).__name__, exc)

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer

