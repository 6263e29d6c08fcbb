"""The caller's turn while they speak: encoded window by window and prefilled into the conversation's
kept rows, so that when the turn ends only its last window, the closing tokens and the assistant
header are left to do.

`CallerTurn` follows the audio of the turn in progress (manual turns: everything since the last
commit; server VAD: the utterance from its prefix padding on, `TurnDetector.utterance`). Each time
an encoder window completes (`funchat.encoder_windows`: 2 s) a task asks the audio tokenizer for
its rows, encodes again the windows a louder moment made stale (`TurnWindows`), and, when no reply
is generating, prefills the windows into the kept rows as a partial prompt chunk
(`TurnRunner.prefill_ahead`). When the turn ends, `take()` hands the windows to the turn
(`Exchange`), which waits for that task and asks the tokenizer only for the rest. Anything that
fails here costs only time: the turn is then encoded and prefilled whole, as without it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from funchat.encoder_windows import EncoderWindows
from funchat.orchestrator import metrics
from funchat.orchestrator.errors import store_call
from funchat.orchestrator.turn_windows import TurnWindows

if TYPE_CHECKING:
    from funchat.orchestrator.converse import ConverseCall
    from funchat.orchestrator.vad import TurnDetector

log = logging.getLogger(__name__)


@dataclass
class SpokenTurn:
    """A turn's windows as `CallerTurn.take` hands them over: wait for the work still running on them."""

    turn: TurnWindows
    work: asyncio.Task | None

    async def windows(self, audio: np.ndarray) -> TurnWindows | None:
        """The windows, if they are sound and their audio is where `audio` (the whole turn) begins."""
        if self.work is not None:
            await asyncio.gather(self.work, return_exceptions=True)
        turn = self.turn
        if turn.broken or not turn.windows or turn.samples > len(audio):
            return None
        return turn if np.array_equal(audio[:turn.samples], turn.audio()) else None


class CallerTurn:
    def __init__(self, call: ConverseCall):
        self.call = call
        self.enabled = call.settings.encode_while_speaking
        facts = call.service.info.facts if self.enabled else None
        self.geometry = EncoderWindows(facts.n_window, facts.group_size) if facts is not None else None
        self.turn = TurnWindows(self.geometry)
        self.utterance: int | None = None  # server VAD: the stream index where the followed utterance starts
        self.work: asyncio.Task | None = None
        self.prefilled_version = 0  # the windows' version last prefilled into the kept rows
        self.prefilled = 0  # how many windows that was

    def reset(self) -> None:
        """A new turn (work still running finishes on the old windows, which nothing uses)."""
        self.turn = TurnWindows(self.geometry)
        self.utterance = None
        self.work = None
        self.prefilled_version = 0
        self.prefilled = 0

    def take(self) -> SpokenTurn:
        """The turn ended: its windows (and the work on them), and a fresh start for the next."""
        spoken = SpokenTurn(self.turn, self.work)
        self.reset()
        return spoken

    async def settle(self) -> None:
        """The call is ending: wait for the work in flight (it is short), so none outlives the call."""
        if self.work is not None:
            await asyncio.gather(self.work, return_exceptions=True)

    def append(self, samples: np.ndarray) -> None:
        """Manual turns: the caller's audio since the last commit, in order."""
        if self.enabled:
            self.turn.append(samples)
            self._kick()

    def follow(self, detector: TurnDetector) -> None:
        """Server VAD: catch up with the utterance in progress (after each chunk fed to the detector)."""
        if not self.enabled:
            return
        now = detector.utterance(self.turn.samples)
        if now is None:
            return
        offset, samples = now
        if offset != self.utterance:  # a new utterance: its audio from the start
            self.reset()
            self.utterance = offset
            _, samples = detector.utterance(0)
        self.turn.append(samples)
        self._kick()

    def _kick(self) -> None:
        if self.turn.broken or self.turn.next_window() is None:
            return
        if self.work is None or self.work.done():
            self.work = metrics.spawn(self._encode_and_prefill(self.turn), "converse.caller_turn")

    async def _encode_and_prefill(self, turn: TurnWindows) -> None:
        try:
            while turn is self.turn:
                window = turn.next_window()
                if window is not None:
                    await self._encode(turn, window)
                elif turn.version != self.prefilled_version and self.call.model_idle():
                    await self._prefill(turn)
                else:
                    return
        except Exception as exc:  # noqa: BLE001 - the turn is then encoded whole at its end
            turn.broken = True
            metrics.caller_windows("failed")
            log.warning("encoding session %s's turn while it is spoken failed: %s", self.call.session_id, exc)

    async def _encode(self, turn: TurnWindows, window: int) -> None:
        """Window `window`, and those the max it brings made stale."""
        tokenizer = self.call.service.services.tokenizer
        todo = [window]
        while todo:
            w = todo.pop(0)
            floor_top = turn.top
            rows, own_top, low = await tokenizer.encode_window(turn.segment(w), w, floor_top)
            metrics.caller_windows("encoded" if w == len(turn.windows) else "encoded_again")
            todo += [s for s in turn.add(w, rows, own_top, low, floor_top) if s not in todo]

    async def _prefill(self, turn: TurnWindows) -> None:
        """The windows into the kept rows, after the conversation's history (read now: the last reply
        is stored by the time no reply is generating)."""
        call = self.call
        version, held = turn.version, len(turn.windows)
        record = await store_call(call.service.store.get(call.session_id))
        request = call.turn_template()
        sent = await call.service.runner.prefill_ahead(request, record.turns, turn.rows(held))
        self.prefilled_version = version
        if sent:
            metrics.caller_windows("prefilled", max(0, held - self.prefilled))
            self.prefilled = held
