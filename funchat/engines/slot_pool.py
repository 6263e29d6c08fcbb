"""Per-call KV-cache rows of the stateful model services (llm, refined_head), independent of Triton.

Each live call (a Triton sequence, keyed by its correlation id) owns one row ("slot") of a shared
KV cache pool. A batch of steps from different calls runs as one forward: the calls' rows are
gathered into a batch cache, the forward appends to it, and the rows are written back. A cap
bounds the live calls and an idle timeout frees the slot of an abandoned call.

Shapes: B calls in a batch, T new positions, E width.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from funchat.model.qwen3 import KVCache

# The one default of the `max_sequences` and `idle_timeout_s` parameters (engines and services).
DEFAULT_MAX_SEQUENCES = 64
DEFAULT_IDLE_TIMEOUT_S = 60.0


class SequenceError(Exception):
    """A request that does not fit the call's state (unknown call, step before start, pool full).
    `status` is the Triton error code name the service answers with."""

    def __init__(self, message: str, status: str = "INVALID_ARG"):
        super().__init__(message)
        self.status = status


@dataclass
class Slot:
    row: int
    last_used: float
    extra: dict[str, Any] = field(default_factory=dict)  # per-call data of the service (e.g. its sampling)


class SlotPool:
    """Rows of one KV cache shared by up to `max_sequences` calls.

    The cache is allocated once, at `capacity` positions per row, and never grows: its memory is
    known at load (rows x capacity x the model's bytes per position) and stays flat however long
    the calls run. A request that would take a row past `capacity` is refused (`check_room`).
    """

    def __init__(self, new_cache: Callable[[int, int], KVCache], max_sequences: int, idle_timeout_s: float,
                 capacity: int, clock: Callable[[], float] = time.monotonic):
        if capacity < 1:
            raise ValueError(f"a KV pool needs a positive capacity, got {capacity}")
        self.cache = new_cache(max_sequences, capacity)
        self.capacity = capacity
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

    def length(self, slot: Slot) -> int:
        """Positions the slot's call holds."""
        return int(self.cache.lengths[slot.row])

    def check_room(self, cid: int, slot: Slot, positions: int, what: str) -> None:
        """Refuse (SequenceError INVALID_ARG) `positions` new positions that would not fit the
        call's row; `what` names the limit in the message (e.g. "max_context 2048")."""
        held = self.length(slot)
        if held + positions > self.capacity:
            raise SequenceError(f"sequence {cid} holds {held} positions and this request adds {positions}: "
                                f"more than {what} allows ({self.capacity} positions); end the call or start "
                                f"it again with a shorter prompt")

    def run(self, rows: list[int], new_positions: int, fn: Callable[[KVCache], Any]) -> Any:
        """Gather `rows` into a batch cache, run fn on it (it appends at most `new_positions` per
        row, padding included), write the rows back. Only the positions the rows can reach are
        copied each way, so a step costs what the calls hold, not what the pool could hold."""
        with self.lock:
            idx = torch.tensor(rows, dtype=torch.long, device=self.cache.lengths.device)
            held = int(self.cache.lengths[idx].max())
            batch = self.cache.select(rows, held + new_positions)  # padding may reach past capacity
            out = fn(batch)
            end = batch.max_length()  # every kept position lies below the rows' new lengths
            if end > self.capacity:  # check_room keeps real positions inside; this is a bug guard
                raise SequenceError(f"a forward left {end} positions, more than the pool's {self.capacity}",
                                    status="INTERNAL")
            for store, new in ((self.cache.k, batch.k), (self.cache.v, batch.v)):
                for layer, t in enumerate(new):
                    store[layer][:, :, :end].index_copy_(0, idx, t[:, :, :end])
            self.cache.lengths[idx] = batch.lengths
            return out


def run_isolated(group: list, run: Callable[[list], None]) -> list[tuple[Any, Exception]]:
    """Run `group` (the requests of one batched forward) with `run(members)`; when that raises, run
    each member alone, so that one request's failure fails only that request, not its batch.
    `run` must leave no trace when it raises (SlotPool.run writes rows back only on success).
    -> (member, exception) for each member that failed on its own."""
    try:
        run(group)
        return []
    except Exception as exc:
        if len(group) == 1:
            return [(group[0], exc)]
    failed = []
    for member in group:
        try:
            run([member])
        except Exception as exc:
            failed.append((member, exc))
    return failed


def forward_failed(service: str, exc: Exception) -> SequenceError:
    """The answer to a request whose forward raised (after run_isolated): INTERNAL, and the call's
    sequence is ended (its slot freed by the caller), since its state is unknown."""
    return SequenceError(f"{service} forward failed ({type(exc).__name__}: {exc}); the sequence was ended and "
                         f"its slot freed: start the call again", status="INTERNAL")


def pad_right(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[T_i, E] per row -> ([B, max T, E] zero-padded, lengths [B])."""
    lengths = torch.tensor([r.shape[0] for r in rows], dtype=torch.long)
    out = rows[0].new_zeros(len(rows), int(lengths.max()), rows[0].shape[1])
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out, lengths
