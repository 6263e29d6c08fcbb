"""ChatML prompts for Fun-Audio-Chat: system prompts, messages with audio, tool calling.

A user audio turn renders as `<|audio_bos|>` + n x `<|AUDIO|>` + `<|audio_eos|>`, where n is
the number of 5 Hz groups of the clip; the model later writes the audio encoder's outputs
over the `<|AUDIO|>` positions (ChatPrompt.audio_spans).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, Union

from funchat.errors import CheckpointError, PromptError
from funchat.text.tokenizer import SPECIAL_TOKENS, TextTokenizer

S2T_SYSTEM_PROMPT = "You are asked to generate text tokens."
S2S_SYSTEM_PROMPT = "You are asked to generate both text and speech tokens at the same time."
_MODE_PROMPTS = {"s2t": S2T_SYSTEM_PROMPT, "s2s": S2S_SYSTEM_PROMPT}

# Appended to the mode prompt; wording of the reference FUNCTION_CALLING_PROMPT.
_TOOLS_HEADER = """
# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
"""
_TOOLS_FOOTER = """
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call>"""

ROLES = ("system", "user", "assistant", "tool")


def _json(obj: Any, what: str) -> str:
    try:
        # ensure_ascii=False and default separators: what HF's `tojson` writes in Qwen templates.
        return json.dumps(obj, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise PromptError(f"{what} is not JSON-serialisable: {e}") from e


def function_calling_system_prompt(tools: list[dict], mode_prompt: str = S2T_SYSTEM_PROMPT) -> str:
    """Mode prompt followed by the tool block, one JSON object per tool and line."""
    if not tools:
        raise PromptError("function calling needs at least one tool definition")
    lines = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise PromptError(f"tool {i} must be a dict (JSON object), got {type(tool).__name__}")
        lines.append(_json(tool, f"tool {i}"))
    return mode_prompt + _TOOLS_HEADER + "\n".join(lines) + _TOOLS_FOOTER


def system_prompt_for(mode: str, persona: str | None = None, tools: list[dict] | None = None) -> str:
    """System prompt for mode "s2t" or "s2s", then " " + persona, then the tool block if any."""
    if mode not in _MODE_PROMPTS:
        raise PromptError(f"unknown mode {mode!r}; expected one of {sorted(_MODE_PROMPTS)}")
    prompt = _MODE_PROMPTS[mode]
    if persona and persona.strip():
        prompt = f"{prompt} {persona.strip()}"
    if tools:
        prompt = function_calling_system_prompt(tools, mode_prompt=prompt)
    return prompt


@dataclass(frozen=True)
class Audio:
    """Placeholder for one audio clip; n_groups = 5 Hz positions it takes in the prompt."""

    n_groups: int

    def __post_init__(self) -> None:
        if isinstance(self.n_groups, bool) or not isinstance(self.n_groups, int) or self.n_groups < 1:
            raise PromptError(f"Audio.n_groups must be an integer >= 1, got {self.n_groups!r}")


Content = Union[str, Audio, Sequence[Union[str, Audio]]]


@dataclass(frozen=True)
class Message:
    """One chat turn. content: text, an Audio, or a list of both (rendered in order).

    role "tool" carries a tool result and renders as a user turn wrapped in <tool_response>;
    assistant messages may carry tool_calls: [{"name", "arguments"}] or OpenAI-style
    [{"function": {"name", "arguments"}}], arguments a dict or an already-encoded JSON string.
    """

    role: str
    content: Content | None = ""
    tool_calls: list[dict] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise PromptError(f"unknown message role {self.role!r}; expected one of {list(ROLES)}")
        if self.tool_calls and self.role != "assistant":
            raise PromptError(f"only assistant messages carry tool_calls, not {self.role!r}")

    def parts(self) -> list[str | Audio]:
        c = self.content
        if c is None:  # OpenAI-style assistant turns with only tool_calls have content None
            return []
        return [c] if isinstance(c, (str, Audio)) else list(c)


@dataclass
class ChatPrompt:
    """input_ids with every <|AUDIO|> run expanded; audio_spans[k] = (start, end) of clip k."""

    input_ids: list[int]
    audio_spans: list[tuple[int, int]]
    text: str  # rendered prompt with one <|AUDIO|> per clip (what the tokenizer encoded)


def _tool_call_text(call: Mapping, where: str) -> str:
    if not isinstance(call, Mapping):
        raise PromptError(f"{where}: tool call must be a dict, got {type(call).__name__}")
    fn = call.get("function", call)  # accept OpenAI's {"type": "function", "function": {...}}
    name = fn.get("name") if isinstance(fn, Mapping) else None
    if not isinstance(name, str) or not name:
        raise PromptError(f"{where}: tool call has no function name")
    args = fn.get("arguments", {})
    # As in the Qwen3 template: a string is taken to be JSON already, anything else is dumped.
    args_text = args if isinstance(args, str) else _json(args, f"{where}: arguments of {name!r}")
    return '<tool_call>\n{"name": ' + _json(name, where) + ', "arguments": ' + args_text + "}\n</tool_call>"


def _message_from_mapping(m: Any, i: int) -> Message:
    if not isinstance(m, Mapping):
        raise PromptError(f"message {i} must be a Message or a dict, got {type(m).__name__}")
    extra = set(m) - {"role", "content", "tool_calls"}
    if "role" not in m or extra:
        raise PromptError(f"message {i} needs a 'role' and only role/content/tool_calls keys, got {sorted(m)}")
    return Message(m["role"], m.get("content", ""), m.get("tool_calls"))


def encode_chat(
    tokenizer: TextTokenizer,
    messages: Sequence[Message | Mapping],
    add_generation_prompt: bool = True,
) -> ChatPrompt:
    """Render messages in ChatML (Qwen3 conventions), encode, and expand the audio placeholders.

    The whole rendered string is encoded in one call so the ids equal what the HF tokenizer
    gives for the same string (encoding pieces separately can merge whitespace differently).
    """
    if not messages:
        raise PromptError("cannot build a prompt from an empty message list")
    msgs = [m if isinstance(m, Message) else _message_from_mapping(m, i) for i, m in enumerate(messages)]

    sp = tokenizer.special_ids()
    needed = ("im_start", "im_end", "audio", "audio_bos", "audio_eos")
    lacking = [SPECIAL_TOKENS[k] for k in needed if k not in sp]
    if lacking:
        raise CheckpointError(f"tokenizer (from {tokenizer.source}) lacks chat tokens {lacking}")
    # Caller text must not contain special tokens: they would be encoded as control ids
    # (turn boundaries, audio slots) rather than as text, and break the audio accounting.
    forbidden = sorted(set(tokenizer.all_special_tokens()) | {SPECIAL_TOKENS[k] for k in sp})

    def check_text(s: str, where: str) -> str:
        if not isinstance(s, str):
            raise PromptError(f"{where}: content must be str or Audio, got {type(s).__name__}")
        for t in forbidden:
            if t in s:
                raise PromptError(
                    f"{where}: text contains the special token {t!r}, which only the prompt builder may place"
                )
        return s

    audio_clips: list[int] = []

    def render_content(m: Message, where: str) -> str:
        out = []
        for p in m.parts():
            if isinstance(p, Audio):
                if m.role != "user":
                    raise PromptError(f"{where}: audio input is only allowed in user messages")
                audio_clips.append(p.n_groups)
                out.append(SPECIAL_TOKENS["audio_bos"] + SPECIAL_TOKENS["audio"] + SPECIAL_TOKENS["audio_eos"])
            else:
                out.append(check_text(p, where))
        return "".join(out)

    im_start, im_end = SPECIAL_TOKENS["im_start"], SPECIAL_TOKENS["im_end"]
    buf: list[str] = []
    for i, m in enumerate(msgs):
        where = f"message {i} ({m.role})"
        body = render_content(m, where)
        if m.role == "tool":
            # Consecutive tool results share one user turn (Qwen3 template).
            if i == 0 or msgs[i - 1].role != "tool":
                buf.append(f"{im_start}user")
            buf.append(f"\n<tool_response>\n{body}\n</tool_response>")
            if i == len(msgs) - 1 or msgs[i + 1].role != "tool":
                buf.append(f"{im_end}\n")
        elif m.role == "assistant":
            buf.append(f"{im_start}assistant\n{body}")
            for j, call in enumerate(m.tool_calls or []):
                if j > 0 or body:
                    buf.append("\n")
                buf.append(check_text(_tool_call_text(call, where), where))
            buf.append(f"{im_end}\n")
        else:
            buf.append(f"{im_start}{m.role}\n{body}{im_end}\n")
    if add_generation_prompt:
        buf.append(f"{im_start}assistant\n")
    text = "".join(buf)

    audio_id = sp["audio"]
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    for tid in tokenizer.encode(text):
        if tid == audio_id:
            n = audio_clips[len(spans)]
            spans.append((len(ids), len(ids) + n))
            ids.extend([audio_id] * n)
        else:
            ids.append(tid)
    if len(spans) != len(audio_clips):  # cannot happen unless the tokenizer splits <|AUDIO|>
        raise CheckpointError(f"tokenizer encoded {len(spans)} <|AUDIO|> tokens for {len(audio_clips)} clips")
    return ChatPrompt(input_ids=ids, audio_spans=spans, text=text)
