"""Conversation: one live Converse call, sending and receiving at the same time."""

from __future__ import annotations

import asyncio
import collections
import json
import time
from typing import TYPE_CHECKING, AsyncIterator, Mapping

import grpc
import numpy as np

from funchat.api import pb
from funchat.client.audio import encode_audio
from funchat.client.config import MAX_CHUNK_S, config_mode, input_format
from funchat.client.errors import FunchatClientError, retry_after_s
from funchat.client.events import response_id_of
from funchat.client.replies import Reply, collect_reply

if TYPE_CHECKING:  # AsyncClient makes Conversations, so it imports this module
    from funchat.client.async_client import AsyncClient


class Conversation:
    """One Converse call. Sending and receiving run concurrently: the send methods put events on a
    queue that feeds the request stream, and events()/next_reply() read the response stream with
    the call's read(). Use one reader at a time (events() or next_reply(), not both at once).

    Every reply is also assembled as it completes: `replies` holds them all, in order.

    `resume_token` is the newest resume token the server gave (SessionCreated's, then each
    response_done's): tokens are short-lived, so continue the session in a new call with this one,
    `session_config(resume_token=call.resume_token)`."""

    def __init__(self, client: AsyncClient, config: pb.SessionConfig, timeout: float | None = None):
        self.client = client
        self.config = config
        self.timeout = timeout
        self.mode = config_mode(config)
        self.encoding, self.sample_rate, self._width = input_format(config)
        self.session: pb.SessionCreated | None = None
        self.resume_token = ""  # the newest one (see the class docstring)
        self.replies: list[Reply] = []
        self._requests: asyncio.Queue[pb.ClientEvent | None] = asyncio.Queue()
        self._call = None
        self._ended = False       # `end` sent: the request stream is closed
        self._finished = False    # the server's stream is over
        self._last_sent_at: float | None = None  # last audio chunk or commit
        self._turn_end_at: float | None = None
        self._open: dict[str, tuple[float | None, list[tuple[float, pb.ServerEvent]]]] = {}
        self._unreturned: collections.deque[Reply] = collections.deque()

    # ---- lifetime ----

    async def __aenter__(self) -> "Conversation":
        await self.start()
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            await self.close()
        else:
            self.abort()

    async def start(self) -> pb.SessionCreated:
        """Open the call, send the config, wait for SessionCreated (FunchatClientError if refused)."""
        self._call = self.client.stub.Converse(self._request_stream(), timeout=self.timeout)  # with the API key
        self._requests.put_nowait(pb.ClientEvent(session=self.config))
        item = await self._read()
        if item is None:
            raise FunchatClientError("UNKNOWN", "the server ended the call before SessionCreated")
        event = item[1]
        if event.WhichOneof("event") == "error":
            hint = await self._retry_hint()
            self.abort()
            raise FunchatClientError(event.error.code or "UNKNOWN", event.error.message, retry_after_s=hint)
        if event.WhichOneof("event") != "session_created":
            self.abort()
            raise FunchatClientError("UNKNOWN", f"expected session_created first, got {event.WhichOneof('event')}")
        self.session = event.session_created
        self.resume_token = self.session.resume_token
        return self.session

    async def _retry_hint(self) -> float | None:
        """The retry hint of a call the server is ending (in its trailing metadata; None without one,
        or when the status does not come within 5 s)."""
        try:
            return retry_after_s(await asyncio.wait_for(self._call.trailing_metadata(), 5.0))
        except (asyncio.TimeoutError, grpc.aio.AioRpcError):
            return None

    async def _request_stream(self) -> AsyncIterator[pb.ClientEvent]:
        while True:
            event = await self._requests.get()
            if event is None:  # end(): half-close, the server answers what is pending and finishes
                return
            yield event

    async def close(self, grace_s: float = 10.0) -> None:
        """Send `end` and read the remaining events (replies still being generated complete) for up
        to grace_s, then cancel the call."""
        await self.end()
        if self._finished or self._call is None:
            return
        try:
            await asyncio.wait_for(self._drain(), grace_s)
        except asyncio.TimeoutError:
            self.abort()

    async def _drain(self) -> None:
        while await self._read() is not None:
            pass

    def abort(self) -> None:
        """Cancel the call now."""
        self._ended = self._finished = True
        if self._call is not None:
            self._call.cancel()

    # ---- client events ----

    def _send(self, event: pb.ClientEvent) -> None:
        if self._ended:
            raise FunchatClientError("FAILED_PRECONDITION", "the call has ended; nothing more can be sent")
        self._requests.put_nowait(event)

    async def send_audio(self, audio: np.ndarray | bytes) -> None:
        """Caller audio: float samples at the config's input rate, or bytes in its format. Sent as
        events of at most 1 s each (the server's limit)."""
        data = bytes(audio) if isinstance(audio, (bytes, bytearray)) else encode_audio(audio, self.encoding)
        step = int(self.sample_rate * MAX_CHUNK_S) * self._width
        for i in range(0, len(data), step):
            self._send(pb.ClientEvent(audio=pb.InputAudioAppend(audio=data[i:i + step])))
        if data:
            self._last_sent_at = time.monotonic()

    async def commit(self) -> None:
        """End the caller's turn (manual turn detection; with server VAD it flushes the detector)."""
        self._send(pb.ClientEvent(commit=pb.InputAudioCommit()))
        self._last_sent_at = time.monotonic()

    async def clear(self) -> None:
        self._send(pb.ClientEvent(clear=pb.InputAudioClear()))

    async def cancel(self) -> None:
        """Stop the reply being generated."""
        self._send(pb.ClientEvent(cancel=pb.ResponseCancel()))

    async def ack_playback(self, response_id: str, played_ms: int) -> None:
        self._send(pb.ClientEvent(playback=pb.PlaybackAck(response_id=response_id, played_ms=max(0, int(played_ms)))))

    async def send_function_output(self, call_id: str, output: str | Mapping | list) -> None:
        text = output if isinstance(output, str) else json.dumps(output, ensure_ascii=False)
        self._send(pb.ClientEvent(function_call_output=pb.FunctionCallOutput(call_id=call_id, output=text)))

    async def end(self) -> None:
        """End the call: the server answers speech it still holds, then ends its stream."""
        if self._ended:
            return
        self._requests.put_nowait(pb.ClientEvent(end=pb.SessionEnd()))
        self._requests.put_nowait(None)
        self._ended = True

    # ---- server events ----

    async def _read(self) -> tuple[float, pb.ServerEvent] | None:
        """The next event and when it came; None at the end of a call that ended OK."""
        if self._finished:
            return None
        try:
            event = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            self._ended = self._finished = True
            raise self.client.error(exc) from None
        if event is grpc.aio.EOF:
            self._ended = self._finished = True
            return None
        t = time.monotonic()
        self._track(t, event)
        return t, event

    def _track(self, t: float, event: pb.ServerEvent) -> None:
        """Group events by response and assemble each reply when its response_done comes."""
        kind = event.WhichOneof("event")
        rid = response_id_of(event)
        if kind == "committed":
            # The turn ended with the last audio (or commit) sent before the server said so.
            self._turn_end_at = self._last_sent_at
        elif kind == "response_created":
            self._open[rid] = (self._turn_end_at, [])
        if rid and rid in self._open:
            self._open[rid][1].append((t, event))
        elif kind == "error" and event.error.event == "turn" and self._open:
            # A failed turn's error comes just before its response_done: it belongs to the latest response.
            next(reversed(self._open.values()))[1].append((t, event))
        if kind == "response_done":
            if event.response_done.resume_token:
                self.resume_token = event.response_done.resume_token
            sent_at, timed = self._open.pop(rid, (None, [(t, event)]))
            reply = collect_reply([e for _, e in timed], [s for s, _ in timed], sent_at=sent_at, response_id=rid,
                                  mode=self.mode, session_id=self.session.session_id if self.session else "")
            self.replies.append(reply)
            self._unreturned.append(reply)

    async def events(self) -> AsyncIterator[pb.ServerEvent]:
        """The server's events until the call ends (FunchatClientError if it ends with an error status)."""
        while True:
            item = await self._read()
            if item is None:
                return
            yield item[1]

    async def next_reply(self) -> Reply:
        """The next reply not yet returned by next_reply (reading events until its response_done)."""
        while not self._unreturned:
            if await self._read() is None:
                raise FunchatClientError("FAILED_PRECONDITION", "the call ended before another reply was done")
        return self._unreturned.popleft()
