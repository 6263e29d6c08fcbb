"""How a simulated caller behaves on the wire: the session it asks for and its timing."""

from __future__ import annotations

from dataclasses import dataclass

from funchat.api import pb
from funchat.client.config import session_config


@dataclass(frozen=True)
class CallerSettings:
    mode: str = "s2s"
    turn_detection: str = "server_vad"  # "manual": the caller commits after each utterance
    # True: a live caller, whose microphone sends a chunk every chunk_ms (its speech, else silence)
    # and whose loudspeaker plays the replies in real time; False: each turn's audio goes as fast
    # as the call takes it, then commit, and the next turn follows the reply's response_done (the
    # benchmark's way: it measures the server, not a conversation).
    realtime: bool = True
    chunk_ms: int = 100
    max_new_tokens: int = 0           # 0: the server's default
    greedy: bool = False
    vad_silence_ms: int = 500         # server VAD: silence that ends a turn (sent explicitly, see converse.py)
    think_s: float = 0.5              # a listener's pause after a reply before speaking again
    silent_s: float = 2.0             # how long a caller that goes silent sends nothing (no audio, no acks)
    turn_timeout_s: float = 60.0      # end of the caller's speech -> response_done, at most
    barge_in_timeout_s: float = 5.0   # speech over a playing reply -> `interrupted`, at most
    connect_timeout_s: float = 10.0   # call opened -> session_created, at most

    def __post_init__(self):
        if not 10 <= self.chunk_ms <= 1000:
            raise ValueError(f"chunk_ms must be in 10..1000 (the server takes at most 1 s per chunk), "
                             f"got {self.chunk_ms}")
        if self.turn_detection not in ("server_vad", "manual"):
            raise ValueError(f"turn_detection must be server_vad or manual, got {self.turn_detection!r}")
        if not 100 <= self.vad_silence_ms <= 10000:
            raise ValueError(f"vad_silence_ms must be in 100..10000 (the server's range), got {self.vad_silence_ms}")

    @property
    def server_vad(self) -> bool:
        return self.turn_detection == "server_vad"

    def session(self, seed: int | None = None) -> pb.SessionConfig:
        return session_config(mode=self.mode, turn_detection=self.turn_detection, greedy=self.greedy, seed=seed,
                              max_new_tokens=self.max_new_tokens,
                              silence_ms=self.vad_silence_ms if self.server_vad else None)
