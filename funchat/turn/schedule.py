"""The turn schedule: the token rules of the Fun-Audio-Chat generation loop, without torch.

Both the in-process oracle and the orchestrator drive this one object: they run the model's
forwards and report what each forward chose; the schedule says what the next forward's input is
and when the turn ends. Rules (the reference loop, step for step):

- Forward 0 is the prefill. In speech-to-speech mode its text token is forced to `<|audio_bos|>`.
- Speech is "on" for a forward when the last input text id was `<|audio_bos|>` (or speech was
  already on). A forward that runs with speech on appends its SRH group of g tokens.
- The next input is the plain text embedding of the last text id, or, when speech is on and the
  forward just run appended a group, (E_text(text) + G(last group)) / 2. So forward 1 sees the
  plain `<|audio_bos|>` and forwards k >= 2 the fused input.
- If any token of a group is speech eos, the whole group becomes eos, speech turns off, and that
  step's text id is replaced by `<|audio_eos|>` in the output and as the next input.
- The turn ends when the chosen text id is an end id (`<|im_end|>`) or after max_new_tokens ids.
  The group of the final forward is still appended.
- Codes outside 0..vocoder_codes-1 (speech bos/eos/pad) are never sent to the vocoder.
- Speech-to-text mode never runs the SRH and always feeds plain text embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Sequence

from funchat.turn.prompt import TokenIds  # noqa: F401  (the schedule's ids; re-exported)


class Mode(str, Enum):
    S2T = "s2t"  # speech in, text out
    S2S = "s2s"  # speech in, text and speech out

    @classmethod
    def parse(cls, value: "str | Mode") -> "Mode":
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown mode {value!r}: expected 's2t' or 's2s'") from None


@dataclass(frozen=True)
class StepInput:
    """What the next LLM forward consumes."""

    text_token: int  # its text embedding (and, for the SRH, E_text of this id)
    speech_group: tuple[int, ...] | None  # fused with the text embedding when not None


@dataclass(frozen=True)
class StepOutput:
    """What one forward produced, after the schedule's rules."""

    index: int  # forward index (0 = prefill)
    text_token: int  # as returned (audio_eos where speech ended)
    text_token_emitted: int  # as chosen (after forcing), before the audio_eos overwrite
    speech_group: tuple[int, ...] | None  # the group appended to the speech output, if any
    speech_ended: bool
    finished: bool
    vocoder_tokens: tuple[int, ...] = ()  # the group's codes the vocoder may use


@dataclass
class TurnSchedule:
    ids: TokenIds
    mode: Mode
    max_new_tokens: int
    prompt_last_token: int = -1
    text_tokens: list[int] = field(default_factory=list)
    text_tokens_emitted: list[int] = field(default_factory=list)
    speech_tokens: list[int] = field(default_factory=list)
    finished: bool = False
    next_input: StepInput | None = None
    _speech_on: bool = False

    def __post_init__(self):
        self.mode = Mode.parse(self.mode)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        self._speech_on = self.mode is Mode.S2S and self.prompt_last_token == self.ids.audio_bos

    @property
    def runs_srh(self) -> bool:
        """The SRH runs on every forward in speech-to-speech mode (its cache must see them all)."""
        return self.mode is Mode.S2S

    @property
    def steps(self) -> int:
        return len(self.text_tokens)

    @property
    def speech_on(self) -> bool:
        """Whether the forward about to run will append a speech group."""
        return self._speech_on

    def observe(self, text_token: int, srh_tokens: Sequence[int] | None) -> StepOutput:
        """Record one forward's chosen text id and SRH tokens; compute the next input."""
        if self.finished:
            raise RuntimeError("the turn is already finished")
        index = len(self.text_tokens)
        speaking = self._speech_on
        if index == 0 and self.mode is Mode.S2S:
            text_token = self.ids.audio_bos
        emitted = text_token
        done = text_token in self.ids.end_ids or index + 1 >= self.max_new_tokens

        group = None
        ended = False
        if speaking:
            if srh_tokens is None or len(srh_tokens) != self.ids.group_size:
                raise ValueError(f"forward {index} runs with speech on and needs {self.ids.group_size} SRH tokens")
            ended = self.ids.speech_eos in srh_tokens
            group = (self.ids.speech_eos,) * self.ids.group_size if ended else tuple(int(t) for t in srh_tokens)
            self.speech_tokens.extend(group)
            if ended:
                text_token = self.ids.audio_eos
                self._speech_on = False

        self.text_tokens.append(int(text_token))
        self.text_tokens_emitted.append(int(emitted))
        self.finished = done
        if done:
            self.next_input = None
        else:
            if self.mode is Mode.S2S and text_token == self.ids.audio_bos:
                self._speech_on = True
            fuse = self._speech_on and speaking
            self.next_input = StepInput(int(text_token), tuple(self.speech_tokens[-self.ids.group_size:]) if fuse else None)
        vocoder = tuple(t for t in group if 0 <= t < self.ids.vocoder_codes) if group else ()
        return StepOutput(index, int(text_token), int(emitted), group, ended, done, vocoder)

    @property
    def vocoder_tokens(self) -> list[int]:
        return [t for t in self.speech_tokens if 0 <= t < self.ids.vocoder_codes]
