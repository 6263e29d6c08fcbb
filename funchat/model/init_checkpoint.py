"""`funchat init-checkpoint`: write a random checkpoint directory in the public layout.

The result (config.json, model.safetensors with the public parameter names, tokenizer files,
generation and preprocessor configs) loads through exactly the same path as a released checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

from funchat.model.checkpoint import build_model, randomize, save_checkpoint
from funchat.model.config import FunAudioChatConfig
from funchat.model.presets import preset_config
from funchat.text.tokenizer import build_tiny_tokenizer

# The Whisper feature extractor settings the reference processor uses (128 bins, 16 kHz, 10 ms hop).
PREPROCESSOR_CONFIG = {
    "feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 128, "sampling_rate": 16000,
    "hop_length": 160, "n_fft": 400, "chunk_length": 30, "n_samples": 480000, "nb_max_frames": 3000,
    "padding_side": "right", "padding_value": 0.0, "return_attention_mask": True,
}


def init_checkpoint(preset: str, out_dir: str | Path, seed: int = 0, max_shard_bytes: int | None = None,
                    vocoder: bool = True) -> Path:
    raw = preset_config(preset)
    cfg = FunAudioChatConfig.from_dict(raw)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tiny_tokenizer(out, vocab_size=cfg.text.vocab_size)  # first: it is the step that can refuse
    model = randomize(build_model(cfg), seed)
    save_checkpoint(model, out, max_shard_bytes=max_shard_bytes)
    gen = {"bos_token_id": raw["text_config"]["bos_token_id"], "eos_token_id": cfg.eos_token_id,
           "do_sample": True, "temperature": 0.8, "top_p": 0.9, "top_k": 0, "repetition_penalty": 1.2,
           "max_new_tokens": 512}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    (out / "preprocessor_config.json").write_text(json.dumps(dict(PREPROCESSOR_CONFIG, feature_size=cfg.audio.num_mel_bins),
                                                             indent=2) + "\n")
    if vocoder:  # the CosyVoice 3 token2wav in vocoder/: the full shapes only with the 8b preset
        from funchat.vocoder.checkpoint import VOCODER_DIR, init_vocoder

        init_vocoder(out / VOCODER_DIR, preset="full" if preset == "8b" else "tiny", seed=seed)
    return out
