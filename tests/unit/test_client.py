"""funchat.client without a funchat server: configs, audio bytes, reply assembly, the `chat` / `call`
flags, and the API key on the wire (against a stand-in gRPC server in this process that checks it).

Calls against a running funchat server are in the integration tests.
"""

from __future__ import annotations

import asyncio
import json
import socket

import grpc
import numpy as np
import pytest
import soundfile as sf

from funchat.api import pb, pb_grpc
from funchat.cli import main as cli_main
from funchat.client import (API_KEY_ENV, AsyncClient, Client, Conversation, FunchatClientError, Reply,
                            auth_metadata, authed_stub, collect_reply, decode_pcm16, describe_event, encode_audio,
                            resolve_api_key, session_config, stream_call)
from funchat.client.call import Player
from funchat.oracle.pipeline import TurnResult

# ---------------------------------------------------------------------------------------------
# session_config


def test_session_config_defaults():
    cfg = session_config()
    assert cfg.mode == pb.MODE_SPEECH_TO_SPEECH
    assert cfg.turn_detection.WhichOneof("type") == "server_vad"
    vad = cfg.turn_detection.server_vad
    assert (vad.threshold, vad.silence_duration_ms, vad.prefix_padding_ms) == (0.0, 0, 0)  # server defaults
    assert cfg.input_audio_format.encoding == pb.AUDIO_ENCODING_PCM16
    assert cfg.input_audio_format.sample_rate_hz == 16000
    assert not cfg.generation.greedy and cfg.generation.max_new_tokens == 0
    for name in ("seed", "temperature", "top_p", "top_k", "repetition_penalty"):
        assert not cfg.generation.HasField(name), name
    assert cfg.resume_token == "" and cfg.instructions == "" and cfg.voice == "" and not cfg.tools


def test_session_config_modes():
    assert session_config(mode="s2t").mode == pb.MODE_SPEECH_TO_TEXT
    assert session_config(mode="s2s").mode == pb.MODE_SPEECH_TO_SPEECH
    with pytest.raises(ValueError, match="unknown mode 'speech'"):
        session_config(mode="speech")


def test_session_config_turn_detection():
    cfg = session_config(turn_detection="manual")
    assert cfg.turn_detection.WhichOneof("type") == "manual"
    cfg = session_config(vad_threshold=0.6, silence_ms=700, prefix_padding_ms=200)
    vad = cfg.turn_detection.server_vad
    assert vad.threshold == pytest.approx(0.6) and vad.silence_duration_ms == 700 and vad.prefix_padding_ms == 200
    with pytest.raises(ValueError, match="silence_ms only apply to turn_detection='server_vad'"):
        session_config(turn_detection="manual", silence_ms=500)
    with pytest.raises(ValueError, match="turn_detection"):
        session_config(turn_detection="push_to_talk")


def test_session_config_generation_and_resume():
    cfg = session_config(greedy=True, seed=0, max_new_tokens=64, resume_token="tok-1", instructions="Be brief.",
                         voice="alice")
    g = cfg.generation
    assert g.greedy and g.max_new_tokens == 64
    assert g.HasField("seed") and g.seed == 0  # seed 0 is a seed, not "unset"
    assert cfg.resume_token == "tok-1" and cfg.instructions == "Be brief." and cfg.voice == "alice"
    cfg = session_config(seed=2**40, temperature=0.7, top_k=20)
    assert cfg.generation.seed == 2**40 and cfg.generation.top_k == 20
    assert cfg.generation.temperature == pytest.approx(0.7) and not cfg.generation.HasField("top_p")
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="seed"):
            session_config(seed=bad)
    with pytest.raises(ValueError, match="max_new_tokens"):
        session_config(max_new_tokens=-1)


def test_session_config_audio_format():
    fmt = session_config(encoding="float32", sample_rate=48000).input_audio_format
    assert fmt.encoding == pb.AUDIO_ENCODING_FLOAT32 and fmt.sample_rate_hz == 48000
    with pytest.raises(ValueError, match="encoding"):
        session_config(encoding="mp3")
    with pytest.raises(ValueError, match="sample_rate"):
        session_config(sample_rate=0)


