"""The audio_tokenizer service's logic: 16 kHz clips -> the 5 Hz LLM input rows of their <|AUDIO|> positions.

Same computation as `funchat.oracle.pipeline.ReferencePipeline.encode_audio`: Whisper log-mel
(`funchat.model.mel`), then `FunAudioChat.encode_audio` (windowed encoder, mean of 5, Linear).
Stateless. Each request is checked on its own (`check`), then the good ones of a batch are encoded
together in one encoder call (`encode`).

Three kinds of request (`TokenizerRequest`):
- a whole clip: all its rows;
- one encoder window of a turn still being spoken (`window`): the samples its mel frames read
  (`EncoderWindows.segment`) -> its rows, floored at (max(top, the window's own max) - 8), and the
  window's own log-mel max and min, with which the caller keeps its windows consistent;
- the end of such a turn (`encoded` > 0, the caller holding windows 0 .. encoded - 1): the samples
  from where window `encoded` reads on, and `top`, the held windows' log-mel max -> the rows of the
  rest of the turn, floored at the whole turn's max (max(top, the rest's own)), and that max: the
  caller encodes again the held windows it makes stale (`funchat.orchestrator.turn_windows`).

Shapes: n samples, g groups (<|AUDIO|> positions), E LLM width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from funchat.audio_io import SAMPLE_RATE, validate_audio
from funchat.encoder_windows import EncoderWindows
from funchat.engines.triton_adapter import ServiceParams
from funchat.errors import AudioInputError
from funchat.model.checkpoint import ENCODER_PREFIXES, load_model
from funchat.model.funaudiochat import FunAudioChat
from funchat.model.mel import clip_end_log10_mel, floor_and_scale, window_log10_mel
from funchat.turn.prompt import CONTEXT_TOKENS, check_clip, speech_frames_for_samples


@dataclass
class TokenizerRequest:
    clip: np.ndarray  # [n] float32: a whole clip, or one window's segment
    window: int | None = None  # the segment of this encoder window (None: a whole clip)
    top: float = -math.inf  # window: the turn's floor top so far; end of turn: the held windows' max
    encoded: int = 0  # end of turn: the windows the caller holds; `clip` is the rest of the turn


@dataclass
class Encoded:
    rows: np.ndarray  # [g, E] float32
    first_window: int = 0  # the rows start at this encoder window
    top: float = 0.0  # the log-mel max: a window's own, or the whole turn's
    low: float = 0.0  # a window's log-mel min (before the floor)


class AudioTokenizerEngine:
    def __init__(self, model: FunAudioChat, device: str, context_tokens: int = CONTEXT_TOKENS):
        self.model = model
        self.device = device
        self.context_tokens = context_tokens
        self.n_mels = model.cfg.audio.num_mel_bins
        self.group_size = model.cfg.audio.group_size
        self.windows = EncoderWindows(model.cfg.audio.n_window, self.group_size)

    def check(self, audio: np.ndarray, window: int | None = None, top: float | None = None,
              encoded: int = 0) -> TokenizerRequest:
        """AUDIO [1, n] as sent (and the optional WINDOW, TOP, ENCODED) -> the request;
        AudioInputError naming the problem. The positions rule is the prompt's (funchat.turn.prompt),
        so a clip the service accepts fits the prompt the orchestrator builds for it."""
        if audio.ndim != 2 or audio.shape[0] != 1:
            raise AudioInputError(f"AUDIO has shape {list(audio.shape)}: send one clip per request, shape [1, n]")
        clip = validate_audio(audio[0], SAMPLE_RATE, source="AUDIO")
        if top is not None and math.isnan(top):
            raise AudioInputError("TOP is NaN: send the log-mel max the service returned")
        top = -math.inf if top is None else float(top)
        if window is not None:
            if encoded:
                raise AudioInputError("WINDOW and ENCODED exclude each other: a window request encodes one window")
            if window < 0:
                raise AudioInputError(f"WINDOW is {window}: windows count from 0")
            start, end = self.windows.segment(window)
            if len(clip) != end - start:
                raise AudioInputError(f"AUDIO has {len(clip)} samples; window {window} reads {end - start} "
                                      f"(samples {start} to {end} of the turn)")
            return TokenizerRequest(clip, window, top)
        if encoded < 0:
            raise AudioInputError(f"ENCODED is {encoded}: send the number of windows held, or none")
        start = self.windows.segment(encoded)[0] if encoded else 0  # where the rest of the turn begins
        check_clip(start + len(clip), self.group_size, self.context_tokens, what="AUDIO")
        if encoded:
            ready = self.windows.ready(start + len(clip))
            if ready < encoded:
                raise AudioInputError(f"ENCODED is {encoded}, but a turn of {start + len(clip)} samples (AUDIO: "
                                      f"its {len(clip)} from sample {start} on) has {ready} whole windows")
            if not math.isfinite(top):
                raise AudioInputError(f"TOP is {top}: with ENCODED send the log-mel max of the windows held")
        return TokenizerRequest(clip, None, top, encoded)

    @torch.inference_mode()
    def encode(self, requests: list[TokenizerRequest]) -> list[Encoded]:
        """Checked requests -> their rows, in one encoder call."""
        mels, frames, meta = [], [], []
        for req in requests:
            mel, n_frames, info = self._log_mel(req)
            mels.append(mel.to(self.device))
            frames.append(n_frames)
            meta.append(info)
        todo = [i for i, n in enumerate(frames) if n > 0]  # the end of a turn may hold no 25 Hz frame
        encoded = dict(zip(todo, self.model.encode_audio([mels[i] for i in todo], [frames[i] for i in todo])
                           if todo else []))
        width = self.model.cfg.text.hidden_size
        return [Encoded(encoded[i].float().cpu().numpy() if i in encoded else np.zeros((0, width), np.float32),
                        **info) for i, info in enumerate(meta)]

    def _log_mel(self, req: TokenizerRequest) -> tuple[torch.Tensor, int, dict]:
        """-> (the log-mel to encode [n_mels, F], its 25 Hz frames, what else the answer says)."""
        window_frames = self.windows.groups * self.group_size  # 25 Hz frames of one whole window
        if req.window is not None:
            raw = window_log10_mel(req.clip, at_clip_start=req.window == 0, n_mels=self.n_mels)  # [n_mels, 200]
            own_top, low = float(raw.max()), float(raw.min())
            mel = floor_and_scale(raw, max(req.top, own_top))
            return mel, window_frames, {"first_window": req.window, "top": own_top, "low": low}
        start = self.windows.segment(req.encoded)[0] if req.encoded else 0
        raw, n_mel = clip_end_log10_mel(req.clip, start, n_mels=self.n_mels)  # [n_mels, F - first + tail]
        top = max(req.top, float(raw.max()))  # the whole turn's: the held windows' and the rest's
        mel = floor_and_scale(raw[:, :n_mel], top)
        n_frames = speech_frames_for_samples(start + len(req.clip), SAMPLE_RATE) - req.encoded * window_frames
        return mel, n_frames, {"first_window": req.encoded, "top": top}


def load_audio_tokenizer_engine(params: ServiceParams) -> AudioTokenizerEngine:
    """The audio_tokenizer service's engine from its config parameters: `checkpoint`, `device`,
    `dtype`, `threads`, `context_tokens`. Only the encoder and the grouping adaptor are read; the
    LLM and the SRH stay on the meta device (no memory)."""
    context_tokens = params.integer("context_tokens", CONTEXT_TOKENS, minimum=1)
    params.apply_threads()
    model = load_model(params.checkpoint, dtype=params.dtype, device=params.device, prefixes=ENCODER_PREFIXES)
    return AudioTokenizerEngine(model, params.device, context_tokens)
