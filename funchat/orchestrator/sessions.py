"""The session store: what a voice call needs to go on after a replica loses it, kept in Redis.

A session is the call's configuration, its history (user speech as the audio tokenizer's rows, so
that a re-prefill needs no re-encoding; assistant and tool text), its state and the turn in
progress. Any orchestrator replica can rebuild a call's context from it: when a model replica lost
its KV cache, or when the orchestrator replica serving the call died and the caller resumes
elsewhere with a resume token.

Key layout (`prefix` defaults to "funchat:"; `<id>` is the session id, [A-Za-z0-9_-]{1,128}):

    {prefix}session:<id>              string  JSON meta: {"v": 2, "session_id", "created_at",
                                              "config", "state", "active", "owner", "tenant",
                                              "dropped"}; dropped: turns trimmed from the oldest end
    {prefix}session:<id>:turns        list    one JSON object per turn, oldest first: {"role",
                                              "text", "n_groups", "audio_ms", "truncated",
                                              "tool_calls", "response_id", "audio"}, where "audio"
                                              is null or {"shape": [n_groups, E], "dtype": "<f4"
                                              (or "<f2"), "model": the fingerprint of the model
                                              that encoded it}
    {prefix}session:<id>:audio:<n>    string  turn n's audio rows: raw little-endian bytes of that
                                              dtype, row-major; n = dropped + the turn's index in
                                              the list (a turn keeps its key when older ones are
                                              trimmed); it exists exactly when the turn's "audio"
                                              is not null
    {prefix}session:<id>:lease        string  the turn in progress's lease token (absent between
                                              turns); expires on its own (see Leases)

Version 1 sessions (no "dropped", audio without "model") are read as version 2 with nothing
dropped; their audio has no known model (the orchestrator refuses to feed it to one).

Expiry is sliding: every write (create, append_turns, update_turn, set_state, update_config,
touch) sets the TTL of all the session's keys to `ttl_s`, in the same MULTI/EXEC as the write, so
the keys of a session always expire together. Reads (get, exists) do not extend it.

Atomicity: a write is an optimistic transaction. It WATCHes the meta, turn-list and lease keys,
reads them (the meta must exist, else SessionNotFound: the session expired or was deleted
meanwhile; the turn list gives the audio keys and the next turn index), queues its writes and the
TTL refresh in MULTI, and EXECs; when another writer (or an expiry) touched a watched key in
between, EXEC aborts and the write starts over from the read. Reads of a whole session use the same
WATCH, so the turns and their audio rows always come from one version.

Leases (fencing): a turn holds its session's lease (`acquire_lease`: SET NX PX with a random token)
from before it reads the history until its last write, renewing it while it runs (`renew_lease`)
and releasing it at the end (`release_lease`), so one turn at a time runs on a session across all
replicas and RPCs; a second gets SessionBusy. A write made with `lease=` checks, inside its
transaction, that the lease key still holds that token (LeaseLost otherwise: the lease expired or
another turn took it, and nothing is written). `update_config` (a call opening the session) is
refused with SessionBusy while any turn holds the lease. Other writes without a lease (a tool's
output, cutting a reply the caller barged into, touch) are not fenced.

History size: `append_turns(..., drop_oldest=k)` trims the k oldest turns (and their audio) in the
same transaction; the orchestrator passes the turns no future prompt could hold (the prompt builder
drops them anyway), so a session's storage stays bounded by what the context can use.

Sessions belong to a tenant (the caller's API key names it; "" without authentication), recorded
at creation: `get(session_id, tenant=...)` and `delete` refuse another tenant's session exactly as
a session that does not exist, so a session id alone reveals nothing.

Resume tokens `v2.<session_id>.<issued_at>.<mac>` (issued_at: Unix seconds; mac: unpadded
base64url HMAC-SHA256 of "<tenant>|<session_id>|<issued_at>" keyed with the secret shared by every
replica, the orchestrator's FUNCHAT_RESUME_SECRET) let a caller take its session to any replica.
A token is good for `token_ttl_s` seconds after it was issued (short: the orchestrator sends a fresh
one with every response_done), only while its session exists, and only for the tenant it was issued
to (checked by the MAC: another tenant's token does not verify).

Each Redis operation's latency is recorded by its name (`metrics.session_store_op`); inside a traced
turn it is also a span, `session_store.<op>`.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError

from funchat import tracing
from funchat.orchestrator import metrics

STATES = ("idle", "listening", "responding")
ROLES = ("user", "assistant", "tool")
# How audio rows may be stored: little-endian on every machine, whatever the host's byte order.
# float32 keeps them bit-exact (the default); float16 halves the bytes (an opt-in, see the README).
AUDIO_DTYPES = {"float32": "<f4", "float16": "<f2"}
TOKEN_VERSION = "v2"
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")  # no ":" (keys) and no "." (tokens)
ISSUED_AT = re.compile(r"[0-9]{1,12}")
CLOCK_SKEW_S = 300     # a token issued this far in the future (another replica's clock) is still accepted
WATCH_ATTEMPTS = 50    # optimistic-transaction attempts before a write gives up under contention
META_VERSION = 2       # 2: "dropped" (history trimming) and the model fingerprint of audio rows

# Lease scripts: compare the token and act in one step, so a turn never extends or frees a lease
# that has already passed to another turn.
RENEW_LEASE = ("if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) "
               "end return 0")
RELEASE_LEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


def _store_op(fn):
    """A SessionStore operation: timed by name (metrics), and a CLIENT span under a traced turn."""
    timed = metrics.session_store_op(fn)
    span_name = "session_store." + fn.__name__

    @functools.wraps(fn)
    async def op(*args, **kwargs):
        with tracing.child_span(span_name, {"db.system": "redis"}, kind=tracing.SpanKind.CLIENT):
            return await timed(*args, **kwargs)
    return op


class SessionError(Exception):
    """Base class of the session store's errors."""