def test_session_config_tools():
    params = {"type": "object", "properties": {"city": {"type": "string"}}}
    cfg = session_config(tools=[{"name": "weather", "description": "Weather now", "parameters": params},
                                {"type": "function", "function": {"name": "time"}}])
    assert [t.name for t in cfg.tools] == ["weather", "time"]
    assert json.loads(cfg.tools[0].parameters_json) == params and cfg.tools[0].description == "Weather now"
    assert cfg.tools[1].parameters_json == ""
    with pytest.raises(ValueError, match=r"tools\[0\] needs a name"):
        session_config(tools=[{"description": "nameless"}])


# ---------------------------------------------------------------------------------------------
# audio bytes


def test_pcm16_round_trip():
    grid = np.arange(-32768, 32768, 7, dtype=np.int64).astype(np.float32) / 32768.0  # exact PCM16 values
    assert np.array_equal(decode_pcm16(encode_audio(grid, "pcm16")), grid)
    x = np.random.default_rng(0).uniform(-1, 1, 4000).astype(np.float32)
    data = encode_audio(x, "pcm16")
    assert len(data) == 2 * len(x)
    assert np.abs(decode_pcm16(data) - x).max() <= 0.5 / 32768 + 1e-7
    # out of range is clipped, not wrapped
    assert list(np.frombuffer(encode_audio(np.array([1.5, -1.5, 1.0], np.float32)), "<i2")) == [32767, -32768, 32767]


def test_float32_round_trip_and_errors():
    x = np.random.default_rng(1).uniform(-1, 1, 1000).astype(np.float32)
    data = encode_audio(x, "float32")
    assert len(data) == 4 * len(x) and np.array_equal(np.frombuffer(data, "<f4"), x)
    assert np.frombuffer(encode_audio(np.array([2.0], np.float32), "float32"), "<f4")[0] == 1.0
    with pytest.raises(ValueError, match="NaN"):
        encode_audio(np.array([0.0, np.nan], np.float32))
    with pytest.raises(ValueError, match="1-D"):
        encode_audio(np.zeros((10, 2), np.float32))
    with pytest.raises(ValueError, match="encoding"):
        encode_audio(x, "mulaw")
    with pytest.raises(ValueError, match="whole number"):
        decode_pcm16(b"\x00\x01\x02")


def test_respond_request_encodes_in_the_config_format():
    client = AsyncClient("127.0.0.1:1")  # no channel is made until an RPC
    x = np.zeros(1600, np.float32)
    req = client._respond_request(x, session_config(encoding="float32"), "sess_1")
    assert len(req.audio) == 4 * 1600 and req.session_id == "sess_1"
    req = client._respond_request(x, None, None)
    assert req.config == pb.SessionConfig() and len(req.audio) == 2 * 1600 and req.session_id == ""
    assert client._respond_request(b"\x01\x02", None, None).audio == b"\x01\x02"


# ---------------------------------------------------------------------------------------------
# replies


def _pcm(values) -> bytes:
    return np.asarray(values, dtype="<i2").tobytes()


def _audio(rid: str, seq: int, values, rate: int = 24000) -> pb.ServerEvent:
    return pb.ServerEvent(audio_delta=pb.AudioDelta(response_id=rid, sequence=seq, pcm16=_pcm(values),
                                                    sample_rate_hz=rate, start_ms=seq * 10))


