"""Reply audio in the call's output format (SessionConfig.output_audio_format): the format checked
and kept in the session record, the vocoder's 24 kHz chunks resampled as one stream per reply and
encoded (G.711 for telephony), the client decoding any format, and a whole turn through the turn
runner (fake model services) in PCMU at 8 kHz."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
import soxr

from funchat import g711
from funchat.api import pb
from funchat.client import (FunchatClientError, collect_reply, decode_audio, decode_delta, encode_audio, output_format,
                            session_config)
from funchat.orchestrator.audio_output import (DEFAULT_OUTPUT, OutputAudioStream, OutputFormat, delta_samples,
                                               pcm16)
from funchat.orchestrator.call_config import CallConfig, parse_config
from funchat.orchestrator.errors import ApiError
from funchat.orchestrator.exchange import turn_request
from funchat.orchestrator.model_clients import VocoderReply

PCMU, PCMA, PCM16, FLOAT32 = (pb.AUDIO_ENCODING_PCMU, pb.AUDIO_ENCODING_PCMA, pb.AUDIO_ENCODING_PCM16,
                              pb.AUDIO_ENCODING_FLOAT32)
# G.711's largest quantisation error, half its top segment's step (1024 / 512 in 16-bit units), plus
# 1.5 units for PCM16's rounding and its 32767 scaling (the decoder divides by 32768)
MAX_G711_ERROR = {"pcmu": 513.5 / 32768, "pcma": 257.5 / 32768}


def parse(fmt: pb.AudioFormat | None) -> CallConfig:
    cfg = pb.SessionConfig() if fmt is None else pb.SessionConfig(output_audio_format=fmt)
    return parse_config(cfg, voices=set(), max_new_tokens=512)


def speech_like(seconds: float = 2.0, rate: int = 24000) -> np.ndarray:
    """A modulated tone with energy across the telephone band and above it (aliasing would show)."""
    t = np.arange(int(seconds * rate)) / rate
    x = 0.4 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 1.3 * t) + 0.1 * np.sin(2 * np.pi * 1700 * t) \
        + 0.05 * np.sin(2 * np.pi * 6000 * t)
    return x.astype(np.float32)


def stream(fmt: OutputFormat, audio: np.ndarray, sizes: list[int]) -> list[dict]:
    """`audio` pushed in chunks of `sizes` (cycled), the last push flushing: -> the delta fields."""
    out, sent, i, k = OutputAudioStream(fmt), [], 0, 0
    while i < len(audio):
        n = sizes[k % len(sizes)]
        fields = out.push(audio[i:i + n], last=i + n >= len(audio))
        if fields is not None:
            sent.append(fields)
        i, k = i + n, k + 1
    return sent


# ---- the format, checked ----

@pytest.mark.parametrize("fmt, expected", [
    (None, ("pcm16", 24000)),                                        # unset: as before
    (pb.AudioFormat(), ("pcm16", 24000)),                            # set but all zero: the same
    (pb.AudioFormat(encoding=PCMU, sample_rate_hz=8000), ("pcmu", 8000)),
    (pb.AudioFormat(encoding=PCMA, sample_rate_hz=8000), ("pcma", 8000)),
    (pb.AudioFormat(encoding=PCMU, sample_rate_hz=16000), ("pcmu", 16000)),  # wideband G.711: allowed
    (pb.AudioFormat(encoding=PCM16, sample_rate_hz=16000), ("pcm16", 16000)),
    (pb.AudioFormat(encoding=PCM16, sample_rate_hz=48000), ("pcm16", 48000)),
    (pb.AudioFormat(encoding=FLOAT32), ("float32", 24000)),          # rate 0 = the vocoder's 24 kHz
    (pb.AudioFormat(encoding=FLOAT32, sample_rate_hz=44100), ("float32", 44100)),
])
def test_an_output_format_is_accepted(fmt, expected):
    cfg = parse(fmt)
    assert (cfg.output_encoding, cfg.output_sample_rate) == expected
    assert (cfg.output_format.encoding, cfg.output_format.sample_rate) == expected
    assert cfg.output_format.is_default == (expected == ("pcm16", 24000))


@pytest.mark.parametrize("fmt, words", [
    (pb.AudioFormat(encoding=9, sample_rate_hz=8000),
     "output_audio_format.encoding 9 is unknown; use AUDIO_ENCODING_PCM16, AUDIO_ENCODING_FLOAT32, "
     "AUDIO_ENCODING_PCMU or AUDIO_ENCODING_PCMA"),
    (pb.AudioFormat(encoding=PCMU, sample_rate_hz=7999),
     "output_audio_format.sample_rate_hz 7999 is not supported; use 8000..48000 Hz"),
    (pb.AudioFormat(encoding=PCM16, sample_rate_hz=48001),
     "output_audio_format.sample_rate_hz 48001 is not supported; use 8000..48000 Hz"),
    (pb.AudioFormat(encoding=PCMA, sample_rate_hz=96000),
     "output_audio_format.sample_rate_hz 96000 is not supported; use 8000..48000 Hz"),
    (pb.AudioFormat(sample_rate_hz=1), "output_audio_format.sample_rate_hz 1 is not supported"),
])
def test_a_bad_output_format_is_refused_naming_the_field(fmt, words):
    with pytest.raises(ApiError) as info:
        parse(fmt)
    assert info.value.code == "INVALID_ARGUMENT"
    assert words in info.value.message, info.value.message


def test_the_input_format_is_still_checked_first():
    cfg = pb.SessionConfig(input_audio_format=pb.AudioFormat(sample_rate_hz=100),
                           output_audio_format=pb.AudioFormat(sample_rate_hz=100))
    with pytest.raises(ApiError, match="input sample rate 100 Hz"):
        parse_config(cfg, voices=set(), max_new_tokens=512)


# ---- the format, kept ----

@pytest.mark.parametrize("fmt", [pb.AudioFormat(encoding=PCMU, sample_rate_hz=8000),
                                 pb.AudioFormat(encoding=PCMA, sample_rate_hz=8000),
                                 pb.AudioFormat(encoding=FLOAT32, sample_rate_hz=16000), None])
def test_the_session_record_keeps_the_output_format(fmt):
    cfg = parse(fmt)
    record = json.loads(json.dumps(dataclasses.asdict(cfg)))  # as the session store keeps the config
    again = CallConfig(**record)
    assert again.output_format == cfg.output_format and again.input_format == cfg.input_format
    assert isinstance(record["output_encoding"], str)  # plain names, not enum numbers


def test_a_record_from_before_output_formats_gets_the_default():
    record = dataclasses.asdict(parse(None))
    del record["output_encoding"], record["output_sample_rate"]
    assert CallConfig(**record).output_format == DEFAULT_OUTPUT


def test_every_turn_of_the_call_asks_for_its_output_format():
    cfg = parse(pb.AudioFormat(encoding=PCMU, sample_rate_hz=8000))
    req = turn_request(cfg, SimpleNamespace(max_new_tokens=16), "sess", "resp", np.zeros((1, 4), np.float32), 1, [])
    assert req.output_format == OutputFormat("pcmu", 8000)


# ---- the conversion, streaming ----

def test_the_default_format_is_sent_as_before():
    """24 kHz PCM16 in `pcm16`, no resampling: the bytes and start_ms of the code before formats."""
    audio = speech_like(1.0)
    sent = stream(DEFAULT_OUTPUT, audio, [14400, 9600])
    assert all(set(f) == {"pcm16", "sample_rate_hz", "start_ms"} and f["sample_rate_hz"] == 24000 for f in sent)
    assert [f["start_ms"] for f in sent] == [0, 600]
    assert b"".join(f["pcm16"] for f in sent) == pcm16(audio)
    old = (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()  # the old turn_runner.pcm16
    assert pcm16(audio) == old


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000])
def test_chunked_equals_the_whole_reply_resampled(rate):
    """One resampler per reply: odd chunk sizes (down to one sample, which it holds back) give the
    whole reply resampled at once, so chunk joins add no clicks."""
    audio = speech_like(2.0)
    sent = stream(OutputFormat("float32", rate), audio, [14400, 1, 7, 9600, 333, 14400])
    got = decode_audio(b"".join(f["audio"] for f in sent), "float32")
    whole = soxr.resample(audio, 24000, rate, quality="HQ").astype(np.float32)
    assert len(got) == len(whole) == round(len(audio) * rate / 24000)
    assert np.abs(got - whole).max() < 1e-6
    # positions in ms count the samples sent before each chunk, in the output rate
    before = np.cumsum([0] + [len(f["audio"]) // 4 for f in sent])[:-1]
    assert [f["start_ms"] for f in sent] == [int(n) * 1000 // rate for n in before]
    assert all(f["encoding"] == FLOAT32 and f["sample_rate_hz"] == rate for f in sent)


@pytest.mark.parametrize("name, encoding", [("pcmu", PCMU), ("pcma", PCMA)])
def test_g711_at_8_khz_decodes_back_close_to_the_source(name, encoding):
    audio = speech_like(2.0)
    sent = stream(OutputFormat(name, 8000), audio, [14400, 7, 9600])  # 600 ms vocoder chunks, and odd ones
    data = b"".join(f["audio"] for f in sent)
    assert all(f["encoding"] == encoding and f["sample_rate_hz"] == 8000 and "pcm16" not in f for f in sent)
    assert len(data) == 16000  # one byte a sample, 2 s at 8 kHz
    got = decode_audio(data, name)
    source = soxr.resample(audio, 24000, 8000, quality="HQ")
    err = got - source
    assert np.abs(err).max() <= MAX_G711_ERROR[name]
    snr = 10 * np.log10(np.sum(source ** 2) / np.sum(err ** 2))
    assert snr > 35, snr  # G.711's ~38 dB on a loud signal; the resampler adds nothing audible
    # the 6 kHz tone, above the 4 kHz Nyquist, is filtered out, not folded onto 2 kHz (0.5 Hz bins)
    spectrum = np.abs(np.fft.rfft(got))
    fold = spectrum[2000 * 2 - 2: 2000 * 2 + 3].max() / spectrum[1700 * 2 - 2: 1700 * 2 + 3].max()
    assert fold < 0.01, fold


def test_a_short_reply_is_all_flushed_by_its_last_push():
    """A reply shorter than the resampler's delay: nothing until the last push, then all of it."""
    out = OutputAudioStream(OutputFormat("pcmu", 8000))
    assert out.push(np.full(240, 0.1, np.float32)) is None  # 10 ms: held back
    fields = out.push(np.zeros(0, np.float32), last=True)
    assert fields is not None and len(fields["audio"]) == 80 and fields["start_ms"] == 0


