"""The CosyVoice 3 flow (tokens + x-vector -> mel) against the reference's golden outputs.

Golden set: ../shared/golden/cosyvoice3-token2wav-tiny-a (tiny random checkpoint, reference at
CosyVoice commit 2db78e7, CPU float32). Offline: one finalize call over all 60 tokens. Streaming:
the Fun-Audio-Chat server's calls, each re-running the flow over all tokens so far.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from funchat.vocoder.flow import Flow, FlowConfig, time_schedule

TOLERANCE = 1e-4
GOLDEN = "golden/cosyvoice3-token2wav-tiny-a"


@pytest.fixture(scope="module")
def golden(shared):
    return shared / GOLDEN


@pytest.fixture(scope="module")
def expected(golden):
    return np.load(golden / "expected.npz")


@pytest.fixture(scope="module")
def state_dict(golden):
    return torch.load(golden / "checkpoint" / "flow.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def config(golden) -> FlowConfig:
    args = json.loads((golden / "checkpoint" / "config.json").read_text())["constructor_args"]
    return FlowConfig.from_constructor_args(args)


@pytest.fixture(scope="module")
def flow(config, state_dict) -> Flow:
    model = Flow(config).eval()
    model.load_state_dict(state_dict, strict=True)
    return model


@pytest.fixture(scope="module")
def noise() -> torch.Tensor:
    # The reference's fixed buffer: drawn once at construction right after seeding 0.
    return torch.randn(1, 80, 15000, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def inputs(expected):
    return torch.from_numpy(expected["in_tokens"])[None], torch.from_numpy(expected["in_spk"])


def max_diff(ours: torch.Tensor, ref: np.ndarray) -> float:
    ours = ours.detach().cpu().numpy()
    assert ours.shape == ref.shape, f"shape {ours.shape} vs golden {ref.shape}"
    return float(np.abs(ours - ref).max())


def test_config_reads_constructor_args(config, golden):
    assert config == FlowConfig.tiny()
    args = json.loads((golden / "checkpoint" / "config.json").read_text())["constructor_args"]
    assert FlowConfig.from_constructor_args(args["flow"]) == config  # the flow entry alone works too
    assert FlowConfig.from_dict(config.to_dict()) == config
    full = FlowConfig.full()
    sizes = (full.dim, full.depth, full.heads, full.dim_head, full.ff_mult, full.pre_lookahead_channels)
    assert sizes == (1024, 22, 16, 64, 2, 1024)


def test_state_dict_matches_reference(config, state_dict):
    ours = Flow(config).state_dict()
    assert list(ours) == list(state_dict)
    for key, value in state_dict.items():
        assert ours[key].shape == value.shape, key


def test_noise_buffer_is_the_references(noise, expected):
    assert max_diff(noise[:, :, :120], expected["off_c0_noise"]) == 0.0


def test_offline_intermediates(flow, inputs, expected):
    tokens, xvec = inputs
    with torch.inference_mode():
        assert max_diff(flow.speaker_embedding(xvec), expected["off_c0_spk_proj"]) <= TOLERANCE
        assert max_diff(flow.encode_tokens(tokens, finalize=True), expected["off_c0_h"]) <= TOLERANCE


def test_offline_mel(flow, inputs, noise, expected):
    tokens, xvec = inputs
    mel = flow.inference(tokens, xvec, noise, finalize=True)
    assert mel.dtype == torch.float32
    assert max_diff(mel, expected["off_c0_flow_mel"]) <= TOLERANCE
    assert max_diff(mel, expected["off_mel"]) <= TOLERANCE


def test_streaming_calls(flow, inputs, noise, expected):
    tokens, xvec = inputs
    calls = expected["st_calls"]  # rows: (tokens so far, token offset, finalize, samples)
    assert len(calls) == 4
    for k, (n_tokens, _offset, finalize, _samples) in enumerate(calls):
        mel = flow.inference(tokens[:, :n_tokens], xvec, noise, finalize=bool(finalize))
        n_out = n_tokens if finalize else n_tokens - flow.cfg.pre_lookahead_len
        assert mel.shape == (1, 80, n_out * flow.cfg.token_mel_ratio)
        assert max_diff(mel, expected[f"st_call{k}_flow_mel"]) <= TOLERANCE, f"call {k}"


def test_streaming_cache_is_new_frames_of_each_call(expected):
    # How the server uses the flow calls: call k contributes frames from token_offset * ratio on.
    calls = expected["st_calls"]
    parts = [expected[f"st_call{k}_flow_mel"][:, :, 2 * offset:] for k, (_, offset, _, _) in enumerate(calls)]
    assert np.array_equal(np.concatenate(parts, axis=2), expected["st_cache_mel"])


def test_solve_on_explicit_window_equals_inference(flow, inputs, noise):
    tokens, xvec = inputs
    with torch.inference_mode():
        mu = flow.mu(tokens[:, :33], finalize=False)  # [1, 80, 60]
        spk = flow.speaker_embedding(xvec)
        mel = flow.solve(mu, spk, noise[:, :, :60])
    assert torch.equal(mel, flow.inference(tokens[:, :33], xvec, noise, finalize=False))


def test_time_schedule_is_cosine():
    t = time_schedule(10, "cosine")
    expected = 1 - np.cos(np.linspace(0, 1, 11) * np.pi / 2)
    assert np.allclose(t.numpy(), expected, atol=1e-6)


def test_other_sizes_run():
    cfg = FlowConfig(vocab_size=100, pre_lookahead_channels=32, dim=48, depth=3, heads=3, dim_head=16, ff_mult=3,
                     static_chunk_size=8, n_timesteps=3)
    torch.manual_seed(0)
    flow = Flow(cfg).eval()
    tokens = torch.randint(0, 100, (1, 11))
    xvec = torch.randn(1, cfg.spk_embed_dim)
    noise = torch.randn(1, cfg.output_size, 100)
    assert flow.encode_tokens(tokens, finalize=False).shape == (1, 8, cfg.input_size)
    for finalize, n in ((True, 11), (False, 8)):
        for streaming in (False, True):
            mel = flow.inference(tokens, xvec, noise, finalize=finalize, streaming=streaming)
            assert mel.shape == (1, cfg.output_size, n * cfg.token_mel_ratio)
            assert torch.isfinite(mel).all()
    assert flow.state_dict()["decoder.estimator.rotary_embed.inv_freq"].shape == (8,)
