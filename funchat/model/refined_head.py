"""`audio_invert_tower`: the Speech Refined Head (SRH), one LLM step -> five 25 Hz speech tokens.

h = LLM final hidden + E_text(input token) is split by `pre_matching` into g sub-frames. Sub-frame j
plus the embedding of the previous speech token goes through `input_matching`, the small Qwen3
`crq_transformer` (its own KV cache over the whole call, g positions per LLM position),
`output_matching` and the speech `lm_head` (tied to `audio_tower.embed_tokens`); the token is
chosen before sub-frame j+1 runs. For a block of L positions (the prompt) the first call covers
sub-frames 0 .. L*g-g at once, all with the same previous-token embedding, as the reference does.

Shapes: B batch, L LLM positions, g group size, E LLM width, V speech codebook.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from funchat.model.config import AudioConfig, Qwen3Config
from funchat.model.qwen3 import KVCache, Qwen3Model

# choose(sub_step, logits [B, V] float32) -> token ids [B]
TokenChooser = Callable[[int, torch.Tensor], torch.Tensor]

# Sub-frames per crq_transformer forward when it needs an attention mask (a prefill that continues a
# kept row or a partial chunk): a long one (5 sub-frames per LLM position) runs in blocks of this many
# (`Qwen3Model.masked_block`), bounding its queries x keys transient by the block, not the prompt's square.
PREFILL_BLOCK = 1024


@dataclass
class RefinedHeadState:
    """Per-call SRH state: its KV cache and the embedding of the last token it produced."""

    cache: KVCache
    prev_embed: torch.Tensor  # [B, E]


class RefinedHead(nn.Module):
    def __init__(self, cfg: AudioConfig, srh_cfg: Qwen3Config, codebook: nn.Embedding):
        super().__init__()
        self.cfg = cfg
        e = cfg.output_dim
        self.pre_matching = nn.Linear(e, e * cfg.group_size, bias=True)
        self.crq_transformer = Qwen3Model(srh_cfg, with_embeddings=False)
        self.input_matching = nn.Linear(e, srh_cfg.hidden_size, bias=False)
        self.output_matching = nn.Linear(srh_cfg.hidden_size, e, bias=False)
        self.crq_transformer.masked_block = PREFILL_BLOCK
        # The output head is the speech embedding table itself (tied, not stored in checkpoints);
        # a tuple keeps it out of this module's parameters so it is not saved twice.
        self._codebook = (codebook,)

    @property
    def codebook(self) -> torch.Tensor:
        return self._codebook[0].weight  # [V, E]

    def new_state(self, batch: int, capacity: int = 256) -> RefinedHeadState:
        bos = self.codebook[self.cfg.bos_token_id]  # [E]
        return RefinedHeadState(self.crq_transformer.new_cache(batch, capacity), bos[None].repeat(batch, 1))

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden [B, E_srh] -> [B, V] float32
        return (self.output_matching(hidden) @ self.codebook.T).float()

    def extend(self, h: torch.Tensor, state: RefinedHeadState, lengths: torch.Tensor | None = None) -> None:
        """A prompt chunk that does not end the prompt: h [B, L, E] (right-padded) -> every sub-frame
        of every position into the cache, all with the previous-token embedding, as `forward` computes
        the sub-frames of a whole prompt's positions before its last; no token is chosen."""
        b, l, e = h.shape
        g = self.cfg.group_size
        if lengths is None:
            lengths = torch.full((b,), l, dtype=torch.long, device=h.device)
        x = self.pre_matching(h).reshape(b, l * g, e) + state.prev_embed[:, None]  # [B, L*g, E]
        self.crq_transformer(self.input_matching(x), state.cache, lengths * g)

    def forward(self, h: torch.Tensor, state: RefinedHeadState, choose: TokenChooser,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        """h [B, L, E] (right-padded; `lengths` [B] real positions) -> chosen tokens [B, g]."""
        first, last_sub = self.first_sub_frames(h, state, choose, lengths)
        tokens = [first]
        for j in range(1, self.cfg.group_size):
            x = (last_sub[:, j] + state.prev_embed)[:, None]  # [B, 1, E]
            out = self.crq_transformer(self.input_matching(x), state.cache, torch.ones_like(first))  # [B, 1, E_srh]
            token = choose(j, self._logits(out[:, 0]))  # [B]
            tokens.append(token)
            state.prev_embed = self.codebook[token]  # [B, E]
        return torch.stack(tokens, dim=1)  # [B, g]

    def first_sub_frames(self, h: torch.Tensor, state: RefinedHeadState, choose: TokenChooser,
                         lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A block's sub-frames 0 .. L*g-g of each row, all with the previous token's embedding, and
        the first token -> (token [B], the last real position's g sub-frames [B, g, E]: the one-position
        sub-steps j = 1 .. g-1 that follow, here or in a fixed-shape step runner)."""
        b, l, e = h.shape
        g = self.cfg.group_size
        if lengths is None:
            lengths = torch.full((b,), l, dtype=torch.long, device=h.device)
        rows = torch.arange(b, device=h.device)
        sub = self.pre_matching(h).reshape(b, l * g, e)  # [B, L*g, E]
        x = sub[:, : l * g - (g - 1)] + state.prev_embed[:, None]  # [B, L*g-g+1, E]
        new_lens = lengths * g - (g - 1)
        out = self.crq_transformer(self.input_matching(x), state.cache, new_lens)  # [B, T, E_srh]
        token = choose(0, self._logits(out[rows, new_lens - 1]))  # [B]
        state.prev_embed = self.codebook[token]  # [B, E]
        return token, sub.reshape(b, l, g, e)[rows, lengths - 1]  # [B], [B, g, E]
