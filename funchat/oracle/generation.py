"""The in-process generation loop: drives the model's forwards with the torch-free TurnSchedule.

This is the oracle's core: every distributed path must reproduce what it produces under greedy
decoding. It reports each forward as it happens through `on_step`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from funchat.model.funaudiochat import FunAudioChat
from funchat.model.sampling import GREEDY, SamplingParams, penalty_history, select
from funchat.turn.prompt import ModelFacts, TokenIds
from funchat.turn.sampling import speech_seed, text_seed
from funchat.turn.schedule import Mode, StepOutput, TurnSchedule


@dataclass(frozen=True)
class GenerationConfig:
    mode: Mode = Mode.S2S
    max_new_tokens: int = 512
    # The reference's demos decode text greedily and sample only the SRH.
    text: SamplingParams = GREEDY
    speech: SamplingParams = SamplingParams()
    seed: int | None = None

    @classmethod
    def greedy(cls, mode: Mode, max_new_tokens: int = 512) -> "GenerationConfig":
        return cls(mode=Mode.parse(mode), max_new_tokens=max_new_tokens, text=GREEDY, speech=GREEDY, seed=0)


@dataclass
class StepRecord:
    """One forward as the callback sees it."""

    output: StepOutput
    srh_tokens: tuple[int, ...] | None  # the SRH's raw tokens (None in s2t)
    text_logits: torch.Tensor | None  # [V] float32 logits of this forward's last position
    llm_seconds: float
    srh_seconds: float


@dataclass
class Generation:
    text_tokens: list[int]
    text_tokens_emitted: list[int]
    speech_tokens: list[int]
    steps: list[StepRecord] = field(default_factory=list)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def llm_step_seconds(self) -> list[float]:
        return [s.llm_seconds for s in self.steps[1:]]

    @property
    def srh_step_seconds(self) -> list[float]:
        return [s.srh_seconds for s in self.steps[1:] if s.srh_tokens is not None]


StepCallback = Callable[[StepRecord], None]


def token_ids_for(model: FunAudioChat, end_ids: tuple[int, ...] | None = None) -> TokenIds:
    """The schedule's ids from the model's config (end ids: the generation config's, else <|im_end|>)."""
    return ModelFacts.from_config(model.cfg.raw).token_ids(end_ids)


@torch.inference_mode()
def generate(model: FunAudioChat, prompt_ids: list[int], prompt_embeds: torch.Tensor, gen: GenerationConfig,
             ids: TokenIds | None = None, on_step: StepCallback | None = None,
             keep_logits: bool = False) -> Generation:
    """Run one assistant turn after a prompt (prompt_embeds [1, L, E] for prompt_ids [L])."""
    ids = ids or token_ids_for(model)
    schedule = TurnSchedule(ids, gen.mode, gen.max_new_tokens, prompt_last_token=prompt_ids[-1])
    device = model.device
    # Two streams: the SRH's draws (made by the refined_head service in the cluster) and the text
    # draws (made by the llm service), so a distributed turn can reproduce a seeded oracle turn.
    seed = gen.seed if gen.seed is not None else int.from_bytes(os.urandom(8), "little") >> 2
    speech_generator = torch.Generator(device=device).manual_seed(speech_seed(seed))
    text_generator = torch.Generator(device=device).manual_seed(text_seed(seed))
    text_history = list(prompt_ids)  # the text repetition penalty sees the whole sequence, as in HF
    result = Generation([], [], [])

    llm_cache = model.new_llm_cache(1, capacity=len(prompt_ids) + gen.max_new_tokens + 1)
    srh_state = model.new_srh_state(1, capacity=model.cfg.audio.group_size * (len(prompt_ids) + gen.max_new_tokens + 1)) \
        if schedule.runs_srh else None

    def choose_speech(step_tokens: list[int]):
        def choose(_: int, logits: torch.Tensor) -> torch.Tensor:
            history = penalty_history(schedule.speech_tokens + step_tokens, gen.speech, device)
            token = select(logits, gen.speech, history, speech_generator)
            step_tokens.append(int(token[0]))
            return token
        return choose

    inputs = prompt_embeds.to(model.dtype)
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    decode_start = None
    while not schedule.finished:
        t0 = time.perf_counter()
        hidden, logits = model.llm_forward(inputs, llm_cache)  # [1, T, E], [1, V]
        t1 = time.perf_counter()
        srh_tokens = None
        if schedule.runs_srh:
            step_tokens: list[int] = []
            model.srh_forward(hidden, input_ids, srh_state, choose_speech(step_tokens))
            srh_tokens = tuple(step_tokens)
        t2 = time.perf_counter()
        history = penalty_history(text_history, gen.text, device)
        text_token = int(select(logits, gen.text, history, text_generator)[0])
        out = schedule.observe(text_token, srh_tokens)
        text_history.append(out.text_token)
        record = StepRecord(out, srh_tokens, logits[0].clone() if keep_logits else None, t1 - t0, t2 - t1)
        result.steps.append(record)
        if out.index == 0:
            result.prefill_seconds = time.perf_counter() - t0
            decode_start = time.perf_counter()
        if on_step is not None:
            on_step(record)
        if schedule.finished:
            break
        nxt = schedule.next_input
        input_ids = torch.tensor([[nxt.text_token]], dtype=torch.long, device=device)
        group = torch.tensor([nxt.speech_group], dtype=torch.long, device=device) if nxt.speech_group else None
        inputs = model.embed_step(input_ids[:, 0], group)
    result.decode_seconds = time.perf_counter() - decode_start if decode_start else 0.0
    result.text_tokens = list(schedule.text_tokens)
    result.text_tokens_emitted = list(schedule.text_tokens_emitted)
    result.speech_tokens = list(schedule.speech_tokens)
    return result