def test_delta_samples_counts_any_format():
    assert delta_samples(pb.AudioDelta(pcm16=b"\0" * 480, sample_rate_hz=24000)) == (240, 24000)
    assert delta_samples(pb.AudioDelta(audio=b"\0" * 80, encoding=PCMU, sample_rate_hz=8000)) == (80, 8000)
    assert delta_samples(pb.AudioDelta(audio=b"\0" * 64, encoding=FLOAT32, sample_rate_hz=16000)) == (16, 16000)


# ---- the client ----

def test_the_client_asks_for_an_output_format():
    assert not session_config().HasField("output_audio_format")  # the default: the config of before
    assert not session_config(output_encoding="pcm16", output_sample_rate=24000).HasField("output_audio_format")
    cfg = session_config(output_encoding="pcmu", output_sample_rate=8000)
    assert cfg.output_audio_format == pb.AudioFormat(encoding=PCMU, sample_rate_hz=8000)
    assert output_format(cfg) == ("pcmu", 8000, 1) and output_format(session_config()) == ("pcm16", 24000, 2)
    with pytest.raises(ValueError, match="output_encoding"):
        session_config(output_encoding="opus")
    with pytest.raises(ValueError, match="output_sample_rate"):
        session_config(output_encoding="pcmu", output_sample_rate=0)


