"""Streaming token2wav: chunk schedule, exact lengths, continuation, serialisation, bounded work, bad inputs.

Models: the golden tiny checkpoint (`golden/cosyvoice3-token2wav-tiny-a`, reference weights) and
a tiny `init_vocoder` checkpoint (our layout, with named speakers). Tokens come from a seeded
numpy RNG. The issue's streaming requirements:

- the first chunk once first_hop + 3 (look-ahead) tokens exist, then every `hop` tokens, only new
  samples, exactly 960 samples per token, a final flush; the audio does not depend on how the
  tokens were split into pushes;
- `incremental`: HiFT continues the waveform exactly (one HiFT run over the concatenated new mel
  frames gives the same samples); with a flow window covering the whole call it equals
  `reference`; mel SNR against offline >= 20 dB at the default window; bounded work per chunk;
- no clicks at chunk joins; a serialised state continues on a fresh instance to the same samples;
- bad inputs raise `VocoderInputError` / `CheckpointError` with a clear message.

Exactness is checked in float64: float32 HiFT runs over different mel lengths round differently
(oneDNN and small-matrix BLAS kernels are chosen by size), and the NSF source turns a 1-ulp f0
difference into ~1e-5 of waveform through its 2*pi*480 phase multiplier (the reference's own
streaming differs from one HiFT run by ~5e-5 for that reason). `float64_hift` runs HiFT in float64
(a test harness: in production the f0 predictor runs in float32 like the reference's), where the
continuation agrees to ~1e-16; the float32 path is checked at a rounding tolerance.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from funchat.errors import CheckpointError
from funchat.model.presets import SPEECH_BOS, SPEECH_EOS, SPEECH_PAD
from funchat.vocoder.checkpoint import init_vocoder, load_reference_folder, load_vocoder, pick_speaker
from funchat.vocoder.hift import Hift
from funchat.vocoder.synthesize import synthesize
from funchat.vocoder.token2wav import MODES, StreamConfig, StreamState, Token2Wav, VocoderInputError

SPT = 960  # samples per token at 24 kHz
EXACT = 1e-5  # the tolerance (float64 HiFT: seen ~2e-16)
ROUNDING = 5e-4  # float32 length-dependent rounding through the source phase (seen: 7e-5; amplitude ~0.1)
LENGTHS = (1, 3, 17, 18, 19, 33, 60, 137)
HOPS = ((15, 15), (5, 10), (25, 25))


# -- fixtures and helpers --------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(golden_dir):
    """Golden-weight Token2Wav per stream configuration (each its own instance, built once)."""
    cache: dict[tuple, Token2Wav] = {}

    def get(**stream) -> Token2Wav:
        key = tuple(sorted(stream.items()))
        if key not in cache:
            model = load_reference_folder(golden_dir)
            model.cfg.stream = StreamConfig(**stream)
            cache[key] = model
        return cache[key]

    return get


@pytest.fixture(scope="module")
def model(models) -> Token2Wav:
    return models()


@pytest.fixture(scope="module")
def tiny_vocoder(tmp_path_factory):
    return load_vocoder(init_vocoder(tmp_path_factory.mktemp("tiny-vocoder"), "tiny", seed=0))


@pytest.fixture
def float64_hift(golden_dir):
    """A fresh golden Token2Wav whose HiFT (f0 predictor included) runs in float64."""

    def make(**stream) -> Token2Wav:
        model = load_reference_folder(golden_dir)
        model.cfg.stream = StreamConfig(**stream)
        hift, solve = model.hift.double(), model.flow.solve
        model.flow.solve = lambda *args, **kwargs: solve(*args, **kwargs).double()
        hift.predict_f0 = lambda mel, finalize=True: hift.f0_predictor(mel.double(), finalize=finalize)
        hift.decode = lambda mel, source, finalize=True: Hift.decode(hift, mel.double(), source, finalize)
        return model

    return make


def tokens(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, 6561, n).tolist()


def stream(model: Token2Wav, xvec, pieces: list[list[int]], mode: str = "incremental",
           trace: list | None = None) -> tuple[list[torch.Tensor], StreamState]:
    """Push each piece (the last with final=True); -> (every chunk in order, the state)."""
    state = model.start(xvec, mode)
    chunks: list[torch.Tensor] = []
    for i, piece in enumerate(pieces):
        chunks += model.push(state, piece, final=i == len(pieces) - 1, trace=trace)
    return chunks, state


def random_pieces(toks: list[int], seed: int, largest: int) -> list[list[int]]:
    """Uneven pieces (sizes 0..largest, so empty pushes too) covering toks, last one non-empty."""
    rng = np.random.default_rng(seed)
    pieces, i = [], 0
    while i < len(toks):
        size = int(rng.integers(0, largest + 1))
        pieces.append(toks[i:i + size])
        i += size
    while not pieces[-1]:  # the final push carries the last token(s)
        pieces.pop()
    assert sum(map(len, pieces)) == len(toks) and pieces[-1]
    return pieces


def expected_calls(n: int, first_hop: int, hop: int, la: int = 3) -> list[tuple[int, int, bool]]:
    """(tokens given to the call, token offset, finalize) of each vocoder call for n tokens, all
    pushed before or with final=True: a chunk per hop while its look-ahead exists and is not the
    last token, then the final flush."""
    calls, offset, step = [], 0, first_hop
    while offset + step + la < n:
        calls.append((offset + step + la, offset, False))
        offset += step
        step = hop
    if offset < n:
        calls.append((n, offset, True))
    return calls


def mel_snr(ref: torch.Tensor, est: torch.Tensor) -> float:
    ref, est = ref.double(), est.double()
    return 10 * math.log10(float((ref ** 2).sum() / ((ref - est) ** 2).sum()))


def flow_mel(trace: list[dict]) -> torch.Tensor:
    """The new mel frames of every call, concatenated: [80, frames]."""
    return torch.cat([call["flow_mel"] for call in trace], dim=1)


# -- lengths, schedule and piecing (both modes) ---------------------------------------------


@pytest.mark.parametrize("n", LENGTHS)
def test_offline_length_is_960_per_token(model, xvec, n):
    wav, mel = model.offline(tokens(n, n), xvec, return_mel=True)
    assert wav.shape == (n * SPT,) and wav.dtype == torch.float32
    assert mel.shape == (80, 2 * n)
    assert torch.isfinite(wav).all()


def stream_cases() -> list:
    """Default hops: every length; other hops: their own edges around first_hop + 3, short and
    medium lengths (the longest call only once, to keep the file fast)."""
    cases = []
    for first_hop, hop in HOPS:
        if (first_hop, hop) == (15, 15):
            lengths = LENGTHS
        else:
            lengths = (1, 3, first_hop + 2, first_hop + 3, first_hop + 4, 33, 60)
        cases += [pytest.param(mode, (first_hop, hop), n, id=f"{mode}-hop{first_hop}-{hop}-n{n}")
                  for mode in MODES for n in lengths]
    return cases


@pytest.mark.parametrize("mode, hops, n", stream_cases())
def test_stream_length_schedule_and_piecing(models, xvec, mode, hops, n):
    first_hop, hop = hops
    model = models(first_hop=first_hop, hop=hop)
    toks = tokens(n, seed=100 + n)
    lookahead = model.cfg.flow.pre_lookahead_len
    held = model.hift.lookahead_frames * model.cfg.hift.samples_per_frame  # 8 frames = 3840 samples

    # All at once.
    trace: list[dict] = []
    whole, state = stream(model, xvec, [toks], mode, trace)
    audio = torch.cat(whole)
    assert audio.shape == (n * SPT,), f"{n} tokens gave {audio.numel()} samples"
    assert state.finished and state.samples_sent == n * SPT and state.token_offset == n
    assert [(c["tokens"], c["offset"], c["finalize"]) for c in trace] == expected_calls(n, first_hop, hop)
    # Only new samples: the first chunk holds back the HiFT look-ahead, later ones are one hop each.
    sizes = [c["samples"] for c in trace]
    if len(trace) > 1:
        assert sizes[0] == first_hop * SPT - held
        assert all(s == hop * SPT for s in sizes[1:-1])
    assert [c.numel() for c in whole] == [s for s in sizes if s]

    # No clicks: the jump across each join is no larger than the largest jump inside a chunk.
    if len(whole) > 1:
        inside = max(float(c.diff().abs().max()) for c in whole if c.numel() > 1)
        joins = np.cumsum([c.numel() for c in whole])[:-1]
        assert max(float((audio[j] - audio[j - 1]).abs()) for j in joins) <= inside

    # One token at a time: nothing before first_hop + look-ahead tokens exist, then identical audio
    # (reference mode: around the first chunk only, its calls cost the square of the length).
    if mode == "incremental" or n <= first_hop + lookahead + 1:
        state = model.start(xvec, mode)
        singles, first_at = [], None  # number of tokens pushed when the first chunk came
        for i, t in enumerate(toks):
            out = model.push(state, [t], final=i == n - 1)
            if out and first_at is None:
                first_at = i + 1
            singles += out
        assert first_at == min(first_hop + lookahead, n)
        assert torch.equal(torch.cat(singles), audio)

    # Uneven random pieces (including empty pushes).
    pieces, state = stream(model, xvec, random_pieces(toks, seed=n, largest=2 * hop + 7), mode)
    assert torch.equal(torch.cat(pieces), audio)

    # Finished: no more pushes of any kind.
    for more, final in (([1], False), ([], True), ([], False)):
        with pytest.raises(VocoderInputError, match="already finished"):
            model.push(state, more, final=final)


@pytest.mark.parametrize("mode", MODES)
def test_final_flush_after_non_final_pushes(models, xvec, mode):
    """Tokens all pushed non-final, then an empty final push: exact length, nothing lost."""
    model = models()
    for n in (18, 34):
        state = model.start(xvec, mode)
        chunks = model.push(state, tokens(n, n))
        assert sum(c.numel() for c in chunks) < n * SPT
        chunks += model.push(state, [], final=True)
        assert sum(c.numel() for c in chunks) == n * SPT and state.finished


@pytest.mark.parametrize("mode", MODES)
def test_tiny_init_vocoder_streams(tiny_vocoder, mode):
    model, speakers = tiny_vocoder
    x = pick_speaker(speakers, "speaker1")
    toks = tokens(40, 7)
    whole, _ = stream(model, x, [toks], mode)
    pieces, _ = stream(model, x, random_pieces(toks, 7, 20), mode)
    assert torch.cat(whole).shape == (40 * SPT,)
    assert torch.equal(torch.cat(whole), torch.cat(pieces))
    assert model.offline(toks, x).shape == (40 * SPT,)


# -- incremental: continuation, equivalence to reference, quality ---------------------------


def one_hift_run(model: Token2Wav, mel: torch.Tensor) -> torch.Tensor:
    """One final HiFT call over the whole mel [80, T], as offline does: -> [T * 480]."""
    noise = model.noise.source_noise(mel.shape[1] * model.cfg.hift.samples_per_frame)
    return model.hift.inference(mel[None], noise, finalize=True)[0]


@pytest.mark.parametrize("hops, n", [((15, 15), 80), ((5, 10), 60), ((25, 25), 40), ((1, 1), 24)],
                         ids=lambda v: f"hop{v[0]}-{v[1]}" if isinstance(v, tuple) else str(v))
def test_incremental_hift_continuation_is_one_hift_run(float64_hift, xvec, hops, n):
    model = float64_hift(first_hop=hops[0], hop=hops[1])
    trace: list[dict] = []
    chunks, _ = stream(model, xvec, [tokens(n, 3 * n)], "incremental", trace)
    mel = flow_mel(trace)
    assert mel.shape == (80, 2 * n) and mel.dtype == torch.float64
    assert float((torch.cat(chunks) - one_hift_run(model, mel)).abs().max()) <= EXACT


@pytest.mark.parametrize("mode", MODES)
def test_float32_continuation_is_one_hift_run_to_rounding(models, xvec, mode):
    """The production float32 path, both modes: the same up to length-dependent rounding."""
    model = models(first_hop=5, hop=10)
    n = 100
    trace: list[dict] = []
    chunks, _ = stream(model, xvec, [tokens(n, 3 * n)], mode, trace)
    if mode == "incremental":
        mel = flow_mel(trace)
    else:  # the reference's mel history: each call's frames past its token offset
        mel = torch.cat([c["flow_mel"][:, 2 * c["offset"]:] for c in trace], dim=1)
    assert float((torch.cat(chunks) - one_hift_run(model, mel)).abs().max()) <= ROUNDING


@pytest.mark.parametrize("hops, n", [((15, 15), 100), ((5, 10), 33)],
                         ids=lambda v: f"hop{v[0]}-{v[1]}" if isinstance(v, tuple) else str(v))
def test_incremental_with_whole_window_equals_reference(float64_hift, xvec, hops, n):
    model = float64_hift(first_hop=hops[0], hop=hops[1], flow_left_tokens=n)
    toks = tokens(n, 5 * n)
    inc_trace: list[dict] = []
    ref_trace: list[dict] = []
    inc, _ = stream(model, xvec, [toks], "incremental", inc_trace)
    ref, _ = stream(model, xvec, [toks], "reference", ref_trace)
    assert [c.numel() for c in inc] == [c.numel() for c in ref]
    for a, b in zip(inc_trace, ref_trace):  # the same flow frames: whole call, noise from column 0
        assert torch.equal(a["flow_mel"], b["flow_mel"][:, 2 * b["offset"]:])
    assert float((torch.cat(inc) - torch.cat(ref)).abs().max()) <= EXACT


@pytest.fixture(scope="module")
def long_utterance(model, xvec):
    toks = tokens(300, 2024)
    _, mel = model.offline(toks, xvec, return_mel=True)
    return toks, mel


def test_incremental_mel_snr_against_offline(models, xvec, long_utterance, capsys):
    toks, offline_mel = long_utterance
    snr = {}
    for window in (10, 25, 50, 100):
        model = models(flow_left_tokens=window)
        trace: list[dict] = []
        stream(model, xvec, [toks], "incremental", trace)
        snr[window] = mel_snr(offline_mel, flow_mel(trace))
    with capsys.disabled():
        print("\nincremental vs offline mel SNR (300 tokens, golden tiny): "
              + ", ".join(f"window {w}: {s:.1f} dB" for w, s in snr.items()))
    assert StreamConfig().flow_left_tokens == 50
    assert snr[50] >= 20.0, snr


# -- serialisation -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(model, xvec):
    """90 tokens streamed in one push per mode (the continuation tests' expectation)."""
    toks = tokens(90, 9)
    return toks, {mode: torch.cat(stream(model, xvec, [toks], mode)[0]) for mode in MODES}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("split", (10, 47))
def test_state_round_trip_on_fresh_instance_continues_exactly(golden_dir, model, xvec, uninterrupted, mode, split):
    toks, whole = uninterrupted[0], uninterrupted[1][mode]
    state = model.start(xvec, mode)
    first = model.push(state, toks[:split])
    data = state.to_bytes()
    fresh = load_reference_folder(golden_dir)  # another replica: its own noise cache, nothing shared
    restored = StreamState.from_bytes(data)
    assert restored.to_bytes() == data
    for name in ("mode", "tokens", "token_offset", "samples_sent", "finished", "dropped_codes", "mel_start"):
        assert getattr(restored, name) == getattr(state, name), name
    for name in ("xvec", "mel", "f0", "cycles"):
        a, b = getattr(state, name), getattr(restored, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and torch.equal(a, b), name

    # A second hop across replicas: back to the first instance mid-way.
    second = fresh.push(restored, toks[split:split + 20])
    again = StreamState.from_bytes(restored.to_bytes())
    rest = model.push(again, toks[split + 20:], final=True)
    assert torch.equal(torch.cat(first + second + rest), whole)


# -- bounded work ---------------------------------------------------------------------------


def test_incremental_work_per_chunk_is_bounded(golden_dir, xvec):
    model = load_reference_folder(golden_dir)  # default stream settings; its own instance for the spies
    left, hop = model.cfg.stream.flow_left_tokens, model.cfg.stream.hop  # 50, 15
    flow_frames, hift_frames = [], []
    solve, decode = model.flow.solve, model.hift.decode

    def spy_solve(mu, *args, **kwargs):
        flow_frames.append(mu.shape[2])
        return solve(mu, *args, **kwargs)

    def spy_decode(mel, *args, **kwargs):
        hift_frames.append(mel.shape[2])
        return decode(mel, *args, **kwargs)

    model.flow.solve, model.hift.decode = spy_solve, spy_decode
    ratio, la = model.cfg.flow.token_mel_ratio, model.cfg.flow.pre_lookahead_len
    hift_left = model.hift.left_context_frames  # 37
    held = model.hift.lookahead_frames  # 8
    state = model.start(xvec)
    toks = tokens(420, 45)
    trace: list[dict] = []
    mel_sizes, tensor_bytes = [], []
    rng = np.random.default_rng(45)
    i = 0
    while i < len(toks):
        size = int(rng.integers(1, 2 * hop))
        model.push(state, toks[i:i + size], final=i + size >= len(toks), trace=trace)
        i += size
        held_tensors = [t for t in (state.mel, state.f0, state.cycles) if t is not None]
        mel_sizes.append(0 if state.mel is None else state.mel.shape[1])
        assert all(t.shape[0] <= hift_left for t in (state.f0, state.cycles) if t is not None)
        tensor_bytes.append(sum(t.numel() * t.element_size() for t in held_tensors))

    assert len(flow_frames) == len(trace) == len(hift_frames)
    assert max(mel_sizes) <= hift_left + hop * ratio
    # The flow window: at most left context + one hop (+ look-ahead on the final call), and the
    # same size for every non-final call once the left context is full.
    assert max(flow_frames) <= (left + hop + la) * ratio
    steady = [f for f, c in zip(flow_frames, trace) if c["offset"] >= left and not c["finalize"]]
    assert len(steady) >= 20 and set(steady) == {(left + hop) * ratio}
    # HiFT re-runs its receptive field plus the new frames, nothing more.
    assert max(hift_frames) <= hift_left + held + hop * ratio
    late = hift_frames[len(hift_frames) // 2:-1]
    assert max(late) <= max(hift_frames[3:len(hift_frames) // 2])
    # The state's tensors do not grow with the call (only the token list does).
    assert max(tensor_bytes[len(tensor_bytes) // 2:]) <= max(tensor_bytes[3:len(tensor_bytes) // 2])
    assert sum(c["samples"] for c in trace) == len(toks) * SPT


def test_reference_mode_history_grows(model, xvec):
    """The contrast: reference mode keeps (and re-runs) the whole mel history."""
    state = model.start(xvec, "reference")
    model.push(state, tokens(100, 1))
    assert state.mel.shape[1] == 2 * state.token_offset == 2 * 90


# -- bad inputs -----------------------------------------------------------------------------


def test_empty_tokens(model, xvec):
    with pytest.raises(VocoderInputError, match="no speech tokens"):
        model.offline([], xvec)
    with pytest.raises(VocoderInputError, match="no speech tokens"):
        model.offline([SPEECH_BOS, SPEECH_EOS, SPEECH_PAD], xvec)
    with pytest.raises(VocoderInputError, match="no speech tokens"):
        synthesize(model, [], xvec, stream=True)
    for mode in MODES:
        state = model.start(xvec, mode)
        assert model.push(state, []) == []
        assert model.push(state, [], final=True) == []
        assert state.finished and state.samples_sent == 0
        with pytest.raises(VocoderInputError):
            model.push(state, [1, 2, 3])


@pytest.mark.parametrize("mode", MODES)
def test_codes_outside_the_codebook_are_dropped_and_counted(model, xvec, mode):
    assert model.cfg.codes == 6561
    assert {SPEECH_BOS, SPEECH_EOS, SPEECH_PAD} == {6561, 6562, 6563}  # what `funchat respond` emits
    clean = tokens(40, 4)
    noisy = [SPEECH_BOS] + clean[:20] + [SPEECH_PAD, SPEECH_PAD] + clean[20:] + [SPEECH_EOS, -1, 6564, 10**6]
    state = model.start(xvec, mode)
    chunks = model.push(state, noisy[:25]) + model.push(state, noisy[25:], final=True)
    assert state.dropped_codes == 7 and state.tokens == clean
    reference, _ = stream(model, xvec, [clean], mode)
    assert torch.equal(torch.cat(chunks), torch.cat(reference))
    assert torch.equal(model.offline(noisy, xvec), model.offline(clean, xvec))
    wav, info = synthesize(model, noisy, xvec, stream=True, mode=mode)
    assert info["dropped_codes"] == 7 and wav.shape == (40 * SPT,)
    _, info = synthesize(model, np.array(noisy), xvec)
    assert info["dropped_codes"] == 7
    # Codes are kept at the edges of the codebook.
    assert model.clean_tokens([0, 6560, 6561, -1]) == ([0, 6560], 2)


def test_non_integer_tokens_are_refused(model, xvec):
    with pytest.raises(VocoderInputError, match="integers"):
        model.offline([1.5, 2.0], xvec)
    state = model.start(xvec)
    with pytest.raises(VocoderInputError, match="integers"):
        model.push(state, np.array([3.0, 4.0]))


def test_unknown_stream_mode(model, xvec):
    with pytest.raises(VocoderInputError, match="unknown stream mode 'chunked'.*incremental.*reference"):
        model.start(xvec, "chunked")
    with pytest.raises(VocoderInputError, match="unknown stream mode"):
        synthesize(model, tokens(20), xvec, stream=True, mode="offline")


@pytest.mark.parametrize("bad", [torch.ones(191), torch.ones(193), torch.ones(2, 192), np.ones(0)],
                         ids=["191", "193", "2x192", "empty"])
def test_wrong_sized_speaker_vector(model, bad):
    for call in (lambda: model.start(bad), lambda: model.start(bad, "reference"),
                 lambda: model.offline(tokens(5), bad)):
        with pytest.raises(VocoderInputError, match="speaker embedding has .* values, the vocoder expects 192"):
            call()


@pytest.mark.parametrize("bad", ["zero", "nan", "inf"])
def test_degenerate_speaker_vector(model, xvec, bad):
    x = xvec.clone()
    if bad == "zero":
        x.zero_()
    else:
        x[7] = float(bad)
    for call in (lambda: model.start(x), lambda: model.offline(tokens(5), x)):
        with pytest.raises(VocoderInputError, match="finite and non-zero"):
            call()


def test_speaker_vector_as_row_or_numpy_is_accepted(model, xvec):
    a = model.offline(tokens(4), xvec)
    assert torch.equal(model.offline(tokens(4), xvec[None]), a)
    assert torch.equal(model.offline(tokens(4), xvec.double().numpy()), a)


def test_too_many_tokens_raise_without_output(models, xvec):
    model = models(max_tokens=40)
    with pytest.raises(VocoderInputError, match="41 speech tokens exceed .*maximum of 40"):
        model.offline(tokens(41), xvec)
    assert model.offline(tokens(40), xvec).shape == (40 * SPT,)
    assert model.offline(tokens(40) + [SPEECH_EOS] * 5, xvec).shape == (40 * SPT,)  # dropped codes do not count
    for mode in MODES:
        state = model.start(xvec, mode)
        trace: list[dict] = []
        with pytest.raises(VocoderInputError, match="exceed .*maximum of 40"):
            model.push(state, tokens(41), final=True, trace=trace)
        assert trace == [] and state.samples_sent == 0
        state = model.start(xvec, mode)
        assert model.push(state, tokens(30)[:20])
        with pytest.raises(VocoderInputError, match="maximum of 40"):
            model.push(state, tokens(30, 1), trace=trace)
        assert trace == []
    assert StreamConfig().max_tokens == 7500


def test_reference_paths_refuse_more_than_the_fixed_noise_covers(models, xvec):
    """Offline and reference mode read the 300 s noise from column 0: 7500 tokens at most, even
    with a larger configured maximum (incremental mode wraps the noise instead)."""
    model = models(max_tokens=8000)
    assert model.noise_tokens == 7500
    too_long = tokens(7501, 3)
    with pytest.raises(VocoderInputError, match="7501 speech tokens exceed .*maximum of 7500"):
        model.offline(too_long, xvec)
    state = model.start(xvec, "reference")
    with pytest.raises(VocoderInputError, match="7501 speech tokens exceed .*maximum of 7500"):
        model.push(state, too_long)
    assert state.tokens == [] and state.samples_sent == 0


@pytest.mark.parametrize("mode", MODES)
def test_rejected_push_leaves_the_stream_usable(models, xvec, mode):
    """A push refused for length must not change the state: the tokens accepted before it can
    still be flushed (same audio as a stream that never saw the refused push), and dropped
    codes of the refused push are not counted."""
    model = models(max_tokens=40)
    toks = tokens(30, 8)
    expected, _ = stream(model, xvec, [toks], mode)
    state = model.start(xvec, mode)
    chunks = model.push(state, toks)
    before = state.to_bytes()
    with pytest.raises(VocoderInputError, match="maximum of 40"):
        model.push(state, tokens(11, 9) + [SPEECH_EOS])
    assert state.to_bytes() == before, (
        f"refused push changed the state: {len(state.tokens)} tokens, {state.dropped_codes} dropped")
    chunks += model.push(state, [], final=True)
    assert torch.equal(torch.cat(chunks), torch.cat(expected))


def test_stream_config_is_validated():
    for bad in ({"first_hop": 0}, {"hop": 0}, {"flow_left_tokens": -1}, {"hift_left_frames": -1}):
        with pytest.raises(VocoderInputError):
            StreamConfig(**bad)


def test_unknown_speaker_name_names_the_choices(tiny_vocoder):
    _, speakers = tiny_vocoder
    assert set(speakers) == {"default", "speaker1"}
    with pytest.raises(CheckpointError, match="unknown speaker 'nobody': choose one of default, speaker1"):
        pick_speaker(speakers, "nobody")
    assert torch.equal(pick_speaker(speakers, None), speakers["default"])
    with pytest.raises(CheckpointError, match="no speakers"):
        pick_speaker({}, None)
