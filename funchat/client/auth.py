"""API keys on the client side: which key a client sends, and the gRPC metadata that carries it.

A funchat server answers every RPC but the gRPC health check only with an API key (`fck_<id>_<secret>`,
made by `funchat keys create`), sent as the metadata `authorization: Bearer <key>`; without one, or
with a wrong or revoked one, it answers UNAUTHENTICATED. Clients take the key as `api_key=`, else
from the environment variable FUNCHAT_API_KEY (`resolve_api_key`); `api_key=""` sends none.

The key is a secret: nothing here puts it in a repr, a log record or an exception message.
(funchat.api_keys, the server side, has the same `bearer_metadata`; the client does not import it,
so that it stays grpc + numpy + soxr + the protos.)
"""

from __future__ import annotations

import os
from typing import Any, Sequence

API_KEY_ENV = "FUNCHAT_API_KEY"
AUTHORIZATION = "authorization"

Metadata = tuple[tuple[str, str], ...]


def resolve_api_key(api_key: str | None = None) -> str | None:
    """The key a client sends: `api_key` when given (\"\" for none), else $FUNCHAT_API_KEY; None when
    there is none. Surrounding whitespace is dropped (a key read from a file ends with a newline);
    a key with characters gRPC metadata cannot carry is a ValueError that does not repeat it."""
    key = os.environ.get(API_KEY_ENV) if api_key is None else api_key
    if key is None:
        return None
    if not isinstance(key, str):
        raise TypeError(f"api_key must be a str, not {type(key).__name__}")
    key = key.strip()
    if not key:
        return None
    if not all(33 <= ord(c) <= 126 for c in key):
        source = f"${API_KEY_ENV}" if api_key is None else "api_key"
        raise ValueError(f"{source} holds characters an API key does not have (whitespace or non-ASCII); "
                         f"an API key is one word, fck_<key id>_<secret>, as `funchat keys create` prints it")
    return key


def auth_metadata(api_key: str | None) -> Metadata:
    """The gRPC metadata that sends `api_key`: (("authorization", "Bearer <key>"),), or () for None."""
    return ((AUTHORIZATION, f"Bearer {api_key}"),) if api_key else ()


class _WithMetadata:
    """A stub's multi-callable whose calls carry extra metadata (after any the caller gives)."""

    __slots__ = ("_callable", "_metadata")

    def __init__(self, multicallable: Any, metadata: Metadata):
        self._callable = multicallable
        self._metadata = metadata

    def _merged(self, metadata: Sequence[tuple[str, str]] | None) -> Metadata:
        return tuple(metadata or ()) + self._metadata

    def __call__(self, *args, metadata: Sequence[tuple[str, str]] | None = None, **kwargs):
        return self._callable(*args, metadata=self._merged(metadata), **kwargs)

    def __getattr__(self, name: str):  # the blocking API's with_call / future
        method = getattr(self._callable, name)
        if not callable(method):
            return method

        def call(*args, metadata=None, **kwargs):
            return method(*args, metadata=self._merged(metadata), **kwargs)
        return call

    def __repr__(self) -> str:
        return f"<{type(self._callable).__name__} with {len(self._metadata)} metadata entries>"


def authed_stub(stub: Any, api_key: str | None = None) -> Any:
    """`stub` (a generated stub, e.g. FunchatStub(channel), on a blocking or an asyncio channel) with
    every RPC carrying the API key (`resolve_api_key(api_key)`); `stub` itself when there is none.
    Metadata the caller passes (e.g. a traceparent) is kept."""
    metadata = auth_metadata(resolve_api_key(api_key))
    if not metadata:
        return stub
    for name, value in list(vars(stub).items()):
        if callable(value) and not name.startswith("_"):
            setattr(stub, name, _WithMetadata(value, metadata))
    return stub
