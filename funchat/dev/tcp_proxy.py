"""A TCP proxy for fault tests: it sits between a client and a server on 127.0.0.1 and, on
command, delays bytes, blackholes them or resets the connections.

    proxy = TcpProxy("127.0.0.1:8001")   # listens on a free 127.0.0.1 port, its own thread
    proxy.start()
    endpoint = proxy.address              # give this to the client instead of the server's
    proxy.set_delay(upstream_s=0.05, downstream_s=0.05)
    proxy.partition()                     # the nasty case: connections stay open, nothing arrives
    proxy.heal()
    proxy.reset()                         # close every connection (the client sees a reset)
    proxy.stop()

A partition keeps both sockets open and stops moving bytes, so neither side sees an error: each
learns of it only from its own deadlines or keepalive, as when a link or a middlebox drops packets.
As on a real network, TCP holds what was sent meanwhile (here: the proxy stops reading, so the
bytes wait in the kernel's buffers and the senders block when those are full); after heal() they
arrive, late, unless a side gave up and closed its connection first. Dropping bytes inside a TCP
stream instead would corrupt it, which no network does. The control methods are thread-safe (the
proxy runs its own event loop).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

READ_SIZE = 64 << 10
UPSTREAM, DOWNSTREAM = "upstream", "downstream"  # client -> server, server -> client


@dataclass
class Faults:
    """The delays the proxy adds now; read at every chunk, so a change applies at once."""

    upstream_delay_s: float = 0.0
    downstream_delay_s: float = 0.0

    def delay(self, direction: str) -> float:
        return self.upstream_delay_s if direction == UPSTREAM else self.downstream_delay_s


def parse_target(target: str) -> tuple[str, int]:
    """"host:port" -> (host, port); a bad one raises ValueError saying what is expected."""
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"proxy target {target!r} is not host:port (e.g. 127.0.0.1:8001)")
    return host, int(port)


class TcpProxy:
    """Forwards each accepted connection to `target`; faults set at run time (see the module doc)."""

    def __init__(self, target: str, host: str = "127.0.0.1"):
        self.target_host, self.target_port = parse_target(target)
        self.host = host
        self.port = 0  # the listening port, once started
        self.faults = Faults()
        self.connections = 0  # accepted so far
        self._loop = asyncio.new_event_loop()
        self._flowing = asyncio.Event()  # cleared while partitioned (set and cleared on the proxy's loop)
        self._flowing.set()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._connections: set[asyncio.Task] = set()  # one task per accepted connection

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # ---- lifecycle ----

    def start(self) -> "TcpProxy":
        self._thread.start()
        self._call(self._listen())
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def __enter__(self) -> "TcpProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- faults (thread-safe: delays are plain assignments; the partition switch runs on the loop) ----

    def set_delay(self, upstream_s: float = 0.0, downstream_s: float = 0.0) -> None:
        """Hold each chunk this long before passing it on (per direction; order is kept)."""
        if upstream_s < 0 or downstream_s < 0:
            raise ValueError("a delay is >= 0 seconds")
        self.faults.upstream_delay_s, self.faults.downstream_delay_s = upstream_s, downstream_s

    @property
    def partitioned(self) -> bool:
        return not self._flowing.is_set()

    def partition(self) -> None:
        """Stop moving bytes either way; connections stay open (see the module doc)."""
        self._loop.call_soon_threadsafe(self._flowing.clear)

    def heal(self) -> None:
        """Move bytes again: what waited during the partition arrives now, in order."""
        self._loop.call_soon_threadsafe(self._flowing.set)

    def reset(self) -> None:
        """Close every open connection, both sides (new ones are still accepted)."""
        self._call(self._close_all())

    @property
    def open_connections(self) -> int:
        return len(self._writers) // 2

    # ---- the event loop's side ----

    def _call(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._close_all()
        # end every connection's task here, so none is left suspended when the loop stops
        tasks = [t for t in self._connections if not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _close_all(self) -> None:
        writers, self._writers = list(self._writers), set()
        for writer in writers:
            writer.transport.abort()  # RST-like: no graceful FIN handshake

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)
        try:
            server_reader, server_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            client_writer.transport.abort()  # the server is down: the client sees its connection refused
            return
        self._writers.update((client_writer, server_writer))
        await asyncio.gather(self._pipe(client_reader, server_writer, UPSTREAM),
                             self._pipe(server_reader, client_writer, DOWNSTREAM), return_exceptions=True)
        for writer in (client_writer, server_writer):
            self._writers.discard(writer)
            writer.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str) -> None:
        """Copy one direction; each chunk leaves at (arrival + delay), in arrival order, and nothing
        is read or sent while partitioned."""
        queue: asyncio.Queue = asyncio.Queue()

        async def send() -> None:
            while (item := await queue.get()) is not None:
                due, data = item
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                await self._flowing.wait()  # a chunk read before the partition waits for heal()
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(send())
        try:
            while True:
                await self._flowing.wait()
                data = await reader.read(READ_SIZE)
                if not data:
                    break
                queue.put_nowait((time.monotonic() + self.faults.delay(direction), data))
        except asyncio.CancelledError:
            sender.cancel()  # the proxy stops: drop what waits (it may wait for a heal that never comes)
            raise
        finally:
            queue.put_nowait(None)
            await asyncio.gather(sender, return_exceptions=True)
            if writer.can_write_eof():
                try:
                    writer.write_eof()  # half-close: the other side sees this one's end
                except OSError:
                    pass
