"""The public API's gateway (funchat.gateway) against small real gRPC servers on 127.0.0.1: every
call forwarded byte for byte with its metadata, statuses, deadline, half-close and cancellation;
TLS, mTLS, certificate reload without a restart, keepalive, the send timeout. Certificates: the `pki` fixture
(tests/conftest.py). (The gateway in front of a real orchestrator: tests/integration/test_public_tls.py.)
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from funchat.api import pb, pb_grpc
from funchat.client import AsyncClient, Client, FunchatClientError, session_config
from funchat.client.tls import TlsOptions
from funchat.dev.tcp_proxy import TcpProxy
from funchat.dev.tritonserver import free_port
from funchat.gateway.forward import public_status
from funchat.gateway.server import GatewayError, GatewayThread
from funchat.gateway.settings import GatewaySettings, GatewaySettingsError
from funchat.gateway.tls import CertificateFiles, TlsFilesError

# ---------------------------------------------------------------- servers


RAW = dict(request_serializer=None, response_deserializer=None)


class Echo(grpc.GenericRpcHandler):
    """A raw-bytes upstream, /test.Echo/<Method>:
    Unary: echoes; b"full" -> RESOURCE_EXHAUSTED with trailing metadata and status details; b"lost" ->
      INTERNAL with Ray's text for a dead replica; b"meta" ->
      the invocation metadata it got, as lines.
    Stream: echoes each message; ends when the caller half-closes, or after a b"stop".
    Refuse: ends PERMISSION_DENIED before reading anything.
    Hang: waits until cancelled or 30 s; records (time cancelled, deadline left at start)."""

    def __init__(self):
        self.cancelled = threading.Event()
        self.cancelled_at: float | None = None
        self.time_remaining: float | None = None
        self.half_closed = threading.Event()

    def service(self, details):
        method = details.method.rsplit("/", 1)[-1]
        if method == "Unary":
            return grpc.unary_unary_rpc_method_handler(self.unary)
        if method == "Stream":
            return grpc.stream_stream_rpc_method_handler(self.stream)
        if method == "Refuse":
            return grpc.stream_stream_rpc_method_handler(self.refuse)
        if method == "Hang":
            return grpc.unary_stream_rpc_method_handler(self.hang)
        return None

    def unary(self, request: bytes, context) -> bytes:
        context.send_initial_metadata((("x-initial", "1"),))
        if request == b"full":
            context.abort_with_status(_Status(grpc.StatusCode.RESOURCE_EXHAUSTED, "the server is full: retry later",
                                              (("retry-after-ms", "250"), ("grpc-status-details-bin", DETAILS))))
        if request == b"queue-full":  # Ray Serve's own refusal: no retry hint
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "Request dropped due to backpressure")
        if request == b"lost":  # what Ray Serve's proxy answers when the call's replica died
            context.abort(grpc.StatusCode.INTERNAL, RAY_ACTOR_DIED)
        if request == b"meta":
            return "\n".join(f"{k}={v}" for k, v in context.invocation_metadata()).encode()
        context.set_trailing_metadata((("x-trailing", "2"), ("x-bin-bin", b"\x00\xff")))
        return request

    def stream(self, requests, context):
        for message in requests:
            if message == b"stop":
                return
            yield message
        self.half_closed.set()
        yield b"half-closed"

    def refuse(self, requests, context):
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "refused before reading")

    def hang(self, request: bytes, context):
        self.time_remaining = context.time_remaining()
        context.add_callback(self._on_done)
        yield b"started"
        deadline = time.monotonic() + 30
        while context.is_active() and time.monotonic() < deadline:
            time.sleep(0.01)

    def _on_done(self):
        self.cancelled_at = time.monotonic()
        self.cancelled.set()


RAY_ACTOR_DIED = ("The actor died unexpectedly before finishing this task.\n\tclass_name: ServeReplica:funchat:"
                  "Orchestrator\n\tactor_id: 8a6f1e2b3c4d5e6f7a8b9c0d01000000\n\tpid: 4242\n\tip: 10.1.2.3\n"
                  "The actor is dead because its worker process has died.")
DETAILS = b"\x08\x08\x12\x05full!"  # a google.rpc.Status as bytes: passed through untouched


class _Status(grpc.Status):
    def __init__(self, code, details, trailing_metadata):
        self.code, self.details, self.trailing_metadata = code, details, trailing_metadata


def serve(handler, workers: int):
    """Serve `handler` (a generic RPC handler) on a free loopback port, named in `handler.target`,
    until the generator is closed."""
    server = grpc.server(futures.ThreadPoolExecutor(workers))
    server.add_generic_rpc_handlers((handler,))
    handler.target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    yield handler
    server.stop(None)


@pytest.fixture(scope="module")
def echo():
    yield from serve(Echo(), workers=8)


def start_gateway(upstream: str, **settings) -> tuple[GatewayThread, str]:
    host, port = upstream.rsplit(":", 1)
    values = dict(grpc_host="127.0.0.1", grpc_port=free_port(), proxy_host=host, proxy_port=int(port),
                  max_message_bytes=1 << 20)
    gateway = GatewayThread(GatewaySettings.load(**{**values, **settings}))
    gateway.start()
    return gateway, f"127.0.0.1:{gateway.gateway.settings.grpc_port}"


@pytest.fixture(scope="module")
def echo_gateway(echo):
    gateway, target = start_gateway(echo.target)
    yield target
    gateway.stop()


@pytest.fixture
def stand_in_gateway(stand_in):
    gateway, target = start_gateway(stand_in.target)
    yield target
    gateway.stop()


def tls_channel(target: str, ca: Path | None, client: tuple[Path, Path] | None = None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes() if ca else None,
        private_key=client[1].read_bytes() if client else None,
        certificate_chain=client[0].read_bytes() if client else None)
    return grpc.secure_channel(target, credentials)


def unary(channel: grpc.Channel, request: bytes, **kwargs):
    return channel.unary_unary("/test.Echo/Unary", **RAW).with_call(request, timeout=5, **kwargs)


# ---------------------------------------------------------------- forwarding


def test_unary_call_passes_through_with_its_metadata(echo, echo_gateway):
    with grpc.insecure_channel(echo_gateway) as channel:
        payload = bytes(range(256)) * 100
        answer, call = unary(channel, payload)
        assert answer == payload
        assert ("x-initial", "1") in call.initial_metadata()
        assert ("x-trailing", "2") in call.trailing_metadata()
        assert ("x-bin-bin", b"\x00\xff") in call.trailing_metadata()
        seen, _ = unary(channel, b"meta", metadata=(("authorization", "Bearer abc"),
                                                    ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-"
                                                                    "b7ad6b7169203331-01"),
                                                    ("x-data-bin", b"\x01\x02")))
        lines = seen.decode().splitlines()
        assert "authorization=Bearer abc" in lines
        assert "traceparent=00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01" in lines
        assert "x-data-bin=b'\\x01\\x02'" in lines


def test_error_status_details_and_trailing_metadata_pass_through(echo_gateway):
    with grpc.insecure_channel(echo_gateway) as channel:
        with pytest.raises(grpc.RpcError) as failed:
            unary(channel, b"full")
    error = failed.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.details() == "the server is full: retry later"
    trailing = dict(error.trailing_metadata())
    assert trailing["retry-after-ms"] == "250"
    assert trailing["grpc-status-details-bin"] == DETAILS


def test_a_lost_replica_is_unavailable_with_what_to_do_and_no_ray_internals(echo_gateway):
    with grpc.insecure_channel(echo_gateway) as channel:
        with pytest.raises(grpc.RpcError) as failed:
            unary(channel, b"lost")
    error = failed.value
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "orchestrator replica was lost" in error.details() and "resume_token" in error.details()
    for internal in ("4242", "10.1.2.3", "8a6f1e2b", "ServeReplica"):
        assert internal not in error.details()


def test_a_refusal_without_a_retry_hint_gets_one(echo_gateway):
    with grpc.insecure_channel(echo_gateway) as channel:
        with pytest.raises(grpc.RpcError) as failed:
            unary(channel, b"queue-full")
    error = failed.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailing = dict(error.trailing_metadata())
    assert trailing["retry-after-ms"] == "1000"
    status = status_pb2.Status.FromString(trailing["grpc-status-details-bin"])
    info = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info) and info.retry_delay.ToMilliseconds() == 1000


def test_other_internal_errors_pass_unchanged():
    assert public_status(grpc.StatusCode.INTERNAL, "llm forward failed") == (grpc.StatusCode.INTERNAL,
                                                                            "llm forward failed")
    assert public_status(grpc.StatusCode.UNAVAILABLE, "The actor died") == (grpc.StatusCode.UNAVAILABLE,
                                                                           "The actor died")


def test_stream_passes_through_and_half_close_reaches_the_upstream(echo, echo_gateway):
    messages = [b"", b"a", bytes(1000), bytes(range(256))]
    with grpc.insecure_channel(echo_gateway) as channel:
        stream = channel.stream_stream("/test.Echo/Stream", **RAW)
        assert list(stream(iter(messages), timeout=5)) == messages + [b"half-closed"]
        assert echo.half_closed.is_set()
        # the upstream ends first (b"stop"): the caller's call ends OK though it never half-closed
        requests = threading.Event()

        def never_done():
            yield b"x"
            yield b"stop"
            requests.wait(5)

        call = stream(never_done(), timeout=5)
        assert list(call) == [b"x"] and call.code() == grpc.StatusCode.OK
        requests.set()


def test_caller_cancellation_reaches_the_upstream(echo, echo_gateway):
    echo.cancelled.clear()
    with grpc.insecure_channel(echo_gateway) as channel:
        call = channel.unary_stream("/test.Echo/Hang", **RAW)(b"", timeout=20)
        assert next(call) == b"started"
        cancelled_at = time.monotonic()
        call.cancel()
        assert echo.cancelled.wait(5), "the upstream call was not cancelled"
        assert echo.cancelled_at - cancelled_at < 1.0
        # the caller's deadline went along (gRPC's timeout header rounds up: a little over 20 s)
        assert 15 < echo.time_remaining <= 20.5


def test_deadline_reaches_the_upstream(echo, echo_gateway):
    echo.cancelled.clear()
    with grpc.insecure_channel(echo_gateway) as channel:
        call = channel.unary_stream("/test.Echo/Hang", **RAW)(b"", timeout=1.0)
        with pytest.raises(grpc.RpcError) as failed:
            list(call)
        assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert echo.cancelled.wait(5)
        # the caller's 1 s, not a default: the grpc-timeout header is rounded up when encoded, so
        # the upstream may see a few milliseconds more (1.0086 s seen)
        assert echo.time_remaining <= 1.05


def test_an_upstream_that_answers_before_reading_passes_its_status(echo_gateway):
    """An upstream that ends the call before it reads the caller's messages (as Ray's proxy does
    for an application that is not up yet): the caller gets that status, never UNKNOWN from the
    gateway writing to the finished upstream call (a race: tried many times, early and late)."""
    def messages(delay_s: float):
        for _ in range(3):
            time.sleep(delay_s)
            yield b"m" * 1000

    # A status that overtakes a client's writes can reach any grpc client as INTERNAL "Internal error from
    # Core" (grpc/grpc#36066): the gateway's own call to the upstream included, whose status it passes on.
    core_bug = (grpc.StatusCode.INTERNAL, "Internal error from Core")
    answers = []
    with grpc.insecure_channel(echo_gateway) as channel:
        refuse = channel.stream_stream("/test.Echo/Refuse", **RAW)
        for i in range(60):
            with pytest.raises(grpc.RpcError) as failed:
                list(refuse(messages(0.001 * (i % 4)), timeout=5))
            answers.append((failed.value.code(), failed.value.details()))
    assert set(answers) <= {(grpc.StatusCode.PERMISSION_DENIED, "refused before reading"), core_bug}, set(answers)
    assert answers.count(core_bug) < len(answers) / 2


def test_messages_over_the_limit_are_refused_at_the_gateway(echo_gateway):
    with grpc.insecure_channel(echo_gateway, options=[("grpc.max_send_message_length", 4 << 20)]) as channel:
        with pytest.raises(grpc.RpcError) as failed:
            unary(channel, bytes((1 << 20) + 1))
        assert failed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert unary(channel, bytes((1 << 20) - 64))[0] == bytes((1 << 20) - 64)  # just under it: through


def test_funchat_calls_through_the_gateway_equal_direct_ones(stand_in, stand_in_gateway):
    """The real API through the gateway, with the client: unary, server streaming and bidirectional
    calls, the API key, UNAUTHENTICATED; the Respond stream's bytes equal the direct call's."""
    request = pb.RespondRequest(audio=b"\0\0" * 1600)
    metadata = (("authorization", f"Bearer {stand_in.key}"),)
    streams = []
    for target in (stand_in.target, stand_in_gateway):
        with grpc.insecure_channel(target) as channel:
            respond = channel.unary_stream("/funchat.v1.Funchat/Respond", **RAW)
            streams.append(list(respond(request.SerializeToString(), metadata=metadata, timeout=5)))
    assert streams[0] == streams[1] and len(streams[0]) == 5

    assert Client(stand_in_gateway, timeout=5, api_key=stand_in.key).respond(b"\0\0" * 1600).text == "hi"
    with pytest.raises(FunchatClientError) as refused:
        Client(stand_in_gateway, timeout=5, api_key="fck_wrong").get_session("sess_1")
    assert refused.value.code == "UNAUTHENTICATED" and refused.value.message == stand_in.refused

    async def converse():
        async with AsyncClient(stand_in_gateway, api_key=stand_in.key) as client:
            assert await client.health()
            async with client.converse(session_config(turn_detection="manual")) as call:
                await call.send_audio(b"\0\0" * 1600)
                await call.commit()
                return await call.next_reply()

    import asyncio
    assert asyncio.run(converse()).text == "hi"
    assert ("Converse", [f"Bearer {stand_in.key}"]) in stand_in.seen


# ---------------------------------------------------------------- TLS


def test_tls_serves_and_plaintext_is_refused(echo, pki):
    cert, key = pki["server"]
    gateway, target = start_gateway(echo.target, tls_cert_file=cert, tls_key_file=key)
    try:
        with tls_channel(target, pki["ca_file"]) as channel:
            assert unary(channel, b"over tls")[0] == b"over tls"
        with grpc.insecure_channel(target) as channel:
            with pytest.raises(grpc.RpcError) as failed:
                unary(channel, b"plaintext")
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        with tls_channel(target, pki["other_ca_file"]) as channel:  # a server this client does not trust
            with pytest.raises(grpc.RpcError) as failed:
                unary(channel, b"untrusted")
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        gateway.stop()


def test_mtls_refuses_callers_without_a_certificate_of_its_ca(echo, pki):
    cert, key = pki["server"]
    gateway, target = start_gateway(echo.target, tls_cert_file=cert, tls_key_file=key,
                                    tls_client_ca_file=pki["ca_file"])
    try:
        with tls_channel(target, pki["ca_file"], pki["client"]) as channel:
            assert unary(channel, b"with a client certificate")[0] == b"with a client certificate"
        for client in (None, pki["other_client"]):
            with tls_channel(target, pki["ca_file"], client) as channel:
                with pytest.raises(grpc.RpcError) as failed:
                    unary(channel, b"refused")
                assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        gateway.stop()


def test_client_tls_options_reach_a_tls_gateway(stand_in, pki):
    """funchat.client's TLS options: CA file and client certificate, against mTLS."""
    cert, key = pki["server"]
    gateway, target = start_gateway(stand_in.target, tls_cert_file=cert, tls_key_file=key,
                                    tls_client_ca_file=pki["ca_file"])
    try:
        client_cert, client_key = pki["client"]
        tls = TlsOptions(ca_file=pki["ca_file"], cert_file=client_cert, key_file=client_key)
        assert Client(target, timeout=5, api_key=stand_in.key, tls=tls).respond(b"\0\0" * 1600).text == "hi"
        assert not Client(target, timeout=5, api_key=stand_in.key, tls=TlsOptions(ca_file=pki["ca_file"])).health()
        assert not Client(target, timeout=5, api_key=stand_in.key).health()  # plaintext to a TLS port
    finally:
        gateway.stop()


