"""What a simulated caller measured: one TurnRecord per turn, one CallRecord per call.

Plain dataclasses that convert to and from dicts of plain values, so that Locust workers can ship
them to the master (msgpack) and the report can be rebuilt from a JSON file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

# What the caller did while a reply played (plan.py chooses it; a behaviour whose moment never came,
# because the reply was shorter, is recorded as "listen").
LISTEN, BARGE_IN, SILENT, HANG_UP = "listen", "barge_in", "silent", "hang_up"
BEHAVIOURS = (LISTEN, BARGE_IN, SILENT, HANG_UP)

# Client-side error codes, next to the gRPC status names and the server's error-event codes.
TIMEOUT = "TIMEOUT"                    # no response_done within the turn timeout
NO_TURN = "NO_TURN"                    # the server never answered the caller's speech (no response_created)
BARGE_IN_IGNORED = "BARGE_IN_IGNORED"  # the caller spoke over a playing reply and it was never interrupted
CLIENT_ERROR = "CLIENT_ERROR"          # the load generator itself failed (a bug: the message says where)


@dataclass
class TurnRecord:
    kind: str            # "converse", "respond" or "oracle"
    call_id: str
    index: int           # turn number within its call, from 0
    started_at: float    # wall clock (time.time()) when the caller began the turn: places it in a load level
    behaviour: str = LISTEN
    status: str = ""     # the reply's status (completed, interrupted, cancelled, failed), "hung_up", or "" if none
    first_audio_s: float | None = None           # end of the caller's turn -> first reply audio chunk
    speech_end_to_audio_s: float | None = None   # end of the caller's speech -> first audio (adds the VAD's wait)
    reply_s: float | None = None                 # end of the caller's turn -> response_done
    audio_s: float = 0.0                         # reply audio received
    underruns: int = 0                           # times the simulated player ran dry
    underrun_s: float = 0.0                      # total time it waited for late chunks
    barge_in_s: float | None = None              # caller speech restarted -> `interrupted` (behaviour barge_in)
    error: str = ""                              # gRPC status name, error-event code or a client code above
    error_message: str = ""

    @property
    def rtf(self) -> float | None:
        """Real-time factor: reply time / reply audio, for completed replies with audio (a cut reply's
        audio is not what it would have been, so it has none)."""
        if self.status != "completed" or self.error or self.reply_s is None or self.audio_s <= 0:
            return None
        return self.reply_s / self.audio_s

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TurnRecord":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class CallRecord:
    kind: str
    call_id: str
    started_at: float                # wall clock
    duration_s: float = 0.0
    turns: list[TurnRecord] = field(default_factory=list)
    hung_up: bool = False            # the caller hung up mid-reply, as planned

    @property
    def errors(self) -> list[str]:
        return [t.error for t in self.turns if t.error]

    def to_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in asdict(self).items() if k != "turns"},
                "turns": [t.to_dict() for t in self.turns]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CallRecord":
        return cls(kind=data["kind"], call_id=data["call_id"], started_at=data["started_at"],
                   duration_s=data.get("duration_s", 0.0), hung_up=data.get("hung_up", False),
                   turns=[TurnRecord.from_dict(t) for t in data.get("turns", [])])
