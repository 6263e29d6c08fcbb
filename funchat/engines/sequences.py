"""Per-call state of the stateful model services (llm, refined_head), independent of Triton.

Each live call (a Triton sequence, keyed by its correlation id) owns one row ("slot") of a shared
KV cache pool. A batch of steps from different calls runs as one forward: the calls' rows are
gathered into a batch cache, the forward appends to it, and the rows are written back. A cap
bounds the live calls and an idle timeout frees the slot of an abandoned call.

Shapes: B calls in a batch, T new positions, E LLM width, g speech group size.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from funchat.model.funaudiochat import FunAudioChat
from funchat.model.qwen3 import KVCache
from funchat.model.sampling import GREEDY, SamplingParams, penalty_history, select


class SequenceError(Exception):
    """A request that does not fit the call's state (unknown call, step before start, pool full)."""

    def __init__(self, message: str, status: str = "INVALID_ARG"):
        super().__init__(message)
        self.status = status


@dataclass
class Slot:
    row: int
    last_used: float
    extra: dict[str, Any] = field(default_factory=dict)  # per-call data of the service (e.g. SRH sampling)


class SlotPool:
    """Rows of one KV cache shared by up to `max_sequences` calls."""

    def __init__(self, new_cache: Callable[[int, int], KVCache], max_sequences: int, idle_timeout_s: float,
                 capacity: int = 256, clock: Callable[[], float] = time.monotonic):
        self.cache = new_cache(max_sequences, capacity)
        self.max_sequences = max_sequences
        self.idle_timeout_s = idle_timeout_s
        self.clock = clock
        self.slots: dict[int, Slot] = {}  # correlation id -> slot
        self.lock = threading.RLock()

    @property
    def live(self) -> int:
        return len(self.slots)

    def reap_idle(self) -> list[int]:
        """Free the slots of calls idle longer than the timeout; -> their correlation ids."""
        now = self.clock()
        with self.lock:
            stale = [cid for cid, s in self.slots.items() if now - s.last_used > self.idle_timeout_s]
            for cid in stale:
                self.free(cid)
        return stale

    def start(self, cid: int) -> Slot:
        with self.lock:
            if cid in self.slots:  # a new START on a live id restarts that call
                self.free(cid)
            if len(self.slots) >= self.max_sequences:
                self.reap_idle()
            if len(self.slots) >= self.max_sequences:
                raise SequenceError(f"all {self.max_sequences} sequence slots are busy; retry later or raise "
                                    f"max_sequences", status="UNAVAILABLE")
            used = {s.row for s in self.slots.values()}
            row = next(r for r in range(self.max_sequences) if r not in used)
            self.cache.lengths[row] = 0
            slot = self.slots[cid] = Slot(row, self.clock())
            return slot

    def get(self, cid: int) -> Slot:
        with self.lock:
            if cid not in self.slots:
                raise SequenceError(f"unknown or ended sequence {cid}: send a START request first "
                                    f"(it may have been freed after {self.idle_timeout_s:g} s idle)", status="NOT_FOUND")
            slot = self.slots[cid]
            slot.last_used = self.clock()
            return slot

    def free(self, cid: int) -> None:
        with self.lock:
            slot = self.slots.pop(cid, None)
            if slot is not None:
                self.cache.lengths[slot.row] = 0

    def run(self, rows: list[int], fn: Callable[[KVCache], Any]) -> Any:
        """Gather `rows` into a batch cache, run fn on it (it appends), write the rows back."""
        with self.lock:
            batch = self.cache.select(rows)
            out = fn(batch)
            self.cache.ensure_capacity(batch.capacity)
            idx = torch.tensor(rows, dtype=torch.long, device=self.cache.lengths.device)
            width = batch.capacity
            for store, new in ((self.cache.k, batch.k), (self.cache.v, batch.v)):
                for layer, t in enumerate(new):
                    store[layer][:, :, :width].index_copy_(0, idx, t)
            self.cache.lengths[idx] = batch.lengths
            return out