def test_client_tls_options_from_the_environment(monkeypatch, pki, no_funchat_env):
    from funchat.client.tls import resolve_tls

    assert resolve_tls(None) is None and resolve_tls(False) is None and resolve_tls(True) == TlsOptions()
    monkeypatch.setenv("FUNCHAT_TLS", "1")
    assert resolve_tls(None) == TlsOptions()
    monkeypatch.setenv("FUNCHAT_TLS_CA_FILE", str(pki["ca_file"]))
    assert resolve_tls(None) == TlsOptions(ca_file=pki["ca_file"])
    monkeypatch.setenv("FUNCHAT_TLS_CLIENT_CERT_FILE", str(pki["client"][0]))
    with pytest.raises(ValueError, match="needs its key.*FUNCHAT_TLS_CLIENT_KEY_FILE"):
        resolve_tls(None)
    with pytest.raises(ValueError, match="cannot read the TLS file /nonexistent.pem"):
        TlsOptions(ca_file=Path("/nonexistent.pem")).credentials()


def _swap(link: Path, folder: Path) -> None:
    """What the kubelet does to a mounted Secret: a new folder, and one atomic symlink swap."""
    tmp = link.with_name(link.name + ".new")
    tmp.symlink_to(folder)
    tmp.replace(link)


def test_certificate_reload_without_restart(echo, pki, tmp_path, caplog):
    """The Secret's files (symlinks into a folder, as the kubelet mounts them) swapped to a
    certificate of another CA: new connections get it; a broken swap keeps the last good one and
    is logged once."""
    mount = tmp_path / "mount"
    mount.mkdir()
    _swap(mount / "..data", pki["root"] / "server")
    for name in ("tls.crt", "tls.key"):
        (mount / name).symlink_to(Path("..data") / name)
    gateway, target = start_gateway(echo.target, tls_cert_file=mount / "tls.crt", tls_key_file=mount / "tls.key")
    try:
        def answers(ca: Path) -> bool:
            with tls_channel(target, ca) as channel:  # a new channel: a new connection and handshake
                try:
                    return unary(channel, b"hello")[0] == b"hello"
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE
                    return False

        assert answers(pki["ca_file"]) and not answers(pki["other_ca_file"])
        _swap(mount / "..data", pki["root"] / "other-server")
        assert answers(pki["other_ca_file"]) and not answers(pki["ca_file"])
        assert gateway.gateway.certificates.reloads == 1

        broken = tmp_path / "broken"  # the first CA's certificate with the second one's key
        broken.mkdir()
        (broken / "tls.crt").write_bytes((pki["root"] / "server" / "tls.crt").read_bytes())
        (broken / "tls.key").write_bytes((pki["root"] / "other-server" / "tls.key").read_bytes())
        with caplog.at_level(logging.ERROR, logger="funchat.gateway"):
            _swap(mount / "..data", broken)
            assert answers(pki["other_ca_file"]) and answers(pki["other_ca_file"])  # the last good pair
        logged = [r for r in caplog.records if "cannot be used" in r.getMessage()]
        assert len(logged) == 1 and "keeping the previous certificate" in logged[0].getMessage()

        _swap(mount / "..data", pki["root"] / "server")  # fixed: the new pair is taken
        assert answers(pki["ca_file"])
    finally:
        gateway.stop()


