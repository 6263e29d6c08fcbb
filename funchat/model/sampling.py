"""Token selection: greedy, or repetition penalty -> temperature -> top-k -> top-p -> multinomial.

The order and the arithmetic follow the Hugging Face logits processors the reference uses, so a
given seed and generator give the same draws. Shapes: B batch, V vocabulary, n history length.
"""

from __future__ import annotations

import torch

from funchat.turn.sampling import GREEDY, SamplingParams  # noqa: F401  (re-exported)


def penalty_history(ids: list[int], params: SamplingParams, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """The ids the repetition penalty looks at as [1, n], or None when they cannot matter (greedy or
    no penalty): the decode loops call this every step, so the list is not copied for nothing."""
    if params.greedy or params.repetition_penalty == 1.0:
        return None
    return torch.tensor([ids], dtype=torch.long, device=device)


def apply_repetition_penalty(scores: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """scores [B, V]; history [B, n] ids already produced: divide positive scores, multiply negative."""
    if penalty == 1.0 or history.shape[-1] == 0:
        return scores
    picked = torch.gather(scores, 1, history)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores.scatter(1, history, picked)


def warp(scores: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) filtering; removed entries become -inf."""
    if params.temperature != 1.0:
        scores = scores / params.temperature
    if params.top_k > 0:
        k = min(params.top_k, scores.shape[-1])
        kth = torch.topk(scores, k).values[..., -1, None]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - params.top_p)
        remove[..., -1:] = False  # always keep the most likely token
        scores = scores.masked_fill(remove.scatter(1, order, remove), -float("inf"))
    return scores


def select(logits: torch.Tensor, params: SamplingParams, history: torch.Tensor | None,
           generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] float32 -> chosen ids [B]. Greedy is the argmax of the raw logits."""
    if params.greedy:
        return torch.argmax(logits, dim=-1)
    scores = logits
    if history is not None:
        scores = apply_repetition_penalty(scores, history, params.repetition_penalty)
    probs = warp(scores, params).softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
