"""Model presets as `config.json` dictionaries in the public layout.

- `tiny`: the public layout and key names at toy sizes (CPU, tests, `make run`).
- `mid`: a few hundred million parameters, for CPU benchmarks of realistic per-stage cost.
- `8b`: the real Fun-Audio-Chat-8B shapes (Whisper-large-v3 encoder, Qwen3-8B, 28-layer SRH);
  build it on the meta device for shape checks or randomly on a GPU for benchmarks. A real
  checkpoint's own config.json always wins over these numbers.
"""

from __future__ import annotations

import copy
from typing import Any

from funchat.errors import PresetError

SPEECH_CODEBOOK = 6565  # 6561 codes + bos 6561, eos 6562, pad 6563, one spare
SPEECH_BOS, SPEECH_EOS, SPEECH_PAD = 6561, 6562, 6563
# Text special tokens sit at the top of a preset's vocabulary, in this order (see text/tokenizer.py).
TEXT_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|text_pad|>", "<|AUDIO|>",
                 "<|audio_bos|>", "<|audio_eos|>", "<|audio_pad|>", "<|sil|>")


def _qwen3(hidden: int, ffn: int, layers: int, heads: int, kv_heads: int, head_dim: int, vocab: int,
           rope_theta: float, max_pos: int) -> dict[str, Any]:
    return {
        "model_type": "qwen3", "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "vocab_size": vocab, "rms_norm_eps": 1e-6, "rope_theta": rope_theta, "rope_scaling": None,
        "max_position_embeddings": max_pos, "attention_bias": False, "attention_dropout": 0.0,
        "hidden_act": "silu", "sliding_window": None, "use_sliding_window": False, "use_cache": True,
    }


def _config(*, enc_layers: int, d_model: int, enc_heads: int, enc_ffn: int, llm: dict[str, Any],
            srh: dict[str, Any]) -> dict[str, Any]:
    vocab = llm["vocab_size"]
    special = {name: vocab - len(TEXT_SPECIALS) + i for i, name in enumerate(TEXT_SPECIALS)}
    text_config = dict(llm, bos_token_id=special["<|endoftext|>"], eos_token_id=special["<|im_end|>"],
                       audio_bos_index=special["<|audio_bos|>"], audio_eos_index=special["<|audio_eos|>"],
                       sil_index=special["<|sil|>"], tie_word_embeddings=False)
    srh = dict(srh, tie_word_embeddings=True)
    return {
        "architectures": ["FunAudioChatForConditionalGeneration"],
        "model_type": "funaudiochat",
        "audio_token_index": special["<|AUDIO|>"],
        "hidden_size": llm["hidden_size"],
        "ignore_index": -100,
        "torch_dtype": "float32",
        "audio_config": {
            "model_type": "funaudiochat_audio_encoder",
            "num_mel_bins": 128, "d_model": d_model, "encoder_layers": enc_layers, "num_hidden_layers": enc_layers,
            "encoder_attention_heads": enc_heads, "encoder_ffn_dim": enc_ffn, "n_window": 100,
            "max_source_positions": 1500, "output_dim": llm["hidden_size"], "activation_function": "gelu",
            "scale_embedding": False, "dropout": 0, "attention_dropout": 0, "activation_dropout": 0,
            "codebook_size": SPEECH_CODEBOOK, "group_size": 5, "bos_token_id": SPEECH_BOS,
            "eos_token_id": SPEECH_EOS, "pad_token_id": SPEECH_PAD, "continuous_features_mode": "replace",
            "enable_audio_invert_tower": True, "crq_transformer_config": srh,
        },
        "text_config": text_config,
    }


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": _config(
        enc_layers=2, d_model=64, enc_heads=4, enc_ffn=128,
        llm=_qwen3(64, 128, 2, 4, 2, 16, 1024, 5_000_000.0, 4096),
        srh=_qwen3(32, 64, 2, 4, 2, 8, 151936, 1_000_000.0, 32768),
    ),
    "mid": _config(
        enc_layers=8, d_model=512, enc_heads=8, enc_ffn=2048,
        llm=_qwen3(1024, 3072, 8, 16, 8, 64, 32768, 1_000_000.0, 40960),
        srh=_qwen3(256, 768, 4, 4, 2, 64, 151936, 1_000_000.0, 32768),
    ),
    "8b": _config(
        enc_layers=32, d_model=1280, enc_heads=20, enc_ffn=5120,
        llm=_qwen3(4096, 12288, 36, 32, 8, 128, 151936, 1_000_000.0, 40960),
        srh=_qwen3(1024, 3072, 28, 16, 8, 128, 151936, 1_000_000.0, 40960),
    ),
}


def preset_config(name: str) -> dict[str, Any]:
    """A fresh copy of a preset's config.json dictionary."""
    if name not in PRESETS:
        raise PresetError(f"unknown preset {name!r}: choose one of {', '.join(sorted(PRESETS))}")
    return copy.deepcopy(PRESETS[name])
