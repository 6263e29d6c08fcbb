"""`funchat reference-dump`: run given log-mel features and prompt ids through our model and loop.

Bypasses the mel front end and the tokenizer so the result can be compared array by array with
what the public reference implementation computed (the golden sets in ../shared/golden/). Runs in
float32 with greedy decoding and writes the golden array names and shapes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from funchat.errors import PromptError
from funchat.oracle.generation import GenerationConfig, generate
from funchat.model.checkpoint import load_model
from funchat.model.funaudiochat import FunAudioChat
from funchat.turn.prompt import ModelFacts, groups_for_frames, resolve_special_ids
from funchat.turn.schedule import Mode


def load_features(path: str | Path, num_mel_bins: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """-> per clip mel [n_mels, F_i] (mask applied), the raw [N, n_mels, F] array, speech lengths [N]."""
    try:
        data = np.load(path)
    except (OSError, ValueError) as exc:
        raise PromptError(f"{path}: not a readable .npz features file ({exc})") from None
    if "input_features" not in data.files:
        raise PromptError(f"{path}: lacks the array 'input_features' (has {', '.join(data.files) or 'nothing'})")
    feats = np.asarray(data["input_features"], dtype=np.float32)
    if feats.ndim == 2:
        feats = feats[None]
    if feats.ndim != 3:
        raise PromptError(f"{path}: input_features has shape {list(feats.shape)}, expected [clips, mel bins, frames]")
    if feats.shape[1] != num_mel_bins:
        raise PromptError(f"{path}: input_features has {feats.shape[1]} mel bins, the checkpoint expects {num_mel_bins}")
    if not np.isfinite(feats).all():
        raise PromptError(f"{path}: input_features contains {int((~np.isfinite(feats)).sum())} non-finite values")
    n = feats.shape[0]
    mask = np.asarray(data["feature_attention_mask"]) if "feature_attention_mask" in data.files \
        else np.ones((n, feats.shape[2]), dtype=np.int64)
    if mask.shape != (n, feats.shape[2]):
        raise PromptError(f"{path}: feature_attention_mask has shape {list(mask.shape)}, expected {[n, feats.shape[2]]}")
    clips = [feats[i][:, mask[i].astype(bool)] for i in range(n)]
    if any(c.shape[1] == 0 for c in clips):
        raise PromptError(f"{path}: a clip has no frames")
    if "speech_lengths" in data.files:
        lengths = np.asarray(data["speech_lengths"], dtype=np.int64).reshape(-1)
        if lengths.shape[0] != n:
            raise PromptError(f"{path}: speech_lengths has {lengths.shape[0]} entries for {n} clips")
    else:  # 25 Hz frames of a clip of F mel frames (F * 160 samples at 16 kHz)
        lengths = np.array([c.shape[1] // 4 for c in clips], dtype=np.int64)
    if (lengths < 1).any():
        raise PromptError(f"{path}: speech_lengths must be >= 1 (got {lengths.tolist()})")
    return clips, feats, lengths


def load_prompt(path: str | Path) -> tuple[list[int], bool]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise PromptError(f"{path}: not a readable JSON prompt ({exc})") from None
    if isinstance(data, list):
        ids, expand = data, True
    elif isinstance(data, dict) and "input_ids" in data:
        ids, expand = data["input_ids"], bool(data.get("expand_audio", True))
    else:
        raise PromptError(f"{path}: expected a list of ids or an object with 'input_ids'")
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise PromptError(f"{path}: input_ids must be a non-empty list of integers")
    return ids, expand


def expand_audio_placeholders(ids: list[int], audio_id: int, groups: list[int], expand: bool,
                              vocab_size: int) -> list[int]:
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise PromptError(f"prompt ids {bad[:5]} are outside the text vocabulary (size {vocab_size})")
    if not expand:
        if ids.count(audio_id) != sum(groups):
            raise PromptError(f"the prompt has {ids.count(audio_id)} <|AUDIO|> ids, the clips need {sum(groups)}")
        return ids
    placeholders = ids.count(audio_id)
    if placeholders != len(groups):
        more = "more" if placeholders > len(groups) else "fewer"
        raise PromptError(f"the prompt has {placeholders} <|AUDIO|> placeholders, {more} than the {len(groups)} "
                          f"clip(s) in the features file")
    out: list[int] = []
    clip = 0
    for i in ids:
        if i == audio_id:
            out.extend([audio_id] * groups[clip])
            clip += 1
        else:
            out.append(i)
    return out


@torch.inference_mode()
def reference_dump(model: FunAudioChat, clips: list[np.ndarray], raw_features: np.ndarray, speech_lengths: np.ndarray,
                   prompt_ids: list[int], expand: bool, mode: Mode, max_new_tokens: int,
                   end_ids: tuple[int, ...]) -> dict[str, np.ndarray]:
    cfg = model.cfg
    g = cfg.audio.group_size
    groups = [groups_for_frames(int(n), g) for n in speech_lengths]
    ids = expand_audio_placeholders(prompt_ids, cfg.audio_token_index, groups, expand, cfg.text.vocab_size)

    mels = [torch.from_numpy(c) for c in clips]
    enc, adaptor = model.encode_audio_padded(mels, [int(n) for n in speech_lengths])  # [N, T25, E], [N, G, E]
    audio_rows = [adaptor[i, : groups[i]] for i in range(len(groups))]
    input_ids = torch.tensor([ids], dtype=torch.long)
    embeds = model.embed_prompt(input_ids, audio_rows)  # [1, L, E]
    hidden = model.language_model.model(embeds)  # [1, L, E] one plain causal forward
    logits = model.text_logits(hidden)  # [1, L, V]

    token_ids = ModelFacts.from_config(cfg.raw).token_ids(end_ids)
    result = generate(model, ids, embeds, GenerationConfig.greedy(mode, max_new_tokens), token_ids, keep_logits=True)

    mel_frames = np.array([c.shape[1] for c in clips], dtype=np.int64)
    enc_lengths = (((mel_frames - 1) // 2 + 1) - 2) // 2 + 1  # the reference's length formula
    max_len = enc.shape[1]
    feature_mask = np.stack([np.pad(np.ones(c.shape[1], np.int64), (0, raw_features.shape[2] - c.shape[1]))
                             for c in clips])  # [N, F]: the real frames first, as the reference lays them out
    out = {
        "in_input_ids": np.array([ids], dtype=np.int64),
        "in_input_features": raw_features,
        "in_feature_attention_mask": feature_mask,
        "in_speech_ids": np.full((len(clips), max_len), cfg.audio.pad_token_id, dtype=np.int64),
        "in_speech_attention_mask": (np.arange(max_len)[None] < speech_lengths[:, None]).astype(np.int64),
        "enc_out": enc.float().numpy(),
        "enc_lengths": enc_lengths,
        "adaptor_out": adaptor.float().numpy(),
        "audio_token_counts": np.array(groups, dtype=np.int64),
        "llm_inputs_embeds": embeds.float().numpy(),
        "text_logits": logits.float().numpy(),
        "llm_last_hidden_state": hidden.float().numpy(),
        "gen_text_ids": np.array([result.text_tokens], dtype=np.int64),
        "gen_text_ids_emitted": np.array(result.text_tokens_emitted, dtype=np.int64),
        "gen_speech_ids": np.array([result.speech_tokens], dtype=np.int64).reshape(1, -1),
        "step_text_logits": torch.stack([s.text_logits for s in result.steps])[:, None].numpy(),
        "step_is_speech": np.array([s.output.speech_group is not None for s in result.steps], dtype=bool),
    }
    if mode is Mode.S2S:
        out["step_crq_tokens"] = np.array([[s.srh_tokens] for s in result.steps], dtype=np.int64)
    return out


def run_reference_dump(checkpoint: str | Path, features: str | Path, prompt: str | Path, out: str | Path,
                       mode: str = "s2s", max_new_tokens: int = 40) -> dict[str, np.ndarray]:
    model = load_model(checkpoint, dtype=torch.float32)
    special = resolve_special_ids(checkpoint, ModelFacts.from_config(model.cfg.raw))
    clips, raw, lengths = load_features(features, model.cfg.audio.num_mel_bins)
    ids, expand = load_prompt(prompt)
    arrays = reference_dump(model, clips, raw, lengths, ids, expand, Mode.parse(mode), max_new_tokens, special.end_ids)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **arrays)
    return arrays
