"""funchat.tracing: settings, propagation, spans only under recording parents, and an export that a
collector which is down cannot slow (the breaker)."""

from __future__ import annotations

import time

import pytest
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from funchat import tracing
from funchat.dev.otlp_receiver import OtlpReceiver
from funchat.dev.tritonserver import free_port
from funchat.orchestrator.settings import OrchestratorSettings, SettingsError

SAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
NOT_SAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    tracing.configure("test", exporter=exporter)
    yield exporter
    tracing.shutdown()


def test_off_by_default_and_a_no_op_tracer_costs_nothing():
    tracing.shutdown()
    assert tracing.TracingConfig.from_env({}).enabled is False
    assert tracing.configure("test", tracing.TracingConfig()) is False
    with tracing.tracer().start_as_current_span("x") as span:
        assert not span.is_recording()
        assert tracing.inject() == {}


def test_config_from_env_and_precise_errors_that_never_show_a_header_value():
    cfg = tracing.TracingConfig.from_env({"FUNCHAT_TRACING_ENDPOINT": " collector:4317 ",
                                          "FUNCHAT_TRACING_HEADERS": "Authorization=Bearer s3cret, x-team = voice",
                                          "FUNCHAT_TRACING_SAMPLE_RATIO": "0.25"})
    assert (cfg.endpoint, cfg.sample_ratio, cfg.enabled) == ("collector:4317", 0.25, True)
    assert cfg.headers == (("authorization", "Bearer s3cret"), ("x-team", "voice"))
    assert "s3cret" not in repr(cfg)
    for env, words in [({"FUNCHAT_TRACING_SAMPLE_RATIO": "lots"}, "FUNCHAT_TRACING_SAMPLE_RATIO"),
                       ({"FUNCHAT_TRACING_SAMPLE_RATIO": "1.5"}, "from 0 to 1"),
                       ({"FUNCHAT_TRACING_HEADERS": "Bearer s3cret"}, "FUNCHAT_TRACING_HEADERS"),
                       ({"FUNCHAT_TRACING_ENDPOINT": "grpc://c:4317"}, "FUNCHAT_TRACING_ENDPOINT")]:
        with pytest.raises(tracing.TracingConfigError, match=words) as err:
            tracing.TracingConfig.from_env(env)
        assert "s3cret" not in str(err.value)


def test_orchestrator_settings_carry_tracing_but_never_the_headers_as_deployment_args():
    settings = OrchestratorSettings.load(checkpoint="/ckpt", endpoints={m: "h:1" for m in (
        "audio_tokenizer", "llm", "refined_head", "vocoder")}, tracing_endpoint="c:4317",
        tracing_headers="api-key=s3cret", tracing_sample_ratio=0.5, auth="off")
    assert settings.tracing_config().headers == (("api-key", "s3cret"),)
    args = settings.deployment_args()
    assert args["tracing_endpoint"] == "c:4317" and "tracing_headers" not in args
    assert "s3cret" not in repr(settings)
    with pytest.raises(SettingsError, match="FUNCHAT_TRACING_SAMPLE_RATIO"):
        OrchestratorSettings.load(checkpoint="/ckpt", endpoints=args["endpoints"], tracing_sample_ratio=2, auth="off")
    bad = OrchestratorSettings.load(checkpoint="/ckpt", endpoints=args["endpoints"], tracing_headers="nokey",
                                    auth="off")
    with pytest.raises(SettingsError, match="FUNCHAT_TRACING_HEADERS"):
        bad.tracing_config()


def test_context_travels_as_traceparent_and_only_sampled_work_sends_it(spans):
    with tracing.tracer().start_as_current_span("turn") as turn:
        carrier = tracing.inject()
    assert set(carrier) == {"traceparent"}
    parent = tracing.extract(carrier)
    tracing.record_span("forward", 10, 20, parent, {"funchat.batch_size": 2})
    forward = next(s for s in spans.get_finished_spans() if s.name == "forward")
    assert forward.parent.span_id == turn.get_span_context().span_id
    assert forward.context.trace_id == turn.get_span_context().trace_id
    assert (forward.start_time, forward.end_time) == (10, 20)
    # gRPC metadata is (key, value) pairs; junk and absent contexts give None
    assert tracing.extract([("traceparent", SAMPLED), ("other", "x")]) is not None
    for carrier in (None, {}, {"traceparent": "garbage"}, {"traceparent": 7}):
        assert tracing.extract(carrier) is None
    # a caller that did not sample: nothing recorded under it, nothing sent on
    with tracing.tracer().start_as_current_span("turn", context=tracing.extract({"traceparent": NOT_SAMPLED})):
        assert tracing.inject() == {}


