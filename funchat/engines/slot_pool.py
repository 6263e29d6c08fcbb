"""Per-call KV-cache rows of the stateful model services (llm, refined_head), independent of Triton.

Each live call (a Triton sequence, keyed by its correlation id) owns one row ("slot") of a shared
KV cache pool. A batch of steps from different calls runs as one forward: the calls' rows are
gathered into a batch cache, the forward appends to it, and the rows are written back. A cap
bounds the live calls and an idle timeout frees the slot of an abandoned call.

Kept prefixes: a sequence that ends with a keep id leaves its row "kept" under that id instead of
freeing it, so the conversation's next prompt (a new sequence with the same keep id and a prefix
length) reuses the positions it shares and prefills only the rest. Kept rows are the pool's spare
capacity: a START that finds no free row evicts the least recently kept one, and kept rows older
than `keep_timeout_s` are freed. A START whose kept row is gone gets NOT_FOUND, and its caller sends
the whole prompt instead.

Shapes: B calls in a batch, T new positions, E width.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from funchat.model.qwen3 import KVCache

# The one default of the `max_sequences` and `idle_timeout_s` parameters (engines and services).
DEFAULT_MAX_SEQUENCES = 64
DEFAULT_IDLE_TIMEOUT_S = 60.0
DEFAULT_KEEP_TIMEOUT_S = 600.0  # how long a conversation's kept prefix waits for its next turn


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
                 capacity: int, clock: Callable[[], float] = time.monotonic,
                 keep_timeout_s: float = DEFAULT_KEEP_TIMEOUT_S):
        if capacity < 1:
            raise ValueError(f"a KV pool needs a positive capacity, got {capacity}")
        self.cache = new_cache(max_sequences, capacity)
        self.capacity = capacity
        self.max_sequences = max_sequences
        self.idle_timeout_s = idle_timeout_s
        self.keep_timeout_s = keep_timeout_s
        self.clock = clock
        self.slots: dict[int, Slot] = {}  # correlation id -> slot
        self.kept: OrderedDict[int, Slot] = OrderedDict()  # keep id -> row, least recently kept first
        self.counts = {"prefix_hits": 0, "prefix_misses": 0, "kept_evicted": 0, "kept_expired": 0}
        self.lock = threading.RLock()

    @property
    def live(self) -> int:
        return len(self.slots)

    def reap_idle(self) -> list[int]:
        """Free the slots of calls idle longer than the timeout, and kept rows older than theirs;
        -> the freed calls' correlation ids."""
        now = self.clock()
        with self.lock:
            stale = [cid for cid, s in self.slots.items() if now - s.last_used > self.idle_timeout_s]
            for cid in stale:
                self.free(cid)
            for keep_id in [k for k, s in self.kept.items() if now - s.last_used > self.keep_timeout_s]:
                self._drop_kept(keep_id, "kept_expired")
        return stale

    def start(self, cid: int, keep_id: int = 0, prefix: int = 0) -> Slot:
        """A row for sequence `cid`. With `prefix` > 0 it is the row kept under `keep_id`, cut back to
        its first `prefix` positions (NOT_FOUND when that row is gone or shorter); otherwise a fresh
        row (a row kept under `keep_id` is dropped: the caller starts the conversation over)."""
        with self.lock:
            if cid in self.slots:  # a new START on a live id restarts that call
                self.free(cid)
            if prefix > 0:
                slot = self.kept.pop(keep_id, None)
                held = -1 if slot is None else int(self.cache.lengths[slot.row])
                if held < prefix:
                    if slot is not None:
                        self._free_row(slot)
                    self.counts["prefix_misses"] += 1
                    raise SequenceError(f"no kept prefix of {prefix} positions under keep id {keep_id} (evicted, "
                                        f"expired or never kept): send the whole prompt with prefix 0",
                                        status="NOT_FOUND")
                self.counts["prefix_hits"] += 1
                self.cache.lengths[slot.row] = prefix
                slot.last_used = self.clock()
                self.slots[cid] = slot
                return slot
            if keep_id in self.kept:
                self._drop_kept(keep_id, None)
            if len(self.slots) + len(self.kept) >= self.max_sequences:
                self.reap_idle()
            if len(self.slots) >= self.max_sequences:
                raise SequenceError(f"all {self.max_sequences} sequence slots are busy; retry later or raise "
                                    f"max_sequences", status="UNAVAILABLE")
            if len(self.slots) + len(self.kept) >= self.max_sequences:
                self._drop_kept(next(iter(self.kept)), "kept_evicted")  # the least recently kept
            used = {s.row for s in self.slots.values()} | {s.row for s in self.kept.values()}
            row = next(r for r in range(self.max_sequences) if r not in used)
            self.cache.lengths[row] = 0
            slot = self.slots[cid] = Slot(row, self.clock())
            return slot

    def end(self, cid: int, keep_id: int = 0) -> None:
        """Sequence `cid` ended: its row is kept under `keep_id` (most recent), or freed when 0."""
        with self.lock:
            slot = self.slots.pop(cid, None)
            if slot is None:
                return
            if not keep_id:
                self._free_row(slot)
                return
            if keep_id in self.kept:
                self._drop_kept(keep_id, None)
            slot.last_used = self.clock()
            self.kept[keep_id] = slot

    def _drop_kept(self, keep_id: int, count: str | None) -> None:
        self._free_row(self.kept.pop(keep_id))
        if count:
            self.counts[count] += 1

    def _free_row(self, slot: Slot) -> None:
        self.cache.lengths[slot.row] = 0

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
                self._free_row(slot)

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
