"""ChatML prompt building: system prompts, audio placeholders, tool calling, errors."""

import json

import pytest
from tokenizers import Tokenizer, models

from funchat.errors import CheckpointError, PromptError
from funchat.text.chat import (
    S2S_SYSTEM_PROMPT,
    S2T_SYSTEM_PROMPT,
    Audio,
    ChatPrompt,
    Message,
    encode_chat,
    function_calling_system_prompt,
    system_prompt_for,
)
from funchat.text.tokenizer import TextTokenizer, build_tiny_tokenizer

# Verbatim from the reference implementation (FunAudioLLM/Fun-Audio-Chat).
REFERENCE_FUNCTION_CALLING_PROMPT = S2T_SYSTEM_PROMPT + """
# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools_definition}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call>"""

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "查询城市天气",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return TextTokenizer.from_dir(build_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def sp(tok):
    return tok.special_ids()


def expand(tok, text, counts):
    """Reference: encode the string with single <|AUDIO|> tokens, then expand each to n."""
    audio = tok.special_ids()["audio"]
    out, k = [], 0
    for i in tok.encode(text):
        if i == audio:
            out += [audio] * counts[k]
            k += 1
        else:
            out.append(i)
    assert k == len(counts)
    return out


# --- system prompts ---------------------------------------------------------------------------


def test_mode_prompts():
    assert S2T_SYSTEM_PROMPT == "You are asked to generate text tokens."
    assert S2S_SYSTEM_PROMPT == "You are asked to generate both text and speech tokens at the same time."
    assert system_prompt_for("s2t", None, None) == S2T_SYSTEM_PROMPT
    assert system_prompt_for("s2s", None, None) == S2S_SYSTEM_PROMPT
    assert system_prompt_for("s2s", "你的名字是小云。", None) == S2S_SYSTEM_PROMPT + " 你的名字是小云。"
    assert system_prompt_for("s2t", "  ", []) == S2T_SYSTEM_PROMPT


def test_unknown_mode():
    with pytest.raises(PromptError, match="unknown mode 'tts'"):
        system_prompt_for("tts", None, None)


def test_function_calling_prompt_matches_reference():
    got = function_calling_system_prompt([WEATHER, TIME])
    lines = json.dumps(WEATHER, ensure_ascii=False) + "\n" + json.dumps(TIME, ensure_ascii=False)
    assert got == REFERENCE_FUNCTION_CALLING_PROMPT.replace("{tools_definition}", lines)
    assert "<tools>\n" + lines + "\n</tools>" in got
    assert "查询城市天气" in got  # ensure_ascii=False keeps non-ASCII as is
    assert system_prompt_for("s2t", None, [WEATHER, TIME]) == got


def test_function_calling_with_s2s_and_persona():
    got = system_prompt_for("s2s", "Be brief.", [WEATHER])
    assert got.startswith(S2S_SYSTEM_PROMPT + " Be brief.\n# Tools\n")
    assert got == function_calling_system_prompt([WEATHER], mode_prompt=S2S_SYSTEM_PROMPT + " Be brief.")


def test_function_calling_errors():
    with pytest.raises(PromptError, match="at least one tool"):
        function_calling_system_prompt([])
    with pytest.raises(PromptError, match="tool 0 must be a dict"):
        function_calling_system_prompt(["get_weather"])
    with pytest.raises(PromptError, match="not JSON-serialisable"):
        function_calling_system_prompt([{"name": "f", "default": object()}])


# --- single audio turn ------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 50])
def test_single_audio_turn_layout(tok, sp, n):
    p = encode_chat(tok, [Message("system", S2T_SYSTEM_PROMPT), Message("user", Audio(n))])
    assert isinstance(p, ChatPrompt)
    assert p.text == (
        f"<|im_start|>system\n{S2T_SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|><|im_end|>\n<|im_start|>assistant\n"
    )
    nl = tok.encode("\n")
    assert nl == [tok.token_to_id("Ċ")]
    expected = (
        [sp["im_start"]] + tok.encode("system\n" + S2T_SYSTEM_PROMPT) + [sp["im_end"]] + nl
        + [sp["im_start"]] + tok.encode("user") + nl
        + [sp["audio_bos"]] + [sp["audio"]] * n + [sp["audio_eos"]] + [sp["im_end"]] + nl
        + [sp["im_start"]] + tok.encode("assistant") + nl
    )  # fmt: skip
    assert p.input_ids == expected
    start = expected.index(sp["audio_bos"]) + 1
    assert p.audio_spans == [(start, start + n)]
    assert p.input_ids[start - 1] == sp["audio_bos"] and p.input_ids[start + n] == sp["audio_eos"]
    assert p.input_ids.count(sp["audio"]) == n
    # Same as encoding the full string with <|AUDIO|> written n times.
    assert p.input_ids == tok.encode(p.text.replace("<|AUDIO|>", "<|AUDIO|>" * n))


def test_no_generation_prompt(tok, sp):
    p = encode_chat(tok, [Message("user", "hi")], add_generation_prompt=False)
    assert p.text == "<|im_start|>user\nhi<|im_end|>\n"
    assert p.input_ids[-2:] == [sp["im_end"]] + tok.encode("\n")
    assert p.audio_spans == []


# --- multi-turn -------------------------------------------------------------------------------


def test_multi_turn_history(tok, sp):
    msgs = [
        Message("system", system_prompt_for("s2s", "你的名字是小云。", None)),
        Message("user", Audio(4)),
        Message("assistant", "你好！我是小云。"),
        Message("user", [Audio(3), "\nWhat did I just say?"]),
        Message("assistant", "You said hello."),
        {"role": "user", "content": Audio(2)},  # plain dicts are accepted too
    ]
    p = encode_chat(tok, msgs)
    assert p.text == (
        f"<|im_start|>system\n{S2S_SYSTEM_PROMPT} 你的名字是小云。<|im_end|>\n"
        "<|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|><|im_end|>\n"
        "<|im_start|>assistant\n你好！我是小云。<|im_end|>\n"
        "<|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|>\nWhat did I just say?<|im_end|>\n"
        "<|im_start|>assistant\nYou said hello.<|im_end|>\n"
        "<|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert p.input_ids == expand(tok, p.text, [4, 3, 2])
    assert [e - s for s, e in p.audio_spans] == [4, 3, 2]
    for s, e in p.audio_spans:
        assert p.input_ids[s - 1] == sp["audio_bos"] and p.input_ids[e] == sp["audio_eos"]
        assert set(p.input_ids[s:e]) == {sp["audio"]}
    assert p.audio_spans[0][1] < p.audio_spans[1][0] < p.audio_spans[2][0]
    assert tok.decode(p.input_ids) == tok.decode(tok.encode(p.text))


# --- tool calling -----------------------------------------------------------------------------


def test_tool_calls_and_responses(tok):
    msgs = [
        Message("system", system_prompt_for("s2t", None, [WEATHER, TIME])),
        Message("user", Audio(5)),
        Message(
            "assistant",
            "",
            tool_calls=[
                {"name": "get_weather", "arguments": {"city": "杭州"}},
                {"type": "function", "function": {"name": "get_time", "arguments": "{}"}},
            ],
        ),
        Message("tool", json.dumps({"temperature": 21}, ensure_ascii=False)),
        Message("tool", "12:00"),
        Message("assistant", "Let me check.", tool_calls=[{"name": "get_time", "arguments": {}}]),
        Message("tool", "12:01"),
    ]
    p = encode_chat(tok, msgs)
    system = function_calling_system_prompt([WEATHER, TIME])
    assert p.text == (
        f"<|im_start|>system\n{system}<|im_end|>\n"
        "<|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|><|im_end|>\n"
        "<|im_start|>assistant\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "杭州"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call><|im_end|>\n'
        # consecutive tool results share one user turn
        '<|im_start|>user\n<tool_response>\n{"temperature": 21}\n</tool_response>\n'
        "<tool_response>\n12:00\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nLet me check.\n"
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n12:01\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert p.input_ids == expand(tok, p.text, [5])
    # 3 calls + the 2 mentions in the system prompt's instructions, each a single added token.
    assert p.input_ids.count(tok.token_to_id("<tool_call>")) == 5
    assert "<tools>\n" + json.dumps(WEATHER, ensure_ascii=False) + "\n" in tok.decode(p.input_ids)


def test_assistant_content_none_with_tool_calls(tok):
    p = encode_chat(tok, [{"role": "assistant", "content": None, "tool_calls": [{"name": "f"}]}], False)
    assert p.text == '<|im_start|>assistant\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call><|im_end|>\n'


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, -3, 1.5, True, None])
def test_bad_audio_groups(n):
    with pytest.raises(PromptError, match="n_groups must be an integer >= 1"):
        Audio(n)


def test_unknown_role(tok):
    with pytest.raises(PromptError, match="unknown message role 'robot'"):
        Message("robot", "hi")
    with pytest.raises(PromptError, match="unknown message role 'robot'"):
        encode_chat(tok, [{"role": "robot", "content": "hi"}])


def test_empty_messages(tok):
    with pytest.raises(PromptError, match="empty message list"):
        encode_chat(tok, [])


def test_bad_message_dicts(tok):
    with pytest.raises(PromptError, match="needs a 'role'"):
        encode_chat(tok, [{"content": "hi"}])
    with pytest.raises(PromptError, match="needs a 'role'"):
        encode_chat(tok, [{"role": "user", "content": "hi", "name": "x"}])
    with pytest.raises(PromptError, match="must be a Message or a dict"):
        encode_chat(tok, ["hi"])
    with pytest.raises(PromptError, match=r"message 0 \(user\): content must be str or Audio"):
        encode_chat(tok, [Message("user", [b"bytes"])])


@pytest.mark.parametrize("token", ["<|AUDIO|>", "<|im_end|>", "<|audio_bos|>", "<|text_pad|>"])
def test_special_tokens_in_text_rejected(tok, token):
    with pytest.raises(PromptError, match=r"message 1 \(user\): text contains the special token"):
        encode_chat(tok, [Message("system", "x"), Message("user", f"say {token} now")])


def test_special_tokens_in_tool_call_rejected(tok):
    call = {"name": "f", "arguments": {"x": "<|im_end|>"}}
    with pytest.raises(PromptError, match="special token"):
        encode_chat(tok, [Message("assistant", "", tool_calls=[call])])


def test_audio_outside_user_rejected(tok):
    with pytest.raises(PromptError, match="only allowed in user messages"):
        encode_chat(tok, [Message("assistant", Audio(3))])


def test_tool_call_errors(tok):
    with pytest.raises(PromptError, match="only assistant messages carry tool_calls"):
        Message("user", "hi", tool_calls=[{"name": "f"}])
    with pytest.raises(PromptError, match="no function name"):
        encode_chat(tok, [Message("assistant", "", tool_calls=[{"arguments": {}}])])
    with pytest.raises(PromptError, match="must be a dict"):
        encode_chat(tok, [Message("assistant", "", tool_calls=["f()"])])
    with pytest.raises(PromptError, match="not JSON-serialisable"):
        encode_chat(tok, [Message("assistant", "", tool_calls=[{"name": "f", "arguments": {1: {2}}}])])


def test_tokenizer_without_chat_tokens():
    bare = TextTokenizer(Tokenizer(models.BPE()))
    with pytest.raises(CheckpointError, match="lacks chat tokens"):
        encode_chat(bare, [Message("user", "hi")])


# --- agreement with transformers --------------------------------------------------------------


def test_matches_transformers(tok, tmp_path_factory):
    import transformers  # a pinned test dependency: its absence is a failure, not a skip
    d = build_tiny_tokenizer(tmp_path_factory.mktemp("hf"))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))
    msgs = [
        Message("system", system_prompt_for("s2t", "请用中文回答。", [WEATHER])),
        Message("user", [Audio(6), "  what's the weather?\n\n"]),
        Message("assistant", "", tool_calls=[{"name": "get_weather", "arguments": {"city": "北京"}}]),
        Message("tool", '{"temp": 3}'),
    ]
    p = encode_chat(tok, msgs)
    full = p.text.replace("<|AUDIO|>", "<|AUDIO|>" * 6)
    assert hf.encode(full, add_special_tokens=False) == p.input_ids
