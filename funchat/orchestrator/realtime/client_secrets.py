"""Ephemeral client secrets for browsers: `POST /v1/realtime/client_secrets`.

A product backend holding an API key asks for a short-lived secret (`ek_...`) and hands it to a
browser, which connects to `/v1/realtime` with it (the subprotocol `openai-insecure-api-key.ek_...`)
without ever seeing the API key. The secret names the key's tenant and key id, its expiry, and the
session it opens with (the request's `session`, checked as a `session.update` is); it is signed with
a key derived from the replicas' shared resume-token key, so any replica accepts it and nothing is
stored. It stops working when it expires or when the API key it came from is revoked.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass

PREFIX = "ek_"
DEFAULT_TTL_S = 600  # as OpenAI's: ten minutes
MIN_TTL_S, MAX_TTL_S = 10, 7200
_DOMAIN = b"funchat realtime client secret v1"  # the derived key signs nothing else


class ClientSecretError(Exception):
    """A client secret that is malformed, forged, altered or expired (the message never repeats it)."""


@dataclass(frozen=True)
class ClientSecret:
    tenant: str
    key_id: str
    expires_at: int
    session: dict


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _key(secret: bytes) -> bytes:
    return hmac.new(secret, _DOMAIN, hashlib.sha256).digest()


def issue(secret: bytes, tenant: str, key_id: str, session: dict, ttl_s: int = DEFAULT_TTL_S,
          now: float | None = None) -> tuple[str, int]:
    """-> (the client secret, its expiry in Unix seconds)."""
    expires_at = int(now if now is not None else time.time()) + int(ttl_s)
    payload = _b64(json.dumps({"t": tenant, "k": key_id, "e": expires_at, "s": session},
                              separators=(",", ":"), sort_keys=True).encode())
    mac = _b64(hmac.new(_key(secret), payload.encode(), hashlib.sha256).digest())
    return f"{PREFIX}{payload}.{mac}", expires_at


def verify(secret: bytes, value: str, now: float | None = None) -> ClientSecret:
    """The secret's contents; ClientSecretError when it is not one this deployment issued, or expired."""
    body = value[len(PREFIX):] if value.startswith(PREFIX) else ""
    payload, _, mac = body.partition(".")
    if not payload or not mac:
        raise ClientSecretError("malformed client secret: expected ek_<payload>.<signature> as issued by "
                                "POST /v1/realtime/client_secrets")
    expected = _b64(hmac.new(_key(secret), payload.encode(), hashlib.sha256).digest())
    if not hmac.compare_digest(expected.encode(), mac.encode()):
        raise ClientSecretError("forged or altered client secret: its signature does not match")
    fields = json.loads(_unb64(payload))
    left = fields["e"] - (now if now is not None else time.time())
    if left <= 0:
        raise ClientSecretError(f"client secret expired {-left:.0f} s ago: ask your backend for a new one")
    return ClientSecret(tenant=fields["t"], key_id=fields["k"], expires_at=fields["e"], session=fields["s"])


def expiry_seconds(request: dict) -> int:
    """`expires_after.seconds` of a request (OpenAI's shape), default 600; ValueError naming what is wrong."""
    after = request.get("expires_after")
    if after is None:
        return DEFAULT_TTL_S
    if not isinstance(after, dict) or after.get("anchor", "created_at") != "created_at":
        raise ValueError("expires_after must be {\"anchor\": \"created_at\", \"seconds\": N}")
    seconds = after.get("seconds", DEFAULT_TTL_S)
    if not isinstance(seconds, int) or isinstance(seconds, bool) or not MIN_TTL_S <= seconds <= MAX_TTL_S:
        raise ValueError(f"expires_after.seconds must be an integer from {MIN_TTL_S} to {MAX_TTL_S}")
    return seconds