def _scripted(rid: str = "resp_a") -> list[pb.ServerEvent]:
    E = pb.ServerEvent
    return [
        E(session_created=pb.SessionCreated(session_id="sess_x", resume_token="tok")),
        E(response_created=pb.ResponseCreated(response_id=rid)),
        E(text_delta=pb.TextDelta(response_id=rid, delta="Hel", token_ids=[11])),
        _audio(rid, 1, [3, 4]),
        E(text_delta=pb.TextDelta(response_id="resp_other", delta="IGNORED")),
        _audio("resp_other", 0, [9, 9]),
        E(text_delta=pb.TextDelta(response_id=rid, delta="lo", token_ids=[12])),
        _audio(rid, 0, [1, 2]),
        _audio(rid, 2, [5]),
        E(function_call=pb.FunctionCall(response_id=rid, call_id="c1", name="weather",
                                        arguments_json='{"city":"Oslo"}')),
        E(response_done=pb.ResponseDone(
            response_id=rid, status="completed", text="Hello",
            usage=pb.Usage(input_tokens=77, output_text_tokens=2, output_speech_tokens=10, history_turns_dropped=1),
            latency_ms={"first_audio": 250.0, "total": 1200.0}, text_tokens=[151, 11, 12],
            text_tokens_emitted=[11, 12], speech_tokens=[1, 2, 3, 4, 6600], vocoder_tokens=[1, 2, 3, 4], audio_ms=208)),
    ]


def test_reply_assembly():
    events = _scripted()
    times = [10.0 + i for i in range(len(events))]
    reply = collect_reply(events, times, sent_at=9.5, mode="s2s")
    assert reply.response_id == "resp_a" and reply.session_id == "sess_x" and reply.status == "completed"
    assert reply.text == "Hello"
    # chunks joined in sequence order although 1 came before 0; the other response's chunk skipped
    assert np.array_equal(reply.audio, np.array([1, 2, 3, 4, 5], np.float32) / 32768)
    assert reply.first_audio_s == pytest.approx(13.0 - 9.5)  # the first chunk to arrive (sequence 1)
    assert reply.text_tokens == [151, 11, 12] and reply.text_tokens_emitted == [11, 12]
    assert reply.speech_tokens == [1, 2, 3, 4, 6600] and reply.vocoder_tokens == [1, 2, 3, 4]
    assert reply.usage == {"input_tokens": 77, "output_text_tokens": 2, "output_speech_tokens": 10,
                           "history_turns_dropped": 1}
    assert reply.latency_ms == {"first_audio": 250.0, "total": 1200.0} and reply.audio_ms == 208
    assert reply.function_calls == [{"call_id": "c1", "name": "weather", "arguments_json": '{"city":"Oslo"}'}]
    assert len(reply.events) == len(events) and not reply.errors


def test_reply_text_from_deltas_without_done():
    events = [e for e in _scripted() if e.WhichOneof("event") != "response_done"]
    reply = collect_reply(events)
    assert reply.text == "Hello" and reply.status == "" and reply.first_audio_s is None
    other = collect_reply(_scripted(), response_id="resp_other")
    assert other.text == "IGNORED" and np.array_equal(other.audio, np.array([9, 9], np.float32) / 32768)


def test_reply_missing_or_repeated_audio_chunk_raises():
    events = [e for e in _scripted() if not (e.WhichOneof("event") == "audio_delta" and e.audio_delta.sequence == 1
                                             and e.audio_delta.response_id == "resp_a")]
    with pytest.raises(FunchatClientError, match=r"audio chunks \[1\] are missing") as info:
        collect_reply(events)
    assert info.value.code == "DATA_LOSS"
    with pytest.raises(FunchatClientError, match="came twice"):
        collect_reply(_scripted() + [_audio("resp_a", 2, [7])])
    with pytest.raises(FunchatClientError, match="16000 Hz"):
        collect_reply([_audio("r", 0, [1], rate=16000)])
    no_zero = [pb.ServerEvent(response_created=pb.ResponseCreated(response_id="r")), _audio("r", 1, [1])]
    with pytest.raises(FunchatClientError, match=r"\[0\] are missing"):
        collect_reply(no_zero)


def test_reply_collects_error_events():
    events = [pb.ServerEvent(response_created=pb.ResponseCreated(response_id="r")),
              pb.ServerEvent(error=pb.Error(code="UNAVAILABLE", message="vocoder down", event="turn")),
              pb.ServerEvent(response_done=pb.ResponseDone(response_id="r", status="failed"))]
    reply = collect_reply(events)
    assert reply.status == "failed" and [(e.code, e.event) for e in reply.errors] == [("UNAVAILABLE", "turn")]
    assert len(reply.audio) == 0


