"""Pushes of several streams run together (`Token2Wav.push_many`): batched flow windows (padded
and masked) and batched HiFT runs give every stream the samples it gets when pushed alone.

Streams are deliberately at different stages in one batch: a first chunk (short flow window,
no HiFT history), mid-call hops (full windows), a final flush, a reference-mode stream, a push
the stream refuses. Exactness: with the whole vocoder in float64 (`float64_model`), where
rounding cannot hide a padding or masking mistake, samples agree to 1e-9; in the float32
production path the flow's mel agrees to 1e-5 (a batched matmul rounds differently, seen 2e-6)
and the samples to the rounding tolerance of `test_vocoder_stream` (the NSF source's 2*pi*480
phase multiplier amplifies a 1-ulp f0 difference).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from funchat.vocoder.checkpoint import load_reference_folder
from funchat.vocoder.hift import Hift
from funchat.vocoder.token2wav import StreamConfig, StreamPush, Token2Wav, VocoderInputError

FLOAT64 = 1e-9
MEL = 1e-5
ROUNDING = 5e-4


def tokens(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 6561, n).tolist()


@pytest.fixture
def float64_model(golden_dir) -> Token2Wav:
    """The golden vocoder with its flow and HiFT (f0 predictor included) in float64."""
    model = load_reference_folder(golden_dir)
    model.flow.double()
    hift = model.hift.double()
    hift.predict_f0 = lambda mel, finalize=True: hift.f0_predictor(mel.double(), finalize=finalize)
    hift.decode = lambda mel, source, finalize=True: Hift.decode(hift, mel.double(), source, finalize)
    return model


# Each stream: (mode, its tokens cut into pushes; the last push is final). Lengths differ so that
# in one round some streams start, some are mid-call and some flush.
STREAMS = [
    ("incremental", [18, 15, 15, 15, 15, 7]),
    ("incremental", [40, 15, 30, 2]),
    ("incremental", [5, 14, 15, 15, 15, 15, 15, 15]),
    ("reference", [20, 15, 10]),
    ("incremental", [90, 1]),
    ("incremental", [17]),
]


def pieces(sizes: list[int], seed: int) -> list[list[int]]:
    toks = tokens(sum(sizes), seed)
    out, i = [], 0
    for size in sizes:
        out.append(toks[i:i + size])
        i += size
    return out


def alone(model: Token2Wav, xvec, trace=None) -> list[torch.Tensor]:
    """Each stream pushed on its own: -> its whole audio."""
    audio = []
    for k, (mode, sizes) in enumerate(STREAMS):
        state, chunks = model.start(xvec, mode), []
        ps = pieces(sizes, k)
        for j, piece in enumerate(ps):
            chunks += model.push(state, piece, final=j == len(ps) - 1, trace=trace)
        audio.append(torch.cat(chunks))
    return audio


def together(model: Token2Wav, xvec, trace=None) -> tuple[list[torch.Tensor], list[int]]:
    """Round r pushes every stream's r-th piece in one push_many: -> each stream's audio, and the
    number of vocoder calls each push_many made."""
    states = [model.start(xvec, mode) for mode, _ in STREAMS]
    all_pieces = [pieces(sizes, k) for k, (_, sizes) in enumerate(STREAMS)]
    audio: list[list[torch.Tensor]] = [[] for _ in STREAMS]
    calls = []
    for r in range(max(len(p) for p in all_pieces)):
        live = [k for k, p in enumerate(all_pieces) if r < len(p)]
        before = len(trace) if trace is not None else 0
        results = model.push_many([StreamPush(states[k], all_pieces[k][r], final=r == len(all_pieces[k]) - 1)
                                   for k in live], trace)
        calls.append(len(trace) - before if trace is not None else 0)
        for k, result in zip(live, results):
            assert not isinstance(result, Exception), result
            audio[k] += result
    assert all(s.finished for s in states)
    return [torch.cat(a) for a in audio], calls


def test_batched_pushes_equal_pushes_alone_in_float64(float64_model, xvec):
    expected = alone(float64_model, xvec)
    got, _ = together(float64_model, xvec)
    for k, (a, b) in enumerate(zip(expected, got)):
        assert a.dtype == torch.float64 and a.shape == b.shape == (sum(STREAMS[k][1]) * 960,)
        assert float((a - b).abs().max()) <= FLOAT64, f"stream {k}"


def test_batched_pushes_equal_pushes_alone_in_float32(golden_dir, xvec):
    model = load_reference_folder(golden_dir)
    alone_trace: list[dict] = []
    expected = alone(model, xvec, alone_trace)
    trace: list[dict] = []
    got, calls = together(model, xvec, trace)
    for k, (a, b) in enumerate(zip(expected, got)):
        assert a.shape == b.shape
        assert float((a - b).abs().max()) <= ROUNDING, f"stream {k}"
    assert max(calls) >= 4  # rounds where several streams' calls ran together
    # Each call's flow mel against the same call alone (calls with equal keys in different
    # streams: the closest one, since their tokens differ).
    mels = {}
    for c in alone_trace:
        mels.setdefault((c["tokens"], c["offset"], c["finalize"], c["flow_mel"].shape), []).append(c["flow_mel"])
    for c in trace:
        same = mels[(c["tokens"], c["offset"], c["finalize"], c["flow_mel"].shape)]
        closest = min(float((c["flow_mel"] - m).abs().max()) for m in same)
        assert closest <= MEL


def test_the_flow_and_hift_run_batched(golden_dir, xvec):
    """Mid-call streams share one flow forward and one HiFT decode per round."""
    model = load_reference_folder(golden_dir)
    solves, decodes = [], []
    solve, decode = model.flow.solve, model.hift.decode
    model.flow.solve = lambda mu, *a, **kw: (solves.append(mu.shape[0]), solve(mu, *a, **kw))[1]
    model.hift.decode = lambda mel, *a, **kw: (decodes.append(mel.shape[0]), decode(mel, *a, **kw))[1]
    states = [model.start(xvec) for _ in range(4)]
    model.push_many([StreamPush(s, tokens(80, k)) for k, s in enumerate(states)])  # 4 calls each
    assert solves and set(solves) == {4}, solves  # (CFG doubles the batch inside the solver)
    assert decodes and max(decodes) == 4, decodes
    solves.clear()
    decodes.clear()
    results = model.push_many([StreamPush(s, tokens(15, 10 + k)) for k, s in enumerate(states)])
    assert solves == [4] and decodes == [4]  # steady state: equal windows, one batch each
    assert all(len(r) == 1 and r[0].numel() == 15 * 960 for r in results)


def test_a_refused_push_leaves_the_others_and_its_stream_unchanged(golden_dir, xvec):
    model = load_reference_folder(golden_dir)
    done, fine, big = model.start(xvec), model.start(xvec), model.start(xvec)
    model.push(done, tokens(20, 1), final=True)
    model.cfg.stream = StreamConfig(max_tokens=100)
    results = model.push_many([StreamPush(done, tokens(5, 2)), StreamPush(fine, tokens(40, 3)),
                               StreamPush(big, tokens(101, 4)), StreamPush(fine, [], final=False)])
    assert isinstance(results[0], VocoderInputError) and "already finished" in str(results[0])
    assert isinstance(results[2], VocoderInputError) and "maximum of 100" in str(results[2])
    assert big.tokens == [] and big.samples_sent == 0  # nothing changed in the refused stream
    assert sum(c.numel() for c in results[1]) > 0
    rest = model.push(fine, [], final=True)
    assert sum(c.numel() for c in results[1] + results[3] + rest) == 40 * 960
    assert model.push_many([]) == []
