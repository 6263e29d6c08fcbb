"""The refined_head service's logic: the Speech Refined Head's g speech tokens per LLM step, batched.

A call's START carries the speech sampling settings and a seed (the orchestrator sends
`funchat.turn.sampling.speech_seed`); the slot keeps the generator and the speech ids the schedule
appended so far (the repetition penalty's history), so each call draws what the oracle draws.

Shapes: B calls in a batch, T new positions, E LLM width, g speech group size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from funchat.engines.fixed_steps import FixedShapeSteps, check_cuda_graphs, context_buckets, decode_position
from funchat.engines.slot_pool import (DEFAULT_IDLE_TIMEOUT_S, DEFAULT_KEEP_TIMEOUT_S, DEFAULT_MAX_SEQUENCES,
                                       SequenceError, Slot, SlotPool, forward_failed, pad_right, run_isolated)
from funchat.engines.triton_adapter import ServiceParams
from funchat.model.checkpoint import load_model
from funchat.model.funaudiochat import FunAudioChat
from funchat.model.qwen3 import KVCache
from funchat.model.refined_head import TokenChooser
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
    keep_id: int = 0  # START: the conversation's kept row to continue (with prefix); END: keep the row under it
    prefix: int = 0  # START: LLM positions of the kept row this prompt shares (the SRH keeps g per position)
    partial: bool = False  # START: a prompt chunk that does not end the prompt: every sub-frame, no token


class SrhEngine:
    """The Speech Refined Head's service logic: g speech tokens per LLM step, batched across calls."""

    def __init__(self, model: FunAudioChat, max_sequences: int = DEFAULT_MAX_SEQUENCES,
                 idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S, max_context: int = CONTEXT_TOKENS,
                 clock: Callable[[], float] = time.monotonic, step_runner: "SrhStepRunner | None" = None):
        """max_context: the LLM positions a call may hold, as the llm service's; the SRH holds g
        positions per LLM position, so its pool is allocated once at g x max_context per call.
        step_runner: optional `SrhStepRunner`; it runs the batches of single steps (prefills stay
        eager) on fixed shapes over the same pool plus one scratch row for its padding rows."""
        if model.audio_invert_tower is None:
            raise ValueError("this checkpoint has no Speech Refined Head")
        self.model = model
        head = model.audio_invert_tower
        self.group = model.cfg.audio.group_size
        self.max_context = max_context
        self.step_runner = step_runner
        capacity = self.group * max_context
        if step_runner is None:
            self.pool = SlotPool(head.crq_transformer.new_cache, max_sequences, idle_timeout_s, capacity, clock)
        else:
            # Row `max_sequences` is never given to a call: the runner's padding rows write there.
            self.pool = SlotPool(lambda rows, cap: head.crq_transformer.new_cache(rows + 1, cap), max_sequences,
                                 idle_timeout_s, capacity, clock)
            step_runner.attach(self.pool.cache, scratch_row=max_sequences)
        self.bos = head.codebook[model.cfg.audio.bos_token_id]

    @torch.inference_mode()
    def run(self, requests: list[SrhRequest]) -> list[torch.Tensor | SequenceError]:
        """One result per request, in order: speech ids [g] int64 (none for a partial prompt chunk),
        or the request's SequenceError."""
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
        def kind(i: int) -> str:
            req = requests[i]
            if req.start and req.partial:
                return "partial"
            return "prefill" if req.start or req.srh_input.shape[0] > 1 else "step"

        for group_kind in ("partial", "prefill", "step"):
            group = [(i, s) for i, s in ready if kind(i) == group_kind]
            if group:
                # A forward that raises fails only the requests that fail on their own; their
                # sequences end (state unknown), so no slot waits for the idle timeout.
                run = partial(self._extend, requests=requests, results=results) if group_kind == "partial" else \
                    partial(self._run_group, requests=requests, results=results, is_prefill=group_kind == "prefill")
                for (i, _), exc in run_isolated(group, run):
                    self.pool.free(requests[i].cid)
                    results[i] = forward_failed("refined_head", exc)
        for i, req in enumerate(requests):
            if req.end and not isinstance(results[i], SequenceError):
                self.pool.end(req.cid, req.keep_id)
        return results  # type: ignore[return-value]

    def _extend(self, group: list[tuple[int, Slot]], requests: list[SrhRequest], results: list) -> None:
        """Partial prompt chunks: every sub-frame of every position into the calls' rows, with the
        turn's previous-token embedding (the start token), as the whole prompt's prefill computes them."""
        h, lengths = pad_right([requests[i].srh_input.to(self.bos.device, self.bos.dtype) for i, _ in group])
        lengths = lengths.to(self.bos.device)
        slots = [s for _, s in group]

        def forward(cache: KVCache) -> None:
            prev = torch.stack([s.extra["prev_embed"] for s in slots])  # [B, E]
            self.model.audio_invert_tower.extend(h, _BatchState(cache, prev), lengths)

        self.pool.run([s.row for s in slots], h.shape[1] * self.group, forward)
        for i, _ in group:
            results[i] = torch.zeros(0, dtype=torch.long)

    def _run_group(self, group: list[tuple[int, Slot]], requests: list[SrhRequest], results: list,
                   is_prefill: bool = True) -> None:
        """One batched forward of `group` ((request index, slot), all prefills or all steps); its
        results go in `results` only when the whole forward succeeded. On failure the calls'
        generators are put back as they were, so a retry draws what this attempt would have."""
        h, lengths = pad_right([requests[i].srh_input.to(self.bos.device, self.bos.dtype) for i, _ in group])
        lengths = lengths.to(self.bos.device)
        slots = [s for _, s in group]
        drawn: list[list[int]] = [[] for _ in group]
        generator_states = [s.extra["generator"].get_state() for s in slots]

        sampled = [b for b, s in enumerate(slots) if not s.extra["sampling"].greedy]

        def choose(_j: int, logits: torch.Tensor) -> torch.Tensor:
            """logits [B, V] -> [B] ids: greedy rows take the raw argmax, all at once (no device
            sync for them); sampled rows draw with their own history and generator."""
            tokens = logits.argmax(dim=-1)  # [B]
            if sampled:
                tokens = tokens.clone()
                for b in sampled:
                    extra = slots[b].extra
                    history = penalty_history(extra["history"] + drawn[b], extra["sampling"], logits.device)
                    tokens[b] = select(logits[b:b + 1], extra["sampling"], history, extra["generator"])[0]
                    drawn[b].append(int(tokens[b]))  # the penalty's history: sampled rows only
            return tokens

        def forward(cache: KVCache) -> torch.Tensor:
            prev = torch.stack([s.extra["prev_embed"] for s in slots])  # [B, E]
            state = _BatchState(cache, prev)
            out = self.model.audio_invert_tower(h, state, choose, lengths)  # [B, g]
            for b, slot in enumerate(slots):
                slot.extra["prev_embed"] = state.prev_embed[b]
            return out

        try:
            if self.step_runner is None:
                tokens = self.pool.run([s.row for s in slots], h.shape[1] * self.group, forward)  # g per LLM position
            elif is_prefill:
                tokens = self._prefill_then_sub_steps(h, lengths, slots, choose)
            else:
                tokens = self._fixed_shape_step(h, slots, choose)
        except Exception:
            for slot, generator_state in zip(slots, generator_states):
                slot.extra["generator"].set_state(generator_state)
            raise
        for b, (i, _) in enumerate(group):
            results[i] = tokens[b]

    def _fixed_shape_step(self, h: torch.Tensor, slots: list[Slot], choose: TokenChooser) -> torch.Tensor:
        """h [B, 1, E] of calls that each take one step -> tokens [B, g], through the step runner."""
        head = self.model.audio_invert_tower
        sub = head.pre_matching(h[:, 0]).reshape(h.shape[0], self.group, -1)  # [B, g, E]
        return self._sub_steps(sub, slots, choose, first=0)

    def _prefill_then_sub_steps(self, h: torch.Tensor, lengths: torch.Tensor, slots: list[Slot],
                                choose: TokenChooser) -> torch.Tensor:
        """Prefills with a step runner: the block (sub-frames 0 .. L*g-g) eagerly over the gathered
        rows, then the last position's one-position sub-steps 1 .. g-1 through the runner's graphs."""
        head = self.model.audio_invert_tower
        out: dict[str, torch.Tensor] = {}

        def block(cache: KVCache) -> None:
            state = _BatchState(cache, torch.stack([s.extra["prev_embed"] for s in slots]))  # prev [B, E]
            out["first"], out["last_sub"] = head.first_sub_frames(h, state, choose, lengths)
            out["prev"] = state.prev_embed

        self.pool.run([s.row for s in slots], h.shape[1] * self.group, block)
        for b, slot in enumerate(slots):
            slot.extra["prev_embed"] = out["prev"][b]
        rest = self._sub_steps(out["last_sub"], slots, choose, first=1)  # [B, g-1]
        return torch.cat([out["first"][:, None], rest], dim=1)  # [B, g]

    def _sub_steps(self, sub: torch.Tensor, slots: list[Slot], choose: TokenChooser, first: int) -> torch.Tensor:
        """Sub-steps first .. g-1 of one position per call (sub [B, g, E]) through the step runner
        -> tokens [B, g - first]; each row gains g - first positions."""
        rows = [s.row for s in slots]
        with self.pool.lock:
            idx = torch.tensor(rows, dtype=torch.long, device=self.pool.cache.lengths.device)
            positions = self.pool.cache.lengths[idx].tolist()  # each row's cached length
            prev = torch.stack([s.extra["prev_embed"] for s in slots])  # [B, E]
            try:
                tokens, prev = self.step_runner.sub_steps(sub, prev, rows, positions, choose, first)
            except Exception:
                # leave no trace (run_isolated retries): a sub-step that ran had advanced its rows
                self.pool.cache.lengths[idx] = torch.tensor(positions, dtype=torch.long, device=idx.device)
                raise
        for b, slot in enumerate(slots):
            slot.extra["prev_embed"] = prev[b]
        return tokens

    def _prepare(self, req: SrhRequest) -> Slot:
        e = self.model.cfg.audio.output_dim
        if req.srh_input.dim() != 2 or req.srh_input.shape[1] != e or req.srh_input.shape[0] == 0:
            raise SequenceError(f"SRH_INPUT must be [positions, {e}], got {list(req.srh_input.shape)}")
        if not torch.isfinite(req.srh_input).all():
            raise SequenceError("SRH_INPUT contains non-finite values")
        positions = req.srh_input.shape[0]
        if req.start and req.prefix < 0:
            raise SequenceError(f"PREFIX is {req.prefix}: use 0 (a whole prompt) or the kept positions to reuse")
        if req.start and req.prefix + positions > self.max_context:
            raise SequenceError(f"SRH_INPUT has {req.prefix + positions} positions with the kept prefix, more than "
                                f"max_context {self.max_context}")
        if req.start:
            slot = self.pool.start(req.cid, req.keep_id, self.group * req.prefix)
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


