"""The gateway's send timeout (FUNCHAT_SEND_TIMEOUT_S) against a small real gRPC upstream on
127.0.0.1: a caller that stops reading has its call ended with RESOURCE_EXHAUSTED and cancelled
upstream; a caller that reads is never cut. (In front of a real orchestrator:
tests/integration/test_faults_network.py.)"""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest

from tests.unit.test_gateway import start_gateway

MESSAGE = b"x" * 20_000


class Talker(grpc.GenericRpcHandler):
    """/test.Talker/Talk: a 20 KB message every 5 ms for as many seconds as the request says (ASCII);
    `cancelled` is set when the call was cancelled before that (not when it ended by itself)."""

    def __init__(self):
        self.cancelled = threading.Event()

    def service(self, details):
        return grpc.unary_stream_rpc_method_handler(self.talk)

    def talk(self, request: bytes, context):
        self.cancelled.clear()
        until = time.monotonic() + float(request)
        while time.monotonic() < until:
            if not context.is_active():
                self.cancelled.set()
                return
            yield MESSAGE
            time.sleep(0.005)


@pytest.fixture(scope="module")
def talker():
    handler = Talker()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((handler,))
    handler.target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    yield handler
    server.stop(None)


def slow_reader_channel(target: str) -> grpc.Channel:
    """A 64 KB receive window that never grows (grpc's bandwidth probe off), like a slow link."""
    return grpc.insecure_channel(target, options=[("grpc.http2.lookahead_bytes", 65536), ("grpc.http2.bdp_probe", 0)])


def talk(channel: grpc.Channel, seconds: float):
    return channel.unary_stream("/test.Talker/Talk", request_serializer=None,
                                response_deserializer=None)(str(seconds).encode())


def test_a_caller_that_stops_reading_is_ended_and_cancelled_upstream(talker):
    gateway, target = start_gateway(talker.target, send_timeout_s=1.0)
    try:
        with slow_reader_channel(target) as channel:
            call = talk(channel, 20)
            next(call)  # the call is up; then nothing is read
            t0 = time.monotonic()
            assert talker.cancelled.wait(10), "the upstream call was not cancelled"
            cancelled_after = time.monotonic() - t0
            with pytest.raises(grpc.RpcError) as failed:
                for _ in call:
                    pass
        assert failed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "the client is not reading" in failed.value.details()
        assert "FUNCHAT_SEND_TIMEOUT_S" in failed.value.details()
        assert 1.0 <= cancelled_after < 5.0, cancelled_after
    finally:
        gateway.stop()


def test_a_caller_that_reads_is_never_cut(talker):
    gateway, target = start_gateway(talker.target, send_timeout_s=1.0)
    try:
        with slow_reader_channel(target) as channel:
            received = sum(1 for _ in talk(channel, 3))  # longer than the send timeout, read as it comes
        assert received > 100 and not talker.cancelled.is_set()
    finally:
        gateway.stop()


def test_with_the_default_send_timeout_the_call_is_kept_longer(talker):
    """The same caller with the default (30 s): nothing ends it within a few seconds, which is
    what the short bound above changes."""
    gateway, target = start_gateway(talker.target)
    try:
        with slow_reader_channel(target) as channel:
            call = talk(channel, 20)
            next(call)
            assert not talker.cancelled.wait(4.0)
            call.cancel()
    finally:
        gateway.stop()
