"""Checkpoint directories: save/load round trips, dtypes, and CheckpointError for every bad layout."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import funchat.model.checkpoint as checkpoint
from funchat.errors import CheckpointError
from funchat.model.checkpoint import (
    INDEX_FILE,
    SINGLE_FILE,
    build_model,
    expected_shapes,
    load_model,
    randomize,
    save_checkpoint,
    tensor_index,
)
from funchat.model.config import FunAudioChatConfig
from funchat.model.presets import preset_config

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("FUNCHAT_SHARED", REPO.parent / "shared"))
GOLDEN_CKPT = SHARED / "golden" / "fun-audio-chat-tiny-a" / "checkpoint"

TIED = "audio_invert_tower.lm_head.weight"
MISSING = "audio_invert_tower.pre_matching.bias"
RESHAPED = "language_model.model.layers.1.self_attn.k_proj.weight"  # [kv heads * head_dim, hidden]


@pytest.fixture(scope="module")
def model():
    cfg = FunAudioChatConfig.from_dict(preset_config("tiny"))
    return randomize(build_model(cfg), seed=3).eval()


@pytest.fixture
def ckpt(model, tmp_path) -> Path:
    out = tmp_path / "ckpt"
    save_checkpoint(model, out)
    return out


@pytest.fixture
def sharded(model, tmp_path) -> Path:
    out = tmp_path / "sharded"
    save_checkpoint(model, out, max_shard_bytes=400_000)
    return out


def _rewrite(ckpt: Path, edit) -> None:
    """Load model.safetensors, let `edit` change the dict in place, write it back."""
    tensors = load_file(str(ckpt / SINGLE_FILE))
    edit(tensors)
    save_file(tensors, str(ckpt / SINGLE_FILE), metadata={"format": "pt"})


def _edit_config(ckpt: Path, edit) -> None:
    raw = json.loads((ckpt / "config.json").read_text())
    edit(raw)
    (ckpt / "config.json").write_text(json.dumps(raw))


def _assert_same_weights(loaded, model, dtype=torch.float32) -> None:
    expected = model.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == dtype, name
        assert torch.equal(got[name], tensor.to(dtype)), name


# ---------------------------------------------------------------- round trips


def test_single_file_round_trip_loads_equal_tensors(model, ckpt):
    assert (ckpt / SINGLE_FILE).is_file() and not (ckpt / INDEX_FILE).exists()
    loaded = load_model(ckpt)
    _assert_same_weights(loaded, model)
    assert loaded.cfg.raw == model.cfg.raw
    assert not loaded.training


def test_saved_checkpoint_has_no_missing_or_unexpected_keys(model, ckpt):
    stored = tensor_index(ckpt)
    expected = expected_shapes(model.cfg)
    assert set(stored) == set(expected)
    assert {name: shape for name, (_, shape) in stored.items()} == expected
    assert TIED not in stored  # tied to audio_tower.embed_tokens, not written twice


def test_sharded_round_trip_writes_index_and_loads_equal_tensors(model, sharded):
    index = json.loads((sharded / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert not (sharded / SINGLE_FILE).exists()
    assert all((sharded / f).is_file() for f in shards)
    assert set(index["weight_map"]) == set(expected_shapes(model.cfg))
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert index["metadata"]["total_size"] == total
    _assert_same_weights(load_model(sharded), model)


def test_loaded_model_is_fully_materialised_and_computes_the_same(model, ckpt):
    loaded = load_model(ckpt)
    assert not any(t.is_meta for t in loaded.parameters())
    assert not any(t.is_meta for t in loaded.buffers())  # non-persistent buffers recomputed
    assert loaded.audio_invert_tower.codebook is loaded.audio_tower.embed_tokens.weight
    ids = torch.tensor([[3, 700, 15, 1000]])
    with torch.inference_mode():
        x = model.language_model.embed(ids)
        torch.testing.assert_close(loaded.language_model.model(x), model.language_model.model(x), atol=0, rtol=0)
        mel = torch.randn(128, 230, generator=torch.Generator().manual_seed(0))
        got = loaded.encode_audio([mel], [23])
        want = model.encode_audio([mel], [23])
        torch.testing.assert_close(got[0], want[0], atol=0, rtol=0)


@pytest.mark.parametrize("dtype_arg, dtype", [("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16),
                                              ("float16", torch.float16), (torch.float16, torch.float16)])
def test_load_in_half_precision_gives_that_dtype(model, ckpt, dtype_arg, dtype):
    loaded = load_model(ckpt, dtype=dtype_arg)
    _assert_same_weights(loaded, model, dtype)
    assert loaded.dtype == dtype


def test_unknown_dtype_raises(ckpt):
    with pytest.raises(CheckpointError, match="unknown dtype 'int8'"):
        load_model(ckpt, dtype="int8")


def test_tied_srh_lm_head_present_still_loads(model, ckpt):
    _rewrite(ckpt, lambda t: t.__setitem__(TIED, t["audio_tower.embed_tokens.weight"].clone()))
    assert TIED in tensor_index(ckpt)
    loaded = load_model(ckpt)
    _assert_same_weights(loaded, model)
    assert torch.equal(loaded.audio_invert_tower.codebook, model.audio_tower.embed_tokens.weight)


def test_mis_shaped_tied_srh_lm_head_raises(ckpt):
    _rewrite(ckpt, lambda t: t.__setitem__(TIED, torch.zeros(6565, 8)))
    with pytest.raises(CheckpointError) as err:
        load_model(ckpt)
    msg = str(err.value)
    assert TIED in msg and "[6565, 8]" in msg and "[6565, 64]" in msg


# ---------------------------------------------------------------- tensors that do not match the config


def test_missing_tensor_raises_naming_it_and_its_shape(ckpt):
    _rewrite(ckpt, lambda t: t.pop(MISSING))
    with pytest.raises(CheckpointError) as err:
        load_model(ckpt)
    msg = str(err.value)
    assert "missing tensor" in msg and MISSING in msg
    assert "[320]" in msg  # group_size * hidden


def test_extra_tensor_raises_naming_it_and_its_shape(ckpt):
    extra = "language_model.model.layers.2.mlp.up_proj.weight"  # a third layer the config lacks
    _rewrite(ckpt, lambda t: t.__setitem__(extra, torch.zeros(128, 64)))
    with pytest.raises(CheckpointError) as err:
        load_model(ckpt)
    msg = str(err.value)
    assert "unexpected tensor" in msg and extra in msg and "[128, 64]" in msg


def test_mis_shaped_tensor_raises_naming_it_and_both_shapes(ckpt):
    _rewrite(ckpt, lambda t: t.__setitem__(RESHAPED, torch.zeros(16, 64)))
    with pytest.raises(CheckpointError) as err:
        load_model(ckpt)
    msg = str(err.value)
    assert RESHAPED in msg and "[16, 64]" in msg and "[32, 64]" in msg


def test_all_problems_are_reported_at_once(ckpt):
    def edit(t):
        t.pop(MISSING)
        t[RESHAPED] = torch.zeros(16, 64)
        t["language_model.extra.weight"] = torch.zeros(2)
    _rewrite(ckpt, edit)
    with pytest.raises(CheckpointError) as err:
        load_model(ckpt)
    msg = str(err.value)
    assert MISSING in msg and RESHAPED in msg and "language_model.extra.weight" in msg


class _CountingSafeOpen:
    """Wraps safetensors.safe_open and counts tensors actually read (headers are not counted)."""

    def __init__(self):
        self.tensors_read = 0

    def __call__(self, *args, **kwargs):
        counter, inner = self, safe_open(*args, **kwargs)

        class Handle:
            def __enter__(self):
                self.h = inner.__enter__()
                return self

            def __exit__(self, *exc):
                return inner.__exit__(*exc)

            def keys(self):
                return self.h.keys()

            def get_slice(self, name):
                return self.h.get_slice(name)

            def get_tensor(self, name):
                counter.tensors_read += 1
                return self.h.get_tensor(name)

        return Handle()


def test_good_checkpoint_reads_every_tensor_through_safe_open(model, ckpt, monkeypatch):
    # (checks the instrument used by the next test)
    spy = _CountingSafeOpen()
    monkeypatch.setattr(checkpoint, "safe_open", spy)
    load_model(ckpt)
    assert spy.tensors_read == len(expected_shapes(model.cfg))


@pytest.mark.parametrize("edit", ["missing", "reshaped"])
def test_failed_load_reads_no_weights_and_returns_no_model(ckpt, monkeypatch, edit):
    if edit == "missing":
        _rewrite(ckpt, lambda t: t.pop(MISSING))
    else:
        _rewrite(ckpt, lambda t: t.__setitem__(RESHAPED, torch.zeros(16, 64)))
    spy = _CountingSafeOpen()
    monkeypatch.setattr(checkpoint, "safe_open", spy)
    result = None
    with pytest.raises(CheckpointError):
        result = load_model(ckpt)
    assert result is None
    assert spy.tensors_read == 0  # validated from the headers before any weight was read


# ---------------------------------------------------------------- broken files


def test_shard_listed_in_index_but_absent_raises(sharded):
    index = json.loads((sharded / INDEX_FILE).read_text())
    gone = sorted(set(index["weight_map"].values()))[1]
    (sharded / gone).unlink()
    with pytest.raises(CheckpointError, match=f"{gone}: shard listed in {INDEX_FILE} is missing"):
        load_model(sharded)


def test_unreadable_index_raises(sharded):
    (sharded / INDEX_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable shard index"):
        load_model(sharded)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_safetensors_file_raises(ckpt, damage):
    path = ckpt / SINGLE_FILE
    data = path.read_bytes()
    path.write_bytes({"garbage": b"\x00\x01not a safetensors file" * 10,
                      "truncated": data[: len(data) // 2],
                      "empty": b""}[damage])
    with pytest.raises(CheckpointError, match=f"{SINGLE_FILE}: not a readable safetensors file"):
        load_model(ckpt)


def test_no_weights_file_raises(ckpt):
    (ckpt / SINGLE_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"no {SINGLE_FILE} and no {INDEX_FILE}"):
        load_model(ckpt)


def test_missing_directory_raises(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        load_model(tmp_path / "nowhere")


# ---------------------------------------------------------------- config.json


def test_missing_config_json_raises(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_model(ckpt)


def test_unparseable_config_json_raises(ckpt):
    (ckpt / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="not a readable JSON config"):
        load_model(ckpt)


def test_wrong_model_type_raises(ckpt):
    _edit_config(ckpt, lambda raw: raw.__setitem__("model_type", "qwen2_audio"))
    with pytest.raises(CheckpointError, match="model_type is 'qwen2_audio', expected 'funaudiochat'"):
        load_model(ckpt)


@pytest.mark.parametrize("where, field", [
    (None, "audio_token_index"),
    ("text_config", "num_attention_heads"),
    ("text_config", "audio_bos_index"),
    ("audio_config", "group_size"),
    ("audio_config", "crq_transformer_config"),
])
def test_config_lacking_a_field_raises_naming_it(ckpt, where, field):
    _edit_config(ckpt, lambda raw: (raw[where] if where else raw).pop(field))
    with pytest.raises(CheckpointError, match=f"lacks required field\\(s\\): {field}"):
        load_model(ckpt)


def test_config_with_different_sizes_than_the_weights_raises(ckpt):
    _edit_config(ckpt, lambda raw: raw["text_config"].__setitem__("intermediate_size", 96))
    with pytest.raises(CheckpointError) as err:
        load_model(ckpt)
    msg = str(err.value)
    assert "language_model.model.layers.0.mlp.up_proj.weight" in msg and "[128, 64]" in msg and "[96, 64]" in msg


# ---------------------------------------------------------------- the golden checkpoint


def test_golden_checkpoint_loads_with_no_missing_or_unexpected_keys():
    assert (GOLDEN_CKPT / "config.json").is_file(), f"golden checkpoint missing: {GOLDEN_CKPT} (set FUNCHAT_SHARED)"
    cfg = FunAudioChatConfig.from_file(GOLDEN_CKPT / "config.json")
    stored = tensor_index(GOLDEN_CKPT)
    expected = expected_shapes(cfg)
    assert sorted(set(expected) - set(stored)) == []
    assert sorted(set(stored) - set(expected) - {TIED}) == []
    model = load_model(GOLDEN_CKPT)
    assert set(model.state_dict()) == set(expected)
    assert not any(t.is_meta for t in model.state_dict().values())
