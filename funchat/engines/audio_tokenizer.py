"""The audio_tokenizer service's logic: 16 kHz clips -> the 5 Hz LLM input rows of their <|AUDIO|> positions.

Same computation as `funchat.oracle.pipeline.ReferencePipeline.encode_audio`: Whisper log-mel
(`funchat.model.mel`), then `FunAudioChat.encode_audio` (windowed encoder, mean of 5, Linear).
Stateless. Each clip is checked on its own (`check`), then the good ones of a batch are encoded
together in one encoder call (`encode`).

Shapes: n samples, g groups (<|AUDIO|> positions), E LLM width.
"""

from __future__ import annotations

import numpy as np
import torch

from funchat.audio_io import SAMPLE_RATE, validate_audio
from funchat.engines.triton_adapter import ServiceParams
from funchat.errors import AudioInputError
from funchat.model.checkpoint import ENCODER_PREFIXES, load_model
from funchat.model.funaudiochat import FunAudioChat
from funchat.model.mel import log_mel_spectrogram
from funchat.turn.prompt import CONTEXT_TOKENS, check_clip, speech_frames_for_samples


class AudioTokenizerEngine:
    def __init__(self, model: FunAudioChat, device: str, context_tokens: int = CONTEXT_TOKENS):
        self.model = model
        self.device = device
        self.context_tokens = context_tokens
        self.n_mels = model.cfg.audio.num_mel_bins
        self.group_size = model.cfg.audio.group_size

    def check(self, audio: np.ndarray) -> np.ndarray:
        """AUDIO [1, n] as sent -> the clip [n] float32; AudioInputError naming the problem.
        The positions rule is the prompt's (funchat.turn.prompt), so a clip the service accepts fits
        the prompt the orchestrator builds for it."""
        if audio.ndim != 2 or audio.shape[0] != 1:
            raise AudioInputError(f"AUDIO has shape {list(audio.shape)}: send one clip per request, shape [1, n]")
        clip = validate_audio(audio[0], SAMPLE_RATE, source="AUDIO")
        check_clip(len(clip), self.group_size, self.context_tokens, what="AUDIO")
        return clip

    @torch.inference_mode()
    def encode(self, clips: list[np.ndarray]) -> list[np.ndarray]:
        """Checked clips [n_i] -> their rows [g_i, E] float32, in one encoder call."""
        mels = [log_mel_spectrogram(c, n_mels=self.n_mels).to(self.device) for c in clips]
        frames = [speech_frames_for_samples(len(c), SAMPLE_RATE) for c in clips]
        return [rows.float().cpu().numpy() for rows in self.model.encode_audio(mels, frames)]


def load_audio_tokenizer_engine(params: ServiceParams) -> AudioTokenizerEngine:
    """The audio_tokenizer service's engine from its config parameters: `checkpoint`, `device`,
    `dtype`, `threads`, `context_tokens`. Only the encoder and the grouping adaptor are read; the
    LLM and the SRH stay on the meta device (no memory)."""
    context_tokens = params.integer("context_tokens", CONTEXT_TOKENS, minimum=1)
    params.apply_threads()
    model = load_model(params.checkpoint, dtype=params.dtype, device=params.device, prefixes=ENCODER_PREFIXES)
    return AudioTokenizerEngine(model, params.device, context_tokens)
