"""The Triton adapters' shared helper without Triton: parameters (one default each, relative paths
from the working directory), inputs (sampling settings checked and named), errors with their
status, batching, metrics, a span per traced request. A fake `pb_utils` stands in for
triton_python_backend_utils."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from funchat import tracing
from funchat.engines.slot_pool import DEFAULT_MAX_SEQUENCES, SequenceError
from funchat.engines.triton_adapter import InputError, ServiceMetrics, ServiceParams, TritonIO, start_tracing
from funchat.errors import AudioInputError
from funchat.turn.sampling import GREEDY, SamplingParams


class FakeTensor:
    def __init__(self, name, array):
        self.name, self.array = name, np.asarray(array)

    def as_numpy(self):
        return self.array


class FakeError:
    INVALID_ARG, NOT_FOUND, UNAVAILABLE, INTERNAL, CANCELLED = (
        "INVALID_ARG", "NOT_FOUND", "UNAVAILABLE", "INTERNAL", "CANCELLED")

    def __init__(self, message, code=None):
        self.message, self.code = message, code


class FakeMetric:
    def __init__(self, **kwargs):
        self.observed, self.value = [], None

    def observe(self, value):
        self.observed.append(value)

    def increment(self, value):
        self.value = (self.value or 0) + value

    def set(self, value):
        self.value = value


class FakeFamily:
    HISTOGRAM, GAUGE, COUNTER = "histogram", "gauge", "counter"

    def __init__(self, name, description, kind):
        self.name = name

    def Metric(self, **kwargs):
        return FakeMetric(**kwargs)


class FakeRequest:
    def __init__(self, inputs=None, outputs=(), parameters="{}", cancelled=False):
        self.inputs = {k: FakeTensor(k, v) for k, v in (inputs or {}).items()}
        self.outputs = list(outputs)
        self._parameters = parameters  # the JSON text the Python backend's request.parameters() returns
        self._cancelled = cancelled

    def is_cancelled(self):
        return self._cancelled

    def requested_output_names(self):
        return self.outputs

    def parameters(self):
        return self._parameters


def fake_pb_utils(logged: list):
    return SimpleNamespace(
        Tensor=FakeTensor, TritonError=FakeError, MetricFamily=FakeFamily,
        InferenceResponse=lambda output_tensors=(), error=None: SimpleNamespace(
            outputs={t.name: t.array for t in output_tensors}, error=error),
        get_input_tensor_by_name=lambda request, name: request.inputs.get(name),
        Logger=SimpleNamespace(log_error=logged.append))


def triton_args(params: dict[str, str], **extra) -> dict:
    config = {"max_batch_size": 8, "parameters": {k: {"string_value": v} for k, v in params.items()}}
    return {"model_config": json.dumps(config), "model_repository": "/somewhere/else/services/llm", **extra}


# ---- parameters ----

def test_parameters_take_one_default_and_relative_paths_from_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = ServiceParams.from_args(triton_args({"dtype": "", "max_sequences": "8"}), "llm")
    assert params.checkpoint == tmp_path / "checkpoints" / "tiny"  # not next to the model repository
    assert params.path("tensorrt_plans", "build/llm_trt") == tmp_path / "build" / "llm_trt"
    assert ServiceParams.from_args(triton_args({"checkpoint": "/abs/ckpt"}), "llm").checkpoint.as_posix() == "/abs/ckpt"
    assert (params.device, params.dtype, params.max_batch_size) == ("cpu", "float32", 8)
    assert params.integer("max_sequences", DEFAULT_MAX_SEQUENCES) == 8
    assert ServiceParams.from_args(triton_args({}), "llm").integer("max_sequences", DEFAULT_MAX_SEQUENCES) == 64


def test_parameters_are_validated_and_named():
    params = ServiceParams.from_args(triton_args({"max_sequences": "many", "idle_timeout_s": "-1"}), "refined_head")
    with pytest.raises(ValueError, match=r"refined_head parameter max_sequences='many' is not accepted: "
                                         r"use an integer >= 1"):
        params.integer("max_sequences", 64, minimum=1)
    with pytest.raises(ValueError, match=r"idle_timeout_s='-1' is not accepted: use a positive number"):
        params.number("idle_timeout_s", 60.0)


def test_cuda_on_a_gpu_instance_is_that_instance_s_gpu():
    args = triton_args({"device": "cuda"}, model_instance_kind="GPU", model_instance_device_id="2")
    assert ServiceParams.from_args(args, "llm").device == "cuda:2"
    assert ServiceParams.from_args(triton_args({"device": "cuda"}), "llm").device == "cuda"


# ---- inputs ----

def test_sampling_inputs_at_start():
    io = TritonIO(fake_pb_utils([]), "llm")
    assert io.sampling(FakeRequest({})) == (GREEDY, 0)
    assert io.sampling(FakeRequest({"GREEDY": [[True]], "TEMPERATURE": [[0.0]], "SEED": [[9]]})) == (GREEDY, 9)
    sampled = FakeRequest({"GREEDY": [[False]], "TEMPERATURE": np.array([[0.5]], np.float32), "TOP_K": [[20]],
                           "SEED": [[4]]})
    assert io.sampling(sampled) == (SamplingParams(temperature=0.5, top_k=20), 4)  # the rest: SamplingParams'


@pytest.mark.parametrize("name, value, words", [
    ("TEMPERATURE", 0.0, "TEMPERATURE: temperature must be > 0 (got 0.0)"),
    ("TOP_P", 1.5, "TOP_P: top_p must be in (0, 1] (got 1.5)"),
    ("TOP_K", -2, "TOP_K: top_k must be >= 0 (got -2)"),
    ("REPETITION_PENALTY", 0.0, "REPETITION_PENALTY: repetition_penalty must be > 0"),
    ("TEMPERATURE", math.nan, "TEMPERATURE is nan: send a finite number"),
    ("REPETITION_PENALTY", math.inf, "REPETITION_PENALTY is inf: send a finite number"),
])
def test_a_bad_sampling_value_is_named(name, value, words):
    io = TritonIO(fake_pb_utils([]), "llm")
    with pytest.raises(InputError) as info:
        io.sampling(FakeRequest({"GREEDY": [[False]], name: [[value]]}))
    assert words in str(info.value)


def test_scalars_text_and_bytes():
    io = TritonIO(fake_pb_utils([]), "vocoder")
    request = FakeRequest({"FINAL": [True, False], "SPEAKER": np.array([b"speaker1"], object),
                           "MODE": np.array([b"\xff"], object), "STATE": np.array([b""], object)})
    with pytest.raises(InputError, match="FINAL must hold one value, got 2"):
        io.scalar(request, "FINAL")
    assert io.text(request, "SPEAKER") == "speaker1" and io.text(request, "MISSING") is None
    assert io.raw_bytes(request, "STATE") == b"" and io.text(request, "STATE") is None
    with pytest.raises(InputError, match="MODE is not utf-8 text"):
        io.text(request, "MODE")
    with pytest.raises(InputError, match="input TOKENS is missing"):
        io.required(request, "TOKENS")
    assert io.sequence(FakeRequest({"CORRID": [7], "START": [1]})) == (7, True, False)
    assert io.requested(FakeRequest(outputs=["TEXT_TOKEN"])) == {"TEXT_TOKEN"} and io.requested(FakeRequest()) is None


# ---- errors, batching, metrics ----

def test_answer_batch_answers_each_request_with_its_status():
    logged: list = []
    pb = fake_pb_utils(logged)
    io = TritonIO(pb, "llm")
    metrics = ServiceMetrics(pb, "llm")
    requests = [FakeRequest({"X": [1]}), FakeRequest({}), FakeRequest({"X": [2]}), FakeRequest({"X": [3]})]

    def run(items):
        return [SequenceError("unknown or ended sequence 2", status="NOT_FOUND") if x == 2 else
                SequenceError("all 4 sequence slots are busy", status="UNAVAILABLE") if x == 3 else x * 10
                for x in items]

    responses = io.answer_batch(requests, parse=lambda r: int(io.required(r, "X")[0]), run=run,
                                outputs=lambda request, value: {"Y": np.array([value])}, metrics=metrics,
                                kind=lambda items: "step")
    assert responses[0].error is None and responses[0].outputs["Y"].tolist() == [10]
    assert (responses[1].error.code, responses[1].error.message) == ("INVALID_ARG", "input X is missing")
    assert (responses[2].error.code, responses[2].error.message) == ("NOT_FOUND", "unknown or ended sequence 2")
    assert responses[3].error.code == "UNAVAILABLE"
    assert metrics.latency["step"].observed and metrics.batch.observed == [3]  # the parsed requests
    pool = SimpleNamespace(live=5, kept={11: None, 12: None}, counts={"prefix_hits": 3, "kept_evicted": 0})
    metrics.set_pool(pool)
    assert metrics.live.value == 5 and metrics.kept.value == 2 and metrics.events["prefix_hits"].value == 3
    pool.counts["prefix_hits"] = 4  # the pool's counts are cumulative: the counter gets what they added
    metrics.set_pool(pool)
    assert metrics.events["prefix_hits"].value == 4 and "kept_evicted" not in metrics.events

    def broken(items):
        raise RuntimeError("CUDA error: out of memory")

    failed = io.answer_batch(requests[:2], parse=lambda r: int(io.required(r, "X")[0]), run=broken,
                             outputs=lambda request, value: {}, metrics=metrics, kind=lambda items: "prefill")
    assert failed[0].error.code == "INTERNAL"
    assert "llm failed: RuntimeError: CUDA error: out of memory" in failed[0].error.message
    assert failed[1].error.code == "INVALID_ARG"  # its own problem, not the batch's
    assert logged and "out of memory" in logged[0]


def test_answer_each_keeps_serving_after_a_failure():
    logged: list = []
    pb = fake_pb_utils(logged)
    io = TritonIO(pb, "vocoder")
    metrics = ServiceMetrics(pb, "vocoder", kinds=("chunk",), stateful=False)

    def handle(request):
        value = int(io.required(request, "X")[0])
        if value == 1:
            raise AudioInputError("bad tokens")
        if value == 2:
            raise KeyError("bug")
        return {"Y": np.array([value])}

    responses = io.answer_each([FakeRequest({"X": [v]}) for v in (1, 2, 3)], handle, metrics, "chunk")
    assert [r.error.code if r.error else None for r in responses] == ["INVALID_ARG", "INTERNAL", None]
    assert responses[0].error.message == "bad tokens" and responses[2].outputs["Y"].tolist() == [3]
    assert metrics.live is None and metrics.batch.observed == [3]


def test_requests_their_callers_gave_up_on_are_answered_cancelled_and_not_run():
    pb = fake_pb_utils([])
    ran: list = []
    requests = [FakeRequest({"X": [1]}, cancelled=True), FakeRequest({"X": [2]})]

    io, metrics = TritonIO(pb, "vocoder"), ServiceMetrics(pb, "vocoder", kinds=("chunk",), stateful=False)
    responses = io.answer_each(requests, lambda r: ran.append(int(r.inputs["X"].array[0])) or {"Y": np.array([1])},
                               metrics, "chunk")
    assert ran == [2] and responses[1].error is None and metrics.cancelled.value == 1
    assert responses[0].error.code == "CANCELLED" and "was not run" in responses[0].error.message

    io = TritonIO(pb, "llm")
    responses = io.answer_batch(requests, parse=lambda r: int(r.inputs["X"].array[0]),
                                run=lambda items: ran.extend(items) or items,
                                outputs=lambda request, value: {"Y": np.array([value])},
                                metrics=ServiceMetrics(pb, "llm"), kind=lambda items: "step")
    assert ran == [2, 2] and responses[0].error.code == "CANCELLED" and responses[1].error is None


# ---- tracing ----

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def traceparent(span_id: str, flags: str = "01") -> str:
    return json.dumps({"traceparent": f"00-{TRACE_ID}-{span_id}-{flags}"})


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    tracing.configure("test", exporter=exporter, record_new_traces=False)
    yield exporter
    tracing.shutdown()


def _by_parent(exporter) -> dict[str, object]:
    return {format(s.parent.span_id, "016x"): s for s in exporter.get_finished_spans()}


def test_answer_batch_records_one_server_span_per_traced_request(spans):
    logged: list = []
    pb = fake_pb_utils(logged)
    io = TritonIO(pb, "llm")
    metrics = ServiceMetrics(pb, "llm")
    requests = [
        FakeRequest({"X": [1], "CORRID": [11], "START": [1]}, parameters=traceparent("00f067aa0ba902b7")),
        FakeRequest({"X": [2], "CORRID": [12]}),  # untraced
        FakeRequest({"X": [3], "CORRID": [13]}, parameters=traceparent("1111111111111111", flags="00")),
        FakeRequest({"X": [4], "CORRID": [14]}, parameters='{"traceparent": "00-nonsense"'),  # malformed JSON
        FakeRequest({"X": [5], "CORRID": [15]}, parameters=json.dumps({"traceparent": "00-zz-yy-01"})),
        FakeRequest({"X": [6], "CORRID": [16]}, parameters=traceparent("2222222222222222")),  # answered NOT_FOUND
        FakeRequest({"CORRID": [17]}, parameters=traceparent("3333333333333333")),  # refused: X missing
        FakeRequest({"X": [8], "CORRID": [18]}, parameters=json.dumps(["not", "an", "object"])),
    ]

    def run(items):
        return [SequenceError("unknown or ended sequence 16", status="NOT_FOUND") if x == 6 else x for x in items]

    responses = io.answer_batch(requests, parse=lambda r: int(io.required(r, "X")[0]), run=run,
                                outputs=lambda request, value: {"Y": np.array([value])}, metrics=metrics,
                                kind=lambda items: "step")
    assert [r.error.code if r.error else None for r in responses] == \
        [None, None, None, None, None, "NOT_FOUND", "INVALID_ARG", None]  # malformed trace headers served
    assert not logged
    by_parent = _by_parent(spans)
    assert sorted(by_parent) == ["00f067aa0ba902b7", "2222222222222222", "3333333333333333"]
    prefill, missing, refused = (by_parent[k] for k in ("00f067aa0ba902b7", "2222222222222222", "3333333333333333"))
    for span in (prefill, missing, refused):
        assert format(span.context.trace_id, "032x") == TRACE_ID and span.kind is SpanKind.SERVER
        assert span.parent.is_remote and span.start_time <= span.end_time
    # its own kind (START), not the batch's "step"
    assert prefill.name == "llm prefill" and prefill.status.status_code is StatusCode.UNSET
    assert dict(prefill.attributes) == {"funchat.model": "llm", "funchat.kind": "prefill", "funchat.batch_size": 7,
                                        "funchat.correlation_id": 11}
    assert missing.name == "llm step" and missing.status.status_code is StatusCode.ERROR
    assert missing.attributes["funchat.status"] == "NOT_FOUND" and missing.attributes["funchat.correlation_id"] == 16
    assert "unknown or ended sequence 16" in missing.status.description
    assert refused.status.status_code is StatusCode.ERROR and refused.attributes["funchat.status"] == "INVALID_ARG"


def test_a_failed_batch_marks_each_traced_span_internal(spans):
    logged: list = []
    pb = fake_pb_utils(logged)
    io = TritonIO(pb, "audio_tokenizer")
    metrics = ServiceMetrics(pb, "audio_tokenizer", kinds=("encode",), stateful=False)

    def broken(items):
        raise RuntimeError("CUDA error: out of memory")

    requests = [FakeRequest({"X": [1]}, parameters=traceparent("00f067aa0ba902b7")), FakeRequest({"X": [2]})]
    responses = io.answer_batch(requests, parse=lambda r: int(io.required(r, "X")[0]), run=broken,
                                outputs=lambda request, value: {}, metrics=metrics, kind=lambda items: "encode")
    assert [r.error.code for r in responses] == ["INTERNAL", "INTERNAL"]
    (span,) = spans.get_finished_spans()
    assert span.name == "audio_tokenizer encode" and span.status.status_code is StatusCode.ERROR
    assert dict(span.attributes) == {"funchat.model": "audio_tokenizer", "funchat.kind": "encode",
                                     "funchat.batch_size": 2, "funchat.status": "INTERNAL"}
    assert "RuntimeError: CUDA error: out of memory" in span.status.description


def test_answer_each_records_each_traced_request_s_own_handling(spans):
    logged: list = []
    pb = fake_pb_utils(logged)
    io = TritonIO(pb, "vocoder")
    metrics = ServiceMetrics(pb, "vocoder", kinds=("chunk",), stateful=False)

    def handle(request):
        value = int(io.required(request, "X")[0])
        if value == 2:
            raise AudioInputError("bad tokens")
        return {"Y": np.array([value])}

    requests = [FakeRequest({"X": [1]}, parameters=traceparent("00f067aa0ba902b7")),
                FakeRequest({"X": [2]}, parameters=traceparent("2222222222222222")),
                FakeRequest({"X": [3]}), FakeRequest({"X": [4]}, parameters="not json"),
                FakeRequest({"X": [5]}, parameters=traceparent("5555555555555555", flags="00"))]
    responses = io.answer_each(requests, handle, metrics, "chunk")
    assert [r.error.code if r.error else None for r in responses] == [None, "INVALID_ARG", None, None, None]
    by_parent = _by_parent(spans)
    assert sorted(by_parent) == ["00f067aa0ba902b7", "2222222222222222"]
    ok, bad = by_parent["00f067aa0ba902b7"], by_parent["2222222222222222"]
    assert ok.name == bad.name == "vocoder chunk" and ok.end_time <= bad.start_time  # one request after the other
    assert dict(ok.attributes) == {"funchat.model": "vocoder", "funchat.kind": "chunk", "funchat.batch_size": 5}
    assert bad.status.status_code is StatusCode.ERROR and bad.attributes["funchat.status"] == "INVALID_ARG"


def test_without_tracing_the_parameters_are_not_read():
    class Untouchable(FakeRequest):
        def parameters(self):
            raise AssertionError("parameters read while tracing is off")

    pb = fake_pb_utils([])
    io = TritonIO(pb, "vocoder")
    responses = io.answer_each([Untouchable({"X": [1]})], lambda r: {"Y": np.array([1])},
                               ServiceMetrics(pb, "vocoder", kinds=("chunk",), stateful=False), "chunk")
    assert responses[0].error is None and io.trace_parent(Untouchable()) is None


def test_start_tracing_refuses_a_bad_setting_by_name(monkeypatch):
    monkeypatch.delenv(tracing.ENDPOINT_ENV, raising=False)
    assert start_tracing("vocoder") is False and not tracing.enabled()  # no endpoint: off
    monkeypatch.setenv(tracing.ENDPOINT_ENV, "127.0.0.1:4317")
    monkeypatch.setenv(tracing.SAMPLE_RATIO_ENV, "lots")
    with pytest.raises(tracing.TracingConfigError, match="FUNCHAT_TRACING_SAMPLE_RATIO='lots'"):
        start_tracing("vocoder")
    assert not tracing.enabled()


# ---- whole-batch failures in the stateful engines ----

def poison_rows(pool, bad_row: int) -> None:
    """Make every batched forward that includes `bad_row` raise, as a device or model failure
    triggered by one request would."""
    run = pool.run

    def failing(rows, new_positions, fn):
        if bad_row in rows:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return run(rows, new_positions, fn)
    pool.run = failing


def test_one_failing_llm_request_fails_alone_and_its_slot_is_freed(tiny_pipeline):
    import torch

    from funchat.engines.llm import LlmEngine, LlmRequest

    prompts = {1: [1, 2, 3], 2: [4, 5, 6, 7], 3: [8, 9]}
    clean = LlmEngine(tiny_pipeline.model, max_sequences=4)
    expected = {cid: r.token for cid, r in zip(prompts, clean.run([LlmRequest(c, True, False, torch.tensor(p))
                                                                   for c, p in prompts.items()]))}
    llm = LlmEngine(tiny_pipeline.model, max_sequences=4)
    poison_rows(llm.pool, bad_row=1)  # the second START gets row 1
    results = llm.run([LlmRequest(c, True, False, torch.tensor(p)) for c, p in prompts.items()])
    failed = results[1]
    assert isinstance(failed, SequenceError) and failed.status == "INTERNAL"
    assert "llm forward failed (RuntimeError: CUDA error: an illegal memory access" in str(failed)
    assert "sequence was ended" in str(failed)
    assert [results[0].token, results[2].token] == [expected[1], expected[3]]  # the others, as if alone
    assert llm.pool.live == 2 and 2 not in llm.pool.slots  # no slot stranded until the idle timeout
    # a step batch: the same isolation; the other call's step is unaffected
    poison_rows(llm.pool, bad_row=llm.pool.slots[3].row)
    steps = llm.run([LlmRequest(1, False, False, torch.tensor([expected[1]])),
                     LlmRequest(3, False, False, torch.tensor([expected[3]]))])
    assert not isinstance(steps[0], SequenceError)
    assert isinstance(steps[1], SequenceError) and steps[1].status == "INTERNAL"
    assert set(llm.pool.slots) == {1}
    assert int(llm.pool.cache.lengths[llm.pool.slots[1].row]) == len(prompts[1]) + 1  # one step, stored once


def test_one_failing_refined_head_request_fails_alone_and_its_slot_is_freed(tiny_pipeline):
    import torch

    from funchat.engines.refined_head import SrhEngine, SrhRequest

    width = tiny_pipeline.model.cfg.audio.output_dim
    h = {cid: torch.randn(3, width, generator=torch.Generator().manual_seed(cid)) for cid in (1, 2)}
    clean = SrhEngine(tiny_pipeline.model, 4).run([SrhRequest(c, True, False, h[c]) for c in (1, 2)])
    srh = SrhEngine(tiny_pipeline.model, 4)
    poison_rows(srh.pool, bad_row=0)  # the first START gets row 0
    results = srh.run([SrhRequest(c, True, False, h[c]) for c in (1, 2)])
    assert isinstance(results[0], SequenceError) and results[0].status == "INTERNAL"
    assert "refined_head forward failed" in str(results[0])
    assert results[1].tolist() == clean[1].tolist()
    assert set(srh.pool.slots) == {2}


def test_an_engine_s_internal_answer_is_logged():
    logged: list = []
    pb = fake_pb_utils(logged)
    io = TritonIO(pb, "llm")
    failure = SequenceError("llm forward failed (RuntimeError: boom); the sequence was ended", status="INTERNAL")
    responses = io.answer_batch([FakeRequest({"X": [1]}), FakeRequest({"X": [2]})],
                                parse=lambda r: int(io.required(r, "X")[0]),
                                run=lambda items: [failure if x == 1 else x for x in items],
                                outputs=lambda request, value: {"Y": np.array([value])},
                                metrics=ServiceMetrics(pb, "llm"), kind=lambda items: "step")
    assert responses[0].error.code == "INTERNAL" and "boom" in responses[0].error.message
    assert responses[1].error is None
    assert len(logged) == 1 and "boom" in logged[0]