def _pad_right(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[T_i, E] per row -> ([B, max T, E] zero-padded, lengths [B])."""
    lengths = torch.tensor([r.shape[0] for r in rows], dtype=torch.long)
    out = rows[0].new_zeros(len(rows), int(lengths.max()), rows[0].shape[1])
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out, lengths


@dataclass
class LlmRequest:
    cid: int
    start: bool
    end: bool
    input_ids: torch.Tensor  # [T] text ids (prompt at start, one id per step)
    audio: torch.Tensor | None = None  # [n, E] rows for the <|AUDIO|> positions (prompt only)
    speech_group: torch.Tensor | None = None  # [g] speech ids fused with the step's text id


@dataclass
class LlmResult:
    logits: torch.Tensor  # [V] float32, last position
    srh_input: torch.Tensor  # [T, E]: final hidden + E_text(input id), what the SRH consumes


class LlmEngine:
    """The shared LLM's service logic: prefill and step requests of many calls, batched.

    step_runner: optional, e.g. `funchat.engines.llm_engines.CudaGraphStepRunner`; it runs the
    batches of single steps (prefills stay eager) on fixed shapes. With one, `capacity` is fixed:
    the KV cache is allocated once at `capacity` positions per call (plus one scratch row for the
    runner's padding rows) and never grows, and a call that would go past it gets a SequenceError.
    Without one, the cache starts at `capacity` and grows as calls need.
    """

    def __init__(self, model: FunAudioChat, max_sequences: int = 16, idle_timeout_s: float = 60.0,
                 capacity: int = 256, clock: Callable[[], float] = time.monotonic, step_runner: Any = None):
        self.model = model
        self.device = model.device
        self.step_runner = step_runner
        if step_runner is None:
            self.max_context: int | None = None
            self.pool = SlotPool(model.new_llm_cache, max_sequences, idle_timeout_s, capacity, clock)
        else:
            # Row `max_sequences` is never given to a call (SlotPool uses rows 0..max_sequences-1):
            # the runner's padding rows write there.
            self.max_context = capacity
            self.pool = SlotPool(lambda rows, cap: model.new_llm_cache(rows + 1, cap), max_sequences,
                                 idle_timeout_s, capacity, clock)
            step_runner.attach(self.pool.cache, scratch_row=max_sequences)

    @torch.inference_mode()
    def run(self, requests: list[LlmRequest]) -> list[LlmResult | SequenceError]:
        """One result (or error) per request, in order. Steps of different calls share a forward;
        prefills share another (right-padded)."""
        self.pool.reap_idle()
        results: list[LlmResult | SequenceError | None] = [None] * len(requests)
        ready: list[tuple[int, Slot, torch.Tensor, torch.Tensor]] = []  # (index, slot, inputs [T, E], ids [T])
        for i, req in enumerate(requests):
            try:
                ready.append((i, *self._prepare(req)))
            except SequenceError as exc:
                results[i] = exc
        for is_prefill in (True, False):
            group = [r for r in ready if (r[2].shape[0] > 1 or requests[r[0]].start) == is_prefill]
            if not group:
                continue
            embeds, lengths = _pad_right([g[2] for g in group])
            lengths = lengths.to(embeds.device)
            rows = [g[1].row for g in group]
            hidden, logits = self._forward(is_prefill, embeds, lengths, rows)
            for b, (i, slot, _, ids) in enumerate(group):
                t = ids.shape[0]
                srh_input = hidden[b, :t] + self.model.language_model.embed(ids)
                results[i] = LlmResult(logits[b], srh_input)
        for i, req in enumerate(requests):
            if req.end and not isinstance(results[i], SequenceError):
                self.pool.free(req.cid)
        return results  # type: ignore[return-value]

    def _forward(self, is_prefill: bool, embeds: torch.Tensor, lengths: torch.Tensor,
                 rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """embeds [B, T, E] right-padded (T = 1 for steps), lengths [B], the calls' cache rows ->
        (hidden [B, T, E], logits of each row's last real position [B, V]); appends to the rows."""
        if is_prefill or self.step_runner is None:
            return self.pool.run(rows, lambda cache: self.model.llm_forward(embeds, cache, lengths))
        with self.pool.lock:
            idx = torch.tensor(rows, dtype=torch.long, device=self.pool.cache.lengths.device)
            positions = self.pool.cache.lengths[idx].tolist()  # where each row's new position goes
            return self.step_runner.step(embeds, rows, positions)

    def _prepare(self, req: LlmRequest) -> tuple[Slot, torch.Tensor, torch.Tensor]:
        vocab = self.model.cfg.text.vocab_size
        device = self.device
        ids = req.input_ids.long().reshape(-1).to(device)
        if ids.numel() == 0:
            raise SequenceError("INPUT_IDS is empty")
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise SequenceError(f"INPUT_IDS holds ids outside the text vocabulary 0..{vocab - 1}")
        if req.start and self.max_context is not None and ids.numel() > self.max_context:
            raise SequenceError(f"the prompt has {ids.numel()} positions, more than max_context "
                                f"{self.max_context}")
        if req.start:
            slot = self.pool.start(req.cid)
            audio = [req.audio.to(device)] if req.audio is not None and req.audio.numel() else []
            try:
                inputs = self.model.embed_prompt(ids[None], audio)[0]  # [T, E]
            except Exception as exc:
                self.pool.free(req.cid)
                raise SequenceError(str(exc)) from None
            return slot, inputs, ids
        slot = self.pool.get(req.cid)
        if ids.numel() != 1:
            raise SequenceError(f"a step takes one text id, got {ids.numel()}")
        if self.max_context is not None and int(self.pool.cache.lengths[slot.row]) >= self.max_context:
            raise SequenceError(f"sequence {req.cid} holds max_context {self.max_context} positions: "
                                f"no room for another step; end the call")
        group = None
        if req.speech_group is not None and req.speech_group.numel():
            group = req.speech_group.long().reshape(1, -1).to(device)
            g, codebook = self.model.cfg.audio.group_size, self.model.cfg.audio.codebook_size
            if group.shape[1] != g or int(group.min()) < 0 or int(group.max()) >= codebook:
                raise SequenceError(f"SPEECH_GROUP must hold {g} ids in 0..{codebook - 1}")
        inputs = self.model.embed_step(ids, group)[0]  # [1, E]
        return slot, inputs, ids


@dataclass
class SrhRequest:
    cid: int
    start: bool
    end: bool
    srh_input: torch.Tensor  # [T, E] from the llm service
    appended: torch.Tensor | None = None  # speech ids the schedule appended after the previous step
    sampling: SamplingParams = GREEDY
    seed: int = 0


class SrhEngine:
    """The Speech Refined Head's service logic: g speech tokens per LLM step, batched across calls."""

    def __init__(self, model: FunAudioChat, max_sequences: int = 16, idle_timeout_s: float = 60.0,
                 capacity: int = 1024, clock: Callable[[], float] = time.monotonic):
        if model.audio_invert_tower is None:
            raise ValueError("this checkpoint has no Speech Refined Head")
        self.model = model
        head = model.audio_invert_tower
        self.pool = SlotPool(head.crq_transformer.new_cache, max_sequences, idle_timeout_s, capacity, clock)
        self.bos = head.codebook[model.cfg.audio.bos_token_id]

    @torch.inference_mode()
    def run(self, requests: list[SrhRequest]) -> list[torch.Tensor | SequenceError]:
        self.pool.reap_idle()
        results: list[torch.Tensor | SequenceError | None] = [None] * len(requests)
        ready = []
        for i, req in enumerate(requests):
            try:
                ready.append((i, self._prepare(req)))
            except SequenceError as exc:
                results[i] = exc
        for is_prefill in (True, False):
            group = [(i, s) for i, s in ready if (requests[i].start or requests[i].srh_input.shape[0] > 1) == is_prefill]
            if not group:
                continue
            h, lengths = _pad_right([requests[i].srh_input.to(self.bos.device, self.bos.dtype) for i, _ in group])
            lengths = lengths.to(self.bos.device)
            slots = [s for _, s in group]
            drawn: list[list[int]] = [[] for _ in group]

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

            tokens = self.pool.run([s.row for s in slots], forward)
            for b, (i, _) in enumerate(group):
                results[i] = tokens[b]
        for i, req in enumerate(requests):
            if req.end and not isinstance(results[i], SequenceError):
                self.pool.free(req.cid)
        return results  # type: ignore[return-value]

    def _prepare(self, req: SrhRequest) -> Slot:
        e = self.model.cfg.audio.output_dim
        if req.srh_input.dim() != 2 or req.srh_input.shape[1] != e or req.srh_input.shape[0] == 0:
            raise SequenceError(f"SRH_INPUT must be [positions, {e}], got {list(req.srh_input.shape)}")
        if not torch.isfinite(req.srh_input).all():
            raise SequenceError("SRH_INPUT contains non-finite values")
        if req.start:
            slot = self.pool.start(req.cid)
            slot.extra.update(history=[], prev_embed=self.bos, sampling=req.sampling,
                              generator=torch.Generator(device=self.bos.device).manual_seed(req.seed))
        else:
            slot = self.pool.get(req.cid)
            if req.srh_input.shape[0] != 1:
                raise SequenceError(f"a step takes one position, got {req.srh_input.shape[0]}")
        if req.appended is not None and req.appended.numel():
            slot.extra["history"].extend(int(t) for t in req.appended.reshape(-1))
        return slot


@dataclass
class _BatchState:
    """The RefinedHeadState shape the SRH module expects, over a gathered batch cache."""

    cache: KVCache
    prev_embed: torch.Tensor  # [B, E]
