"""Client: a blocking wrapper of AsyncClient for one-shot calls."""

from __future__ import annotations

import asyncio

import numpy as np

from funchat.api import pb
from funchat.client.async_client import AsyncClient
from funchat.client.auth import resolve_api_key
from funchat.client.replies import Reply
from funchat.client.tls import TlsOptions, resolve_tls


class Client:
    """Blocking wrapper of AsyncClient for one-shot calls. Each call runs in its own event loop
    (asyncio.run) with its own channel: simple and safe across threads, at the cost of a connection
    per call. Not for use inside a running event loop (use AsyncClient there).

    api_key: as AsyncClient's (None: FUNCHAT_API_KEY, read here; "": none); kept out of the repr.
    tls: as AsyncClient's (None: the environment's FUNCHAT_TLS*, read here)."""

    def __init__(self, target: str = "127.0.0.1:50051", timeout: float | None = None, api_key: str | None = None,
                 tls: bool | TlsOptions | None = None):
        self.target = target
        self.timeout = timeout
        self.tls = resolve_tls(tls)
        self._api_key = resolve_api_key(api_key) or ""  # "": none (not the environment's again)

    def __repr__(self) -> str:
        key = "set" if self._api_key else "none"
        return f"Client(target={self.target!r}, timeout={self.timeout!r}, api_key=<{key}>)"

    def _run(self, method: str, *args, **kwargs):
        async def call():
            async with AsyncClient(self.target, self.timeout, api_key=self._api_key,
                                   tls=self.tls if self.tls is not None else False) as client:
                return await getattr(client, method)(*args, **kwargs)
        return asyncio.run(call())

    def respond(self, audio: np.ndarray | bytes, config: pb.SessionConfig | None = None,
                session_id: str | None = None) -> Reply:
        return self._run("respond", audio, config, session_id)

    def get_session(self, session_id: str) -> pb.Session:
        return self._run("get_session", session_id)

    def delete_session(self, session_id: str) -> bool:
        return self._run("delete_session", session_id)

    def health(self, service: str = "") -> bool:
        return self._run("health", service)
