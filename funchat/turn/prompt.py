"""A turn's prompt: special ids, messages, history fitted to the context, audio positions, limits.

The one place that knows how a turn's prompt is built. The oracle (`funchat.oracle.pipeline`)
and the orchestrator (`funchat.orchestrator.turn_runner`) both call it, so a conversation gives
the same prompt ids in process and through the cluster. Torch-free: it reads the checkpoint's
`config.json`, tokenizer files, `special_tokens.json` and `generation_config.json`, never weights.

Rules (the reference's):
- a clip of n samples at 16 kHz counts `int(n / 16000 * 25)` 25 Hz frames and takes
  `ceil(frames / group_size)` `<|AUDIO|>` positions;
- the system prompt is the mode's instruction, then the persona, then the tool block;
- the history is fitted to the context by dropping whole exchanges from the oldest end, so the
  kept history starts at a user turn; prompt and reply together stay under `context_tokens`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

from funchat.errors import AudioInputError, CheckpointError, ContextOverflowError
from funchat.text.chat import Audio, Message, encode_chat, system_prompt_for
from funchat.text.tokenizer import TextTokenizer

INPUT_SAMPLE_RATE = 16000  # the audio encoder's input rate
SPEECH_FRAME_RATE = 25  # speech frames (and speech tokens) per second
CONTEXT_TOKENS = 2048  # the reference's context limit (prompt + reply), in LLM positions
MODES = ("s2t", "s2s")  # funchat.turn.schedule.Mode's values (that module imports this one)

CONFIG_FILE = "config.json"
SPECIAL_TOKENS_FILE = "special_tokens.json"
GENERATION_CONFIG_FILE = "generation_config.json"

TOKEN_STRINGS = {
    "endoftext": "<|endoftext|>", "im_start": "<|im_start|>", "im_end": "<|im_end|>", "audio": "<|AUDIO|>",
    "audio_bos": "<|audio_bos|>", "audio_eos": "<|audio_eos|>", "audio_pad": "<|audio_pad|>", "sil": "<|sil|>",
}


# ---- audio positions ----

def speech_frames_for_samples(n_samples: int, sample_rate: int = INPUT_SAMPLE_RATE,
                              frame_rate: int = SPEECH_FRAME_RATE) -> int:
    """25 Hz frames a clip counts for: int(seconds * 25), as the reference processor computes it."""
    return int(n_samples / sample_rate * frame_rate)


def groups_for_frames(frames: int, group_size: int) -> int:
    """5 Hz LLM positions (`<|AUDIO|>` ids) a clip of `frames` 25 Hz frames takes: ceil(frames / 5)."""
    return math.ceil(frames / group_size)


def check_clip(n_samples: int, group_size: int, context_tokens: int, what: str = "audio") -> int:
    """A clip's prompt positions; AudioInputError when it is too short to encode or cannot fit.
    The audio tokenizer service and the prompt builder both apply it, so a clip the service
    accepts fits the prompt built for it."""
    groups = groups_for_frames(speech_frames_for_samples(n_samples), group_size)
    if groups < 1:
        raise AudioInputError(f"{what} is too short: {n_samples / INPUT_SAMPLE_RATE * 1000:.1f} ms ({n_samples} "
                              f"samples); at least 40 ms (640 samples, one 25 Hz frame) is needed")
    # The turn's fixed part (system prompt, role tags, audio bos/eos) needs some room too.
    if groups >= context_tokens:
        raise AudioInputError(f"{what} is too long: {n_samples / INPUT_SAMPLE_RATE:.1f} s takes {groups} LLM "
                              f"positions, more than the {context_tokens}-token context")
    return groups


# ---- special ids ----

@dataclass(frozen=True)
class TokenIds:
    """The special ids the turn schedule needs (from the checkpoint's config and tokenizer)."""

    audio_bos: int  # text <|audio_bos|>
    audio_eos: int  # text <|audio_eos|>
    end_ids: tuple[int, ...]  # text ids that end the turn (<|im_end|>, from the generation config)
    speech_eos: int  # 6562
    group_size: int  # 5
    vocoder_codes: int  # 6561: codes 0..6560 are speech, the rest are specials


@dataclass(frozen=True)
class SpecialTextIds:
    audio: int
    audio_bos: int
    audio_eos: int
    sil: int
    im_end: int
    im_start: int | None
    endoftext: int | None
    audio_pad: int | None
    end_ids: tuple[int, ...]  # ids that end an assistant turn


@dataclass(frozen=True)
class ModelFacts:
    """What a prompt needs to know of a checkpoint's `config.json` (sizes and ids, no weights)."""

    audio_token_index: int
    audio_bos_index: int
    audio_eos_index: int
    sil_index: int
    eos_token_id: int  # text end of turn (<|im_end|>)
    vocab_size: int
    hidden_size: int  # the LLM's width (the audio rows' and the SRH input's)
    group_size: int  # 25 Hz frames per 5 Hz LLM position
    speech_bos: int  # 6561: codes below it are what the vocoder speaks
    speech_eos: int  # 6562
    n_window: int = 100  # the audio encoder's window is 2 * n_window mel frames (funchat.encoder_windows)

    @classmethod
    def from_config(cls, raw: dict[str, Any]) -> "ModelFacts":
        try:
            text, audio = raw["text_config"], raw["audio_config"]
            eos = text["eos_token_id"]
            return cls(audio_token_index=int(raw["audio_token_index"]),
                       audio_bos_index=int(text["audio_bos_index"]), audio_eos_index=int(text["audio_eos_index"]),
                       sil_index=int(text["sil_index"]), eos_token_id=int(eos[0] if isinstance(eos, list) else eos),
                       vocab_size=int(text.get("vocab_size", 151936)), hidden_size=int(text["hidden_size"]),
                       group_size=int(audio["group_size"]), speech_bos=int(audio["bos_token_id"]),
                       speech_eos=int(audio["eos_token_id"]), n_window=int(audio.get("n_window", 100)))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"config.json lacks or mangles a field the prompt needs: {exc!r}") from None

    def token_ids(self, end_ids: tuple[int, ...] | None = None) -> TokenIds:
        return TokenIds(audio_bos=self.audio_bos_index, audio_eos=self.audio_eos_index,
                        end_ids=end_ids or (self.eos_token_id,), speech_eos=self.speech_eos,
                        group_size=self.group_size, vocoder_codes=self.speech_bos)