@pytest.mark.parametrize("name", ["pcm16", "float32", "pcmu", "pcma"])
def test_the_client_decodes_what_it_would_encode(name):
    x = np.linspace(-0.9, 0.9, 101).astype(np.float32)
    got = decode_audio(encode_audio(x, name), name)
    tol = {"pcm16": 1 / 32768, "float32": 0.0, "pcmu": 0.03, "pcma": 0.03}[name]
    assert len(got) == len(x) and np.abs(got - x).max() <= tol


def test_a_reply_in_pcmu_is_collected_at_8_khz():
    data = encode_audio(np.full(160, 0.25, np.float32), "pcmu")

    def delta(seq):
        return pb.ServerEvent(audio_delta=pb.AudioDelta(response_id="r", sequence=seq, audio=data[seq * 80:][:80],
                                                        encoding=PCMU, sample_rate_hz=8000, start_ms=seq * 10))
    samples, rate = decode_delta(delta(0).audio_delta)
    assert rate == 8000 and len(samples) == 80
    reply = collect_reply([delta(1), delta(0)])
    assert reply.sample_rate == 8000 and len(reply.audio) == 160 and reply.audio_s == pytest.approx(0.02)
    assert np.abs(reply.audio - 0.25).max() < 0.01
    mixed = pb.ServerEvent(audio_delta=pb.AudioDelta(response_id="r", sequence=2, pcm16=b"\0\0", sample_rate_hz=24000))
    with pytest.raises(FunchatClientError, match="pcm16 at 24000 Hz, the chunks before pcmu at 8000 Hz"):
        collect_reply([delta(0), delta(1), mixed])


