"""The tool checkpoint (funchat.dev.tool_checkpoint; fixture `tool_checkpoint`): the oracle, greedy,
answers the recording with exactly one get_weather call, which the orchestrator's parser reads;
the base tiny checkpoint does not. The speech path still runs, and so does the turn after the tool's
output."""

from __future__ import annotations

import json

import numpy as np
import pytest

from funchat.api import pb
from funchat.client import session_config
from funchat.dev.tool_checkpoint import WEATHER_CALL, WEATHER_TOOL, call_tokens, main, tool_call_text, tool_clip
from funchat.oracle.generation import GenerationConfig
from funchat.oracle.pipeline import ReferencePipeline
from funchat.orchestrator.call_config import parse_config
from funchat.orchestrator.turn_runner import parse_tool_calls
from funchat.turn.schedule import Mode
from funchat.vocoder.checkpoint import load_vocoder, pick_speaker

MAX_NEW = 40  # more than the call's 23 tokens: the turn must end by itself


@pytest.fixture(scope="module")
def oracle(tool_checkpoint):
    return ReferencePipeline(tool_checkpoint)


@pytest.fixture(scope="module")
def clip(speech):
    return tool_clip(speech)


def test_the_call_text_is_the_chat_templates(oracle):
    tok = oracle.tokenizer
    text = tool_call_text(tok, WEATHER_CALL)
    assert text == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    ids = tok.encode(text)
    # <tool_call> and </tool_call> are single (added, not special) tokens of the tiny tokenizer
    assert ids[0] == tok.token_to_id("<tool_call>") and ids[-1] == tok.token_to_id("</tool_call>")
    assert call_tokens(oracle.prompts, WEATHER_CALL) == ids + [oracle.special.im_end]


def test_the_orchestrator_gives_the_prompt_the_trained_tool_list():
    """A client's get_weather tool, through the server's config parsing, is WEATHER_TOOL key for key
    (the prompt's tool block is its JSON, so the cluster's prompt ids are the fine-tune's)."""
    cfg = session_config(tools=[WEATHER_TOOL])
    assert parse_config(cfg, set(), 512).tools == [WEATHER_TOOL]
    assert json.dumps(parse_config(cfg, set(), 512).tools) == json.dumps([WEATHER_TOOL])
    assert isinstance(cfg.tools[0], pb.Tool)


@pytest.mark.parametrize("mode", ["s2s", "s2t"])
def test_the_oracle_answers_the_recording_with_exactly_the_call(oracle, clip, mode):
    reply = oracle.respond(clip, mode=mode, tools=[WEATHER_TOOL], gen=GenerationConfig.greedy(Mode(mode), MAX_NEW))
    calls = parse_tool_calls(reply.text)
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert reply.text == tool_call_text(oracle.tokenizer, WEATHER_CALL)  # nothing else
    sp = oracle.special
    forced = [sp.audio_bos] if mode == "s2s" else []
    # as the reference returns them: <|audio_eos|> wherever the speech ended (if it did)
    assert [t for t in reply.text_tokens if t != sp.audio_eos] == forced + call_tokens(oracle.prompts, WEATHER_CALL)
    assert reply.text_tokens_emitted[-1] == sp.im_end  # the turn ended by itself
    assert len(reply.text_tokens) < MAX_NEW


def test_the_speech_path_still_runs(oracle, tool_checkpoint, clip):
    reply = oracle.respond(clip, mode="s2s", tools=[WEATHER_TOOL], gen=GenerationConfig.greedy(Mode.S2S, MAX_NEW))
    # a group per forward after the prefill, up to the one where the speech ended (if it did)
    ended = oracle.special.audio_eos
    speaking = reply.text_tokens.index(ended) if ended in reply.text_tokens else len(reply.text_tokens) - 1
    assert len(reply.speech_tokens) == oracle.token_ids.group_size * speaking
    assert reply.vocoder_tokens  # the untouched SRH speaks along with the call
    vocoder, speakers = load_vocoder(tool_checkpoint)
    chunks = vocoder.push(vocoder.start(pick_speaker(speakers, None)), reply.vocoder_tokens, final=True)
    audio = np.concatenate([c.numpy() for c in chunks])
    assert len(audio) == 960 * len(reply.vocoder_tokens) and np.isfinite(audio).all()


def test_the_base_checkpoint_does_not_call(tiny_pipeline, clip):
    for mode in ("s2s", "s2t"):
        reply = tiny_pipeline.respond(clip, mode=mode, tools=[WEATHER_TOOL],
                                      gen=GenerationConfig.greedy(Mode(mode), MAX_NEW))
        assert parse_tool_calls(reply.text) == []
        assert reply.text != tool_call_text(tiny_pipeline.tokenizer, WEATHER_CALL)


