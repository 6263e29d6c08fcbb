"""Special text ids: config first, then special_tokens.json or the tokenizer files; end ids from
generation_config.json. A checkpoint without tokenizer files still loads."""

from __future__ import annotations

import json
import shutil

import pytest

from funchat.errors import CheckpointError
from funchat.model.config import FunAudioChatConfig
from funchat.turn.prompt import ModelFacts, read_config, resolve_special_ids


def facts(ckpt):
    return ModelFacts.from_config(read_config(ckpt))


def test_golden_checkpoint_uses_special_tokens_json(shared):
    ckpt = shared / "golden" / "fun-audio-chat-tiny-a" / "checkpoint"
    ids = resolve_special_ids(ckpt, facts(ckpt))
    assert (ids.im_start, ids.im_end, ids.endoftext) == (1016, 1017, 1015)
    assert (ids.audio, ids.audio_bos, ids.audio_eos, ids.sil) == (1019, 1020, 1021, 1023)
    assert ids.end_ids == (1017,)


def test_tokenizer_files_supply_ids_the_config_lacks(tiny_checkpoint):
    cfg = FunAudioChatConfig.from_file(tiny_checkpoint / "config.json")
    ids = resolve_special_ids(tiny_checkpoint, facts(tiny_checkpoint))
    tok_cfg = json.loads((tiny_checkpoint / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    by_name = {v["content"]: int(k) for k, v in tok_cfg.items()}
    assert ids.im_start == by_name["<|im_start|>"] and ids.endoftext == by_name["<|endoftext|>"]
    assert ids.audio == cfg.audio_token_index == by_name["<|AUDIO|>"]


def test_without_tokenizer_files_only_config_ids(tiny_checkpoint, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_checkpoint / name, bare / name)
    cfg = FunAudioChatConfig.from_file(bare / "config.json")
    ids = resolve_special_ids(bare, facts(bare))
    assert ids.im_start is None and ids.im_end == cfg.eos_token_id and ids.end_ids == (cfg.eos_token_id,)


def test_generation_config_end_ids_list_and_range_check(tiny_checkpoint, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint, ck)
    cfg = FunAudioChatConfig.from_file(ck / "config.json")
    (ck / "generation_config.json").write_text(json.dumps({"eos_token_id": [cfg.eos_token_id, 1015]}))
    assert resolve_special_ids(ck, facts(ck)).end_ids == (cfg.eos_token_id, 1015)
    (ck / "generation_config.json").write_text(json.dumps({"eos_token_id": 99999}))
    with pytest.raises(CheckpointError, match="99999 is outside the text vocabulary"):
        resolve_special_ids(ck, facts(ck))
