"""The Realtime endpoint's pure parts: the session object <-> the call's SessionConfig, and Converse's
events as the protocol's server events (funchat/orchestrator/realtime/session.py, server_events.py)."""

from __future__ import annotations

import base64

import pytest

from funchat.api import pb
from funchat.orchestrator.realtime.errors import RealtimeError, from_status
from funchat.orchestrator.realtime.server_events import ServerEvents
from funchat.orchestrator.realtime.session import AudioFormat, RealtimeSession

MODEL = "fun-audio-chat"


def test_the_default_session_is_the_protocols_and_maps_to_server_vad_and_24_khz_pcm16():
    s = RealtimeSession(model=MODEL)
    cfg = s.to_pb()
    assert cfg.mode == pb.MODE_SPEECH_TO_SPEECH
    assert cfg.input_audio_format.encoding == pb.AUDIO_ENCODING_PCM16 and cfg.input_audio_format.sample_rate_hz == 24000
    assert cfg.turn_detection.WhichOneof("type") == "server_vad"
    assert cfg.turn_detection.server_vad.silence_duration_ms == 500
    assert not cfg.HasField("output_audio_format")  # 24 kHz PCM16: the gRPC API's default
    j = s.to_json("sess_1")
    assert j["type"] == "realtime" and j["id"] == "sess_1" and j["audio"]["input"]["format"] == {"type": "audio/pcm",
                                                                                                 "rate": 24000}


def test_an_update_maps_every_field_it_takes():
    s = RealtimeSession(model=MODEL).update({
        "type": "realtime", "instructions": "Be brief.",
        "audio": {"input": {"format": {"type": "audio/pcmu"},
                            "turn_detection": {"type": "server_vad", "threshold": 0.6, "silence_duration_ms": 800}},
                  "output": {"format": {"type": "audio/pcma"}, "voice": "speaker1"}},
        "tools": [{"type": "function", "name": "f", "description": "d", "parameters": {"type": "object"}}],
        "tool_choice": "auto", "output_modalities": ["text"], "max_output_tokens": 40,
        "generation": {"greedy": True, "seed": 7}})
    cfg = s.to_pb(resume_token="tok")
    assert cfg.instructions == "Be brief." and cfg.voice == "speaker1" and cfg.resume_token == "tok"
    assert cfg.mode == pb.MODE_SPEECH_TO_TEXT
    assert (cfg.input_audio_format.encoding, cfg.input_audio_format.sample_rate_hz) == (pb.AUDIO_ENCODING_PCMU, 8000)
    assert (cfg.output_audio_format.encoding, cfg.output_audio_format.sample_rate_hz) == (pb.AUDIO_ENCODING_PCMA, 8000)
    assert cfg.turn_detection.server_vad.threshold == pytest.approx(0.6)
    assert cfg.turn_detection.server_vad.silence_duration_ms == 800
    assert cfg.turn_detection.server_vad.prefix_padding_ms == 300  # unchanged default
    assert [(t.name, t.description, t.parameters_json) for t in cfg.tools] == [("f", "d", '{"type": "object"}')]
    assert cfg.generation.greedy and cfg.generation.seed == 7 and cfg.generation.max_new_tokens == 40
    manual = s.update({"audio": {"input": {"turn_detection": None}}})
    assert manual.manual and manual.to_pb().turn_detection.WhichOneof("type") == "manual"
    assert manual.instructions == "Be brief."  # an update changes only what it names


