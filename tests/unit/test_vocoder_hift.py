"""Causal HiFT and the fixed-noise recipe against the reference CosyVoice 3 token2wav goldens.

Golden set: ../shared/golden/cosyvoice3-token2wav-tiny-a (reference CosyVoice 2db78e7, CPU,
float32, tiny random checkpoint). Offline: HiFT over the 120-frame mel. Streaming: the
reference's `CosyVoice3Model.token2wav` as Fun-Audio-Chat drives it (hop 15 tokens, look-ahead
3): every call appends the flow's new frames to a mel cache, re-runs HiFT over the whole cache
and returns only the samples past what it has already returned.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from funchat.vocoder.hift import (Hift, HiftConfig, load_hift, load_hift_state_dict,
                                  normalize_hift_state_dict)
from funchat.vocoder.noise import MAX_FLOW_FRAMES, MAX_SOURCE_SAMPLES, FixedNoise, NoiseRecipe

TOL = 1e-4
NAME = "cosyvoice3-token2wav-tiny-a"


@pytest.fixture(scope="module")
def golden(shared):
    return shared / "golden" / NAME


@pytest.fixture(scope="module")
def expected(golden):
    with np.load(golden / "expected.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def config(golden):
    return json.loads((golden / "checkpoint" / "config.json").read_text())


@pytest.fixture(scope="module")
def hift(golden):
    return load_hift(golden / "checkpoint")


@pytest.fixture(scope="module")
def noise(config):
    return FixedNoise.from_constructor_args(config)


def _maxdiff(a, b) -> float:
    a = a.detach().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    assert a.shape == b.shape, f"shape {a.shape} vs golden {b.shape}"
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


# -- config and checkpoint -------------------------------------------------------------------


def test_config_from_constructor_args(config):
    cfg = HiftConfig.from_constructor_args(config)
    assert cfg == HiftConfig.tiny()
    assert HiftConfig.from_constructor_args(config["constructor_args"]["hift"]) == cfg
    assert HiftConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.samples_per_frame == 480 and cfg.source_channels == 9
    full = HiftConfig.full()
    assert full.base_channels == 512 and full.f0_cond_channels == 512
    assert {**full.to_dict(), "base_channels": 64, "f0_cond_channels": 64} == cfg.to_dict()


def test_strict_load_same_keys_in_same_order(golden, config):
    state = torch.load(golden / "checkpoint" / "hift.pt", map_location="cpu", weights_only=True)
    model = Hift(HiftConfig.from_constructor_args(config))
    assert list(model.state_dict()) == list(state)
    model.load_state_dict(state, strict=True)
    n = sum(p.numel() for p in model.parameters())
    assert n == config["parameters"]["hift"]


def test_old_weight_norm_layout_loads(golden, config, hift):
    state = torch.load(golden / "checkpoint" / "hift.pt", map_location="cpu", weights_only=True)
    old = {}
    for key, value in state.items():
        key = key.replace("parametrizations.weight.original0", "weight_g")
        key = key.replace("parametrizations.weight.original1", "weight_v")
        old["generator." + key] = value
    assert set(normalize_hift_state_dict(old)) == set(state)
    model = Hift(HiftConfig.from_constructor_args(config))
    load_hift_state_dict(model, old)
    for (k, a), b in zip(model.state_dict().items(), hift.state_dict().values()):
        assert torch.equal(a, b), k
    # Weight norm removed (plain `weight`) also loads, to the same effective weights.
    plain = {}
    for key, value in state.items():
        if key.endswith("parametrizations.weight.original1"):
            module = hift.get_submodule(key[: -len(".parametrizations.weight.original1")])
            plain[key[: -len("parametrizations.weight.original1")] + "weight"] = module.weight.detach()
        elif not key.endswith("parametrizations.weight.original0"):
            plain[key] = value
    model = Hift(HiftConfig.from_constructor_args(config))
    load_hift_state_dict(model, plain)
    for name, module in model.named_modules():
        if hasattr(module, "parametrizations"):
            assert torch.allclose(module.weight, hift.get_submodule(name).weight, atol=1e-6, rtol=1e-5), name


# -- noise recipe ----------------------------------------------------------------------------


def test_noise_recipe_matches_golden(noise, expected):
    assert _maxdiff(noise.flow_noise(120), expected["off_c0_noise"]) == 0.0
    assert _maxdiff(noise.rand_ini(), expected["hift_rand_ini"]) == 0.0
    assert _maxdiff(noise.source_noise(57600), expected["hift_noise_sine"]) == 0.0
    assert noise.source_samples_cached < MAX_SOURCE_SAMPLES  # drawn lazily


def test_noise_prefix_property_and_lazy_growth(config, expected):
    lazy = FixedNoise.from_constructor_args(config)
    small = lazy.source_noise(1000).clone()
    grown = lazy.source_noise(300_000)  # continues the same generator
    assert torch.equal(grown[:, :1000], small)
    assert _maxdiff(grown[:, :57600], expected["hift_noise_sine"]) == 0.0
    once = FixedNoise.from_constructor_args(config)
    assert torch.equal(once.source_noise(300_000), grown)


def test_noise_drawn_all_at_once_equals_the_lazy_draws(config, expected):
    lazy = FixedNoise.from_constructor_args(config)
    part = lazy.source_noise(300_000).clone()
    lazy.draw_all()  # continues after what was drawn
    assert lazy.source_samples_cached == MAX_SOURCE_SAMPLES
    buffer = lazy.source_noise(MAX_SOURCE_SAMPLES)
    assert torch.equal(buffer[:, :300_000], part)
    whole = FixedNoise.from_constructor_args(config)
    whole.draw_all()
    assert torch.equal(whole.source_noise(MAX_SOURCE_SAMPLES), buffer)
    assert _maxdiff(whole.source_noise(57600), expected["hift_noise_sine"]) == 0.0
    pointer = whole.source_noise(10).data_ptr()
    whole.source_noise(5_000_000)
    assert whole.source_noise(10).data_ptr() == pointer  # never redrawn or moved


def test_noise_leaves_global_rng_alone(config):
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    FixedNoise.from_constructor_args(config).source_noise(10)
    assert torch.equal(torch.get_rng_state(), before)


def test_noise_depends_on_f0_width_and_refuses_long_calls(config):
    golden_recipe = NoiseRecipe.from_constructor_args(config)
    wide = FixedNoise(NoiseRecipe(**{**golden_recipe.__dict__, "f0_cond_channels": 128}))
    ours = FixedNoise(golden_recipe)
    assert torch.equal(wide.flow_noise(50), ours.flow_noise(50))  # drawn before the f0 predictor
    assert not torch.equal(wide.source_noise(100), ours.source_noise(100))
    assert FixedNoise.for_configs(HiftConfig.tiny()).recipe == golden_recipe
    with pytest.raises(ValueError):
        ours.flow_noise(MAX_FLOW_FRAMES + 1)
    with pytest.raises(ValueError):
        ours.source_noise(MAX_SOURCE_SAMPLES + 1)


# -- offline ---------------------------------------------------------------------------------


def test_offline_f0_source_and_wav(hift, noise, expected):
    mel = torch.from_numpy(expected["off_mel"])
    f0 = hift.predict_f0(mel)
    assert _maxdiff(f0, expected["off_c0_f0"]) <= TOL
    source = hift.source(f0, noise.source_noise(mel.shape[2] * 480))
    assert _maxdiff(source, expected["off_c0_source"]) <= TOL
    wav = hift.inference(mel, noise.source_noise(mel.shape[2] * 480), finalize=True)
    assert wav.shape == (1, 120 * 480)
    assert _maxdiff(wav, expected["off_wav"]) <= TOL


# -- streaming, as the reference drives HiFT -------------------------------------------------


def test_streaming_calls_reproduce_reference(hift, noise, expected):
    calls = expected["st_calls"]
    ratio = 2  # token_mel_ratio
    mel_cache = None
    speech_offset = 0
    for k, (n_tokens, token_offset, finalize, n_samples) in enumerate(calls.tolist()):
        flow_mel = torch.from_numpy(expected[f"st_call{k}_flow_mel"])  # all tokens so far
        assert flow_mel.shape[2] == (n_tokens - (0 if finalize else 3)) * ratio
        new = flow_mel[:, :, token_offset * ratio:]
        mel_cache = new if mel_cache is None else torch.cat([mel_cache, new], dim=2)
        wav = hift.inference(mel_cache, noise.source_noise(mel_cache.shape[2] * 480), finalize=bool(finalize))
        expected_len = mel_cache.shape[2] - (0 if finalize else hift.lookahead_frames)
        assert wav.shape[1] == expected_len * 480
        chunk = wav[:, speech_offset:]
        speech_offset += chunk.shape[1]
        assert chunk.shape[1] == n_samples
        assert _maxdiff(chunk, expected[f"st_call{k}_wav"]) <= TOL, f"call {k}"
    assert _maxdiff(mel_cache, expected["st_cache_mel"]) == 0.0
    assert speech_offset == expected["st_wav"].shape[1]


def test_non_final_prefix_matches_final(hift, noise, expected):
    # What makes emitting only new samples sound: a non-final call's samples are final.
    mel = torch.from_numpy(expected["off_mel"])
    full = hift.inference(mel, noise.source_noise(120 * 480), finalize=True)
    part = hift.inference(mel[:, :, :50], noise.source_noise(50 * 480), finalize=False)
    assert part.shape == (1, (50 - 8) * 480)
    assert float((part - full[:, : part.shape[1]]).abs().max()) <= 1e-5


# -- receptive field -------------------------------------------------------------------------


def test_receptive_field_is_what_the_docstring_says(hift, noise, expected):
    assert hift.f0_lookahead_frames == 3 and hift.conv_pre_lookahead_frames == 4
    assert hift.lookahead_frames == 8
    left = hift.left_context_frames
    assert 0 < left < 60
    mel = torch.from_numpy(expected["off_mel"])
    f0 = hift.predict_f0(mel)
    # f0: 8 frames of history suffice.
    start = 40
    f0_window = hift.predict_f0(mel[:, :, start:])
    reach = hift.f0_predictor.left_reach
    assert reach == 8
    assert torch.allclose(f0_window[:, reach:], f0[:, start + reach:], atol=1e-5, rtol=0)
    # Decoding: given the (stateful) source, left_context_frames of mel history reproduce the output.
    source = hift.source(f0, noise.source_noise(120 * 480))
    with torch.no_grad():
        full = hift.decode(mel, source)
        start = 10
        window = hift.decode(mel[:, :, start:], source[:, start * 480:])
    cut = left * 480
    assert float((window[:, cut:] - full[:, start * 480 + cut:]).abs().max()) <= 1e-5
    # A change to the first 5 frames of source (or mel) reaches no further than the bound.
    with torch.no_grad():
        for changed_mel, changed_source in [(mel + (torch.arange(120) < 5), source),
                                            (mel, source + (torch.arange(120 * 480) < 5 * 480)[None, :, None])]:
            moved = (hift.decode(changed_mel, changed_source) - full).abs()[0].nonzero()
            assert int(moved.max()) < 5 * 480 + hift.left_context_samples


# -- other sizes -----------------------------------------------------------------------------


@pytest.mark.parametrize("finalize", [True, False])
def test_other_width_runs_with_right_length(finalize):
    cfg = HiftConfig(base_channels=32, f0_cond_channels=16)
    torch.manual_seed(0)
    model = Hift(cfg).eval()
    noise = FixedNoise.for_configs(cfg)
    mel = torch.randn(1, 80, 20)
    wav = model.inference(mel, noise.source_noise(20 * 480), finalize=finalize)
    assert wav.shape == (1, (20 if finalize else 20 - model.lookahead_frames) * 480)
    assert torch.isfinite(wav).all() and float(wav.abs().max()) <= cfg.audio_limit
    assert model.predict_f0(mel).shape == (1, 20)
    assert model.predict_f0(mel, finalize=False).shape == (1, 17)


def test_too_short_or_bad_inputs_are_refused(hift, noise):
    with pytest.raises(ValueError):
        hift.inference(torch.zeros(1, 80, 8), noise.source_noise(8 * 480), finalize=False)
    with pytest.raises(ValueError):
        hift.inference(torch.zeros(1, 40, 10), noise.source_noise(10 * 480))
    with pytest.raises(ValueError):
        hift.inference(torch.zeros(1, 80, 10), noise.source_noise(9 * 480))