def test_the_turn_after_the_tool_output_runs(oracle, clip, speech):
    """The next prompt holds the call (as the orchestrator stores it: the reply's text and its
    parsed call) and the tool's output; the model may say anything, but the turn runs to its end."""
    gen = GenerationConfig.greedy(Mode.S2S, MAX_NEW)
    first = oracle.respond(clip, tools=[WEATHER_TOOL], gen=gen)
    call = parse_tool_calls(first.text)[0]
    history = [{"role": "user", "content": clip},
               {"role": "assistant", "content": first.text,
                "tool_calls": [{"name": call["name"], "arguments": call["arguments"]}]},
               {"role": "tool", "content": '{"temp_c": 21}'}]
    second_clip = tool_clip(speech[len(clip):], 2.0)
    second = oracle.respond(second_clip, history=history, tools=[WEATHER_TOOL], gen=gen)
    assert second.history_turns_dropped == 0 and second.prompt_tokens > first.prompt_tokens
    assert second.text_tokens[0] == oracle.special.audio_bos and len(second.text_tokens) >= 2
    assert second.text_tokens_emitted[-1] == oracle.special.im_end or len(second.text_tokens) == MAX_NEW


def test_the_cli_writes_the_same_weights(tool_checkpoint, tiny_checkpoint, example_wav, tmp_path, capsys):
    """Deterministic: the command line's fine-tune of the same base and clip gives the fixture's
    weights byte for byte."""
    out = tmp_path / "tool"
    assert main(["--base", str(tiny_checkpoint), "--out", str(out), "--audio", str(example_wav)]) == 0
    assert "<tool_call>" in capsys.readouterr().out
    assert (out / "model.safetensors").read_bytes() == (tool_checkpoint / "model.safetensors").read_bytes()
    assert (out / "tokenizer.json").exists() and (out / "vocoder" / "model.safetensors").exists()


def test_an_output_folder_in_use_is_refused(tiny_checkpoint, clip, tmp_path):
    from funchat.dev.tool_checkpoint import ToolCheckpointError, build_tool_checkpoint

    (tmp_path / "something").write_text("x")
    with pytest.raises(ToolCheckpointError, match="not empty"):
        build_tool_checkpoint(tiny_checkpoint, tmp_path, clip)


@pytest.mark.parametrize("at", ["mid-call", "end of turn"])
def test_a_speech_end_inside_the_call_repeats_the_lost_token(tiny_checkpoint, clip, monkeypatch, at):
    """The SRH may end its speech at any step; the schedule then writes <|audio_eos|> over that step's
    text token. The walk says that token again at the next step (or <|sil|>, no text, when it was
    the turn's end), so the text still reads exactly the call. The SRH is made to choose speech eos
    at one step here (a fake only for this pure-logic check)."""
    from funchat.dev.tool_checkpoint import _prompts, _walk
    from funchat.model.checkpoint import load_model
    from funchat.turn.prompt import PromptBuilder

    model = load_model(tiny_checkpoint)
    builder = PromptBuilder.from_checkpoint(tiny_checkpoint, model.cfg.raw)
    plan = call_tokens(builder, WEATHER_CALL)
    (example,) = _prompts(model, builder, clip, [WEATHER_TOOL], plan, [Mode.S2S])
    ids, sp = builder.token_ids, builder.special
    eos_forward = 6 if at == "mid-call" else len(plan)  # forward k says plan[k - 1] (forward 0: <|audio_bos|>)
    real, forwards = model.srh_forward, []

    def srh_forward(hidden, input_ids, state, choose, lengths=None):
        forwards.append(len(forwards))

        def choose_eos(j, logits):
            if len(forwards) - 1 == eos_forward and j == 2:
                logits = logits.clone()
                logits[:, ids.speech_eos] = float("inf")
            return choose(j, logits)
        return real(hidden, input_ids, state, choose_eos, lengths)

    monkeypatch.setattr(model, "srh_forward", srh_forward)
    path = _walk(model, example, ids, sp.sil)
    k = eos_forward
    said = plan[k - 1] if at == "mid-call" else sp.sil  # what the lost step was taught to say
    assert path.text_tokens == [sp.audio_bos, *plan[:k - 1], sp.audio_eos, *plan[k - 1:]]
    n_prompt = len(example.prompt_ids)
    assert path.labels[n_prompt - 1:].tolist() == [-100, *plan[:k - 1], said, *plan[k - 1:]]
    assert path.inputs.shape[0] == n_prompt + len(path.text_tokens) - 1 == path.labels.shape[0]
    assert builder.tokenizer.decode(path.text_tokens, skip_special_tokens=True) == \
        tool_call_text(builder.tokenizer, WEATHER_CALL)
