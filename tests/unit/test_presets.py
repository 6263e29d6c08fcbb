"""Model presets: the 8b shapes (on the meta device) against the design facts, and tiny's layout."""

import re

import pytest
import torch

from funchat.errors import PresetError
from funchat.model.checkpoint import build_model, expected_shapes
from funchat.model.config import FunAudioChatConfig
from funchat.model.presets import PRESETS, preset_config

PREFIXES = ("continuous_audio_tower.", "audio_tower.", "language_model.", "audio_invert_tower.")


@pytest.fixture(scope="module")
def model_8b():
    return build_model(FunAudioChatConfig.from_dict(preset_config("8b")), device="meta")


@pytest.fixture(scope="module")
def shapes_8b(model_8b):
    return {k: tuple(v.shape) for k, v in model_8b.state_dict().items()}


def _layer_count(shapes: dict, prefix: str) -> int:
    found = {int(m.group(1)) for k in shapes if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    assert found == set(range(len(found))), f"{prefix}: layer indices are not 0..n-1"
    return len(found)


def test_8b_is_built_on_the_meta_device(model_8b):
    assert all(p.is_meta for p in model_8b.parameters())


def test_8b_parameter_count(model_8b):
    count = sum(p.numel() for p in model_8b.parameters())
    assert 9.3e9 < count < 9.5e9, count


def test_8b_keys_use_only_the_four_public_prefixes(shapes_8b):
    assert all(k.startswith(PREFIXES) for k in shapes_8b), [k for k in shapes_8b if not k.startswith(PREFIXES)]
    for prefix in PREFIXES:
        assert any(k.startswith(prefix) for k in shapes_8b), prefix


def test_8b_llm_shapes(shapes_8b):
    assert _layer_count(shapes_8b, "language_model.model.layers.") == 36
    layer = "language_model.model.layers.35."
    assert shapes_8b[layer + "self_attn.q_proj.weight"] == (4096, 4096)
    assert shapes_8b[layer + "self_attn.k_proj.weight"] == (1024, 4096)
    assert shapes_8b[layer + "self_attn.v_proj.weight"] == (1024, 4096)
    assert shapes_8b[layer + "self_attn.o_proj.weight"] == (4096, 4096)
    assert shapes_8b[layer + "self_attn.q_norm.weight"] == (128,)
    assert shapes_8b[layer + "mlp.gate_proj.weight"] == (12288, 4096)
    assert shapes_8b["language_model.model.embed_tokens.weight"] == (151936, 4096)
    assert shapes_8b["language_model.model.norm.weight"] == (4096,)
    assert shapes_8b["language_model.lm_head.weight"] == (151936, 4096)


def test_8b_encoder_and_adaptor_shapes(shapes_8b):
    assert _layer_count(shapes_8b, "continuous_audio_tower.layers.") == 32
    assert shapes_8b["continuous_audio_tower.conv1.weight"] == (1280, 128, 3)
    assert shapes_8b["continuous_audio_tower.conv2.weight"] == (1280, 1280, 3)
    assert shapes_8b["continuous_audio_tower.layers.31.fc1.weight"] == (5120, 1280)
    assert shapes_8b["continuous_audio_tower.proj.weight"] == (4096, 1280)
    assert shapes_8b["audio_tower.embed_tokens.weight"] == (6565, 4096)
    assert shapes_8b["audio_tower.output_matching.weight"] == (4096, 4096)
    assert shapes_8b["audio_tower.continual_output_matching.weight"] == (4096, 4096)


def test_8b_srh_shapes(shapes_8b):
    assert shapes_8b["audio_invert_tower.pre_matching.weight"] == (20480, 4096)
    assert shapes_8b["audio_invert_tower.pre_matching.bias"] == (20480,)
    assert shapes_8b["audio_invert_tower.input_matching.weight"] == (1024, 4096)
    assert shapes_8b["audio_invert_tower.output_matching.weight"] == (4096, 1024)
    assert _layer_count(shapes_8b, "audio_invert_tower.crq_transformer.layers.") == 28
    layer = "audio_invert_tower.crq_transformer.layers.27."
    assert shapes_8b[layer + "self_attn.q_proj.weight"] == (2048, 1024)  # 16 heads x 128
    assert shapes_8b[layer + "self_attn.k_proj.weight"] == (1024, 1024)  # 8 kv heads x 128
    assert shapes_8b[layer + "mlp.up_proj.weight"] == (3072, 1024)
    assert shapes_8b["audio_invert_tower.crq_transformer.norm.weight"] == (1024,)
    # the speech lm_head is tied to audio_tower.embed_tokens: not a key, no crq embeddings
    assert "audio_invert_tower.lm_head.weight" not in shapes_8b
    assert "audio_invert_tower.crq_transformer.embed_tokens.weight" not in shapes_8b


def test_8b_expected_shapes_match_the_built_model(shapes_8b):
    assert expected_shapes(FunAudioChatConfig.from_dict(preset_config("8b"))) == shapes_8b


def _layout(keys) -> set[str]:
    return {re.sub(r"\.layers\.\d+\.", ".layers.N.", k) for k in keys}


@pytest.mark.parametrize("name", ["tiny", "mid"])
def test_smaller_presets_have_the_8b_key_set_modulo_layer_counts(shapes_8b, name):
    keys = expected_shapes(FunAudioChatConfig.from_dict(preset_config(name)))
    assert _layout(keys) == _layout(shapes_8b)


def test_tiny_preset_sizes_differ_but_speech_codebook_is_real():
    cfg = FunAudioChatConfig.from_dict(preset_config("tiny"))
    shapes = expected_shapes(cfg)
    assert shapes["language_model.lm_head.weight"] == (cfg.text.vocab_size, cfg.hidden_size)
    assert shapes["audio_tower.embed_tokens.weight"] == (6565, cfg.hidden_size)
    assert shapes["audio_invert_tower.pre_matching.weight"] == (5 * cfg.hidden_size, cfg.hidden_size)
    assert cfg.hidden_size < 4096 and cfg.vocoder_codes == 6561


def test_preset_config_returns_a_fresh_copy():
    a = preset_config("tiny")
    a["text_config"]["hidden_size"] = 1
    assert preset_config("tiny")["text_config"]["hidden_size"] == PRESETS["tiny"]["text_config"]["hidden_size"] != 1


def test_unknown_preset_raises_naming_the_choices():
    with pytest.raises(PresetError) as err:
        preset_config("huge")
    msg = str(err.value)
    assert "'huge'" in msg
    for name in ("tiny", "mid", "8b"):
        assert name in msg