def test_bad_tls_files_are_refused_at_start(pki, tmp_path):
    cert, _ = pki["server"]
    _, other_key = pki["other_server"]
    with pytest.raises(TlsFilesError, match="not a PEM certificate chain and its private key"):
        CertificateFiles(cert, other_key)
    with pytest.raises(TlsFilesError, match="cannot read"):
        CertificateFiles(cert, tmp_path / "missing.key")
    (tmp_path / "ca.pem").write_text("not a certificate")
    with pytest.raises(TlsFilesError, match="is not a PEM CA bundle"):
        CertificateFiles(*pki["server"], tmp_path / "ca.pem")


def test_settings_name_what_to_fix(pki, no_funchat_env):
    with pytest.raises(GatewaySettingsError, match="set both FUNCHAT_TLS_CERT_FILE and FUNCHAT_TLS_KEY_FILE"):
        GatewaySettings.load(tls_cert_file=pki["server"][0])
    with pytest.raises(GatewaySettingsError, match="FUNCHAT_TLS_CLIENT_CA_FILE .mTLS. needs TLS"):
        GatewaySettings.load(tls_client_ca_file=pki["ca_file"])
    with pytest.raises(GatewaySettingsError, match="FUNCHAT_PROXY_PORT must differ from FUNCHAT_GRPC_PORT"):
        GatewaySettings.load(grpc_port=50051, proxy_port=50051)
    with pytest.raises(GatewaySettingsError, match="FUNCHAT_KEEPALIVE_TIME_S"):
        GatewaySettings.load(keepalive_time_s=0)