def test_tokens_json_has_the_respond_shape():
    reply = collect_reply(_scripted(), mode="s2s")
    oracle = TurnResult(text="", text_tokens=[], text_tokens_emitted=[], speech_tokens=[], vocoder_tokens=[],
                        mode="s2s", prompt_tokens=0, history_turns_dropped=0).to_json()
    data = reply.tokens_json()
    assert list(data) == list(oracle)
    assert data["prompt_tokens"] == 77 and data["history_turns_dropped"] == 1 and data["mode"] == "s2s"
    assert data["timings"] == {"first_audio": 0.25, "total": 1.2}
    assert data["text_tokens"] == [151, 11, 12] and data["vocoder_tokens"] == [1, 2, 3, 4]
    json.dumps(data)  # plain JSON types only
    assert Reply().tokens_json()["prompt_tokens"] == 0


def test_describe_event_shows_no_audio_bytes():
    line = describe_event(_audio("resp_a", 3, np.full(2400, 1234)))
    assert line == "audio_delta response=resp_a seq=3 start_ms=30 100 ms"
    assert describe_event(pb.ServerEvent(error=pb.Error(code="NOT_FOUND", message="gone"))) == \
        "error code=NOT_FOUND event=- message='gone'"
    for event in _scripted():
        assert describe_event(event).startswith(event.WhichOneof("event"))


def test_conversation_groups_events_into_replies():
    call = Conversation(AsyncClient("127.0.0.1:1"), session_config(mode="s2t"))
    call.session = pb.SessionCreated(session_id="sess_c")
    call._last_sent_at = 100.0  # the last audio chunk before the server committed the turn
    E = pb.ServerEvent
    script = [E(speech_started=pb.SpeechStarted(audio_start_ms=0)),
              E(speech_stopped=pb.SpeechStopped(audio_end_ms=900)),
              E(committed=pb.InputAudioCommitted(item_id="i1", audio_ms=900))] + _scripted("r1")[1:]
    for i, event in enumerate(script):
        call._track(101.0 + i, event)
    assert len(call.replies) == 1
    reply = call.replies[0]
    assert reply.response_id == "r1" and reply.session_id == "sess_c" and reply.mode == "s2t"
    assert reply.first_audio_s == pytest.approx(101.0 + 5 - 100.0)  # audio chunk 1 is the 6th event
    assert all(e.WhichOneof("event") not in ("speech_started", "committed") for e in reply.events)
    # a failed turn: its error is attributed to the open response
    call._track(200.0, E(response_created=pb.ResponseCreated(response_id="r2")))
    call._track(201.0, E(error=pb.Error(code="INVALID_ARGUMENT", message="too short", event="turn")))
    call._track(202.0, E(response_done=pb.ResponseDone(response_id="r2", status="failed")))
    assert [r.status for r in call.replies] == ["completed", "failed"]
    assert call.replies[1].errors[0].message == "too short"
    assert [r.response_id for r in call._unreturned] == ["r1", "r2"]


def test_player_timeline_and_playback():
    player = Player()
    chunk = lambda seq: pb.AudioDelta(response_id="r", sequence=seq, pcm16=_pcm(np.full(2400, 1000)),  # 100 ms
                                      sample_rate_hz=24000)
    player.add(1.0, chunk(0))
    player.add(1.02, chunk(1))   # arrives while chunk 0 plays: queued behind it (starts at 1.1)
    player.add(1.5, chunk(2))    # arrives after an underrun: starts when it arrives
    assert [round(s[1], 3) for s in player.segments] == [1.0, 1.1, 1.5]
    assert player.played_ms("r", 0.5) == 0 and player.played_ms("r", 1.15) == 150
    assert player.played_ms("r", 9.0) == 300 and player.end_s() == pytest.approx(1.6)
    player.stop("r", 1.55)       # interrupted half-way through chunk 2
    assert player.played_ms("r", 9.0) == 250
    player.add(1.6, chunk(3))    # audio of a stopped reply is not played
    audio = player.render(2.0)
    assert len(audio) == 48000
    heard = np.flatnonzero(audio)
    assert heard[0] == 24000 and heard[-1] == int(1.55 * 24000) - 1 and len(heard) == 6000


