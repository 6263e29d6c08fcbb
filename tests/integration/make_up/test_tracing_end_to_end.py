"""Traces end to end: the stack as `make up` starts it (redis-server, four tritonservers, the Ray Serve
orchestrator), every process exporting over OTLP/gRPC to a receiver started here (the collector
service of `opentelemetry-proto`, funchat.dev.otlp_receiver).

- One turn's span tree, read from the in-memory exporter of an orchestrator run in this process
  against the stack's model services and Redis; the model services' own spans join it over OTLP.
- Through the public API (Ray Serve's gRPC proxy): a caller's `traceparent` is the parent of the
  Respond RPC's span; a Converse turn that the server VAD ends has its `vad.end_of_turn` span; the
  spans of all four model services arrive in the caller's trace.
- A collector that is down: the turn is served, with the same tokens.

Calls through the public API send the key `up` made (<run_dir>/api_key); the in-process service
runs without authentication (FUNCHAT_AUTH=off: its calls have no gRPC context to carry a key).
"""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import grpc
import numpy as np
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from funchat import tracing
from funchat.api import pb, pb_grpc
from funchat.client import authed_stub
from funchat.dev.tritonserver import free_port
from funchat.orchestrator.service import FunchatService
from funchat.orchestrator.settings import OrchestratorSettings
from tests.integration.pcm import pcm16_bytes

MAX_NEW = 16
MODELS = ("audio_tokenizer", "llm", "refined_head", "vocoder")
MODEL_SPANS = {"audio_tokenizer.encode", "llm.prefill", "refined_head.prefill", "vocoder.push"}


@pytest.fixture(scope="module")
def receiver(otlp_receiver):
    return otlp_receiver


@pytest.fixture(scope="module")
def stack(make_up_stack):
    return make_up_stack


def greedy_config(manual: bool = True) -> pb.SessionConfig:
    td = pb.TurnDetection(manual=pb.ManualTurns()) if manual else \
        pb.TurnDetection(server_vad=pb.ServerVad(silence_duration_ms=600))
    return pb.SessionConfig(mode=pb.MODE_SPEECH_TO_SPEECH, turn_detection=td,
                            generation=pb.Generation(greedy=True, seed=0, max_new_tokens=MAX_NEW))


def in_process_service(stack) -> FunchatService:
    e = stack["endpoints"]
    settings = OrchestratorSettings.load(
        checkpoint=e["checkpoint"], endpoints={m: e[m] for m in MODELS}, redis_url=e["redis"],
        redis_ca_file=e["redis_ca_file"], redis_password=Path(e["redis_password_file"]).read_text().strip(),
        resume_secret=(stack["run_dir"] / "resume_secret").read_text().strip(), max_new_tokens=MAX_NEW, auth="off")
    return FunchatService(settings)


async def respond(service: FunchatService, audio: np.ndarray) -> list[pb.ServerEvent]:
    try:
        return [e async for e in service.Respond(pb.RespondRequest(config=greedy_config(), audio=pcm16_bytes(audio)))]
    finally:
        await service.services.close()
        await service.store.close()


def done_of(events) -> pb.ResponseDone:
    return next(e.response_done for e in events if e.WhichOneof("event") == "response_done")


def children(spans, parent) -> list:
    return [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]


def test_one_turn_span_tree_and_the_model_services_join_it(stack, receiver, speech):
    exporter = InMemorySpanExporter()
    tracing.configure("funchat-orchestrator", exporter=exporter)
    try:
        events = asyncio.run(respond(in_process_service(stack), speech[:32000]))
    finally:
        tracing.shutdown()
    done = done_of(events)
    assert done.status == "completed", events
    spans = exporter.get_finished_spans()
    [rpc] = [s for s in spans if s.name == "funchat.Respond"]
    [turn] = [s for s in spans if s.name == "funchat.turn"]
    assert rpc.parent is None and rpc.kind is SpanKind.SERVER
    assert turn.parent.span_id == rpc.context.span_id
    assert {s.context.trace_id for s in spans} == {rpc.context.trace_id}  # one trace
    # opening the session is the RPC's; the turn's work is the turn's
    assert {s.name for s in children(spans, rpc)} >= {"funchat.turn", "session_store.create"}
    under_turn = [s.name for s in children(spans, turn)]
    assert set(under_turn) >= MODEL_SPANS | {"decode", "session_store.get", "session_store.set_state",
                                             "session_store.append_turns"}, under_turn
    for name in ("audio_tokenizer.encode", "llm.prefill", "refined_head.prefill", "decode"):
        assert under_turn.count(name) == 1, (name, under_turn)
    assert under_turn.count("vocoder.push") >= 2  # one per chunk
    attrs = turn.attributes
    assert attrs["funchat.session_id"] == events[0].session_created.session_id
    assert attrs["funchat.response_id"] == done.response_id and attrs["funchat.status"] == "completed"
    assert attrs["funchat.text_tokens"] == len(done.text_tokens)
    assert attrs["funchat.speech_tokens"] == len(done.speech_tokens)
    assert attrs["funchat.prompt_tokens"] == done.usage.input_tokens
    assert [e.name for e in turn.events] == ["first_audio"]
    decode = next(s for s in spans if s.name == "decode")
    assert decode.attributes["funchat.llm_steps"] == len(done.text_tokens) - 1  # the prefill chose the first
    assert decode.attributes["funchat.refined_head_steps"] >= 1
    # The model services' spans (over OTLP) are children of the orchestrator's CLIENT spans
    clients = {format(s.context.span_id, "016x"): s.name for s in spans if s.name in MODEL_SPANS}
    trace_id = format(turn.context.trace_id, "032x")
    wanted = {f"funchat-{m}" for m in MODELS}
    got = receiver.wait_for(lambda received: wanted <= {s.service for s in received if s.trace_id == trace_id})
    served = [s for s in got if s.trace_id == trace_id]
    assert {s.service for s in served} == wanted, served
    for s in served:
        assert s.parent_span_id in clients, s
        model = s.service.removeprefix("funchat-")
        assert clients[s.parent_span_id].startswith(model + "."), (s, clients[s.parent_span_id])