def test_a_taken_port_is_an_error(echo, echo_gateway):
    port = int(echo_gateway.rsplit(":", 1)[1])
    with pytest.raises(GatewayError, match=f"cannot listen on 127.0.0.1:{port}"):
        GatewayThread(GatewaySettings.load(grpc_host="127.0.0.1", grpc_port=port, proxy_port=free_port())).start()


# ---------------------------------------------------------------- keepalive


def test_keepalive_finds_a_dead_connection_and_cancels_its_call(echo):
    """A caller whose network goes silent (a partition: no FIN, no RST) holds its call until the
    gateway's keepalive ping goes unanswered; then the upstream call is cancelled. Without keepalive
    (gRPC's default: first ping after 2 h) it would be held until the call's deadline."""
    gateway, target = start_gateway(echo.target, keepalive_time_s=0.5, keepalive_timeout_s=0.5)
    proxy = TcpProxy(target).start()
    try:
        echo.cancelled.clear()
        with grpc.insecure_channel(proxy.address) as channel:
            call = channel.unary_stream("/test.Echo/Hang", **RAW)(b"", timeout=25)
            assert next(call) == b"started"
            proxy.partition()
            partitioned_at = time.monotonic()
            assert echo.cancelled.wait(10), "the dead connection's call was never cancelled"
            # at most one keepalive interval + the ping's timeout, and scheduling slack
            assert echo.cancelled_at - partitioned_at < 0.5 + 0.5 + 1.0
            call.cancel()
    finally:
        proxy.stop()
        gateway.stop()


