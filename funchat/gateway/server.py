"""The gateway's gRPC server: the public port, plaintext or TLS (optionally mTLS), with keepalive,
forwarding every call to Ray Serve's gRPC proxy (funchat.gateway.forward).

Two ways to run it: `python -m funchat.gateway` (`run`, its own process: the chart's sidecar of a
RayService head), or in the orchestrator's process (`GatewayThread`: a thread with its own event
loop, started and stopped by `python -m funchat.orchestrator.app`).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading

import grpc

from funchat.gateway.forward import Forwarder
from funchat.gateway.settings import GatewaySettings
from funchat.gateway.tls import CertificateFiles

log = logging.getLogger("funchat.gateway")


class GatewayError(RuntimeError):
    """The gateway cannot serve (its port is taken); the message says which port."""


class Gateway:
    """One gRPC server on the public port and one channel to the upstream, in the running event loop."""

    def __init__(self, settings: GatewaySettings):
        self.settings = settings
        # TlsFilesError here, at start, for files that cannot be used
        self.certificates = (CertificateFiles(settings.tls_cert_file, settings.tls_key_file,
                                              settings.tls_client_ca_file) if settings.tls else None)
        self.server: grpc.aio.Server | None = None
        self.channel: grpc.aio.Channel | None = None

    def describe(self) -> str:
        tls = "plaintext"
        if self.certificates is not None:
            tls = "TLS with client certificates (mTLS)" if self.certificates.client_auth else "TLS"
        return f"gRPC gateway on {self.settings.address} ({tls}) -> {self.settings.upstream}"

    async def start(self) -> None:
        s = self.settings
        self.channel = grpc.aio.insecure_channel(s.upstream, options=s.channel_options())
        self.server = grpc.aio.server(options=s.server_options())
        self.server.add_generic_rpc_handlers((Forwarder(self.channel, s.send_timeout_s),))
        try:
            if self.certificates is not None:
                port = self.server.add_secure_port(s.address, self.certificates.server_credentials())
            else:
                port = self.server.add_insecure_port(s.address)
        except RuntimeError:
            port = 0
        if not port:
            await self.channel.close()
            raise GatewayError(f"cannot listen on {s.address} (FUNCHAT_GRPC_PORT): the port is taken or the "
                               "address is not this machine's")
        await self.server.start()

    async def stop(self, grace: float | None = 5.0) -> None:
        """Stop taking calls, give those in flight `grace` seconds, close the upstream channel."""
        if self.server is not None:
            await self.server.stop(grace)
        if self.channel is not None:
            await self.channel.close()


async def run(settings: GatewaySettings, stop: asyncio.Event, grace: float = 5.0) -> None:
    """Serve until `stop` is set."""
    gateway = Gateway(settings)
    await gateway.start()
    print(f"funchat {gateway.describe()}", flush=True)
    try:
        await stop.wait()
    finally:
        await gateway.stop(grace)


def serve_forever(settings: GatewaySettings) -> None:
    """`run` until SIGTERM / SIGINT."""
    async def main():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run(settings, stop)
    asyncio.run(main())


class GatewayThread:
    """The gateway in a thread of this process, with its own event loop. `start` returns once it
    listens (or raises why it cannot); `stopped` is set when it has ended, for any reason."""

    def __init__(self, settings: GatewaySettings):
        self.gateway = Gateway(settings)  # TlsFilesError now, in the caller's thread
        self.stopped = threading.Event()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="funchat-gateway", daemon=True)

    def start(self, timeout: float = 30.0) -> None:
        self._thread.start()
        if not self._started.wait(timeout):
            raise GatewayError(f"the gateway did not start within {timeout:g} s")
        if self._error is not None:
            raise self._error

    def stop(self, grace: float = 5.0) -> None:
        if self._thread.ident is None:  # never started
            return
        if self._loop is not None and self._stop is not None and not self.stopped.is_set():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(grace + 5.0)

    def _main(self) -> None:
        async def main():
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            try:
                await self.gateway.start()
            except BaseException as exc:  # noqa: BLE001 (handed to start())
                self._error = exc
                return
            finally:
                self._started.set()
            try:
                await self._stop.wait()
            finally:
                await self.gateway.stop()
        try:
            asyncio.run(main())
        except Exception:  # noqa: BLE001 (the orchestrator sees `stopped` and exits)
            log.exception("the gateway failed")
        finally:
            self.stopped.set()
