"""How a turn's tokens are chosen: the settings, and which seeded stream each kind of token uses.

Torch-free, so the orchestrator can validate a caller's settings and pass them to the model
services, which do the drawing (`funchat.model.sampling.select`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    greedy: bool = False
    temperature: float = 0.8
    top_p: float = 0.9
    top_k: int = 0
    repetition_penalty: float = 1.2

    def __post_init__(self):
        for name in ("temperature", "top_p", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number (got {getattr(self, name)})")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (got {self.temperature}); use greedy for argmax")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (got {self.top_k})")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (got {self.repetition_penalty})")


GREEDY = SamplingParams(greedy=True)


# A turn's seed feeds two streams: the refined head's speech draws and the LLM's text draws. They
# are separate so that each model service can draw its own tokens and still give the oracle's turn.
def speech_seed(seed: int) -> int:
    return seed


def text_seed(seed: int) -> int:
    return seed + 1