def test_child_spans_only_under_a_recording_span(spans):
    with tracing.child_span("session_store.get") as span:
        assert span is None  # no turn: no stray one-span trace
    with tracing.tracer().start_as_current_span("turn"):
        with tracing.child_span("session_store.get", {"db.system": "redis"}) as span:
            assert span is not None
    names = [s.name for s in spans.get_finished_spans()]
    assert names == ["session_store.get", "turn"]


def test_followers_record_only_what_was_sampled_elsewhere():
    exporter = InMemorySpanExporter()
    tracing.configure("funchat-llm", exporter=exporter, record_new_traces=False)
    try:
        tracing.record_span("llm prefill", 1, 2, None)  # no parent: not recorded
        tracing.record_span("llm prefill", 1, 2, tracing.extract({"traceparent": SAMPLED}), error="INVALID_ARG: x")
        [span] = exporter.get_finished_spans()
        assert format(span.parent.span_id, "016x") == "b7ad6b7169203331"
        assert span.status.status_code is StatusCode.ERROR
        assert span.resource.attributes["service.name"] == "funchat-llm"
    finally:
        tracing.shutdown()


class _DownCollector:
    def __init__(self):
        self.calls = 0

    def export(self, spans):
        self.calls += 1
        return SpanExportResult.FAILURE

    def shutdown(self):
        pass

    def force_flush(self, timeout_millis=0):
        return True


def test_breaker_stops_trying_a_down_collector_for_a_while():
    now = [100.0]
    inner = _DownCollector()
    breaker = tracing._CollectorBreaker(inner, "c:4317", down_s=10.0, clock=lambda: now[0])
    assert breaker.export([1, 2]) is SpanExportResult.FAILURE and inner.calls == 1
    now[0] += 5
    assert breaker.export([3]) is SpanExportResult.FAILURE and inner.calls == 1  # dropped without trying
    now[0] += 6
    breaker.export([4])
    assert inner.calls == 2 and breaker.dropped == 4


def test_a_collector_that_is_down_never_blocks_spans_or_shutdown():
    port = free_port()  # nothing listens there
    tracing.configure("test", tracing.TracingConfig(endpoint=f"127.0.0.1:{port}"))
    t0 = time.perf_counter()
    for _ in range(tracing.MAX_QUEUE_SPANS * 2):  # more than the queue holds
        with tracing.tracer().start_as_current_span("turn"):
            pass
    ending = time.perf_counter() - t0
    t0 = time.perf_counter()
    tracing.shutdown()
    shutdown = time.perf_counter() - t0
    # Generous bounds on a loaded 2-core machine: a blocking export would take EXPORT_TIMEOUT_S
    # per batch (16 batches here), which is what these catch.
    assert ending < 10.0, ending
    assert shutdown < 2 * tracing.EXPORT_TIMEOUT_S + 1, shutdown


def test_spans_reach_an_otlp_receiver_with_their_resource_and_attributes():
    with OtlpReceiver() as receiver:
        tracing.configure("funchat-orchestrator", tracing.TracingConfig(endpoint=receiver.endpoint,
                                                                        headers=(("x-team", "voice"),)))
        with tracing.tracer().start_as_current_span("funchat.turn", attributes={"funchat.session_id": "s1"}):
            with tracing.child_span("session_store.get"):
                pass
        tracing.shutdown()  # flushes
        got = receiver.wait_for(lambda spans: len(spans) >= 2, timeout=10)
        assert receiver.last_metadata.get("x-team") == "voice"  # FUNCHAT_TRACING_HEADERS go with each export
    by_name = {s.name: s for s in got}
    assert by_name["funchat.turn"].service == "funchat-orchestrator"
    assert by_name["funchat.turn"].attributes["funchat.session_id"] == "s1"
    assert by_name["session_store.get"].parent_span_id == by_name["funchat.turn"].span_id
