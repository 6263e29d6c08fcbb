"""The oracle: the whole model in one process, `respond(audio, history, mode)`.

Speech in (16 kHz mono float32), text and speech tokens out, every LLM step reported as it is
produced. No network, no services: this is the ground truth the cluster must reproduce exactly
under greedy decoding.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from funchat.audio_io import SAMPLE_RATE, validate_audio
from funchat.errors import PromptError
from funchat.model.checkpoint import load_model
from funchat.model.mel import log_mel_spectrogram
from funchat.oracle.generation import GenerationConfig, StepCallback, generate
from funchat.turn.prompt import CONTEXT_TOKENS, PromptBuilder, PromptTurn, speech_frames_for_samples
from funchat.turn.schedule import Mode


@dataclass
class TurnResult:
    text: str
    text_tokens: list[int]  # as the reference returns them (audio_bos first in s2s, audio_eos where speech ended)
    text_tokens_emitted: list[int]
    speech_tokens: list[int]  # every SRH group appended, specials included
    vocoder_tokens: list[int]  # speech_tokens restricted to codes 0..6560
    mode: str
    prompt_tokens: int
    history_turns_dropped: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage

    def to_json(self) -> dict[str, Any]:
        return {
            "text": self.text, "text_tokens": self.text_tokens, "text_tokens_emitted": self.text_tokens_emitted,
            "speech_tokens": self.speech_tokens, "vocoder_tokens": self.vocoder_tokens, "mode": self.mode,
            "prompt_tokens": self.prompt_tokens, "history_turns_dropped": self.history_turns_dropped,
            "timings": self.timings,
        }


class ReferencePipeline:
    """Loads a checkpoint once; answers turns in process."""

    def __init__(self, checkpoint: str | Path, dtype: str | torch.dtype = "float32", device: str = "cpu",
                 context_tokens: int = CONTEXT_TOKENS):
        self.checkpoint = Path(checkpoint)
        self.model = load_model(self.checkpoint, dtype=dtype, device=device)
        self.prompts = PromptBuilder.from_checkpoint(self.checkpoint, self.model.cfg.raw, context_tokens)
        self.tokenizer = self.prompts.tokenizer
        self.special = self.prompts.special
        self.token_ids = self.prompts.token_ids
        self.context_tokens = context_tokens

    # ---- audio ----

    def audio_groups(self, n_samples: int) -> int:
        """5 Hz positions a clip of n samples (16 kHz) takes in the prompt."""
        return self.prompts.audio_groups(n_samples)

    @torch.inference_mode()
    def encode_audio(self, audio: np.ndarray) -> torch.Tensor:
        """16 kHz mono samples -> [n_groups, E] LLM input embeddings."""
        mel = log_mel_spectrogram(audio, n_mels=self.model.cfg.audio.num_mel_bins).to(self.model.device)
        frames = speech_frames_for_samples(len(audio), SAMPLE_RATE)
        return self.model.encode_audio([mel], [frames])[0]

    def check_audio(self, audio: np.ndarray, what: str = "audio") -> np.ndarray:
        audio = validate_audio(audio, SAMPLE_RATE, source=what)
        self.prompts.check_clip(len(audio), what)
        return audio

    # ---- turns ----

    def prompt_turns(self, history: Sequence[Mapping[str, Any]]) -> list[PromptTurn]:
        """The history dicts as the prompt builder reads them (a clip becomes its position count)."""
        turns = []
        for turn in history:
            content = turn.get("content")
            if isinstance(content, np.ndarray):
                turns.append(PromptTurn(turn["role"], n_groups=self.audio_groups(len(content))))
            else:
                turns.append(PromptTurn(turn["role"], content, tool_calls=turn.get("tool_calls")))
        return turns

    @torch.inference_mode()
    def respond(self, audio: np.ndarray | None, history: Sequence[Mapping[str, Any]] = (), mode: str | Mode = Mode.S2S,
                system_prompt: str | None = None, tools: list[dict] | None = None,
                gen: GenerationConfig | None = None, on_step: StepCallback | None = None) -> TurnResult:
        """One assistant turn for a user's speech (audio None: no new speech; the reply answers the
        history as it stands, e.g. a user's text or a function's output).

        history: earlier turns, oldest first, as {"role": "user"|"assistant"|"tool", "content": text
        or a 16 kHz float32 array (user speech)}; oldest turns are dropped to fit the context.
        system_prompt: a persona appended to the mode's instruction. Returns tokens and timings.
        """
        mode = Mode.parse(mode)
        gen = gen or GenerationConfig(mode=mode)
        if gen.mode is not mode:
            gen = GenerationConfig(mode=mode, max_new_tokens=gen.max_new_tokens, text=gen.text,
                                   speech=gen.speech, seed=gen.seed)
        if mode is Mode.S2S and self.model.audio_invert_tower is None:
            raise PromptError("this checkpoint has no Speech Refined Head: only s2t mode is available")
        timings: dict[str, float] = {}
        t_start = time.perf_counter()
        audio = self.check_audio(audio) if audio is not None else None
        history = list(history)
        for i, turn in enumerate(history):
            if isinstance(turn.get("content"), np.ndarray):
                self.check_audio(turn["content"], what=f"history turn {i} audio")

        prompt = self.prompts.build(mode.value, system_prompt, tools, self.prompt_turns(history),
                                    self.audio_groups(len(audio)) if audio is not None else 0, gen.max_new_tokens)
        history, dropped = prompt.kept(history), prompt.dropped
        timings["prompt"] = time.perf_counter() - t_start

        t0 = time.perf_counter()
        clips = [turn["content"] for turn in history if isinstance(turn.get("content"), np.ndarray)]
        clips += [audio] if audio is not None else []
        mels = [log_mel_spectrogram(c, n_mels=self.model.cfg.audio.num_mel_bins).to(self.model.device) for c in clips]
        t1 = time.perf_counter()
        frames = [speech_frames_for_samples(len(c), SAMPLE_RATE) for c in clips]
        audio_rows = self.model.encode_audio(mels, frames) if clips else []
        t2 = time.perf_counter()
        timings["mel"], timings["encoder"] = t1 - t0, t2 - t1

        input_ids = torch.tensor([prompt.ids], dtype=torch.long, device=self.model.device)
        embeds = self.model.embed_prompt(input_ids, audio_rows)
        if gen.max_new_tokens != prompt.max_new_tokens:
            gen = GenerationConfig(mode=mode, max_new_tokens=prompt.max_new_tokens, text=gen.text, speech=gen.speech,
                                   seed=gen.seed)
        result = generate(self.model, prompt.ids, embeds, gen, self.token_ids, on_step=on_step)

        llm_steps, srh_steps = result.llm_step_seconds, result.srh_step_seconds
        timings.update(
            llm_prefill=result.steps[0].llm_seconds,
            srh_prefill=result.steps[0].srh_seconds,
            llm_step_mean=float(np.mean(llm_steps)) if llm_steps else 0.0,
            srh_step_mean=float(np.mean(srh_steps)) if srh_steps else 0.0,
            decode=result.decode_seconds,
            total=time.perf_counter() - t_start,
        )
        vocoder = [t for t in result.speech_tokens if 0 <= t < self.token_ids.vocoder_codes]
        text = self.tokenizer.decode(result.text_tokens, skip_special_tokens=True)
        return TurnResult(text=text, text_tokens=result.text_tokens, text_tokens_emitted=result.text_tokens_emitted,
                          speech_tokens=result.speech_tokens, vocoder_tokens=vocoder, mode=mode.value,
                          prompt_tokens=len(prompt.ids), history_turns_dropped=dropped, timings=timings)
