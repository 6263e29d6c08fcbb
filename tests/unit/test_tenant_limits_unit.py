"""Pure logic of the limits' edges: retry hints as the server writes them and the client reads them,
the lenient request parsing of the gRPC ingress, the tenant-limit settings and Ray's bounded queue.
The limiter itself runs against a real redis-server in tests/integration/test_tenant_limits.py."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from funchat.api import pb
from funchat.client.errors import FunchatClientError, retry_after_s
from funchat.orchestrator import app
from funchat.orchestrator.errors import ApiError, retry_trailers
from funchat.orchestrator.ingress import UnparsableMessage, lenient
from funchat.orchestrator.service import ParsedEvents, parsed
from funchat.orchestrator.settings import OrchestratorSettings, SettingsError
from funchat.orchestrator.tenant_limits import TenantLimiter, TenantLimits

ENDPOINTS = {"audio_tokenizer": "a:1", "llm": "b:2", "refined_head": "c:3", "vocoder": "d:4"}
NOT_PROTOBUF = b"\x0f" + b"\x00" * 20  # field 1, wire type 7: no such wire type


class NoRedis:
    """Enough of a redis client to build a TenantLimiter that is never run."""

    def register_script(self, script):
        return None


class RecordingContext:
    """What a servicer context is told (the methods ApiError uses)."""

    def __init__(self):
        self.code = self.details = None
        self.trailers = ()

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details

    def set_trailing_metadata(self, trailers):
        self.trailers = tuple(trailers)


def test_a_retry_hint_is_retry_info_in_the_status_details_and_retry_after_ms():
    ctx = RecordingContext()
    ApiError("RESOURCE_EXHAUSTED", "tenant 'acme' is over", retry_after_s=0.2501).set_status(ctx)
    assert ctx.code is grpc.StatusCode.RESOURCE_EXHAUSTED and ctx.details == "tenant 'acme' is over"
    trailers = dict(ctx.trailers)
    assert trailers["retry-after-ms"] == "251"  # rounded up: never sooner than the server said
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and status.message == "tenant 'acme' is over"
    info = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info) and info.retry_delay.ToMilliseconds() == 251
    assert retry_after_s(ctx.trailers) == 0.251


def test_errors_without_a_hint_send_no_trailers_and_a_hint_is_never_zero():
    ctx = RecordingContext()
    ApiError("INVALID_ARGUMENT", "bad").set_status(ctx)
    assert ctx.trailers == ()
    assert dict(retry_trailers("RESOURCE_EXHAUSTED", "x", 0.0))["retry-after-ms"] == "1"


@pytest.mark.parametrize("trailers, expected", [
    ((("request_id", "r1"), ("retry-after-ms", "1500")), 1.5),
    ((("retry-after-ms", b"20"),), 0.02),
    ((("request_id", "r1"),), None),
    ((("retry-after-ms", "soon"),), None),
    ((("retry-after-ms", "-5"),), None),
    (None, None),
])
def test_the_client_reads_the_hint_from_trailing_metadata(trailers, expected):
    assert retry_after_s(trailers) == expected


def test_the_client_error_carries_the_hint():
    err = FunchatClientError("RESOURCE_EXHAUSTED", "full", retry_after_s=1.0)
    assert err.retry_after_s == 1.0 and str(err) == "RESOURCE_EXHAUSTED: full"
    assert FunchatClientError("NOT_FOUND", "gone").retry_after_s is None


def test_the_ingress_passes_unparsable_bytes_on_as_such():
    parse = lenient(pb.ClientEvent)
    event = pb.ClientEvent(commit=pb.InputAudioCommit())
    assert parse(event.SerializeToString()) == event
    bad = parse(NOT_PROTOBUF)
    assert bad == UnparsableMessage("funchat.v1.ClientEvent", 21)
    assert lenient(pb.RespondRequest)(NOT_PROTOBUF).message_type == "funchat.v1.RespondRequest"


def test_an_unparsable_message_is_invalid_argument_saying_what_to_send():
    with pytest.raises(ApiError) as err:
        parsed(UnparsableMessage("funchat.v1.RespondRequest", 300))
    assert err.value.code == "INVALID_ARGUMENT"
    assert err.value.message == ("a 300-byte message could not be parsed as funchat.v1.RespondRequest: send "
                                 "messages serialized from funchat/v1/funchat.proto")
    request = pb.GetSessionRequest(session_id="s")
    assert parsed(request) is request


def test_a_call_stream_ends_at_its_first_unparsable_message():
    good = pb.ClientEvent(commit=pb.InputAudioCommit())

    async def stream():
        yield good
        yield UnparsableMessage("funchat.v1.ClientEvent", 9)
        yield good

    async def main():
        seen = []
        with pytest.raises(ApiError) as err:
            async for event in ParsedEvents(stream()):
                seen.append(event)
        return seen, err.value

    seen, err = asyncio.run(main())
    assert seen == [good] and err.code == "INVALID_ARGUMENT" and "9-byte message" in err.message


def test_tenant_limit_settings_from_the_environment(no_funchat_env, monkeypatch):
    monkeypatch.setenv("FUNCHAT_AUTH", "off")
    defaults = OrchestratorSettings.load(checkpoint="/ckpt", endpoints=ENDPOINTS)
    assert (defaults.tenant_max_calls, defaults.tenant_rate_per_s, defaults.tenant_burst,
            defaults.tenant_slot_lease_s) == (32, 20.0, 40, 30.0)
    monkeypatch.setenv("FUNCHAT_TENANT_MAX_CALLS", "0")
    monkeypatch.setenv("FUNCHAT_TENANT_RATE_PER_S", "2.5")
    monkeypatch.setenv("FUNCHAT_TENANT_BURST", "5")
    settings = OrchestratorSettings.load(checkpoint="/ckpt", endpoints=ENDPOINTS)
    assert (settings.tenant_max_calls, settings.tenant_rate_per_s, settings.tenant_burst) == (0, 2.5, 5)
    monkeypatch.setenv("FUNCHAT_TENANT_BURST", "0")
    with pytest.raises(SettingsError, match="FUNCHAT_TENANT_BURST"):
        OrchestratorSettings.load(checkpoint="/ckpt", endpoints=ENDPOINTS)
    monkeypatch.setenv("FUNCHAT_TENANT_BURST", "5")
    monkeypatch.setenv("FUNCHAT_TENANT_RATE_PER_S", "-1")
    with pytest.raises(SettingsError, match="FUNCHAT_TENANT_RATE_PER_S"):
        OrchestratorSettings.load(checkpoint="/ckpt", endpoints=ENDPOINTS)


def test_a_rate_without_a_burst_is_refused():
    with pytest.raises(ValueError, match="burst of at least 1"):
        TenantLimiter(NoRedis(), TenantLimits(rate_per_s=1.0, burst=0))
    TenantLimiter(NoRedis(), TenantLimits(max_calls=3))  # no rate limit: no burst needed


def test_a_tenants_own_limits_replace_the_defaults_field_by_field():
    own = {"acme": {"max_calls": 4}, "beta": {"rate_per_s": 0.5, "burst": 2}}
    limiter = TenantLimiter(NoRedis(), TenantLimits(2, 10.0, 20), overrides=lambda t: own.get(t, {}))
    assert limiter.limits_of("acme") == TenantLimits(4, 10.0, 20)
    assert limiter.limits_of("beta") == TenantLimits(2, 0.5, 2)
    assert limiter.limits_of("other") == TenantLimits(2, 10.0, 20)


def test_rays_queue_is_bounded(no_funchat_env, monkeypatch):
    monkeypatch.setenv("FUNCHAT_AUTH", "off")
    settings = OrchestratorSettings.load(checkpoint="/ckpt", endpoints=ENDPOINTS, max_calls=8)
    options = app.deployment_options(settings)
    assert options["max_ongoing_requests"] == 8 + 16 and options["max_queued_requests"] == 16
    assert app.build_app(settings)._bound_deployment._deployment_config.max_queued_requests == 16