# ---------------------------------------------------------------------------------------------
# the `chat` and `call` commands


@pytest.mark.parametrize("command", ["chat", "call"])
def test_cli_missing_server_exits_2(command, capsys):
    with pytest.raises(SystemExit) as info:
        cli_main([command, "--input", "in.wav"])
    assert info.value.code == 2
    assert "--server" in capsys.readouterr().err


@pytest.mark.parametrize("server", ["localhost", "localhost:port", ":50051", "host:70000"])
def test_cli_bad_server_address_exits_2(server, capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["chat", "--server", server, "--input", "in.wav"])
    assert info.value.code == 2
    assert "expected HOST:PORT" in capsys.readouterr().err


def test_cli_bad_flags_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["chat", "--server", "127.0.0.1:50051", "--input", "in.wav", "--mode", "t2t"])
    assert info.value.code == 2
    assert cli_main(["call", "--server", "127.0.0.1:50051", "--input", "in.wav", "--chunk-ms", "2000"]) == 2
    assert "--chunk-ms must be 1..1000" in capsys.readouterr().err
    assert cli_main(["chat", "--server", "127.0.0.1:50051", "--input", str(tmp_path / "nope.wav")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_unreachable_server_exits_2(tmp_path, capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    wav = tmp_path / "in.wav"
    sf.write(wav, np.zeros(1600, np.float32), 16000)
    assert cli_main(["chat", "--server", f"127.0.0.1:{port}", "--input", str(wav), "--timeout", "10"]) == 2
    err = capsys.readouterr().err
    assert f"funchat chat: error: cannot reach funchat server at 127.0.0.1:{port} (UNAVAILABLE)" in err
    assert len(err.strip().splitlines()) == 1



# ---------------------------------------------------------------------------------------------
# API keys

KEY = "fck_abcdefgh23_" + "k" * 52  # the key the stand-in takes (tests/conftest.py)
SECRET = KEY.rsplit("_", 1)[1]
REFUSED = "missing authorization metadata: send `authorization: Bearer <key>`"


def test_resolve_api_key_env_default_explicit_and_none(monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, f"  {KEY}\n")
    assert resolve_api_key() == KEY  # from the environment, whitespace dropped (a key read from a file)
    assert resolve_api_key("fck_other") == "fck_other"  # given: the environment is not read
    assert resolve_api_key("") is None  # "": none, whatever the environment says
    monkeypatch.delenv(API_KEY_ENV)
    assert resolve_api_key() is None
    assert auth_metadata(KEY) == (("authorization", f"Bearer {KEY}"),) and auth_metadata(None) == ()
    for bad in (f"Bearer {KEY}", f"{KEY}\u00e9", "two words"):
        with pytest.raises(ValueError, match="one word") as info:
            resolve_api_key(bad)
        assert SECRET not in str(info.value) and "two words" not in str(info.value)
    monkeypatch.setenv(API_KEY_ENV, f"{KEY} x")
    with pytest.raises(ValueError, match=r"\$FUNCHAT_API_KEY holds"):
        resolve_api_key()


def test_every_rpc_of_the_async_client_sends_the_key(stand_in):
    async def main():
        async with AsyncClient(stand_in.target, timeout=10, api_key=KEY) as client:
            assert await client.health()
            session = await client.get_session("sess_1")
            deleted = await client.delete_session("sess_1")
            reply = await client.respond(np.zeros(1600, np.float32), session_config())
            async with client.converse(session_config(turn_detection="manual")) as call:
                await call.send_audio(np.zeros(1600, np.float32))
                await call.commit()
                conversed = await call.next_reply()
            return session, deleted, reply, conversed

    session, deleted, reply, conversed = asyncio.run(main())
    assert session.session_id == "sess_1" and deleted and reply.text == "hi" and conversed.text == "hi"
    assert stand_in.seen == [(m, [f"Bearer {KEY}"]) for m in ("Check", "GetSession", "DeleteSession", "Respond",
                                                            "Converse")]  # once each, never twice


def test_the_sync_client_and_stream_call_take_the_key_from_the_environment(stand_in, monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, KEY)
    client = Client(stand_in.target, timeout=10)
    assert client.respond(np.zeros(1600, np.float32)).text == "hi"
    assert client.get_session("s").session_id == "s" and client.delete_session("s") and client.health()

    async def call():
        async with AsyncClient(stand_in.target) as c:
            return await stream_call(c, session_config(turn_detection="manual"), np.zeros(1600, np.float32),
                                     realtime=False, timeout_s=10)

    result = asyncio.run(call())
    assert [r.text for r in result.replies] == ["hi"]
    assert {m for m, _ in stand_in.seen} == {"Respond", "GetSession", "DeleteSession", "Check", "Converse"}
    assert all(values == [f"Bearer {KEY}"] for _, values in stand_in.seen), stand_in.seen


def test_no_key_or_a_wrong_one_is_unauthenticated_with_the_servers_message(stand_in, monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, KEY)
    wrong = "fck_abcdefgh23_" + "w" * 52
    for api_key, sent in (("", []), (wrong, [f"Bearer {wrong}"])):
        stand_in.seen.clear()
        with pytest.raises(FunchatClientError) as info:
            Client(stand_in.target, timeout=10, api_key=api_key).respond(np.zeros(1600, np.float32))
        assert info.value.code == "UNAUTHENTICATED" and info.value.message == REFUSED
        assert not info.value.unreachable
        assert "w" * 52 not in str(info.value) and SECRET not in str(info.value)
        assert stand_in.seen == [("Respond", sent)]

        async def converse():
            async with AsyncClient(stand_in.target, api_key=api_key) as client:
                async with client.converse(session_config()):
                    pass

        with pytest.raises(FunchatClientError, match="UNAUTHENTICATED: missing authorization metadata"):
            asyncio.run(converse())
    assert Client(stand_in.target, timeout=10, api_key="").health()  # the health check needs no key


def test_the_key_is_in_no_repr(monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, KEY)
    for client in (AsyncClient("127.0.0.1:1"), Client("127.0.0.1:1"), AsyncClient("127.0.0.1:1", api_key=KEY)):
        assert SECRET not in repr(client) and "api_key=<set>" in repr(client)
        assert SECRET not in str(vars(client).get("target"))
    assert "api_key=<none>" in repr(AsyncClient("127.0.0.1:1", api_key="")) and "<none>" in repr(Client(api_key=""))
    stub = authed_stub(pb_grpc.FunchatStub(grpc.insecure_channel("127.0.0.1:1")), KEY)
    assert SECRET not in repr(stub.Respond) and SECRET not in repr(vars(stub))
    conversation = Conversation(AsyncClient("127.0.0.1:1", api_key=KEY), session_config())
    assert SECRET not in repr(conversation)


def test_authed_stub_keeps_the_callers_metadata(stand_in):
    seen = {}

    class Echo(grpc.UnaryUnaryClientInterceptor):
        def intercept_unary_unary(self, continuation, details, request):
            seen["metadata"] = list(details.metadata)
            return continuation(details, request)

    with grpc.insecure_channel(stand_in.target) as channel:
        stub = authed_stub(pb_grpc.FunchatStub(grpc.intercept_channel(channel, Echo())), KEY)
        stub.GetSession(pb.GetSessionRequest(session_id="x"), metadata=(("traceparent", "00-ab-cd-01"),), timeout=10)
        _, call = stub.GetSession.with_call(pb.GetSessionRequest(session_id="y"), timeout=10)
        assert call.code() == grpc.StatusCode.OK
    assert seen["metadata"] == [("authorization", f"Bearer {KEY}")]
    assert [m for m, _ in stand_in.seen] == ["GetSession", "GetSession"]
    assert all(v == [f"Bearer {KEY}"] for _, v in stand_in.seen)
    plain = pb_grpc.FunchatStub(grpc.insecure_channel("127.0.0.1:1"))
    assert authed_stub(plain, "") is plain  # no key: the stub as it was


def _wav(tmp_path):
    wav = tmp_path / "in.wav"
    sf.write(wav, np.zeros(1600, np.float32), 16000)
    return wav


@pytest.mark.parametrize("command", ["chat", "call"])
def test_cli_sends_the_key_of_the_environment_or_the_key_file(command, stand_in, tmp_path, monkeypatch, capsys):
    extra = ["--no-realtime", "--timeout", "10"] if command == "call" else ["--timeout", "10"]
    monkeypatch.setenv(API_KEY_ENV, KEY)
    assert cli_main([command, "--server", stand_in.target, "--input", str(_wav(tmp_path)), *extra]) == 0, \
        capsys.readouterr().err
    monkeypatch.delenv(API_KEY_ENV)
    key_file = tmp_path / "api_key"
    key_file.write_text(KEY + "\n")
    assert cli_main([command, "--server", stand_in.target, "--input", str(_wav(tmp_path)), "--api-key-file",
                     str(key_file), *extra]) == 0, capsys.readouterr().err
    assert stand_in.seen and all(v == [f"Bearer {KEY}"] for _, v in stand_in.seen)
    assert SECRET not in capsys.readouterr().out


@pytest.mark.parametrize("command", ["chat", "call"])
def test_cli_unauthenticated_says_what_to_set(command, stand_in, tmp_path, monkeypatch, capsys):
    extra = ["--no-realtime", "--timeout", "10"] if command == "call" else ["--timeout", "10"]
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert cli_main([command, "--server", stand_in.target, "--input", str(_wav(tmp_path)), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"funchat {command}: error: funchat server at {stand_in.target} answered "
                          f"UNAUTHENTICATED: {REFUSED}; no API key was sent: set FUNCHAT_API_KEY")
    assert len(err.strip().splitlines()) == 1
    wrong = "fck_abcdefgh23_" + "w" * 52
    monkeypatch.setenv(API_KEY_ENV, wrong)
    assert cli_main([command, "--server", stand_in.target, "--input", str(_wav(tmp_path)), *extra]) == 2
    err = capsys.readouterr().err
    assert "the API key from $FUNCHAT_API_KEY was refused; set FUNCHAT_API_KEY" in err and "w" * 52 not in err


def test_cli_api_key_file_problems_exit_2_without_the_content(tmp_path, capsys):
    wav = _wav(tmp_path)
    base = ["chat", "--server", "127.0.0.1:1", "--input", str(wav), "--api-key-file"]
    assert cli_main(base + [str(tmp_path / "missing")]) == 2
    assert "cannot read the API key file" in capsys.readouterr().err
    (tmp_path / "empty").write_text("\n")
    assert cli_main(base + [str(tmp_path / "empty")]) == 2
    assert "is empty" in capsys.readouterr().err
    (tmp_path / "two").write_text(f"{KEY} {KEY}\n")
    assert cli_main(base + [str(tmp_path / "two")]) == 2
    err = capsys.readouterr().err
    assert "does not hold a key alone" in err and SECRET not in err


def test_cli_has_no_flag_for_the_key_itself(capsys):
    with pytest.raises(SystemExit):
        cli_main(["chat", "--help"])
    out = capsys.readouterr().out
    assert "--api-key-file" in out and "FUNCHAT_API_KEY" in out
    for flag in (["--api-key", KEY], [f"--api-key={KEY}"]):  # not taken for an abbreviation of --api-key-file
        with pytest.raises(SystemExit) as info:
            cli_main(["chat", "--server", "127.0.0.1:1", "--input", "x.wav", *flag])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "there is no --api-key flag" in err and "FUNCHAT_API_KEY" in err and SECRET not in err
