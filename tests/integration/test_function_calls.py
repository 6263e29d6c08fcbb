"""Function calling through the public API, end to end: its own redis-server, four tritonservers and
Ray Serve orchestrator, all on the tool checkpoint (tests/conftest.py: `tool_checkpoint`, the tiny
checkpoint fine-tuned so that its greedy reply to the recording's first 3 s, with get_weather as its
tool, is exactly get_weather(city="Paris")). The shared `model_services` load the plain tiny
checkpoint at start, hence a stack of its own.

Every reply is compared with the in-process oracle on the same checkpoint, greedy: the same text
and speech tokens and audio, the call the caller is sent, and, after the caller returns the
function's output, the next turn's, whose prompt holds the call and the output.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest

from funchat.api import pb
from funchat.client import session_config
from funchat.dev.redis_server import start_redis
from funchat.dev.stack import start_orchestrator
from funchat.dev.tool_checkpoint import WEATHER_CALL, WEATHER_TOOL, tool_call_text, tool_clip
from funchat.dev.tritonserver import free_port, start_servers
from funchat.oracle.generation import GenerationConfig
from funchat.oracle.pipeline import ReferencePipeline
from funchat.orchestrator.turn_runner import parse_tool_calls
from funchat.turn.schedule import Mode
from tests.integration.pcm import pcm16_bytes, pcm16_samples
from tests.integration.test_orchestrator import Caller, assert_same_as_oracle, config, funchat_stub, kinds, reply_of

MAX_NEW = 40  # more than the call's 23 tokens: the turn ends by itself
TOOL_OUTPUT = '{"temp_c": 21}'
TOOLS = list(session_config(tools=[WEATHER_TOOL]).tools)  # the pb.Tool a client sends for WEATHER_TOOL


@pytest.fixture(scope="module")
def stack(tool_checkpoint, tmp_path_factory, make_api_key, request):
    run_dir = tmp_path_factory.mktemp("function-calls")
    keys_file, key = make_api_key(run_dir, "dev")
    # The integration conftest's list of clusters whose logs a failing test's report shows.
    conftest = request.config.pluginmanager.get_plugin(str(Path(__file__).with_name("conftest.py")))
    shown = getattr(conftest, "_CLUSTERS", [])
    redis_server = start_redis(run_dir)
    cluster = orch = None
    try:
        cluster = start_servers(params={"*": {"checkpoint": str(tool_checkpoint), "threads": "1"}},
                                run_dir=run_dir / "triton", timeout=240)
        shown.append(cluster)
        env = {"FUNCHAT_CHECKPOINT": str(tool_checkpoint), "FUNCHAT_REDIS_URL": redis_server.url,
               "FUNCHAT_RESUME_SECRET": "tools-secret-" + "0" * 20, "FUNCHAT_ENDPOINTS": json.dumps(cluster.endpoints),
               "FUNCHAT_MAX_NEW_TOKENS": "512", "FUNCHAT_AUTH": "api_keys", "FUNCHAT_API_KEYS_FILE": str(keys_file)}
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("FUNCHAT_API_KEY", key)  # the clients' (Caller, funchat_stub)
            orch = start_orchestrator(run_dir, env, free_port(), timeout=240)
            yield {"target": orch.target, "run_dir": run_dir, "key": key,
                   "base_url": f"http://127.0.0.1:{orch.http_port}/v1"}
    finally:
        if orch is not None:
            orch.stop()
        if cluster is not None:
            cluster.stop()
            if cluster in shown:
                shown.remove(cluster)
        redis_server.stop()


@pytest.fixture(scope="module")
def oracle(tool_checkpoint):
    return ReferencePipeline(tool_checkpoint)


@pytest.fixture(scope="module")
def turns(speech):
    """Two caller turns as (what the client sends: float samples, what the server decodes of their
    PCM16 bytes, which the oracle hears): the question the checkpoint answers with the call (the
    recording's first 3 s: `tool_clip` is what the server decodes of them) and the next 2.5 s."""
    question = speech[:48000]
    assert (tool_clip(speech) == pcm16_samples(question)).all()
    follow_up = speech[48000:88000]
    return (question, pcm16_samples(question)), (follow_up, pcm16_samples(follow_up))


def calls_of(events) -> list[pb.FunctionCall]:
    return [e.function_call for e in events if e.WhichOneof("event") == "function_call"]


async def send_turn(caller: Caller, audio) -> list[pb.ServerEvent]:
    """The caller's turn in 0.5 s chunks, committed -> the reply's events up to its response_done."""
    for k in range(0, len(audio), 8000):
        await caller.send(pb.ClientEvent(audio=pb.InputAudioAppend(audio=pcm16_bytes(audio[k:k + 8000]))))
    await caller.send(pb.ClientEvent(commit=pb.InputAudioCommit()))
    return await caller.until("response_done")


def test_the_model_calls_the_function_and_answers_after_its_output_as_the_oracle(stack, oracle, tool_checkpoint,
                                                                                 turns):
    (question, heard_question), (follow_up, heard_follow_up) = turns

    async def main():
        caller = await Caller(stack["target"]).start(pb.ClientEvent(session=config(max_new=MAX_NEW, tools=TOOLS)))
        sid = (await caller.until("session_created"))[-1].session_created.session_id
        first = await send_turn(caller, question)
        call = calls_of(first)[0] if calls_of(first) else None
        # a bad output first: no call_id. An error event names it; the call goes on.
        await caller.send(pb.ClientEvent(function_call_output=pb.FunctionCallOutput(output=TOOL_OUTPUT)))
        bad = (await caller.until("error"))[-1].error
        if call is not None:
            await caller.send(pb.ClientEvent(function_call_output=pb.FunctionCallOutput(call_id=call.call_id,
                                                                                        output=TOOL_OUTPUT)))
        second = await send_turn(caller, follow_up)
        async with grpc.aio.insecure_channel(stack["target"]) as ch:
            session = await funchat_stub(ch).GetSession(pb.GetSessionRequest(session_id=sid))
        await caller.send(pb.ClientEvent(end=pb.SessionEnd()))
        rest = []
        while (event := await caller.next()) is not None:
            rest.append(event)
        await caller.close()
        return first, bad, second, session, rest

    first, bad, second, session, rest = asyncio.run(main())
    gen = GenerationConfig.greedy(Mode.S2S, MAX_NEW)

    # turn 1: exactly the call, sent as a function_call event before response_done, and the oracle's tokens
    ref1 = oracle.respond(heard_question, tools=[WEATHER_TOOL], gen=gen)
    assert ref1.text == tool_call_text(oracle.tokenizer, WEATHER_CALL)  # the checkpoint does what it was made for
    assert_same_as_oracle(reply_of(first), ref1, tool_checkpoint)
    assert reply_of(first)["done"].status == "completed"
    (call,) = calls_of(first)
    assert (call.name, json.loads(call.arguments_json)) == ("get_weather", {"city": "Paris"})
    assert call.arguments_json == '{"city": "Paris"}' and call.call_id.startswith("call_")
    assert call.response_id == reply_of(first)["done"].response_id
    assert kinds(first).index("function_call") == len(first) - 2  # right before response_done

    assert (bad.code, bad.event) == ("INVALID_ARGUMENT", "function_call_output") and "call_id" in bad.message

    # the session holds the call and the (one, good) output between the two spoken turns
    assert [t.role for t in session.turns] == ["user", "assistant", "tool", "user", "assistant"]
    assert session.turns[0].audio_ms == len(question) * 1000 // 16000
    assert session.turns[2].text == TOOL_OUTPUT
    assert session.turns[1].text == ""  # the call is kept as the turn's call, not also as its text

    # turn 2: the oracle on the same history: the caller's speech, the assistant's turn as the
    # session keeps it (its text and the call it made) and the function's output
    history = [{"role": "user", "content": heard_question},
               {"role": "assistant", "content": session.turns[1].text,
                "tool_calls": [{"name": call.name, "arguments": call.arguments_json}]},
               {"role": "tool", "content": session.turns[2].text}]
    ref2 = oracle.respond(heard_follow_up, history=history, tools=[WEATHER_TOOL], gen=gen)
    assert_same_as_oracle(reply_of(second), ref2, tool_checkpoint)
    assert reply_of(second)["done"].usage.input_tokens == ref2.prompt_tokens
    assert session.turns[4].text == ref2.text
    # what it says is free, but any call in it is parsed as the oracle's text parses
    assert [(c.name, c.arguments_json) for c in calls_of(second)] == \
        [(c["name"], c["arguments"]) for c in parse_tool_calls(ref2.text)]
    assert kinds(rest) == []


def test_respond_in_text_mode_calls_the_function_too(stack, oracle, turns):
    """The unary Respond, speech-to-text: the same call, as the oracle's s2t reply."""
    (question, heard_question), _ = turns
    cfg = config(max_new=MAX_NEW, tools=TOOLS, mode=pb.MODE_SPEECH_TO_TEXT)

    async def main():
        async with grpc.aio.insecure_channel(stack["target"]) as ch:
            return [e async for e in funchat_stub(ch).Respond(pb.RespondRequest(config=cfg,
                                                                               audio=pcm16_bytes(question)))]

    events = asyncio.run(main())
    ref = oracle.respond(heard_question, mode="s2t", tools=[WEATHER_TOOL],
                         gen=GenerationConfig.greedy(Mode.S2T, MAX_NEW))
    reply = reply_of(events)
    assert reply["text_tokens"] == ref.text_tokens and reply["done"].text == ref.text
    assert reply["speech_tokens"] == [] and len(reply["audio"]) == 0
    assert [(c.name, json.loads(c.arguments_json)) for c in calls_of(events)] == [("get_weather", {"city": "Paris"})]


def test_a_function_call_round_trip_over_the_realtime_sdk(stack, oracle, tool_checkpoint, turns):
    """The same exchange through /v1/realtime with the official openai SDK: the call comes as a
    function_call item (arguments delta and done), the output goes back with conversation.item.create,
    and response.create has the model answer it (no new speech), equal to the oracle on that history."""
    from openai import AsyncOpenAI

    from tests.integration.test_realtime import reply as realtime_reply, spoken_turn, until

    (question, heard_question), _ = turns
    session = {"type": "realtime", "tools": [{"type": "function", **WEATHER_TOOL["function"]}], "tool_choice": "auto",
               "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}, "turn_detection": None}},
               "max_output_tokens": MAX_NEW, "generation": {"greedy": True, "seed": 0}}

    async def main():
        client = AsyncOpenAI(base_url=stack["base_url"], api_key=stack["key"])
        async with client.realtime.connect(model="fun-audio-chat") as conn:
            await until(conn, "session.created")
            await conn.session.update(session=session)
            await until(conn, "session.updated")
            first = await spoken_turn(conn, pcm16_bytes(question))
            done = [e for e in first if e.type == "response.function_call_arguments.done"][-1]
            await conn.conversation.item.create(item={"type": "function_call_output", "call_id": done.call_id,
                                                      "output": TOOL_OUTPUT})
            output_item = (await until(conn, "conversation.item.done"))[-1].item
            await conn.response.create()  # the model answers the function's output, no new speech
            second = await until(conn, "response.done")
            return first, done, output_item, second

    first, done, output_item, second = asyncio.run(main())
    gen = GenerationConfig.greedy(Mode.S2S, MAX_NEW)
    ref1 = oracle.respond(heard_question, tools=[WEATHER_TOOL], gen=gen)
    assert realtime_reply(first)["funchat"]["text_tokens"] == ref1.text_tokens
    assert (done.name, json.loads(done.arguments)) == ("get_weather", {"city": "Paris"})
    delta = [e for e in first if e.type == "response.function_call_arguments.delta"][-1]
    assert delta.call_id == done.call_id and delta.delta == done.arguments
    added = [e for e in first if e.type == "response.output_item.added" and e.item.type == "function_call"]
    assert added and added[-1].item.call_id == done.call_id and added[-1].item.name == "get_weather"
    response = realtime_reply(first)["done"].response
    assert [i.type for i in response.output][-1] == "function_call"
    assert response.output[-1].arguments == done.arguments
    assert output_item.type == "function_call_output" and output_item.output == TOOL_OUTPUT

    history = [{"role": "user", "content": heard_question},
               {"role": "assistant", "content": "", "tool_calls": [{"name": done.name, "arguments": done.arguments}]},
               {"role": "tool", "content": TOOL_OUTPUT}]
    ref2 = oracle.respond(None, history=history, tools=[WEATHER_TOOL], gen=gen)
    r2 = realtime_reply(second)
    assert r2["funchat"]["text_tokens"] == ref2.text_tokens and r2["funchat"]["speech_tokens"] == ref2.speech_tokens
    assert r2["text"] == ref2.text