class SrhStepRunner(FixedShapeSteps):
    """SRH steps (one LLM position: g sub-steps, each one new position of the crq_transformer) on
    fixed shapes over the engine's pool in place (FixedShapeSteps), optionally as CUDA graphs.

    A sub-step's graph covers input_matching, the crq_transformer position and the speech logits;
    the token is chosen between sub-steps (a sampled call draws on the host), and its codebook
    row feeds the next sub-step, as `RefinedHead.forward` does for a one-position block.
    """

    def sub_steps(self, sub: torch.Tensor, prev_embed: torch.Tensor, rows: list[int], positions: list[int],
                  choose: TokenChooser, first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sub-frames first .. g-1 of one position per call: sub [B, g, E] (`pre_matching`'s split),
        prev_embed [B, E] -> (tokens [B, g - first], the new prev_embed [B, E]); each row gains
        g - first positions from its cached length. A prefill's last position takes sub-steps 1 ..
        g-1 here after its block; a step takes all g."""
        head = self.model.audio_invert_tower
        tokens, prev = [], prev_embed
        for j in range(first, head.cfg.group_size):
            x = (sub[:, j] + prev)[:, None]  # [B, 1, E]
            (logits,) = self._in_pieces(x, rows, [p + j - first for p in positions])  # [B, V] float32
            token = choose(j, logits)  # [B]
            tokens.append(token)
            prev = head.codebook[token]  # [B, E]
        return torch.stack(tokens, dim=1), prev

    def _static_step(self, n: int, context: int) -> tuple[torch.Tensor]:
        """-> (speech logits [n, V] float32,) of the first n buffer rows."""
        head = self.model.audio_invert_tower
        x = head.input_matching(self.x_buf[:n])  # [n, 1, E_srh]
        hidden = decode_position(head.crq_transformer, x, self.rows_buf[:n], self.pos_buf[:n], self.cache,
                                 self.key_index, context)  # [n, 1, E_srh]
        return (head._logits(hidden[:, 0]),)


@dataclass
class _BatchState:
    """The RefinedHeadState shape the SRH module expects, over a gathered batch cache."""

    cache: KVCache
    prev_embed: torch.Tensor  # [B, E]


def build_srh_engine(model: FunAudioChat, max_sequences: int = DEFAULT_MAX_SEQUENCES,
                     idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S, max_context: int = CONTEXT_TOKENS,
                     cuda_graphs: str = "auto", max_batch: int = 16) -> SrhEngine:
    """The engine as the service runs it. cuda_graphs: "auto" steps through an `SrhStepRunner`
    with CUDA graphs on a CUDA device and eagerly (no runner) elsewhere; "true" needs CUDA;
    "false" runs the runner's fixed shapes without capture (any device)."""
    on_cuda = model.device.type == "cuda"
    cuda_graphs = check_cuda_graphs("refined_head", cuda_graphs)
    if cuda_graphs == "true" and not on_cuda:
        raise ValueError(f"refined_head parameter cuda_graphs=true needs device cuda, got {model.device}: "
                         f"use auto or false")
    if cuda_graphs == "auto" and not on_cuda:
        return SrhEngine(model, max_sequences, idle_timeout_s, max_context)
    g = model.cfg.audio.group_size
    contexts = context_buckets(g * max_context, smallest=g * 256)
    runner = SrhStepRunner(model, max_batch, use_graphs=cuda_graphs != "false", context_sizes=contexts)
    engine = SrhEngine(model, max_sequences, idle_timeout_s, max_context, step_runner=runner)
    runner.capture_all()  # at load, not during the first calls
    return engine


def load_srh_engine(params: ServiceParams) -> SrhEngine:
    """The refined_head service's engine from its config parameters: `checkpoint`, `device`,
    `dtype`, `threads`, `max_sequences`, `idle_timeout_s`, `keep_timeout_s`, `max_context`, `cuda_graphs`."""
    max_sequences = params.integer("max_sequences", DEFAULT_MAX_SEQUENCES, minimum=1)
    idle_timeout_s = params.number("idle_timeout_s", DEFAULT_IDLE_TIMEOUT_S)
    keep_timeout_s = params.number("keep_timeout_s", DEFAULT_KEEP_TIMEOUT_S)
    max_context = params.integer("max_context", CONTEXT_TOKENS, minimum=1)
    cuda_graphs = check_cuda_graphs("refined_head", params.text("cuda_graphs", "auto"))  # before any weight is read
    params.apply_threads()
    model = load_model(params.checkpoint, dtype=params.dtype, device=params.device)
    engine = build_srh_engine(model, max_sequences, idle_timeout_s, max_context, cuda_graphs,
                              max_batch=max(1, params.max_batch_size))
    engine.pool.keep_timeout_s = keep_timeout_s
    return engine
