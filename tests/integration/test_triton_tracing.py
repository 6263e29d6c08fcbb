"""The model services' spans under a real tritonserver: a request whose parameters carry a sampled
`traceparent` (what the orchestrator sends) gets one span, exported over OTLP/gRPC as a child of
that parent and under the service's own name; a request without one, or with an unsampled one, gets
none; a misconfigured FUNCHAT_TRACING_* variable fails the model's load, naming the variable."""

from __future__ import annotations

import secrets

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from funchat import tracing
from funchat.dev.otlp_receiver import OtlpReceiver
from funchat.dev.tritonserver import TritonServerError, start_servers

SPAN_WAIT_S = 30.0  # the services export every tracing.EXPORT_DELAY_MS; generous for a busy machine


@pytest.fixture(scope="module")
def receiver():
    with OtlpReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def traced(tiny_checkpoint, tmp_path_factory, receiver):
    """audio_tokenizer and vocoder exporting to `receiver`. The servers take this process's
    environment when they start (funchat.dev.tritonserver.server_env), and their Python backend
    stubs take the server's, so the variables are needed only while they start."""
    params = {"*": {"checkpoint": str(tiny_checkpoint), "threads": "1"}}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(tracing.ENDPOINT_ENV, receiver.endpoint)
        mp.delenv(tracing.HEADERS_ENV, raising=False)
        mp.delenv(tracing.SAMPLE_RATIO_ENV, raising=False)
        cluster = start_servers(models=["audio_tokenizer", "vocoder"], run_dir=tmp_path_factory.mktemp("triton-traced"),
                                params=params, timeout=120)
    try:
        yield cluster
    finally:
        cluster.stop()


def traceparent(sampled: bool = True) -> tuple[str, str, str]:
    """A made-up caller span: (traceparent, trace id, span id)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}", trace_id, span_id


def encode(cluster, parameters: dict | None = None) -> None:
    clip = (0.3 * np.sin(np.arange(8000) / 16000 * 2 * np.pi * 220)).astype(np.float32)[None]  # 0.5 s
    audio = grpcclient.InferInput("AUDIO", list(clip.shape), "FP32")
    audio.set_data_from_numpy(clip)
    with grpcclient.InferenceServerClient(cluster.endpoints["audio_tokenizer"]) as client:
        result = client.infer("audio_tokenizer", [audio], parameters=parameters)
    assert result.as_numpy("N_GROUPS").tolist() == [[3]]


def push(cluster, tokens: list[int], parameters: dict | None = None) -> None:
    inputs = []
    for name, array, dtype in (("TOKENS", np.array([tokens], np.int64), "INT64"), ("FINAL", np.array([[True]]), "BOOL")):
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    with grpcclient.InferenceServerClient(cluster.endpoints["vocoder"]) as client:
        client.infer("vocoder", inputs, parameters=parameters)


def test_a_traced_encode_joins_the_caller_s_trace(traced, receiver):
    untraced = traceparent(sampled=False)
    encode(traced)  # no traceparent
    encode(traced, {"traceparent": untraced[0]})  # the caller did not sample this turn
    header, trace_id, span_id = traceparent()
    encode(traced, {"traceparent": header})
    spans = receiver.wait_for(lambda spans: any(s.trace_id == trace_id for s in spans), SPAN_WAIT_S)
    mine = [s for s in spans if s.trace_id == trace_id]
    assert len(mine) == 1, spans
    span = mine[0]
    assert (span.service, span.name, span.parent_span_id) == ("funchat-audio_tokenizer", "audio_tokenizer encode",
                                                              span_id)
    assert span.attributes == {"funchat.model": "audio_tokenizer", "funchat.kind": "encode", "funchat.batch_size": 1}
    assert span.status_code == 0 and 0 < span.start_ns <= span.end_ns
    # The earlier requests, served (and exported) first, made no span: everything received is ours.
    assert all(s.trace_id == trace_id for s in spans if s.service == "funchat-audio_tokenizer"), spans
    assert not any(s.trace_id == untraced[1] for s in spans)


def test_every_traced_vocoder_push_has_its_span(traced, receiver):
    header, trace_id, span_id = traceparent()
    push(traced, [1, 2, 3], {"traceparent": header})
    push(traced, [1, 2, 3], {"traceparent": header, "tracestate": "vendor=1"})
    spans = receiver.wait_for(lambda spans: sum(s.trace_id == trace_id for s in spans) >= 2, SPAN_WAIT_S)
    mine = [s for s in spans if s.trace_id == trace_id]
    assert len(mine) == 2, spans
    for span in mine:
        assert (span.service, span.name, span.parent_span_id) == ("funchat-vocoder", "vocoder chunk", span_id)
        assert span.attributes == {"funchat.model": "vocoder", "funchat.kind": "chunk", "funchat.batch_size": 1}


def test_a_refused_push_has_an_error_span(traced, receiver):
    header, trace_id, span_id = traceparent()
    with pytest.raises(grpcclient.InferenceServerException, match="speaker"):
        bad = [grpcclient.InferInput("TOKENS", [1, 1], "INT64"), grpcclient.InferInput("FINAL", [1, 1], "BOOL"),
               grpcclient.InferInput("SPEAKER", [1, 1], "BYTES")]
        for tensor, array in zip(bad, (np.array([[1]], np.int64), np.array([[True]]), np.array([[b"nobody"]], object))):
            tensor.set_data_from_numpy(array)
        with grpcclient.InferenceServerClient(traced.endpoints["vocoder"]) as client:
            client.infer("vocoder", bad, parameters={"traceparent": header})
    spans = receiver.wait_for(lambda spans: any(s.trace_id == trace_id for s in spans), SPAN_WAIT_S)
    (span,) = [s for s in spans if s.trace_id == trace_id]
    assert span.parent_span_id == span_id and span.status_code == 2  # ERROR
    assert span.attributes["funchat.status"] == "INVALID_ARG"


def test_a_bad_tracing_setting_fails_the_load_by_name(tiny_checkpoint, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(tracing.ENDPOINT_ENV, "127.0.0.1:1")
        mp.setenv(tracing.SAMPLE_RATIO_ENV, "lots")
        with pytest.raises(TritonServerError, match="FUNCHAT_TRACING_SAMPLE_RATIO='lots'"):
            start_servers(models=["vocoder"], run_dir=tmp_path_factory.mktemp("triton-badtracing"),
                          params={"*": {"checkpoint": str(tiny_checkpoint), "threads": "1"}}, timeout=60)
