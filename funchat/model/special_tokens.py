"""Special text ids of a checkpoint.

The config gives `audio_token_index` and `text_config.audio_bos_index / audio_eos_index / sil_index /
eos_token_id`. Ids it lacks (im_start, im_end, endoftext, audio_pad) come from `special_tokens.json`
where the checkpoint carries one, else from the tokenizer files. A checkpoint without either still
loads: only text in/out needs them. The turn's end ids come from `generation_config.json`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from funchat.errors import CheckpointError
from funchat.model.config import FunAudioChatConfig

TOKEN_STRINGS = {
    "endoftext": "<|endoftext|>", "im_start": "<|im_start|>", "im_end": "<|im_end|>", "audio": "<|AUDIO|>",
    "audio_bos": "<|audio_bos|>", "audio_eos": "<|audio_eos|>", "audio_pad": "<|audio_pad|>", "sil": "<|sil|>",
}


@dataclass(frozen=True)
class SpecialTextIds:
    audio: int
    audio_bos: int
    audio_eos: int
    sil: int
    im_end: int
    im_start: int | None
    endoftext: int | None
    audio_pad: int | None
    end_ids: tuple[int, ...]  # ids that end an assistant turn


def _from_tokenizer_files(ckpt: Path) -> dict[str, int]:
    """Look the names up in tokenizer.json's added tokens or tokenizer_config.json's decoder."""
    found: dict[str, int] = {}
    wanted = {v: k for k, v in TOKEN_STRINGS.items()}
    tok_json = ckpt / "tokenizer.json"
    if tok_json.exists():
        for entry in json.loads(tok_json.read_text()).get("added_tokens", []):
            if entry.get("content") in wanted:
                found[wanted[entry["content"]]] = int(entry["id"])
    cfg_json = ckpt / "tokenizer_config.json"
    if cfg_json.exists():
        for idx, entry in json.loads(cfg_json.read_text()).get("added_tokens_decoder", {}).items():
            if entry.get("content") in wanted:
                found.setdefault(wanted[entry["content"]], int(idx))
    return found


def resolve_special_ids(ckpt_dir: str | Path, cfg: FunAudioChatConfig) -> SpecialTextIds:
    ckpt = Path(ckpt_dir)
    names: dict[str, int] = {}
    special_file = ckpt / "special_tokens.json"
    try:
        if special_file.exists():
            names.update({k: int(v) for k, v in json.loads(special_file.read_text()).items()})
        else:
            names.update(_from_tokenizer_files(ckpt))
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{ckpt}: unreadable special token file ({exc})") from None
    # The config is authoritative for the ids it carries.
    names.update(audio=cfg.audio_token_index, audio_bos=cfg.audio_bos_index, audio_eos=cfg.audio_eos_index,
                  sil=cfg.sil_index)
    names.setdefault("im_end", cfg.eos_token_id)

    end_ids: tuple[int, ...] = (cfg.eos_token_id,)
    gen_file = ckpt / "generation_config.json"
    if gen_file.exists():
        try:
            eos = json.loads(gen_file.read_text()).get("eos_token_id")
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{gen_file}: unreadable ({exc})") from None
        if eos is not None:
            end_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))
    for name, value in list(names.items()) + [("end", e) for e in end_ids]:
        if not 0 <= value < cfg.text.vocab_size:
            raise CheckpointError(f"special token {name}={value} is outside the text vocabulary (size {cfg.text.vocab_size})")
    return SpecialTextIds(
        audio=names["audio"], audio_bos=names["audio_bos"], audio_eos=names["audio_eos"], sil=names["sil"],
        im_end=names["im_end"], im_start=names.get("im_start"), endoftext=names.get("endoftext"),
        audio_pad=names.get("audio_pad"), end_ids=end_ids,
    )