@pytest.mark.parametrize("fields, code, param", [
    ({"type": "transcription"}, "invalid_value", "session.type"),
    ({"model": "gpt-realtime"}, "invalid_value", "session.model"),
    ({"prompt": {}}, "unsupported_field", "session.prompt"),
    ({"instructions": 3}, "invalid_type", "session.instructions"),
    ({"audio": {"input": {"format": {"type": "audio/wav"}}}}, "unsupported_value", "session.audio.input.format.type"),
    ({"audio": {"input": {"format": {"type": "audio/pcm", "rate": 7999}}}}, "unsupported_value",
     "session.audio.input.format.rate"),
    ({"audio": {"output": {"format": {"type": "audio/pcm", "rate": 16000}}}}, "unsupported_value",
     "session.audio.output.format.rate"),
    ({"audio": {"input": {"turn_detection": {"type": "semantic_vad"}}}}, "unsupported_value",
     "session.audio.input.turn_detection.type"),
    ({"audio": {"input": {"turn_detection": {"type": "server_vad", "create_response": "no"}}}}, "invalid_type",
     "session.audio.input.turn_detection.create_response"),
    ({"audio": {"input": {"turn_detection": {"type": "server_vad", "idle_timeout_ms": 500}}}}, "invalid_value",
     "session.audio.input.turn_detection.idle_timeout_ms"),
    ({"audio": {"input": {"turn_detection": {"type": "server_vad", "threshold": 1.5}}}}, "invalid_value",
     "session.audio.input.turn_detection.threshold"),
    ({"audio": {"input": {"transcription": {"model": "whisper-1"}}}}, "unsupported_field",
     "session.audio.input.transcription"),
    ({"audio": {"output": {"speed": 1.5}}}, "unsupported_value", "session.audio.output.speed"),
    ({"tools": [{"type": "mcp"}]}, "unsupported_value", "session.tools[0].type"),
    ({"tools": [{"type": "function"}]}, "invalid_value", "session.tools[0].name"),
    ({"tool_choice": "required"}, "unsupported_value", "session.tool_choice"),
    ({"output_modalities": ["audio", "text"]}, "invalid_value", "session.output_modalities"),
    ({"max_output_tokens": 0}, "invalid_value", "session.max_output_tokens"),
    ({"generation": {"greedy": "yes"}}, "invalid_type", "session.generation.greedy"),
    ({"generation": {"beam": 4}}, "unsupported_field", "session.generation.beam"),
])
def test_a_bad_update_is_refused_naming_the_field_and_changes_nothing(fields, code, param):
    s = RealtimeSession(model=MODEL)
    with pytest.raises(RealtimeError) as refused:
        s.update(fields)
    assert (refused.value.code, refused.value.param) == (code, param)
    assert param in refused.value.message
    assert s == RealtimeSession(model=MODEL)


def test_server_vad_options_map_to_the_calls_turn_detection():
    s = RealtimeSession(model=MODEL).update({"audio": {"input": {"turn_detection": {
        "type": "server_vad", "create_response": False, "interrupt_response": False, "idle_timeout_ms": 6000}}}})
    vad = s.to_pb().turn_detection.server_vad
    assert (vad.HasField("create_response"), vad.create_response) == (True, False)
    assert (vad.HasField("interrupt_response"), vad.interrupt_response) == (True, False)
    assert vad.idle_timeout_ms == 6000
    td = s.to_json("s")["audio"]["input"]["turn_detection"]
    assert (td["create_response"], td["interrupt_response"], td["idle_timeout_ms"]) == (False, False, 6000)
    default = RealtimeSession(model=MODEL).to_pb().turn_detection.server_vad
    assert default.create_response and default.interrupt_response and default.idle_timeout_ms == 0


def test_an_idle_timeout_opens_the_callers_item():
    events = ServerEvents(lambda: RealtimeSession(model=MODEL), lambda kind: None)
    out = events.translate(pb.ServerEvent(idle_timeout=pb.IdleTimeout(audio_start_ms=1000, audio_end_ms=7000)))
    assert out[0]["type"] == "input_audio_buffer.timeout_triggered" and out[0]["audio_end_ms"] == 7000
    committed = events.translate(pb.ServerEvent(committed=pb.InputAudioCommitted(item_id="x", audio_ms=6000)))
    assert committed[0]["item_id"] == out[0]["item_id"]


def test_a_status_becomes_an_error_event_with_the_client_event_id():
    event = from_status("INVALID_ARGUMENT", "bad", "evt_7").event()
    assert event["type"] == "error" and event["event_id"].startswith("event_")
    assert event["error"] == {"type": "invalid_request_error", "code": "invalid_argument", "message": "bad",
                              "param": None, "event_id": "evt_7"}
    assert from_status("UNAVAILABLE", "down", None).event()["error"]["type"] == "server_error"


def translate_all(events: ServerEvents, *messages: pb.ServerEvent) -> list[dict]:
    return [out for m in messages for out in events.translate(m)]


