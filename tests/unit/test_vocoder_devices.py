"""The vocoder's device and dtype settings: the flow in bfloat16/float16 against float32 (the mel
SNR the GPU path gives up), states and chunks on the CPU whatever the device, and the service
parameters refused with a message that names them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from funchat.engines.triton_adapter import ServiceParams
from funchat.engines.vocoder import load_vocoder_engine
from funchat.vocoder.checkpoint import init_vocoder, load_reference_folder
from funchat.vocoder.token2wav import StreamState, VocoderInputError


def stream_mel(model, xvec, toks: list[int]) -> tuple[torch.Tensor, torch.Tensor, StreamState]:
    """Push toks in hops of 15, then finish -> (flow mel [80, frames], wav [samples], final state)."""
    state = model.start(xvec)
    trace: list[dict] = []
    chunks = []
    for i in range(0, len(toks), 15):
        chunks += model.push(state, toks[i:i + 15], final=i + 15 >= len(toks), trace=trace)
    return torch.cat([c["flow_mel"] for c in trace], dim=1), torch.cat(chunks), state


def snr_db(ref: torch.Tensor, est: torch.Tensor) -> float:
    ref, est = ref.double(), est.double()
    return 10 * math.log10(float((ref ** 2).sum() / ((ref - est) ** 2).sum()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_flow_stays_close_to_float32_and_states_stay_on_the_cpu(golden_dir, xvec, dtype):
    toks = np.random.default_rng(3).integers(0, 6561, 64).tolist()
    ref_mel, ref_wav, _ = stream_mel(load_reference_folder(golden_dir), xvec, toks)
    model = load_reference_folder(golden_dir).to_device("cpu", dtype)
    assert model.flow_dtype == dtype and next(model.hift.parameters()).dtype == torch.float32
    mel, wav, state = stream_mel(model, xvec, toks)
    assert mel.dtype == torch.float32 and mel.shape == ref_mel.shape and wav.shape == ref_wav.shape
    assert snr_db(ref_mel, mel) > 20.0  # seen on the golden weights: bf16 29 dB, fp16 41 dB
    assert all(t.device.type == "cpu" for t in (state.xvec, state.mel, state.f0, state.cycles))
    assert StreamState.from_bytes(state.to_bytes()).tokens == toks


def test_an_unsupported_flow_dtype_is_refused(golden_dir):
    with pytest.raises(VocoderInputError, match="float64 is not supported"):
        load_reference_folder(golden_dir).to_device("cpu", torch.float64)


@pytest.mark.parametrize("values, message", [
    ({"device": "tpu"}, r"device='tpu' is not accepted: use cpu, cuda or cuda:N"),
    ({"dtype": "int8"}, r"dtype='int8' is not accepted: use one of float32, bfloat16, float16"),
])
def test_bad_vocoder_service_parameters_are_named(tmp_path, values, message):
    checkpoint = init_vocoder(tmp_path / "ckpt", "tiny", seed=0)
    params = ServiceParams("vocoder", {"checkpoint": str(checkpoint), **values})
    with pytest.raises(ValueError, match=message):
        load_vocoder_engine(params)


def test_the_vocoder_service_takes_a_bfloat16_flow(tmp_path):
    checkpoint = init_vocoder(tmp_path / "ckpt", "tiny", seed=0)
    engine = load_vocoder_engine(ServiceParams("vocoder", {"checkpoint": str(checkpoint), "dtype": "bfloat16"}))
    assert engine.vocoder.flow_dtype == torch.bfloat16