def read_config(ckpt_dir: str | Path) -> dict[str, Any]:
    path = Path(ckpt_dir) / CONFIG_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: config.json not found") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable JSON config ({exc})") from None


def _from_tokenizer_files(ckpt: Path) -> dict[str, int]:
    """Look the names up in tokenizer.json's added tokens or tokenizer_config.json's decoder."""
    found: dict[str, int] = {}
    wanted = {v: k for k, v in TOKEN_STRINGS.items()}
    tok_json = ckpt / "tokenizer.json"
    if tok_json.exists():
        for entry in json.loads(tok_json.read_text()).get("added_tokens", []):
            if entry.get("content") in wanted:
                found[wanted[entry["content"]]] = int(entry["id"])
    cfg_json = ckpt / "tokenizer_config.json"
    if cfg_json.exists():
        for idx, entry in json.loads(cfg_json.read_text()).get("added_tokens_decoder", {}).items():
            if entry.get("content") in wanted:
                found.setdefault(wanted[entry["content"]], int(idx))
    return found


def resolve_special_ids(ckpt_dir: str | Path, facts: ModelFacts) -> SpecialTextIds:
    """The config gives `audio_token_index` and `text_config.audio_bos_index / audio_eos_index /
    sil_index / eos_token_id`. Ids it lacks (im_start, im_end, endoftext, audio_pad) come from
    `special_tokens.json` where the checkpoint carries one, else from the tokenizer files. A
    checkpoint without either still works: only text in/out needs them. The turn's end ids come
    from `generation_config.json`."""
    ckpt = Path(ckpt_dir)
    names: dict[str, int] = {}
    special_file = ckpt / SPECIAL_TOKENS_FILE
    try:
        if special_file.exists():
            names.update({k: int(v) for k, v in json.loads(special_file.read_text()).items()})
        else:
            names.update(_from_tokenizer_files(ckpt))
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{ckpt}: unreadable special token file ({exc})") from None
    # The config is authoritative for the ids it carries.
    names.update(audio=facts.audio_token_index, audio_bos=facts.audio_bos_index, audio_eos=facts.audio_eos_index,
                 sil=facts.sil_index)
    names.setdefault("im_end", facts.eos_token_id)

    end_ids: tuple[int, ...] = (facts.eos_token_id,)
    gen_file = ckpt / GENERATION_CONFIG_FILE
    if gen_file.exists():
        try:
            eos = json.loads(gen_file.read_text()).get("eos_token_id")
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{gen_file}: unreadable ({exc})") from None
        if eos is not None:
            end_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))
    for name, value in list(names.items()) + [("end", e) for e in end_ids]:
        if not 0 <= value < facts.vocab_size:
            raise CheckpointError(f"special token {name}={value} is outside the text vocabulary (size {facts.vocab_size})")
    return SpecialTextIds(
        audio=names["audio"], audio_bos=names["audio_bos"], audio_eos=names["audio_eos"], sil=names["sil"],
        im_end=names["im_end"], im_start=names.get("im_start"), endoftext=names.get("endoftext"),
        audio_pad=names.get("audio_pad"), end_ids=end_ids,
    )


# ---- history and prompt ----

class HistoryItem(Protocol):
    """One earlier turn as the prompt sees it (the session store's HistoryTurn is one)."""

    role: str  # "user" | "assistant" | "tool"
    text: str | None
    n_groups: int  # > 0: a user's speech clip taking this many <|AUDIO|> positions
    tool_calls: list | None