class SessionNotFound(SessionError):
    """No such session: never created, deleted, or expired."""


class InvalidResumeToken(SessionError):
    """A resume token that is malformed or whose signature does not match (forged or altered)."""


class ExpiredResumeToken(SessionError):
    """A genuine resume token that is too old, or whose session has expired."""


class StoreUnavailable(SessionError):
    """Redis cannot be reached."""


class SessionBusy(SessionError):
    """Another turn of the session holds its lease: one turn at a time."""


class LeaseLost(SessionError):
    """A turn's lease expired or passed to another turn: its write is refused, nothing written."""


@dataclass
class HistoryTurn:
    """One turn of a call's history. `audio_rows`: the audio tokenizer's rows for a user's speech
    (float32 [n_groups, E]); stored as float32 by default, so they come back bit-exact.
    `audio_model`: the fingerprint of the model that encoded them (None: unknown, a version 1
    session)."""

    role: str                              # "user" | "assistant" | "tool"
    text: str | None = None
    audio_rows: np.ndarray | None = None
    n_groups: int = 0
    audio_ms: int = 0
    truncated: bool = False                # an assistant turn cut where the caller barged in
    tool_calls: list | None = None
    response_id: str | None = None
    audio_model: str | None = None
    item_id: str | None = None             # the caller's name for it (a committed item, a text or output item)


@dataclass
class Lease:
    """A turn's hold on its session (see Leases in the module docstring)."""

    session_id: str
    token: str
    ttl_ms: int


@dataclass
class SessionRecord:
    session_id: str
    created_at: float
    config: dict                           # JSON-able, opaque to the store
    turns: list[HistoryTurn] = field(default_factory=list)
    state: str = "idle"                    # "idle" | "listening" | "responding"
    active: dict | None = None             # the turn in progress (opaque), None between turns
    owner: str | None = None               # the orchestrator replica serving the call
    tenant: str = ""                       # who created it (the API key's tenant; "" without auth)
    expires_in_s: float | None = None      # filled on read from the meta key's TTL
    dropped: int = 0                       # turns trimmed from the oldest end over the session's life


