"""The events a call will send, in order, read by the RPC that streams them to the caller."""

from __future__ import annotations

import asyncio
import collections

from funchat.api import pb

END = object()  # the last item of an outbox: the RPC's stream ends after what came before it


class Outbox:
    """The events a call will send, in order; audio not yet sent can be dropped at a barge-in.

    A queue that can drop items in its middle, which asyncio.Queue cannot. Items are server events,
    `END`, or (Converse) an ApiError that ends the call with its status.
    """

    def __init__(self):
        self.items: collections.deque = collections.deque()
        self.ready = asyncio.Event()

    async def put(self, item) -> None:
        self.put_nowait(item)

    def put_nowait(self, item) -> None:
        self.items.append(item)
        self.ready.set()

    def drop_audio(self, response_id: str) -> int:
        """Remove the unsent audio chunks of a reply; -> how many."""
        keep = [e for e in self.items if not (isinstance(e, pb.ServerEvent) and e.WhichOneof("event") == "audio_delta"
                                                and e.audio_delta.response_id == response_id)]
        dropped = len(self.items) - len(keep)
        self.items = collections.deque(keep)
        return dropped

    async def get(self):
        while not self.items:
            self.ready.clear()
            await self.ready.wait()
        return self.items.popleft()
