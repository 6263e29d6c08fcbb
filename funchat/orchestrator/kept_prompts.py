"""What the llm and refined_head services keep of each conversation's last prompt, as this replica
knows it: so that the next turn prefills only what its prompt adds.

After a turn the services keep the conversation's KV cache rows (END with a keep id). The next
prompt repeats the last one's positions, then adds the reply (as text, the way the reference's
next prompt sees it) and the caller's new turn. The turn asks the services to cut the kept rows
back to the positions both prompts share and to prefill the rest (START with the keep id and a
prefix length). The share stops one position before the end of the last prompt: that position's
Speech Refined Head sub-frames were computed with the tokens it chose, where a whole prefill of
the new prompt uses the start token. Audio positions count as shared only when their encoder rows
are the same: the share ends before the first that differs (a window of the caller's turn that
was prefilled while they spoke and encoded again at the end).

Right after a turn, while the caller listens and speaks, the turn runner prefills ahead what the
next prompt will begin with: everything up to the caller's next audio (the reply as text, the user
header). That chunk is sent as a partial prompt (every SRH sub-frame with the start token, no
token chosen), so the next turn can share all of it and prefill only the caller's audio and the
assistant header when the caller stops. While the caller speaks, each encoder window of their turn
(2 s, 10 positions) is prefilled the same way once it is encoded (`caller_turn`), so that at the
end only the last window, the closing tokens and the assistant header are left.

A conversation the replica has no record of (its first turn, another replica's, a record dropped
after a failed turn) sends its whole prompt; so does one whose kept rows the services evicted (they
answer NOT_FOUND and the turn retries with the whole prompt).

Records are bounded (least recently used dropped first); a dropped record only costs one whole
prefill.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

DEFAULT_CAPACITY = 4096


@dataclass(frozen=True)
class KeptPrompt:
    keep_id: int  # the services' key for the conversation's rows
    ids: tuple[int, ...]  # the prompt the rows were last prefilled with (the reply's steps came after it)
    rows: np.ndarray  # [n, E]: its <|AUDIO|> rows in prompt order
    with_srh: bool  # the refined_head row was kept too (a speech-to-speech turn)
    # True when the rows hold every position as a whole prefill of a longer prompt would (a prefill
    # ahead: no token was chosen at the last position), so all of them can be shared
    complete: bool = False


@dataclass(frozen=True)
class PrefillPlan:
    keep_id: int
    prefix: int  # positions of the kept rows to reuse (0: send the whole prompt)
    audio_rows: int  # how many of the prompt's audio rows lie in that prefix


class KeptPrompts:
    def __init__(self, audio_token: int, capacity: int = DEFAULT_CAPACITY):
        self.audio_token = audio_token
        self.capacity = capacity
        self._items: OrderedDict[str, KeptPrompt] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def plan(self, conversation: str, ids: list[int], rows: np.ndarray, with_srh: bool) -> PrefillPlan:
        """How to prefill `ids` (audio `rows` [n, E]) for `conversation`: the kept positions to reuse."""
        with self._lock:
            kept = self._items.get(conversation)
        if kept is None or (with_srh and not kept.with_srh):
            return PrefillPlan(kept.keep_id if kept else new_keep_id(), 0, 0)
        share = shared_prefix(kept.ids, ids, limit=len(kept.ids) if kept.complete else len(kept.ids) - 1)
        audio_at = [i for i, t in enumerate(ids[:share]) if t == self.audio_token]  # the shared audio positions
        differ = first_different_row(kept.rows[:len(audio_at)], rows[:len(audio_at)])
        if differ is not None:  # the share ends before the first audio position whose rows differ
            share, audio_at = audio_at[differ], audio_at[:differ]
        return PrefillPlan(kept.keep_id, share, len(audio_at))

    def remember(self, conversation: str, keep_id: int, ids: list[int], rows: np.ndarray, with_srh: bool,
                 complete: bool = False) -> None:
        with self._lock:
            self._items.pop(conversation, None)
            self._items[conversation] = KeptPrompt(keep_id, tuple(ids), rows, with_srh, complete)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def forget(self, conversation: str) -> None:
        with self._lock:
            self._items.pop(conversation, None)


def shared_prefix(a: tuple[int, ...] | list[int], b: list[int], limit: int) -> int:
    """The length of the common prefix of a and b, at most `limit`."""
    n = min(len(a), len(b), max(0, limit))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def first_different_row(a: np.ndarray, b: np.ndarray) -> int | None:
    """The index of the first row where a and b [n, E] differ (None: none does)."""
    if a.shape != b.shape:
        raise ValueError(f"rows of shapes {a.shape} and {b.shape}")
    differ = np.flatnonzero(~np.all(a == b, axis=1)) if len(a) else np.zeros(0, np.int64)
    return int(differ[0]) if differ.size else None


def new_keep_id() -> int:
    """A random positive int64: the services' keep ids are shared by every orchestrator replica."""
    return secrets.randbits(62) + 1
