"""`audio_tower`: 25 Hz -> 5 Hz grouping (mean of each 5 vectors, then a bias-free Linear).

Two paths share the grouping rule: continuous encoder features (`continual_output_matching`) for
user audio, and discrete speech tokens (`embed_tokens` then `output_matching`) for the assistant's
own speech fed back into the LLM. Shapes: B batch, G groups, g group size (5), E LLM width.
"""

from __future__ import annotations

import torch
from torch import nn

from funchat.model.config import AudioConfig


def mean_of_groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B, G*g, E] -> [B, G, E]: the mean of each run of `group_size` frames (not a concat)."""
    b, n, e = x.shape
    return x.reshape(b, n // group_size, group_size, e).mean(dim=2)


class SpeechGrouping(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.codebook_size, cfg.output_dim)
        self.output_matching = nn.Linear(cfg.output_dim, cfg.output_dim, bias=False)
        self.continual_output_matching = nn.Linear(cfg.output_dim, cfg.output_dim, bias=False)

    def group_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Speech token ids [B, G*g] -> LLM inputs [B, G, E]."""
        return self.output_matching(mean_of_groups(self.embed_tokens(ids), self.cfg.group_size))

    def group_features(self, features: torch.Tensor) -> torch.Tensor:
        """Encoder output [B, G*g, E] (25 Hz, zero-padded to a multiple of g) -> [B, G, E]."""
        grouped = self.continual_output_matching(mean_of_groups(features, self.cfg.group_size))
        if self.cfg.continuous_features_mode == "add":
            # The reference adds the discrete path of the placeholder ids (all speech pad) to it.
            pad = torch.full(features.shape[:2], self.cfg.pad_token_id, dtype=torch.long, device=features.device)
            grouped = grouped + self.group_tokens(pad)
        return grouped
