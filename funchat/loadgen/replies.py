"""Each reply as the caller experiences it: when its audio came, how it played, how it ended.

Playback is `funchat call`'s loudspeaker model (funchat.client.call.Player): a reply plays from its
first chunk, chunk after chunk; a chunk that arrives after the audio received before it has finished
playing is an underrun (the player ran dry and waits for it, then plays on from its arrival).
"""

from __future__ import annotations

from dataclasses import dataclass

from funchat.api import pb
from funchat.client.call import Player
from funchat.client.config import OUTPUT_SAMPLE_RATE


@dataclass
class ReplyState:
    response_id: str
    created_at: float | None = None
    first_audio_at: float | None = None
    audio_s: float = 0.0
    server_end_ms: int = 0       # the end of the audio as the server counts it (start_ms + length)
    underruns: int = 0
    underrun_s: float = 0.0
    interrupted_at: float | None = None
    done_at: float | None = None
    status: str = ""
    error: str = ""              # the code of an error event that belongs to this reply
    error_message: str = ""


class ReplyTracker:
    """Feed it every server event (with its arrival time, time.monotonic()); it keeps a ReplyState
    per response and the simulated loudspeaker."""

    def __init__(self):
        self.player = Player()
        self.replies: dict[str, ReplyState] = {}

    def reply(self, response_id: str) -> ReplyState:
        if response_id not in self.replies:
            self.replies[response_id] = ReplyState(response_id)
        return self.replies[response_id]

    def on_event(self, t: float, event: pb.ServerEvent) -> ReplyState | None:
        """Update the reply the event belongs to and return it (None for other events)."""
        kind = event.WhichOneof("event")
        if kind == "response_created":
            state = self.reply(event.response_created.response_id)
            state.created_at = t
        elif kind == "audio_delta":
            delta = event.audio_delta
            state = self.reply(delta.response_id)
            if delta.response_id in self.player.stopped:
                return state  # audio of a reply already cut: the player drops it
            due = self.player.cursor.get(delta.response_id)  # when the audio received so far runs out
            if due is not None and t > due:
                state.underruns += 1
                state.underrun_s += t - due
            if state.first_audio_at is None:
                state.first_audio_at = t
            self.player.add(t, delta)
            samples = len(delta.pcm16) // 2
            state.audio_s += samples / OUTPUT_SAMPLE_RATE
            rate = delta.sample_rate_hz or OUTPUT_SAMPLE_RATE
            state.server_end_ms = max(state.server_end_ms, delta.start_ms + samples * 1000 // rate)
        elif kind == "interrupted":
            state = self.reply(event.interrupted.response_id)
            state.interrupted_at = t
            self.player.stop(state.response_id, t)
        elif kind == "response_done":
            state = self.reply(event.response_done.response_id)
            state.done_at = t
            state.status = event.response_done.status
        else:
            return None
        return state

    def played_ms(self, response_id: str, t: float) -> int:
        """Reply audio the caller has heard by t."""
        return self.player.played_ms(response_id, t)

    def ack_ms(self, response_id: str, t: float) -> int:
        """What a playback ack reports at t: the heard position, and once everything received has
        played, the server's own count of the reply's audio (so that rounding never leaves a
        finished reply looking unfinished to the server, which would treat the caller's next words
        as a barge-in)."""
        played = self.played_ms(response_id, t)
        state = self.replies.get(response_id)
        if state is not None and state.done_at is not None and t >= self.ends_at(response_id):
            return max(played, state.server_end_ms)
        return played

    def ends_at(self, response_id: str) -> float:
        """When the audio received so far will have finished playing (0 before any audio)."""
        return self.player.cursor.get(response_id, 0.0)