async def _converse_vad_turn(target: str, audio: np.ndarray, traceparent: str, api_key: str) -> list[pb.ServerEvent]:
    queue: asyncio.Queue = asyncio.Queue()

    async def requests():
        while (event := await queue.get()) is not None:
            yield event

    events = []
    async with grpc.aio.insecure_channel(target) as channel:
        call = authed_stub(pb_grpc.FunchatStub(channel), api_key).Converse(requests(),
                                                                           metadata=(("traceparent", traceparent),))
        queue.put_nowait(pb.ClientEvent(session=greedy_config(manual=False)))
        silence = np.zeros(16000, np.float32)
        for start in range(0, len(audio) + len(silence), 8000):  # 500 ms chunks, speech then 1 s of silence
            chunk = np.concatenate([audio, silence])[start:start + 8000]
            queue.put_nowait(pb.ClientEvent(audio=pb.InputAudioAppend(audio=pcm16_bytes(chunk))))
        async for event in call:
            events.append(event)
            if event.WhichOneof("event") == "response_done":
                queue.put_nowait(pb.ClientEvent(end=pb.SessionEnd()))
                queue.put_nowait(None)
    return events


def test_spans_of_every_process_arrive_over_otlp_in_the_callers_trace(stack, receiver, speech):
    target = stack["endpoints"]["orchestrator"]
    trace_id, caller_span = secrets.token_hex(16), secrets.token_hex(8)
    traceparent = f"00-{trace_id}-{caller_span}-01"

    async def call_respond():
        async with grpc.aio.insecure_channel(target) as channel:
            stub = authed_stub(pb_grpc.FunchatStub(channel), stack["api_key"])  # the key, and the traceparent below
            request = pb.RespondRequest(config=greedy_config(), audio=pcm16_bytes(speech[:32000]))
            return [e async for e in stub.Respond(request, metadata=(("traceparent", traceparent),))]

    events = asyncio.run(call_respond())
    assert done_of(events).status == "completed"
    wanted = {"funchat-orchestrator"} | {f"funchat-{m}" for m in MODELS}

    def arrived(received) -> bool:  # the RPC's span ends last
        ours = [s for s in received if s.trace_id == trace_id]
        return wanted <= {s.service for s in ours} and "funchat.Respond" in {s.name for s in ours}

    got = [s for s in receiver.wait_for(arrived) if s.trace_id == trace_id]
    assert {s.service for s in got} == wanted, got
    by_name = {s.name: s for s in got}
    assert by_name["funchat.Respond"].parent_span_id == caller_span  # the caller's span is the parent
    assert by_name["funchat.turn"].parent_span_id == by_name["funchat.Respond"].span_id
    assert receiver.last_metadata.get("x-funchat-test") == "1"  # FUNCHAT_TRACING_HEADERS went with the exports

    # Converse with the server VAD: the turn starts where the speech ended, the VAD's wait under it
    trace_id, caller_span = secrets.token_hex(16), secrets.token_hex(8)
    events = asyncio.run(_converse_vad_turn(target, speech[:32000], f"00-{trace_id}-{caller_span}-01",
                                            stack["api_key"]))
    assert done_of(events).status == "completed", [e.WhichOneof("event") for e in events]
    got = [s for s in receiver.wait_for(lambda received: {"funchat.turn", "vad.end_of_turn"} <= {
        s.name for s in received if s.trace_id == trace_id}) if s.trace_id == trace_id]
    by_name = {s.name: s for s in got}
    turn, vad = by_name["funchat.turn"], by_name["vad.end_of_turn"]
    assert turn.parent_span_id == caller_span and vad.parent_span_id == turn.span_id
    assert vad.start_ns == turn.start_ns and 400 <= vad.attributes["funchat.silence_ms"] <= 1000
    assert 0 < vad.duration_ms


def test_a_collector_that_is_down_never_fails_a_turn(stack, speech):
    reference = asyncio.run(respond(in_process_service(stack), speech[:32000]))
    tracing.configure("funchat-orchestrator", tracing.TracingConfig(endpoint=f"127.0.0.1:{free_port()}"))
    try:
        traced = asyncio.run(respond(in_process_service(stack), speech[:32000]))
    finally:
        tracing.shutdown()
    assert done_of(traced).status == "completed"
    assert list(done_of(traced).text_tokens) == list(done_of(reference).text_tokens)
    assert list(done_of(traced).speech_tokens) == list(done_of(reference).speech_tokens)