def test_a_caller_that_pings_too_often_is_sent_away(echo):
    """The ping policy: a caller pinging more often than keepalive_min_ping_interval_s gets GOAWAY
    (too_many_pings) and loses its call; the same caller keeps its call (until its deadline here)
    where the policy allows its pace. (A gRPC client pings at most once a second.)"""
    options = [("grpc.keepalive_time_ms", 1000), ("grpc.keepalive_timeout_ms", 1000),
               ("grpc.http2.max_pings_without_data", 0), ("grpc.keepalive_permit_without_calls", 1)]
    for min_interval_s, code in ((5.0, grpc.StatusCode.UNAVAILABLE), (0.5, grpc.StatusCode.DEADLINE_EXCEEDED)):
        gateway, target = start_gateway(echo.target, keepalive_min_ping_interval_s=min_interval_s)
        try:
            with grpc.insecure_channel(target, options=options) as channel:
                started = time.monotonic()
                call = channel.unary_stream("/test.Echo/Hang", **RAW)(b"", timeout=6.0)
                with pytest.raises(grpc.RpcError) as ended:
                    list(call)
                assert ended.value.code() == code, ended.value.details()
                if code == grpc.StatusCode.UNAVAILABLE:  # the third ping too soon: the third strike
                    assert time.monotonic() - started < 5.5
        finally:
            gateway.stop()