def _encode_turn(turn: HistoryTurn, dtype: str = AUDIO_DTYPES["float32"]) -> tuple[dict, bytes | None]:
    """-> (the turn's JSON object, its audio bytes or None). Checks it before anything is written.
    dtype: how the audio rows are stored (one of AUDIO_DTYPES' values)."""
    if turn.role not in ROLES:
        raise ValueError(f"turn role {turn.role!r} is not one of {ROLES}")
    audio, blob = None, None
    if turn.audio_rows is not None:
        rows = np.asarray(turn.audio_rows)
        if rows.ndim != 2:
            raise ValueError(f"audio_rows must be [n_groups, E], got shape {rows.shape}")
        rows = np.ascontiguousarray(rows, dtype=dtype)
        audio, blob = {"shape": list(rows.shape), "dtype": dtype, "model": turn.audio_model}, rows.tobytes()
    doc = {"role": turn.role, "text": turn.text, "n_groups": int(turn.n_groups), "audio_ms": int(turn.audio_ms),
           "truncated": bool(turn.truncated), "tool_calls": turn.tool_calls, "response_id": turn.response_id,
           "audio": audio, "item_id": turn.item_id}
    return doc, blob


def _decode_turn(doc: dict, blob: bytes | None) -> HistoryTurn:
    rows = None
    if doc.get("audio") is not None:
        shape = tuple(doc["audio"]["shape"])
        # frombuffer is a read-only view of the reply; astype copies into a writable native array.
        rows = np.frombuffer(blob, dtype=doc["audio"]["dtype"]).reshape(shape).astype(np.float32)
    return HistoryTurn(role=doc["role"], text=doc.get("text"), audio_rows=rows, n_groups=doc.get("n_groups", 0),
                       audio_ms=doc.get("audio_ms", 0), truncated=doc.get("truncated", False),
                       tool_calls=doc.get("tool_calls"), response_id=doc.get("response_id"),
                       audio_model=(doc.get("audio") or {}).get("model"), item_id=doc.get("item_id"))


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _redacted(url: str) -> str:
    """The URL without its password, fit for an error message."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***" if parts.username else ":***"
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc}"))


class SessionStore:
    """Sessions in Redis (see the module docstring for the layout). One instance per event loop:
    redis.asyncio clients are bound to the loop they first run on."""

    def __init__(self, redis_url: str, *, secret: str | bytes, ttl_s: int, prefix: str = "funchat:",
                 password: str = "", token_ttl_s: int | None = None, audio_dtype: str = "float32",
                 ca_file: str | os.PathLike | None = None):
        """secret: the resume-token HMAC key, the same on every replica (the orchestrator's settings
        hold it). An empty one is refused (tokens anyone could forge). ttl_s: sliding expiry.
        password: Redis AUTH, when the URL has none (one or the other, not both). token_ttl_s: how
        long a resume token is good for (None: as long as ttl_s). audio_dtype: how audio rows are
        stored, "float32" (bit-exact) or "float16" (half the bytes). ca_file: the CA that verifies a
        rediss:// server's certificate (None: the system's CAs)."""
        key = secret.encode() if isinstance(secret, str) else bytes(secret)
        if not key:
            raise ValueError("the resume-token secret is empty: it must be the same non-empty key on every "
                             "orchestrator replica (FUNCHAT_RESUME_SECRET or FUNCHAT_RESUME_SECRET_FILE)")
        if int(ttl_s) < 1:
            raise ValueError(f"ttl_s must be at least 1 second, got {ttl_s}")
        if token_ttl_s is not None and int(token_ttl_s) < 1:
            raise ValueError(f"token_ttl_s must be at least 1 second, got {token_ttl_s}")
        if audio_dtype not in AUDIO_DTYPES:
            raise ValueError(f"audio_dtype {audio_dtype!r} is not one of {sorted(AUDIO_DTYPES)}")
        self.url = redis_url
        self.ttl_s = int(ttl_s)
        self.token_ttl_s = self.ttl_s if token_ttl_s is None else int(token_ttl_s)
        self.audio_dtype = AUDIO_DTYPES[audio_dtype]
        self.prefix = prefix
        self._secret = key
        # A few quick retries ride out a blip (a Redis restart takes well under a second); past them
        # the caller hears StoreUnavailable at once instead of a call hanging on the store.
        if password and urlsplit(redis_url).password:
            raise ValueError("the Redis password is both in the URL and given on its own: keep one")
        if ca_file and urlsplit(redis_url).scheme != "rediss":
            raise ValueError("a CA file for Redis needs a rediss:// (TLS) URL")
        tls = {"ssl_ca_certs": str(ca_file)} if ca_file else {}
        self.redis = aioredis.Redis.from_url(
            redis_url, password=password or None, socket_connect_timeout=2.0, socket_timeout=5.0,
            retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries=3), **tls)

    async def __aenter__(self) -> SessionStore:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # ---- keys ----

    def _meta_key(self, session_id: str) -> str:
        return f"{self.prefix}session:{session_id}"

    def _turns_key(self, session_id: str) -> str:
        return f"{self.prefix}session:{session_id}:turns"

    def _audio_key(self, session_id: str, number: int) -> str:
        """number: the turn's index in the list plus the turns dropped before it (meta "dropped")."""
        return f"{self.prefix}session:{session_id}:audio:{number}"

    def _audio_keys(self, session_id: str, dropped: int, turns: list[dict]) -> list[str]:
        return [self._audio_key(session_id, dropped + k) for k, t in enumerate(turns) if t.get("audio") is not None]

    def _lease_key(self, session_id: str) -> str:
        return f"{self.prefix}session:{session_id}:lease"

    @staticmethod
    def _check_id(session_id: str) -> None:
        # An id outside the charset could name another session's key ("x:turns"): no such session.
        if not isinstance(session_id, str) or not SESSION_ID.fullmatch(session_id):
            raise SessionNotFound(f"no session {session_id!r} (not a valid session id)")

    @contextlib.contextmanager
    def _reachable(self) -> Iterator[None]:
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise StoreUnavailable(f"cannot reach Redis at {_redacted(self.url)}: {exc}") from exc

    # ---- reads ----

    @_store_op
    async def get(self, session_id: str, tenant: str | None = None) -> SessionRecord:
        """The whole session, its audio rows included. tenant: the caller's; another tenant's session
        is not found (None: no check, for the store's own callers). Raises SessionNotFound."""
        self._check_id(session_id)
        meta_key, turns_key = self._meta_key(session_id), self._turns_key(session_id)
        with self._reachable():
            async with self.redis.pipeline(transaction=True) as pipe:
                for _ in range(WATCH_ATTEMPTS):
                    try:
                        await pipe.watch(meta_key, turns_key)
                        raw = await pipe.get(meta_key)
                        if raw is None:
                            raise SessionNotFound(f"no session {session_id!r} (never created, deleted or expired)")
                        docs = [json.loads(t) for t in await pipe.lrange(turns_key, 0, -1)]
                        dropped = json.loads(raw).get("dropped", 0)
                        pipe.multi()
                        pipe.pttl(meta_key)
                        for key in self._audio_keys(session_id, dropped, docs):
                            pipe.get(key)
                        pttl, *blobs = await pipe.execute()
                        break
                    except WatchError:
                        continue  # written meanwhile: read the new version
                else:
                    raise SessionError(f"session {session_id}: could not read a consistent version after "
                                       f"{WATCH_ATTEMPTS} attempts (too many concurrent writes)")
        meta = json.loads(raw)
        if tenant is not None and meta.get("tenant", "") != tenant:
            raise SessionNotFound(f"no session {session_id!r} (never created, deleted or expired)")
        if any(b is None for b in blobs):  # keys removed behind the store's back
            raise SessionNotFound(f"no session {session_id!r} (its audio rows expired or were deleted)")
        blob_iter = iter(blobs)
        turns = [_decode_turn(doc, next(blob_iter) if doc.get("audio") is not None else None) for doc in docs]
        return SessionRecord(session_id=meta["session_id"], created_at=meta["created_at"], config=meta["config"],
                             turns=turns, state=meta["state"], active=meta["active"], owner=meta["owner"],
                             tenant=meta.get("tenant", ""), dropped=meta.get("dropped", 0),
                             expires_in_s=pttl / 1000.0 if pttl >= 0 else None)

    @_store_op
    async def exists(self, session_id: str) -> bool:
        try:
            self._check_id(session_id)
        except SessionNotFound:
            return False
        with self._reachable():
            return bool(await self.redis.exists(self._meta_key(session_id)))

    @_store_op
    async def ping(self) -> bool:
        """True when Redis answers; False when it cannot be reached."""
        try:
            return bool(await self.redis.ping())
        except (RedisConnectionError, RedisTimeoutError):
            return False

    # ---- writes ----

    @_store_op
    async def create(self, config: dict, session_id: str | None = None, tenant: str = "") -> SessionRecord:
        """A new, empty session ("idle") of `tenant`. session_id: a new random one when None; a given
        one must be unused (SessionError otherwise) and match [A-Za-z0-9_-]{1,128} (ValueError otherwise)."""
        if session_id is None:
            session_id = secrets.token_hex(16)
        elif not isinstance(session_id, str) or not SESSION_ID.fullmatch(session_id):
            raise ValueError(f"session id {session_id!r} must match [A-Za-z0-9_-]{{1,128}}")
        record = SessionRecord(session_id=session_id, created_at=time.time(), config=config,
                               expires_in_s=float(self.ttl_s), tenant=tenant)
        meta = _dumps({"v": META_VERSION, "session_id": session_id, "created_at": record.created_at,
                       "config": config, "state": record.state, "active": None, "owner": None, "tenant": tenant,
                       "dropped": 0})
        meta_key = self._meta_key(session_id)
        with self._reachable():
            async with self.redis.pipeline(transaction=True) as pipe:
                for _ in range(WATCH_ATTEMPTS):
                    try:
                        await pipe.watch(meta_key)
                        if await pipe.exists(meta_key):
                            raise SessionError(f"session {session_id!r} already exists")
                        pipe.multi()
                        pipe.set(meta_key, meta, ex=self.ttl_s)
                        # no leftovers of an earlier session of that id
                        pipe.delete(self._turns_key(session_id), self._lease_key(session_id))
                        await pipe.execute()
                        return record
                    except WatchError:
                        continue
        raise SessionError(f"session {session_id}: could not be created after {WATCH_ATTEMPTS} attempts "
                           "(too many concurrent writes)")

    async def _write(self, session_id: str, queue: Callable[[Any, dict, list[dict]], Any],
                     lease: Lease | None = None, exclusive: bool = False) -> Any:
        """One optimistic transaction on a live session (see the module docstring).

        queue(pipe, meta, turns) runs inside MULTI: it queues the writes and brings `meta` and
        `turns` (the stored JSON objects) to their new state, which the TTL refresh then follows.
        lease: the write is the turn's holding it (LeaseLost when it does not any more); exclusive:
        refused (SessionBusy) while any turn holds the session's lease. Raises SessionNotFound when
        the meta key is gone. Returns what `queue` returns.
        """
        self._check_id(session_id)
        meta_key, turns_key, lease_key = (self._meta_key(session_id), self._turns_key(session_id),
                                          self._lease_key(session_id))
        with self._reachable():
            async with self.redis.pipeline(transaction=True) as pipe:
                for _ in range(WATCH_ATTEMPTS):
                    try:
                        # The lease key is watched too: a lease taken or lost meanwhile aborts EXEC
                        await pipe.watch(meta_key, turns_key, lease_key)
                        raw = await pipe.get(meta_key)
                        if raw is None:
                            raise SessionNotFound(f"no session {session_id!r} (never created, deleted or expired)")
                        holder = await pipe.get(lease_key)
                        if lease is not None and holder != lease.token.encode():
                            raise LeaseLost(f"session {session_id}: this turn lost its lease on the session (it "
                                            "expired, or another turn took it); nothing of the turn was stored")
                        if exclusive and holder is not None:
                            raise self._busy(session_id, await pipe.pttl(lease_key))
                        meta = json.loads(raw)
                        turns = [json.loads(t) for t in await pipe.lrange(turns_key, 0, -1)]
                        pipe.multi()
                        result = queue(pipe, meta, turns)
                        # Sliding expiry: every key of the session, in the same transaction.
                        audio_keys = self._audio_keys(session_id, meta.get("dropped", 0), turns)
                        for key in [meta_key, turns_key, *audio_keys]:
                            pipe.expire(key, self.ttl_s)
                        await pipe.execute()
                        return result
                    except WatchError:
                        continue  # another writer got in between: start over from its version
        raise SessionError(f"session {session_id}: write abandoned after {WATCH_ATTEMPTS} attempts "
                           "(too many concurrent writes)")

    @_store_op
    async def append_turns(self, session_id: str, turns: list[HistoryTurn], lease: Lease | None = None,
                           drop_oldest: int = 0) -> int:
        """Add turns at the end of the history, all or none, then trim the `drop_oldest` oldest
        turns (and their audio) in the same transaction. lease: the writing turn's (LeaseLost when
        it lost it). Returns the number of turns now stored."""
        encoded = [_encode_turn(t, self.audio_dtype) for t in turns]  # bad turns fail before anything is written
        if drop_oldest < 0:
            raise ValueError(f"drop_oldest must be >= 0, got {drop_oldest}")
        turns_key = self._turns_key(session_id)

        def queue(pipe, meta: dict, stored: list[dict]) -> int:
            dropped = meta.get("dropped", 0)
            for doc, blob in encoded:
                number = dropped + len(stored)
                pipe.rpush(turns_key, _dumps(doc))
                if blob is not None:
                    pipe.set(self._audio_key(session_id, number), blob)
                else:  # keep "audio:<n> exists iff turn n has audio" even over a stray key
                    pipe.delete(self._audio_key(session_id, number))
                stored.append(doc)
            cut = min(drop_oldest, len(stored))
            if cut:
                gone = self._audio_keys(session_id, dropped, stored[:cut])
                if gone:
                    pipe.delete(*gone)
                pipe.ltrim(turns_key, cut, -1)
                del stored[:cut]
                meta.update(v=META_VERSION, dropped=dropped + cut)
                pipe.set(self._meta_key(session_id), _dumps(meta), ex=self.ttl_s)
            return len(stored)

        return await self._write(session_id, queue, lease=lease)

    @_store_op
    async def update_turn(self, session_id: str, index: int, turn: HistoryTurn, lease: Lease | None = None) -> None:
        """Replace the turn at `index` (negative counts from the end: -1 is the last), its audio
        included: a turn without audio_rows removes the stored rows. Used to cut an assistant turn
        where the caller barged in. Raises IndexError when there is no such turn."""
        doc, blob = _encode_turn(turn, self.audio_dtype)

        def queue(pipe, meta: dict, stored: list[dict]) -> None:
            k = index + len(stored) if index < 0 else index
            if not 0 <= k < len(stored):
                raise IndexError(f"session {session_id}: no turn {index} (it has {len(stored)})")
            pipe.lset(self._turns_key(session_id), k, _dumps(doc))
            number = meta.get("dropped", 0) + k
            if blob is not None:
                pipe.set(self._audio_key(session_id, number), blob)
            else:
                pipe.delete(self._audio_key(session_id, number))
            stored[k] = doc

        await self._write(session_id, queue, lease=lease)

    @_store_op
    async def delete_turn(self, session_id: str, item_id: str) -> bool:
        """Delete the turn named `item_id` (its item id, or a reply's response id), its audio included;
        the later turns' audio keys move down one number with them, in the same transaction. Refused
        (SessionBusy) while a turn holds the session. -> whether there was such a turn."""
        turns_key = self._turns_key(session_id)

        def queue(pipe, meta: dict, stored: list[dict]) -> bool:
            k = next((i for i, t in enumerate(stored) if item_id in (t.get("item_id"), t.get("response_id"))), None)
            if k is None:
                return False
            dropped = meta.get("dropped", 0)
            if stored[k].get("audio") is not None:
                pipe.delete(self._audio_key(session_id, dropped + k))
            for j in range(k + 1, len(stored)):  # "audio:<n> exists iff turn n has audio", renumbered
                if stored[j].get("audio") is not None:
                    pipe.rename(self._audio_key(session_id, dropped + j), self._audio_key(session_id, dropped + j - 1))
            del stored[k]
            pipe.delete(turns_key)
            if stored:
                pipe.rpush(turns_key, *[_dumps(t) for t in stored])
            return True

        return await self._write(session_id, queue, exclusive=True)

    @_store_op
    async def set_state(self, session_id: str, state: str, active: dict | None = None,
                        owner: str | None = None, lease: Lease | None = None, exclusive: bool = False) -> None:
        """Set state, active turn and owner together: each replaces the stored value (None clears).
        lease: the writing turn's (LeaseLost when it lost it); exclusive: only while no turn holds
        the lease (SessionBusy otherwise)."""
        if state not in STATES:
            raise ValueError(f"session state {state!r} is not one of {STATES}")

        def queue(pipe, meta: dict, stored: list[dict]) -> None:
            meta.update(state=state, active=active, owner=owner)
            pipe.set(self._meta_key(session_id), _dumps(meta), ex=self.ttl_s)

        await self._write(session_id, queue, lease=lease, exclusive=exclusive)

    @_store_op
    async def update_config(self, session_id: str, config: dict) -> None:
        """Replace the session's config (a resumed call may change instructions, voice, ...). Refused
        with SessionBusy while a turn of the session holds its lease."""
        def queue(pipe, meta: dict, stored: list[dict]) -> None:
            meta["config"] = config
            pipe.set(self._meta_key(session_id), _dumps(meta), ex=self.ttl_s)

        await self._write(session_id, queue, exclusive=True)

    @_store_op
    async def touch(self, session_id: str) -> None:
        """Extend the session's life by ttl_s from now. Raises SessionNotFound."""
        await self._write(session_id, lambda pipe, meta, stored: None)

    @_store_op
    async def delete(self, session_id: str, tenant: str | None = None) -> bool:
        """Remove the session and all its keys. False when there was no such session (or, with
        `tenant`, when it is another tenant's: then nothing is removed)."""
        try:
            self._check_id(session_id)
        except SessionNotFound:
            return False
        meta_key, turns_key = self._meta_key(session_id), self._turns_key(session_id)
        with self._reachable():
            async with self.redis.pipeline(transaction=True) as pipe:
                for _ in range(WATCH_ATTEMPTS):
                    try:
                        await pipe.watch(meta_key, turns_key)
                        raw = await pipe.get(meta_key)
                        if raw is not None and tenant is not None and json.loads(raw).get("tenant", "") != tenant:
                            await pipe.unwatch()
                            return False
                        existed = raw is not None
                        dropped = json.loads(raw).get("dropped", 0) if raw is not None else 0
                        docs = [json.loads(t) for t in await pipe.lrange(turns_key, 0, -1)]
                        pipe.multi()
                        pipe.delete(meta_key, turns_key, self._lease_key(session_id),
                                    *self._audio_keys(session_id, dropped, docs))
                        await pipe.execute()
                        return existed
                    except WatchError:
                        continue
        raise SessionError(f"session {session_id}: delete abandoned after {WATCH_ATTEMPTS} attempts "
                           "(too many concurrent writes)")

    # ---- leases ----

    def _busy(self, session_id: str, pttl_ms: int) -> SessionBusy:
        within = f" (its lease ends within {pttl_ms / 1000:.0f} s if that turn stalls)" if pttl_ms > 0 else ""
        return SessionBusy(f"session {session_id}: another turn of this session is in progress, in another call "
                           f"or request{within}; one turn at a time: retry when it has ended")

    @_store_op
    async def acquire_lease(self, session_id: str, ttl_s: float) -> Lease:
        """The session's lease for one turn, good for ttl_s unless renewed. Raises SessionBusy while
        another turn holds it. Does not check that the session exists (its writes do)."""
        self._check_id(session_id)
        lease = Lease(session_id, secrets.token_hex(16), max(1, int(ttl_s * 1000)))
        key = self._lease_key(session_id)
        with self._reachable():
            if await self.redis.set(key, lease.token, nx=True, px=lease.ttl_ms):
                return lease
            pttl = await self.redis.pttl(key)
        raise self._busy(session_id, pttl)

    @_store_op
    async def renew_lease(self, lease: Lease) -> bool:
        """Extend the lease by its ttl from now. False when it is no longer this turn's (lost)."""
        with self._reachable():
            return bool(await self.redis.eval(RENEW_LEASE, 1, self._lease_key(lease.session_id), lease.token,
                                              lease.ttl_ms))

    @_store_op
    async def release_lease(self, lease: Lease) -> bool:
        """Free the session for the next turn. False when it was no longer this turn's."""
        with self._reachable():
            return bool(await self.redis.eval(RELEASE_LEASE, 1, self._lease_key(lease.session_id), lease.token))

    async def close(self) -> None:
        await self.redis.aclose()

    # ---- resume tokens ----

    def _mac(self, tenant: str, session_id: str, issued_at: int) -> str:
        digest = hmac.new(self._secret, f"{tenant}|{session_id}|{issued_at}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")

    def issue_resume_token(self, session_id: str, issued_at: int | None = None, tenant: str = "") -> str:
        """`v2.<session_id>.<issued_at>.<mac>`, good for `tenant` only; issued_at defaults to now (Unix
        seconds)."""
        if not SESSION_ID.fullmatch(session_id):
            raise ValueError(f"session id {session_id!r} must match [A-Za-z0-9_-]{{1,128}}")
        issued_at = int(time.time()) if issued_at is None else int(issued_at)
        return f"{TOKEN_VERSION}.{session_id}.{issued_at}.{self._mac(tenant, session_id, issued_at)}"

    async def verify_resume_token(self, token: str, tenant: str = "") -> str:
        """-> the session id, for a token issued to `tenant`. Raises InvalidResumeToken (malformed,
        forged, altered, or another tenant's) or ExpiredResumeToken (older than token_ttl_s, or its
        session has expired or was deleted)."""
        parts = token.split(".") if isinstance(token, str) else []
        if (len(parts) != 4 or parts[0] != TOKEN_VERSION or not SESSION_ID.fullmatch(parts[1])
                or not ISSUED_AT.fullmatch(parts[2])):
            raise InvalidResumeToken("malformed resume token: expected v2.<session_id>.<issued_at>.<mac> as "
                                     "issued in session_created")
        session_id, issued_at, mac = parts[1], int(parts[2]), parts[3]
        # Constant-time comparison: the time taken must not tell how much of a guessed MAC is right.
        if not hmac.compare_digest(self._mac(tenant, session_id, issued_at).encode(), mac.encode()):
            raise InvalidResumeToken("forged or altered resume token: its signature does not match (issued to "
                                     "another API key's tenant, signed with another FUNCHAT_RESUME_SECRET, or "
                                     "modified)")
        age = time.time() - issued_at
        if age < -CLOCK_SKEW_S:
            raise InvalidResumeToken(f"resume token issued {-age:.0f} s in the future: check the replicas' clocks")
        if age > self.token_ttl_s:
            raise ExpiredResumeToken(f"resume token for session {session_id} expired: issued {age:.0f} s ago, "
                                     f"tokens last {self.token_ttl_s} s; resume with the newest one (every "
                                     "response_done carries a fresh token), or start a new session")
        if not await self.exists(session_id):
            raise ExpiredResumeToken(f"session {session_id} has expired (or was deleted); start a new session")
        return session_id
