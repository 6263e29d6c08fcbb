"""The refined_head service's logic: the Speech Refined Head's g speech tokens per LLM step, batched.

A call's START carries the speech sampling settings and a seed (the orchestrator sends
`funchat.turn.sampling.speech_seed`); the slot keeps the generator and the speech ids the schedule
appended so far (the repetition penalty's history), so each call draws what the oracle draws.

Shapes: B calls in a batch, T new positions, E LLM width, g speech group size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from funchat.engines.slot_pool import (DEFAULT_IDLE_TIMEOUT_S, DEFAULT_MAX_SEQUENCES, SequenceError, Slot,
                                       SlotPool, forward_failed, pad_right, run_isolated)
from funchat.engines.triton_adapter import ServiceParams
from funchat.model.checkpoint import load_model
from funchat.model.funaudiochat import FunAudioChat
from funchat.model.qwen3 import KVCache
from funchat.model.sampling import GREEDY, SamplingParams, penalty_history, select
from funchat.turn.prompt import CONTEXT_TOKENS


@dataclass
class SrhRequest:
    cid: int
    start: bool
    end: bool
    srh_input: torch.Tensor  # [T, E] from the llm service
    appended: torch.Tensor | None = None  # speech ids the schedule appended after the previous step
    sampling: SamplingParams = GREEDY  # START only
    seed: int = 0  # START only


class SrhEngine:
    """The Speech Refined Head's service logic: g speech tokens per LLM step, batched across calls."""

    def __init__(self, model: FunAudioChat, max_sequences: int = DEFAULT_MAX_SEQUENCES,
                 idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S, max_context: int = CONTEXT_TOKENS,
                 clock: Callable[[], float] = time.monotonic):
        """max_context: the LLM positions a call may hold, as the llm service's; the SRH holds g
        positions per LLM position, so its pool is allocated once at g x max_context per call."""
        if model.audio_invert_tower is None:
            raise ValueError("this checkpoint has no Speech Refined Head")
        self.model = model
        head = model.audio_invert_tower
        self.group = model.cfg.audio.group_size
        self.max_context = max_context
        self.pool = SlotPool(head.crq_transformer.new_cache, max_sequences, idle_timeout_s,
                             self.group * max_context, clock)
        self.bos = head.codebook[model.cfg.audio.bos_token_id]

    @torch.inference_mode()
    def run(self, requests: list[SrhRequest]) -> list[torch.Tensor | SequenceError]:
        """One result per request, in order: speech ids [g] int64, or the request's SequenceError."""
        self.pool.reap_idle()
        results: list[torch.Tensor | SequenceError | None] = [None] * len(requests)
        ready = []
        for i, req in enumerate(requests):
            try:
                ready.append((i, self._prepare(req)))
            except SequenceError as exc:
                results[i] = exc
            except Exception as exc:  # a bug or the device: this request alone fails, its new slot freed
                if req.start:
                    self.pool.free(req.cid)
                results[i] = forward_failed("refined_head", exc)
        for is_prefill in (True, False):
            group = [(i, s) for i, s in ready if (requests[i].start or requests[i].srh_input.shape[0] > 1) == is_prefill]
            if group:
                # A forward that raises fails only the requests that fail on their own; their
                # sequences end (state unknown), so no slot waits for the idle timeout.
                for (i, _), exc in run_isolated(group, lambda part: self._run_group(part, requests, results)):
                    self.pool.free(requests[i].cid)
                    results[i] = forward_failed("refined_head", exc)
        for i, req in enumerate(requests):
            if req.end and not isinstance(results[i], SequenceError):
                self.pool.free(req.cid)
        return results  # type: ignore[return-value]

    def _run_group(self, group: list[tuple[int, Slot]], requests: list[SrhRequest], results: list) -> None:
        """One batched forward of `group` ((request index, slot), all prefills or all steps); its
        results go in `results` only when the whole forward succeeded. On failure the calls'
        generators are put back as they were, so a retry draws what this attempt would have."""
        h, lengths = pad_right([requests[i].srh_input.to(self.bos.device, self.bos.dtype) for i, _ in group])
        lengths = lengths.to(self.bos.device)
        slots = [s for _, s in group]
        drawn: list[list[int]] = [[] for _ in group]
        generator_states = [s.extra["generator"].get_state() for s in slots]

        def choose(_j: int, logits: torch.Tensor) -> torch.Tensor:
            tokens = []
            for b, slot in enumerate(slots):  # each call has its own history and generator
                extra = slot.extra
                history = penalty_history(extra["history"] + drawn[b], extra["sampling"], logits.device)
                tokens.append(int(select(logits[b:b + 1], extra["sampling"], history, extra["generator"])[0]))
                drawn[b].append(tokens[-1])
            return torch.tensor(tokens, dtype=torch.long, device=logits.device)

        def forward(cache: KVCache) -> torch.Tensor:
            prev = torch.stack([s.extra["prev_embed"] for s in slots])  # [B, E]
            state = _BatchState(cache, prev)
            out = self.model.audio_invert_tower(h, state, choose, lengths)  # [B, g]
            for b, slot in enumerate(slots):
                slot.extra["prev_embed"] = state.prev_embed[b]
            return out

        try:
            tokens = self.pool.run([s.row for s in slots], h.shape[1] * self.group, forward)  # g per LLM position
        except Exception:
            for slot, generator_state in zip(slots, generator_states):
                slot.extra["generator"].set_state(generator_state)
            raise
        for b, (i, _) in enumerate(group):
            results[i] = tokens[b]

    def _prepare(self, req: SrhRequest) -> Slot:
        e = self.model.cfg.audio.output_dim
        if req.srh_input.dim() != 2 or req.srh_input.shape[1] != e or req.srh_input.shape[0] == 0:
            raise SequenceError(f"SRH_INPUT must be [positions, {e}], got {list(req.srh_input.shape)}")
        if not torch.isfinite(req.srh_input).all():
            raise SequenceError("SRH_INPUT contains non-finite values")
        positions = req.srh_input.shape[0]
        if req.start and positions > self.max_context:
            raise SequenceError(f"SRH_INPUT has {positions} positions, more than max_context {self.max_context}")
        if req.start:
            slot = self.pool.start(req.cid)
            slot.extra.update(history=[], prev_embed=self.bos, sampling=req.sampling,
                              generator=torch.Generator(device=self.bos.device).manual_seed(req.seed))
        else:
            slot = self.pool.get(req.cid)
            if req.srh_input.shape[0] != 1:
                raise SequenceError(f"a step takes one position, got {req.srh_input.shape[0]}")
            self.pool.check_room(req.cid, slot, self.group, f"max_context {self.max_context}")
        if req.appended is not None and req.appended.numel():
            slot.extra["history"].extend(int(t) for t in req.appended.reshape(-1))
        return slot


@dataclass
class _BatchState:
    """The RefinedHeadState shape the SRH module expects, over a gathered batch cache."""

    cache: KVCache
    prev_embed: torch.Tensor  # [B, E]


def load_srh_engine(params: ServiceParams) -> SrhEngine:
    """The refined_head service's engine from its config parameters: `checkpoint`, `device`,
    `dtype`, `threads`, `max_sequences`, `idle_timeout_s`, `max_context`."""
    max_sequences = params.integer("max_sequences", DEFAULT_MAX_SEQUENCES, minimum=1)
    idle_timeout_s = params.number("idle_timeout_s", DEFAULT_IDLE_TIMEOUT_S)
    max_context = params.integer("max_context", CONTEXT_TOKENS, minimum=1)
    params.apply_threads()
    model = load_model(params.checkpoint, dtype=params.dtype, device=params.device)
    return SrhEngine(model, max_sequences=max_sequences, idle_timeout_s=idle_timeout_s, max_context=max_context)