@dataclass(frozen=True)
class PromptTurn:
    """A HistoryItem for callers that keep their history another way (the oracle's dicts)."""

    role: str
    text: str | None = None
    n_groups: int = 0
    tool_calls: list | None = None


@dataclass
class Prompt:
    ids: list[int]  # the prompt's token ids, <|AUDIO|> runs expanded
    dropped: int  # history turns dropped from the oldest end to fit the context
    max_new_tokens: int  # the reply's length cap: the request's, bounded by the room left

    def kept(self, history: Sequence) -> list:
        """The history turns the prompt holds (the newest len(history) - dropped)."""
        return list(history[self.dropped:])


def fit_history(turns: Sequence, prompt_len, context_tokens: int) -> tuple[list, int]:
    """Drop the oldest turns until `prompt_len(kept) < context_tokens` or nothing is left.

    Whole exchanges go: each cut removes the oldest turn and the turns up to the next "user" turn,
    so the kept history starts at a user turn. Returns (kept turns, number of turns dropped).
    """
    history, dropped = list(turns), 0
    while history and prompt_len(history) >= context_tokens:
        cut = 1
        while cut < len(history) and history[cut].role != "user":
            cut += 1
        history, dropped = history[cut:], dropped + cut
    return history, dropped


class PromptBuilder:
    """Builds turns' prompts for one checkpoint: `PromptBuilder.from_checkpoint(dir)`."""

    def __init__(self, tokenizer: TextTokenizer, facts: ModelFacts, special: SpecialTextIds,
                 context_tokens: int = CONTEXT_TOKENS):
        self.tokenizer = tokenizer
        self.facts = facts
        self.special = special
        self.token_ids = facts.token_ids(special.end_ids)
        self.context_tokens = context_tokens

    @classmethod
    def from_checkpoint(cls, ckpt_dir: str | Path, config: dict[str, Any] | None = None,
                        context_tokens: int = CONTEXT_TOKENS) -> "PromptBuilder":
        """config: the parsed config.json when the caller has it already (else read from the directory)."""
        facts = ModelFacts.from_config(config if config is not None else read_config(ckpt_dir))
        return cls(TextTokenizer.from_dir(ckpt_dir), facts, resolve_special_ids(ckpt_dir, facts), context_tokens)

    # ---- audio ----

    def audio_groups(self, n_samples: int) -> int:
        """5 Hz prompt positions of a 16 kHz clip of n samples."""
        return groups_for_frames(speech_frames_for_samples(n_samples), self.facts.group_size)

    def check_clip(self, n_samples: int, what: str = "audio") -> int:
        """A clip's prompt positions; AudioInputError when it is too short to encode or cannot fit."""
        return check_clip(n_samples, self.facts.group_size, self.context_tokens, what)

    # ---- prompt ----

    def messages(self, mode: str, persona: str | None, tools: list[dict] | None, history: Sequence[HistoryItem],
                 n_groups: int) -> list[Message]:
        """System prompt, the history, then the caller's clip of n_groups positions (0: no new speech, the
        reply answers the history as it stands: a caller's text, a function's output)."""
        msgs = [Message("system", system_prompt_for(mode, persona, tools))]
        for turn in history:
            if turn.n_groups > 0:
                msgs.append(Message(turn.role, Audio(turn.n_groups)))
            else:
                msgs.append(Message(turn.role, turn.text, turn.tool_calls or None))
        if n_groups > 0:
            msgs.append(Message("user", Audio(n_groups)))
        return msgs

    def ids(self, mode: str, persona: str | None, tools: list[dict] | None, history: Sequence[HistoryItem],
            n_groups: int) -> list[int]:
        return encode_chat(self.tokenizer, self.messages(mode, persona, tools, history, n_groups)).input_ids

    def unusable_history(self, history: Sequence[HistoryItem]) -> int:
        """How many of the oldest turns no later prompt can hold. They are the turns `build` drops
        for the smallest prompt there can be (either mode, no persona, no tools, a one-position
        clip); a real prompt, never shorter, drops at least those. A session store may delete them."""
        def smallest_prompt_len(kept: Sequence[HistoryItem]) -> int:
            return min(len(self.ids(mode, None, None, kept, 1)) for mode in MODES)

        return fit_history(history, smallest_prompt_len, self.context_tokens)[1]

    def build(self, mode: str, persona: str | None, tools: list[dict] | None, history: Sequence[HistoryItem],
              n_groups: int, max_new_tokens: int) -> Prompt:
        """The turn's prompt with the history fitted to the context; ContextOverflowError when even
        the turn alone does not fit."""
        kept, dropped = fit_history(history, lambda h: len(self.ids(mode, persona, tools, h, n_groups)),
                                    self.context_tokens)
        ids = self.ids(mode, persona, tools, kept, n_groups)
        if len(ids) >= self.context_tokens:
            raise ContextOverflowError(f"the prompt takes {len(ids)} positions; the context holds "
                                       f"{self.context_tokens} (shorten the turn or the instructions)")
        return Prompt(ids, dropped, max(1, min(max_new_tokens, self.context_tokens - len(ids))))