# ---- a whole turn (fake model services) ----

class SineVocoder:
    """960 samples (40 ms) of a 24 kHz tone per code, continuous across pushes."""

    first_chunk_codes = 0  # a stream's codes are pushed as they come (no chunk size learned)

    def __init__(self):
        self.made = 0

    async def push(self, tokens, state, final, speaker=None, ready_at=None):
        await asyncio.sleep(0.001)
        n = 960 * len(tokens)
        t = (self.made + np.arange(n)) / 24000
        self.made += n
        return VocoderReply((0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), b"state", 0, 0)


@pytest.fixture(scope="module")
def builder(tiny_checkpoint):
    from funchat.turn.prompt import PromptBuilder

    return PromptBuilder.from_checkpoint(tiny_checkpoint)


def run_turn(builder, fmt: OutputFormat):
    from funchat.orchestrator.turn_runner import TurnRequest, TurnRunner
    from funchat.turn.schedule import Mode
    from tests.unit.test_turn_failures import FakeLlm, FakeRefinedHead, FakeServices

    token = builder.tokenizer.encode("hello")[0]
    vocoder = SineVocoder()
    svc = FakeServices(FakeLlm(token, builder.facts.hidden_size, fail_at=10 ** 9), FakeRefinedHead([1, 2, 3, 4, 5]),
                       vocoder)
    req = TurnRequest(response_id="resp_fmt", mode=Mode.S2S, n_groups=3, max_new_tokens=40, output_format=fmt,
                      audio_rows=np.zeros((3, builder.facts.hidden_size), np.float32))
    events = []

    async def emit(event):
        events.append(event)

    outcome = asyncio.run(TurnRunner(builder, svc).run(req, emit, asyncio.Event()))
    return outcome, [e.audio_delta for e in events if e.WhichOneof("event") == "audio_delta"], vocoder.made


def test_a_turn_streams_its_reply_in_pcmu_at_8_khz(builder):
    outcome, deltas, made = run_turn(builder, OutputFormat("pcmu", 8000))
    assert made > 0 and outcome.status == "completed"
    assert [d.sequence for d in deltas] == list(range(len(deltas)))
    assert all(not d.pcm16 and d.encoding == PCMU and d.sample_rate_hz == 8000 for d in deltas)
    data = b"".join(d.audio for d in deltas)
    assert len(data) == made // 3  # every sample, the resampler's tail included
    assert outcome.audio_ms == made * 1000 // 24000  # ms as before: the same for every format
    before = np.cumsum([0] + [len(d.audio) for d in deltas])[:-1]
    assert [d.start_ms for d in deltas] == [int(n) * 1000 // 8000 for n in before]
    t = np.arange(made) / 24000
    source = soxr.resample((0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 24000, 8000, quality="HQ")
    assert np.abs(g711.ulaw_to_pcm16(data) / 32768 - source).max() <= MAX_G711_ERROR["pcmu"]


def test_a_turn_in_the_default_format_sends_pcm16_as_before(builder):
    outcome, deltas, made = run_turn(builder, DEFAULT_OUTPUT)
    assert all(d.pcm16 and not d.audio and d.encoding == 0 and d.sample_rate_hz == 24000 for d in deltas)
    assert sum(len(d.pcm16) for d in deltas) == 2 * made
    before = np.cumsum([0] + [len(d.pcm16) // 2 for d in deltas])[:-1]
    assert [d.start_ms for d in deltas] == [int(n) * 1000 // 24000 for n in before]


def test_the_cli_asks_for_an_output_format():
    from funchat.cli import _client_config, build_parser

    base = ["chat", "--server", "127.0.0.1:50051", "--input", "x.wav"]
    args = build_parser().parse_args(base + ["--output-format", "pcmu"])
    assert args.output_format == ("pcmu", 8000)  # G.711 defaults to the telephone's rate
    assert _client_config(args).output_audio_format == pb.AudioFormat(encoding=PCMU, sample_rate_hz=8000)
    assert build_parser().parse_args(base + ["--output-format", "pcm16:16000"]).output_format == ("pcm16", 16000)
    assert not _client_config(build_parser().parse_args(base)).HasField("output_audio_format")
    for bad in ("opus", "pcmu:8k", "pcmu:0"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(base + ["--output-format", bad])