def test_a_spoken_reply_opens_its_item_and_part_once_and_closes_them_before_response_done():
    session = RealtimeSession(model=MODEL)
    done_calls = []
    events = ServerEvents(lambda: session, lambda kind: None, lambda: done_calls.append(1),
                          lambda: [{"name": "calls", "limit": 4}])
    out = translate_all(
        events,
        pb.ServerEvent(session_created=pb.SessionCreated(session_id="s1", resume_token="r1")),
        pb.ServerEvent(speech_started=pb.SpeechStarted(audio_start_ms=100)),
        pb.ServerEvent(speech_stopped=pb.SpeechStopped(audio_end_ms=900)),
        pb.ServerEvent(committed=pb.InputAudioCommitted(item_id="x", audio_ms=800)),
        pb.ServerEvent(response_created=pb.ResponseCreated(response_id="resp_1")),
        pb.ServerEvent(text_delta=pb.TextDelta(response_id="resp_1", delta="Hel")),
        pb.ServerEvent(audio_delta=pb.AudioDelta(response_id="resp_1", pcm16=b"\x01\x00\x02\x00")),
        pb.ServerEvent(text_delta=pb.TextDelta(response_id="resp_1", delta="lo")),
        pb.ServerEvent(response_done=pb.ResponseDone(response_id="resp_1", status="completed", text="Hello",
                                                     usage=pb.Usage(input_tokens=50, output_text_tokens=3,
                                                                    output_speech_tokens=10),
                                                     text_tokens=[1, 2, 3], resume_token="r2")))
    types = [e["type"] for e in out]
    assert types == [
        "session.created", "input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed", "conversation.item.added", "conversation.item.done", "response.created",
        "response.output_item.added", "conversation.item.added", "response.content_part.added",
        "response.output_audio_transcript.delta", "response.output_audio.delta",
        "response.output_audio_transcript.delta", "response.output_audio.done",
        "response.output_audio_transcript.done", "response.content_part.done", "response.output_item.done",
        "conversation.item.done", "response.done", "rate_limits.updated"]
    user_item = out[1]["item_id"]
    assert out[2]["item_id"] == out[3]["item_id"] == out[4]["item"]["id"] == user_item
    assistant = out[7]["item"]["id"]
    assert out[8]["previous_item_id"] == user_item
    assert base64.b64decode(out[11]["delta"]) == b"\x01\x00\x02\x00"
    assert out[14]["transcript"] == "Hello"
    response = out[18]["response"]
    assert response["status"] == "completed" and response["output"][0]["id"] == assistant
    assert response["output"][0]["content"] == [{"type": "audio", "transcript": "Hello"}]
    assert response["usage"]["total_tokens"] == 63 and response["funchat"]["text_tokens"] == [1, 2, 3]
    assert events.resume_token == "r2" and events.reply_of_item[assistant] == "resp_1"
    assert done_calls == [1] and not events.responding
    # a second session_created (the call resumed with a new config) is an update
    again = events.translate(pb.ServerEvent(session_created=pb.SessionCreated(session_id="s1")))
    assert again[0]["type"] == "session.updated"


def test_manual_commits_are_announced_by_the_call_not_again_by_converse():
    session = RealtimeSession(model=MODEL).update({"audio": {"input": {"turn_detection": None}}})
    events = ServerEvents(lambda: session, lambda kind: None)
    assert events.translate(pb.ServerEvent(committed=pb.InputAudioCommitted(item_id="x"))) == []
    announced = events.committed("item_a")
    assert [e["type"] for e in announced] == ["input_audio_buffer.committed", "conversation.item.added",
                                              "conversation.item.done"]


def test_a_cut_reply_a_function_call_and_an_error():
    session = RealtimeSession(model=MODEL)
    events = ServerEvents(lambda: session, lambda kind: {"truncate": "evt_9"}.get(kind))
    translate_all(events, pb.ServerEvent(response_created=pb.ResponseCreated(response_id="r")),
                  pb.ServerEvent(audio_delta=pb.AudioDelta(response_id="r", pcm16=b"\x00\x00")))
    cut = events.translate(pb.ServerEvent(interrupted=pb.ResponseInterrupted(response_id="r", audio_end_ms=440)))
    assert cut == [{"type": "conversation.item.truncated", "event_id": cut[0]["event_id"],
                    "item_id": events.replies["r"].message["id"], "content_index": 0, "audio_end_ms": 440}]
    call = events.translate(pb.ServerEvent(function_call=pb.FunctionCall(response_id="r", call_id="c1", name="f",
                                                                         arguments_json='{"a": 1}')))
    assert [e["type"] for e in call] == ["response.output_item.added", "conversation.item.added",
                                         "response.function_call_arguments.delta",
                                         "response.function_call_arguments.done", "response.output_item.done",
                                         "conversation.item.done"]
    assert call[3]["call_id"] == "c1" and call[3]["arguments"] == '{"a": 1}' and call[0]["output_index"] == 1
    done = events.translate(pb.ServerEvent(response_done=pb.ResponseDone(response_id="r", status="interrupted")))
    response = done[-1]["response"]
    assert response["status"] == "cancelled" and response["status_details"]["reason"] == "turn_detected"
    assert [i["type"] for i in response["output"]] == ["message", "function_call"]
    assert response["output"][0]["status"] == "incomplete"
    error = events.translate(pb.ServerEvent(error=pb.Error(code="INVALID_ARGUMENT", message="m", event="truncate")))
    assert error[0]["error"]["event_id"] == "evt_9" and error[0]["error"]["code"] == "invalid_argument"


def test_audio_formats_know_their_sample_width():
    assert AudioFormat().bytes_per_sample == 2 and AudioFormat("audio/pcmu", 8000).bytes_per_sample == 1