def test_the_readme_lists_every_gateway_setting_with_its_default():
    readme = (Path(__file__).resolve().parents[2] / "services" / "orchestrator" / "README.md").read_text()
    for name, field in GatewaySettings.model_fields.items():
        variable = f"FUNCHAT_{name.upper()}"
        assert f"`{variable}`" in readme, variable
        rows = [line for line in readme.splitlines() if line.startswith(f"| `{variable}` |")]
        if rows and name not in ("grpc_port", "proxy_port", "max_message_bytes"):  # shared with the orchestrator's table
            default = "unset" if field.default is None else f"`{field.default}`"
            assert rows[0].split("|")[2].strip() == default, variable


# ---------------------------------------------------------------- send timeout (FUNCHAT_SEND_TIMEOUT_S)
# A caller that stops reading has its call ended with RESOURCE_EXHAUSTED and cancelled upstream; a
# caller that reads is never cut. (In front of a real orchestrator: tests/integration/test_faults_network.py.)

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
        finished = threading.Event()
        # on the RPC's end, however it ends: a cancelled call's generator may never be resumed (a
        # blocked send is dropped), so checking is_active() between messages alone can miss it
        context.add_callback(lambda: None if finished.is_set() else self.cancelled.set())
        until = time.monotonic() + float(request)
        while time.monotonic() < until:
            if not context.is_active():
                self.cancelled.set()
                return
            yield MESSAGE
            time.sleep(0.005)
        finished.set()


@pytest.fixture(scope="module")
def talker():
    yield from serve(Talker(), workers=4)


def slow_reader_channel(target: str) -> grpc.Channel:
    """A 64 KB receive window that never grows (grpc's bandwidth probe off), like a slow link."""
    return grpc.insecure_channel(target, options=[("grpc.http2.lookahead_bytes", 65536), ("grpc.http2.bdp_probe", 0)])


def talk(channel: grpc.Channel, seconds: float):
    return channel.unary_stream("/test.Talker/Talk", **RAW)(str(seconds).encode())


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
