"""Model configuration, read from (and written to) a Hugging Face style `config.json`.

The layout is the public Fun-Audio-Chat one (`model_type: funaudiochat`, `audio_config`,
`text_config`, `audio_token_index`). Every size comes from the file, never from constants.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from funchat.errors import CheckpointError


@dataclass
class Qwen3Config:
    """A Qwen3 dense decoder: the shared LLM and, smaller, the SRH's crq_transformer."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 40960
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> "Qwen3Config":
        _require(d, where, "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        if d.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{where}.hidden_act={d['hidden_act']!r} is not supported (only 'silu')")
        if d.get("rope_scaling") not in (None, {}):
            raise CheckpointError(f"{where}.rope_scaling={d['rope_scaling']!r} is not supported (only plain RoPE)")
        heads = int(d["num_attention_heads"])
        return cls(
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or int(d["hidden_size"]) // heads),
            vocab_size=int(d.get("vocab_size", 151936)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(d.get("rope_theta", 1_000_000.0)),
            max_position_embeddings=int(d.get("max_position_embeddings", 40960)),
            attention_bias=bool(d.get("attention_bias", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(model_type="qwen3", rope_scaling=None, sliding_window=None, use_sliding_window=False,
                 use_cache=True, attention_dropout=0.0)
        return d


@dataclass
class AudioConfig:
    """Whisper-shaped encoder, 5-frame grouping adaptor and speech codebook."""

    num_mel_bins: int
    d_model: int
    encoder_layers: int
    encoder_attention_heads: int
    encoder_ffn_dim: int
    n_window: int  # attention window is 2 * n_window mel frames
    max_source_positions: int
    output_dim: int  # = LLM hidden size
    codebook_size: int  # speech vocabulary incl. specials (6565)
    group_size: int  # 25 Hz frames per 5 Hz LLM position (5)
    bos_token_id: int  # speech bos 6561
    eos_token_id: int  # speech eos 6562
    pad_token_id: int  # speech pad 6563
    continuous_features_mode: str = "replace"
    activation_function: str = "gelu"
    scale_embedding: bool = False
    enable_audio_invert_tower: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AudioConfig":
        _require(d, "audio_config", "num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads",
                 "encoder_ffn_dim", "n_window", "output_dim", "codebook_size", "group_size",
                 "bos_token_id", "eos_token_id", "pad_token_id")
        if d.get("activation_function", "gelu") != "gelu":
            raise CheckpointError(f"audio_config.activation_function={d['activation_function']!r} is not supported")
        mode = d.get("continuous_features_mode", "add")
        if mode not in ("add", "replace"):
            raise CheckpointError(f"audio_config.continuous_features_mode={mode!r} must be 'add' or 'replace'")
        return cls(
            num_mel_bins=int(d["num_mel_bins"]),
            d_model=int(d["d_model"]),
            encoder_layers=int(d["encoder_layers"]),
            encoder_attention_heads=int(d["encoder_attention_heads"]),
            encoder_ffn_dim=int(d["encoder_ffn_dim"]),
            n_window=int(d["n_window"]),
            max_source_positions=int(d.get("max_source_positions", 1500)),
            output_dim=int(d["output_dim"]),
            codebook_size=int(d["codebook_size"]),
            group_size=int(d["group_size"]),
            bos_token_id=int(d["bos_token_id"]),
            eos_token_id=int(d["eos_token_id"]),
            pad_token_id=int(d["pad_token_id"]),
            continuous_features_mode=mode,
            scale_embedding=bool(d.get("scale_embedding", False)),
            enable_audio_invert_tower=bool(d.get("enable_audio_invert_tower", True)),
        )


@dataclass
class FunAudioChatConfig:
    audio: AudioConfig
    text: Qwen3Config
    srh: Qwen3Config | None  # None when the checkpoint has no audio_invert_tower
    audio_token_index: int
    audio_bos_index: int
    audio_eos_index: int
    sil_index: int
    eos_token_id: int  # text end of turn (<|im_end|>)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def hidden_size(self) -> int:
        return self.text.hidden_size

    @property
    def vocoder_codes(self) -> int:
        """Speech codes the vocoder understands: 0 .. bos-1 (6561 for the real model)."""
        return self.audio.bos_token_id

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "FunAudioChatConfig":
        if raw.get("model_type") != "funaudiochat":
            raise CheckpointError(f"config.json model_type is {raw.get('model_type')!r}, expected 'funaudiochat'")
        _require(raw, "config", "audio_config", "text_config", "audio_token_index")
        audio = AudioConfig.from_dict(raw["audio_config"])
        text_raw = raw["text_config"]
        _require(text_raw, "text_config", "audio_bos_index", "audio_eos_index", "sil_index", "eos_token_id")
        text = Qwen3Config.from_dict(text_raw, "text_config")
        srh = None
        if audio.enable_audio_invert_tower:
            _require(raw["audio_config"], "audio_config", "crq_transformer_config")
            srh = Qwen3Config.from_dict(raw["audio_config"]["crq_transformer_config"],
                                        "audio_config.crq_transformer_config")
        if audio.output_dim != text.hidden_size:
            raise CheckpointError(
                f"audio_config.output_dim={audio.output_dim} must equal text_config.hidden_size={text.hidden_size}")
        eos = text_raw["eos_token_id"]
        eos = int(eos[0] if isinstance(eos, list) else eos)
        cfg = cls(
            audio=audio, text=text, srh=srh,
            audio_token_index=int(raw["audio_token_index"]),
            audio_bos_index=int(text_raw["audio_bos_index"]),
            audio_eos_index=int(text_raw["audio_eos_index"]),
            sil_index=int(text_raw["sil_index"]),
            eos_token_id=eos,
            raw=copy.deepcopy(raw),
        )
        for name in ("audio_token_index", "audio_bos_index", "audio_eos_index", "sil_index", "eos_token_id"):
            value = getattr(cfg, name)
            if not 0 <= value < text.vocab_size:
                raise CheckpointError(f"{name}={value} is outside the text vocabulary (size {text.vocab_size})")
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> "FunAudioChatConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path}: config.json not found") from None
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable JSON config ({exc})") from None
        return cls.from_dict(raw)


def _require(d: dict[str, Any], where: str, *keys: str) -> None:
    missing = [k for k in keys if k not in d]
    if missing:
        raise CheckpointError(f"{where} lacks required field(s): {', '.join(missing)}")
