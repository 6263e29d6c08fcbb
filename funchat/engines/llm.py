"""The llm service's logic: prefills and steps of many calls, batched, and each call's text token chosen.

A call's START carries its prompt and how its text tokens are chosen (greedy, or sampling settings
and a seed). The slot keeps a torch.Generator seeded with that seed and the ids the repetition
penalty looks at, so each forward's token is chosen here exactly as the oracle
(`funchat.oracle.generation.generate`) chooses it: the caller gets one id per forward, never the
vocabulary's logits.

Why the penalty history is "the prompt, then each step's input id": the oracle's history is the
prompt plus every text id the schedule returned, and a step's input id is the schedule's previous
returned id (after its forcing and audio_eos rules), so both lists are equal at every forward.

Shapes: B calls in a batch, T new positions, E LLM width, V text vocabulary, g speech group size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from funchat.engines.slot_pool import (DEFAULT_IDLE_TIMEOUT_S, DEFAULT_MAX_SEQUENCES, SequenceError, Slot,
                                       SlotPool, forward_failed, pad_right, run_isolated)
from funchat.model.funaudiochat import FunAudioChat
from funchat.model.sampling import GREEDY, SamplingParams, penalty_history, select
from funchat.turn.prompt import CONTEXT_TOKENS


@dataclass
class LlmRequest:
    cid: int
    start: bool
    end: bool
    input_ids: torch.Tensor  # [T] text ids (prompt at start, one id per step)
    audio: torch.Tensor | None = None  # [n, E] rows for the <|AUDIO|> positions (prompt only)
    speech_group: torch.Tensor | None = None  # [g] speech ids fused with the step's text id
    sampling: SamplingParams = GREEDY  # START only: how the call's text tokens are chosen
    seed: int = 0  # START only: the call's text draws (the orchestrator sends funchat.turn.sampling.text_seed)
    return_top_k: int = 0  # debugging: also return this forward's k largest raw logits and their ids
    keep_id: int = 0  # START: the conversation's kept row to continue (with prefix); END: keep the row under it
    prefix: int = 0  # START: positions of the kept row this prompt shares; input_ids/audio are the rest


@dataclass
class LlmResult:
    token: int  # the text id chosen for this forward's last position
    srh_input: torch.Tensor  # [T, E]: final hidden + E_text(input id), what the SRH consumes
    logits: torch.Tensor  # [V] float32 raw logits of the last position: for in-process checks, never sent
    top_ids: torch.Tensor | None = None  # [k] int64, only when the request asked (return_top_k)
    top_logits: torch.Tensor | None = None  # [k] float32 raw logits of top_ids


@dataclass
class _Ready:
    index: int  # the request's position in the batch
    slot: Slot
    inputs: torch.Tensor  # [T, E]
    ids: torch.Tensor  # [T] on the model's device


class LlmEngine:
    """The shared LLM's service logic: prefill and step requests of many calls, batched.

    capacity: the KV positions each call may hold (prompt + steps; the service's `max_context`).
    The pool is allocated once at `capacity` per call and never grows, so the service's memory is
    fixed at load; a prompt or step that would go past it gets a SequenceError.
    step_runner: optional, e.g. `funchat.engines.llm_engines.CudaGraphStepRunner`; it runs the
    batches of single steps (prefills stay eager) on fixed shapes, over the same pool plus one
    scratch row for the runner's padding rows.
    """

    def __init__(self, model: FunAudioChat, max_sequences: int = DEFAULT_MAX_SEQUENCES,
                 idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S, capacity: int = CONTEXT_TOKENS,
                 clock: Callable[[], float] = time.monotonic, step_runner: Any = None):
        self.model = model
        self.device = model.device
        self.step_runner = step_runner
        self.max_context = capacity
        if step_runner is None:
            self.pool = SlotPool(model.new_llm_cache, max_sequences, idle_timeout_s, capacity, clock)
        else:
            # Row `max_sequences` is never given to a call (SlotPool uses rows 0..max_sequences-1):
            # the runner's padding rows write there.
            self.pool = SlotPool(lambda rows, cap: model.new_llm_cache(rows + 1, cap), max_sequences,
                                 idle_timeout_s, capacity, clock)
            step_runner.attach(self.pool.cache, scratch_row=max_sequences)

    @torch.inference_mode()
    def run(self, requests: list[LlmRequest]) -> list[LlmResult | SequenceError]:
        """One result (or error) per request, in order. Steps of different calls share a forward;
        prefills share another (right-padded)."""
        self.pool.reap_idle()
        results: list[LlmResult | SequenceError | None] = [None] * len(requests)
        ready: list[_Ready] = []
        for i, req in enumerate(requests):
            try:
                ready.append(self._prepare(i, req))
            except SequenceError as exc:
                results[i] = exc
            except Exception as exc:  # a bug or the device: this request alone fails, its new slot freed
                if req.start:
                    self.pool.free(req.cid)
                results[i] = forward_failed("llm", exc)
        for is_prefill in (True, False):
            group = [r for r in ready if (r.inputs.shape[0] > 1 or requests[r.index].start) == is_prefill]
            if group:
                # A forward that raises fails only the requests that fail on their own; their
                # sequences end (state unknown), so no slot waits for the idle timeout.
                for r, exc in run_isolated(group, lambda part: self._run_group(is_prefill, part, requests, results)):
                    self.pool.free(requests[r.index].cid)
                    results[r.index] = forward_failed("llm", exc)
        for i, req in enumerate(requests):
            if req.end and not isinstance(results[i], SequenceError):
                self.pool.end(req.cid, req.keep_id)
        return results  # type: ignore[return-value]

    def _run_group(self, is_prefill: bool, group: list[_Ready], requests: list[LlmRequest], results: list) -> None:
        """One batched forward of `group` (all prefills or all steps); its results go in `results`
        only when the whole forward succeeded."""
        embeds, lengths = pad_right([r.inputs for r in group])
        lengths = lengths.to(embeds.device)
        hidden, logits = self._forward(is_prefill, embeds, lengths, [r.slot.row for r in group])
        tokens = self._choose([r.slot for r in group], logits)
        for b, r in enumerate(group):
            t = r.ids.shape[0]
            srh_input = hidden[b, :t] + self.model.language_model.embed(r.ids)
            results[r.index] = LlmResult(tokens[b], srh_input, logits[b],
                                         *self._top_k(logits[b], requests[r.index].return_top_k))

    def _forward(self, is_prefill: bool, embeds: torch.Tensor, lengths: torch.Tensor,
                 rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """embeds [B, T, E] right-padded (T = 1 for steps), lengths [B], the calls' cache rows ->
        (hidden [B, T, E], logits of each row's last real position [B, V]); appends to the rows."""
        if is_prefill or self.step_runner is None:
            return self.pool.run(rows, embeds.shape[1], lambda cache: self.model.llm_forward(embeds, cache, lengths))
        with self.pool.lock:
            idx = torch.tensor(rows, dtype=torch.long, device=self.pool.cache.lengths.device)
            positions = self.pool.cache.lengths[idx].tolist()  # where each row's new position goes
            try:
                return self.step_runner.step(embeds, rows, positions)
            except Exception:
                # leave no trace (run_isolated retries): a piece that ran had advanced its rows
                self.pool.cache.lengths[idx] = torch.tensor(positions, dtype=torch.long, device=idx.device)
                raise

    @staticmethod
    def _choose(slots: list[Slot], logits: torch.Tensor) -> list[int]:
        """logits [B, V] float32 -> each call's text id, chosen as the oracle does: greedy rows take
        the raw argmax (the whole batch at once), sampled rows draw from their own generator after
        the repetition penalty over their history."""
        sampled = [b for b, s in enumerate(slots) if not s.extra["sampling"].greedy]
        tokens = logits.argmax(dim=-1).tolist() if len(sampled) < len(slots) else [0] * len(slots)
        for b in sampled:
            extra = slots[b].extra
            history = penalty_history(extra["history"], extra["sampling"], logits.device)
            tokens[b] = int(select(logits[b:b + 1], extra["sampling"], history, extra["generator"])[0])
        return tokens

    @staticmethod
    def _top_k(logits: torch.Tensor, k: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """logits [V] -> (ids [k], raw logits [k]) largest first, or (None, None) when not asked."""
        if k <= 0:
            return None, None
        top = torch.topk(logits, k)
        return top.indices, top.values

    def _prepare(self, index: int, req: LlmRequest) -> _Ready:
        vocab = self.model.cfg.text.vocab_size
        device = self.device
        given = req.input_ids.long().reshape(-1)  # checked where it arrived (the CPU, from Triton): no device sync
        if given.numel() == 0:
            raise SequenceError("INPUT_IDS is empty")
        if int(given.min()) < 0 or int(given.max()) >= vocab:
            raise SequenceError(f"INPUT_IDS holds ids outside the text vocabulary 0..{vocab - 1}")
        ids = given.to(device)
        if not 0 <= req.return_top_k <= vocab:
            raise SequenceError(f"RETURN_TOP_K is {req.return_top_k}: use 0 (none) to {vocab} (the vocabulary)")
        if req.start and req.prefix < 0:
            raise SequenceError(f"PREFIX is {req.prefix}: use 0 (a whole prompt) or the kept positions to reuse")
        if req.start and req.prefix + ids.numel() > self.max_context:
            raise SequenceError(f"the prompt has {req.prefix + ids.numel()} positions, more than max_context "
                                f"{self.max_context}")
        if req.start:
            slot = self.pool.start(req.cid, req.keep_id, req.prefix)
            kept_ids = slot.extra.get("history", [])[:req.prefix]  # the kept row's ids (prompt + step inputs)
            audio = [req.audio.to(device)] if req.audio is not None and req.audio.numel() else []
            try:
                inputs = self.model.embed_prompt(ids[None], audio)[0]  # [T, E]
            except Exception as exc:
                self.pool.free(req.cid)
                raise SequenceError(str(exc)) from None
            slot.extra.update(sampling=req.sampling, history=kept_ids + ids.tolist(),
                              generator=torch.Generator(device=device).manual_seed(req.seed))
            return _Ready(index, slot, inputs, ids)
        slot = self.pool.get(req.cid)
        if ids.numel() != 1:
            raise SequenceError(f"a step takes one text id, got {ids.numel()}")
        if self.pool.length(slot) >= self.max_context:
            raise SequenceError(f"sequence {req.cid} holds max_context {self.max_context} positions: "
                                f"no room for another step; end the call")
        group = None
        if req.speech_group is not None and req.speech_group.numel():
            group = req.speech_group.long().reshape(1, -1)
            g, codebook = self.model.cfg.audio.group_size, self.model.cfg.audio.codebook_size
            if group.shape[1] != g or int(group.min()) < 0 or int(group.max()) >= codebook:
                raise SequenceError(f"SPEECH_GROUP must hold {g} ids in 0..{codebook - 1}")
            group = group.to(device)
        inputs = self.model.embed_step(ids, group)[0]  # [1, E]
        slot.extra["history"].append(int(ids[0]))  # the previous forward's returned id
        return _Ready(index, slot, inputs, ids)
