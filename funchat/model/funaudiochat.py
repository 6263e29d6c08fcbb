"""Fun-Audio-Chat: encoder + grouping adaptor + shared Qwen3 LLM + Speech Refined Head.

Submodule names are the public checkpoint's prefixes: `continuous_audio_tower.`, `audio_tower.`,
`language_model.` and `audio_invert_tower.`. This module holds the per-step building blocks; the
turn loop that drives them lives in `funchat.oracle.generation` and its token rules in `funchat.turn.schedule`.

Shapes: B batch, L prompt positions, E LLM width (= hidden size), V text vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

from funchat.errors import PromptError
from funchat.model.adaptor import SpeechGrouping
from funchat.model.config import FunAudioChatConfig
from funchat.model.encoder import AudioEncoder
from funchat.model.qwen3 import KVCache, Qwen3ForCausalLM
from funchat.model.refined_head import RefinedHead, RefinedHeadState, TokenChooser


class FunAudioChat(nn.Module):
    def __init__(self, cfg: FunAudioChatConfig):
        super().__init__()
        self.cfg = cfg
        self.continuous_audio_tower = AudioEncoder(cfg.audio)
        self.audio_tower = SpeechGrouping(cfg.audio)
        self.language_model = Qwen3ForCausalLM(cfg.text)
        self.audio_invert_tower = (
            RefinedHead(cfg.audio, cfg.srh, self.audio_tower.embed_tokens) if cfg.srh is not None else None
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.lm_head.weight.device

    # ---- user audio -> 5 Hz LLM inputs (the audio_tokenizer service) ----

    def encode_audio(self, mels: list[torch.Tensor], speech_frames: list[int]) -> list[torch.Tensor]:
        """Per clip: log-mel [n_mels, F] and its 25 Hz frame count n -> [ceil(n/g), E] embeddings."""
        g = self.cfg.audio.group_size
        encoded = self.continuous_audio_tower([m.to(self.dtype) for m in mels])
        out = []
        for frames, n in zip(encoded, speech_frames):
            padded_len = -(-n // g) * g
            # Rows past the encoder's own output are zeros (the reference pads after the projection).
            padded = frames.new_zeros(padded_len, frames.shape[1])  # [ceil(n/g)*g, E]
            keep = min(padded_len, frames.shape[0])
            padded[:keep] = frames[:keep]
            out.append(self.audio_tower.group_features(padded[None])[0])
        return out

    def encode_audio_padded(self, mels: list[torch.Tensor], speech_frames: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder output as the reference batches it: [N, max padded len, E] and the adaptor output."""
        g = self.cfg.audio.group_size
        encoded = self.continuous_audio_tower([m.to(self.dtype) for m in mels])
        max_len = -(-max(speech_frames) // g) * g
        enc = encoded[0].new_zeros(len(encoded), max_len, encoded[0].shape[1])  # [N, T25, E]
        for i, frames in enumerate(encoded):
            keep = min(max_len, frames.shape[0])
            enc[i, :keep] = frames[:keep]
        return enc, self.audio_tower.group_features(enc)

    # ---- LLM inputs ----

    def embed_prompt(self, input_ids: torch.Tensor, audio: list[torch.Tensor]) -> torch.Tensor:
        """input_ids [1, L] with `<|AUDIO|>` runs; audio: per clip [n_i, E] -> inputs [1, L, E]."""
        embeds = self.language_model.embed(input_ids)  # [1, L, E]
        slots = input_ids == self.cfg.audio_token_index  # [1, L]
        rows = torch.cat(audio, dim=0) if audio else embeds.new_zeros(0, embeds.shape[-1])
        if int(slots.sum()) != rows.shape[0]:
            raise PromptError(f"the prompt has {int(slots.sum())} <|AUDIO|> positions but the audio gives "
                              f"{rows.shape[0]} embeddings")
        embeds = embeds.clone()
        embeds[slots] = rows.to(embeds.dtype)
        return embeds

    def embed_step(self, text_tokens: torch.Tensor, speech_groups: torch.Tensor | None = None,
                   fuse: torch.Tensor | None = None) -> torch.Tensor:
        """Assistant-side input of one step: [B] text ids (+ [B, g] speech ids) -> [B, 1, E].

        Rows where `fuse` is True get (E_text(text) + G(speech group)) / 2 (a mean, not a sum);
        the others get the plain text embedding.
        """
        text = self.language_model.embed(text_tokens)[:, None]  # [B, 1, E]
        if speech_groups is None:
            return text
        fused = (text + self.audio_tower.group_tokens(speech_groups)) / 2  # [B, 1, E]
        if fuse is None:
            return fused
        return torch.where(fuse[:, None, None], fused, text)

    # ---- shared LLM ----

    def new_llm_cache(self, batch: int, capacity: int = 256) -> KVCache:
        return self.language_model.model.new_cache(batch, capacity)

    def llm_forward(self, inputs: torch.Tensor, cache: KVCache | None,
                    lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs [B, T, E] -> (final-normed hidden [B, T, E], logits of each row's last real position [B, V])."""
        hidden = self.language_model.model(inputs, cache, lengths)
        b, t, _ = hidden.shape
        last = (lengths - 1) if lengths is not None else torch.full((b,), t - 1, device=hidden.device)
        logits = self.language_model.lm_head(hidden[torch.arange(b, device=hidden.device), last]).float()
        return hidden, logits

    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.lm_head(hidden).float()

    # ---- Speech Refined Head ----

    def new_srh_state(self, batch: int, capacity: int = 1024) -> RefinedHeadState:
        if self.audio_invert_tower is None:
            raise PromptError("this checkpoint has no Speech Refined Head (audio_invert_tower); use s2t mode")
        return self.audio_invert_tower.new_state(batch, capacity)

    def srh_forward(self, hidden: torch.Tensor, input_ids: torch.Tensor, state: RefinedHeadState,
                    choose: TokenChooser, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """LLM hidden [B, T, E] and the text ids that were its inputs [B, T] -> speech tokens [B, g].

        The SRH sees hidden + E_text(input id): for the prompt, `<|AUDIO|>` rows use the plain
        embedding of the placeholder id, as in the reference.
        """
        h = hidden + self.language_model.embed(input_ids)
        return self.audio_invert_tower(h, state, choose, lengths)
