"""Hostile input: every decoder of caller data either gives usable data or refuses it precisely.

Properties (hypothesis) over the public messages, the call configuration and the audio decoders:
random bytes, truncated messages, huge sizes and strings, NaN/inf, values at the wire types' limits,
unknown enum values, wrong sample rates. "Precisely" means: one documented exception type (or an
`error` event) with a status code from a small set and a short message, and never anything else;
"usable" means finite, non-empty float32 audio. After a refused event a Converse call still serves.

The examples are derandomized (the same ones on every run, no example database written), so CI is
reproducible; open-ended search is the fuzz target's job (fuzz/fuzz_audio_and_events.py).
"""

from __future__ import annotations

import asyncio
import importlib.util
import math
import os
import re
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from funchat.api import pb
from funchat.audio_io import SAMPLE_RATE, load_audio, validate_audio
from funchat.errors import AudioInputError
from funchat.orchestrator.audio_input import AudioFormatError, InputAudioStream, InputFormat, decode_utterance
from funchat.orchestrator.call_config import CallConfig, parse_config
from funchat.orchestrator.converse import END_EVENT, ConverseCall
from funchat.orchestrator.errors import ApiError

FEW = settings(max_examples=40, deadline=None, derandomize=True, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
VOICES = {"alice", "bob"}
MAX_NEW_TOKENS = 512
CONFIG_CODES = {"INVALID_ARGUMENT"}  # what parse_config may refuse with
EVENT_CODES = {"INVALID_ARGUMENT", "FAILED_PRECONDITION", "NOT_FOUND"}  # what one refused Converse event gets
MAX_ERROR_CHARS = 1000  # a refusal says what to fix; it never echoes a caller's megabytes
HUGE_TEXT = "\u00e9" * (1 << 20)  # 2 MiB of UTF-8 in one string


def big(value):
    """A large constant as a strategy whose repr stays short (hypothesis prints strategies)."""
    return st.builds(lambda: value)


RATES = st.sampled_from([8000, 11025, 16000, 22050, 24000, 44100, 48000]) | st.integers(8000, 48000)
FORMATS = st.builds(lambda encoding, rate: InputFormat(encoding, rate, {"pcm16": 2, "float32": 4}[encoding]),
                    st.sampled_from(["pcm16", "float32"]), RATES)


# ---- protobuf messages built from their descriptors: every field, any value its wire type allows ----

def _text():
    return st.text(st.characters(exclude_categories=("Cs",)), max_size=40) | big(HUGE_TEXT) | big("[" * 5000) | \
        st.sampled_from(["", " ", "{}", "NaN", "\x00", "alice"])


def _ints(lo: int, hi: int):
    return st.integers(lo, hi) | st.sampled_from([lo, hi, 0, 1, hi // 2 + 1])


SCALARS = {
    FieldDescriptor.TYPE_STRING: _text(),
    FieldDescriptor.TYPE_BYTES: st.binary(max_size=64) | st.just(b"\0" * 3) | big(b"\xff" * 64001),
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_FLOAT: st.floats(width=32) | st.sampled_from([math.nan, math.inf, -math.inf, 1.4e-45, 0.5]),
    FieldDescriptor.TYPE_DOUBLE: st.floats(),
    FieldDescriptor.TYPE_INT32: _ints(-2**31, 2**31 - 1),
    FieldDescriptor.TYPE_INT64: _ints(-2**63, 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: _ints(0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: _ints(0, 2**64 - 1),
}


def _value(field: FieldDescriptor, depth: int):
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return messages(message_factory.GetMessageClass(field.message_type), depth + 1)
    if field.type == FieldDescriptor.TYPE_ENUM:  # proto3 enums are open: any int32 arrives
        return st.sampled_from([v.number for v in field.enum_type.values]) | _ints(-2**31, 2**31 - 1)
    return SCALARS[field.type]


def _set(msg, field: FieldDescriptor, value) -> None:
    target = getattr(msg, field.name)
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        for entry in value:
            target[entry.key] = entry.value  # the maps here hold scalars
    elif field.is_repeated:
        for item in value:
            target.add().CopyFrom(item) if field.type == FieldDescriptor.TYPE_MESSAGE else target.append(item)
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        target.CopyFrom(value)
    else:
        setattr(msg, field.name, value)


def messages(cls, depth: int = 0):
    """Any message of this class: each field unset or any value; one member (or none) per oneof."""
    plain, oneofs = {}, []
    for oneof in cls.DESCRIPTOR.oneofs:
        if not oneof.name.startswith("_"):  # `optional` fields are synthetic oneofs of one
            oneofs.append(st.none() | st.one_of([st.tuples(st.just(f), _value(f, depth)) for f in oneof.fields]))
    for f in cls.DESCRIPTOR.fields:
        if f.containing_oneof is not None and not f.containing_oneof.name.startswith("_"):
            continue
        if depth > 3 and f.type == FieldDescriptor.TYPE_MESSAGE:
            continue
        value = _value(f, depth)
        plain[f] = st.none() | (st.lists(value, max_size=3) if f.is_repeated else value)

    def build(values, chosen):
        msg = cls()
        for f, v in values.items():
            if v is not None:
                _set(msg, f, v)
        for pick in chosen:
            if pick is not None:
                _set(msg, *pick)
        return msg
    return st.builds(build, st.fixed_dictionaries(plain), st.tuples(*oneofs))


def all_message_classes():
    return [message_factory.GetMessageClass(d) for d in pb.DESCRIPTOR.message_types_by_name.values()]


# ---- audio: the API's decoders ----

def _float32_bytes():
    values = st.floats(width=32) | st.sampled_from([math.nan, math.inf, -math.inf, 1.0, -1.0, 1.000001, 3e38])
    return st.lists(values, max_size=64).map(lambda xs: struct.pack(f"<{len(xs)}f", *xs))


AUDIO_BYTES = st.binary(max_size=256) | _float32_bytes() | st.sampled_from([b"", b"\0", b"\0" * 2, b"\0" * 4])


def expected_decode_error(data: bytes, fmt: InputFormat) -> bool:
    """When `InputFormat.decode` must refuse, as the API documents it."""
    if len(data) % fmt.bytes_per_sample:
        return True
    if fmt.encoding == "float32":
        x = np.frombuffer(data, "<f4")
        return bool(x.size) and not (np.isfinite(x).all() and float(np.abs(x).max()) <= 1.0 + 1e-6)
    return False


def assert_usable(samples: np.ndarray, allow_empty: bool = False, bounded: bool = True) -> None:
    """bounded: the API's decoders take [-1, 1] only (and the HQ resampler's filter overshoots a
    full-scale input by a bounded amount); the library's accept louder float audio as it is."""
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert allow_empty or samples.size > 0
    assert np.isfinite(samples).all()
    assert not bounded or samples.size == 0 or np.abs(samples).max() <= 4.0


@FEW
@given(data=AUDIO_BYTES, fmt=FORMATS)
def test_decode_utterance_gives_audio_or_a_format_error(data, fmt):
    try:
        samples = decode_utterance(data, fmt)
    except AudioFormatError as exc:
        assert str(exc) and len(str(exc)) < MAX_ERROR_CHARS
        return
    assert not expected_decode_error(data, fmt)
    assert_usable(samples)


@FEW
@given(chunks=st.lists(AUDIO_BYTES | big(b"\0" * 200_000), max_size=6), fmt=FORMATS)
def test_input_stream_refuses_bad_chunks_and_keeps_decoding(chunks, fmt):
    stream = InputAudioStream(fmt, max_chunk_ms=1000)
    for chunk in chunks:
        too_long = fmt.duration_ms(len(chunk)) > 1000
        try:
            samples = stream.push(chunk)
        except AudioFormatError as exc:
            assert too_long or expected_decode_error(chunk, fmt), exc
            assert str(exc) and len(str(exc)) < MAX_ERROR_CHARS
            continue
        assert not too_long and not expected_decode_error(chunk, fmt)
        assert_usable(samples, allow_empty=True)  # a resampler may hold a short chunk back
    silence = b"\0" * (fmt.bytes_per_sample * (fmt.sample_rate // 10))  # 100 ms
    good = [stream.push(silence) for _ in range(2)]  # the resampler's delay may hold the first back
    assert_usable(np.concatenate(good))


@pytest.mark.parametrize("rate", [8000, 11025, 16000, 44100, 48000])
def test_a_flushed_stream_gives_the_whole_turn(rate):
    """A turn's audio is all there once the stream is flushed, and the next turn starts clean."""
    stream = InputAudioStream(InputFormat("pcm16", rate, 2), max_chunk_ms=1000)
    for _ in range(2):
        turn = np.concatenate([stream.push(b"\1\0" * (rate // 10)) for _ in range(5)] + [stream.flush()])
        assert abs(len(turn) - 5 * (rate // 10) * SAMPLE_RATE / rate) <= 1


@FEW
@given(encoding=_ints(-2**31, 2**31 - 1), rate=_ints(0, 2**32 - 1))
def test_input_format_from_any_proto(encoding, rate):
    ok = encoding in (0, 1, 2) and (rate == 0 or 8000 <= rate <= 48000)
    try:
        fmt = InputFormat.from_proto(pb.AudioFormat(encoding=encoding, sample_rate_hz=rate))
    except AudioFormatError as exc:
        assert not ok and str(exc)
        return
    assert ok and fmt.sample_rate == (rate or SAMPLE_RATE)


# ---- audio: the library's decoders (files and caller arrays) ----

ARRAY_DTYPES = st.sampled_from([np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64,
                                np.uint8, np.bool_, np.complex64])
LIB_RATES = st.sampled_from([8000, 16000, 44100, 48000, 1000, 768000]) | st.integers(-10, 10**7)


@FEW
@given(array=hnp.arrays(ARRAY_DTYPES, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=40)),
       rate=LIB_RATES)
def test_validate_audio_gives_audio_or_an_input_error(array, rate):
    try:
        samples = validate_audio(array, rate)
    except AudioInputError as exc:
        assert str(exc) and len(str(exc)) < MAX_ERROR_CHARS
        return
    assert_usable(samples, bounded=False)


@FEW
@given(values=st.lists(st.floats(width=32) | st.sampled_from([3e38, -3e38]), min_size=1, max_size=50),
       rate=st.sampled_from([8000, 44100, 48000]))
def test_validate_audio_never_returns_inf_from_a_finite_input(values, rate):
    """Finite samples near float32's limit overflow the resampler: refused, not passed on as inf."""
    try:
        samples = validate_audio(np.array(values, np.float32), rate)
    except AudioInputError as exc:
        assert str(exc)
        return
    assert np.isfinite(samples).all() and samples.size


def wav_bytes(fmt_code: int, channels: int, rate: int, bits: int, declared: int, payload: bytes) -> bytes:
    """A RIFF/WAVE file whose header fields say anything (the declared data size included)."""
    byte_rate = (rate * channels * bits // 8) & 0xFFFFFFFF
    header = struct.pack("<HHIIHH", fmt_code, channels, rate, byte_rate, (channels * bits // 8) & 0xFFFF, bits)
    body = b"WAVEfmt " + struct.pack("<I", 16) + header + b"data" + struct.pack("<I", declared) + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


AUDIO_FILES = st.binary(max_size=200) | st.builds(
    wav_bytes, st.sampled_from([1, 3, 6, 7, 0xFFFE, 0]), _ints(0, 0xFFFF), _ints(0, 2**32 - 1),
    st.sampled_from([0, 8, 16, 24, 32, 64, 7]), _ints(0, 2**32 - 1), st.binary(max_size=400) | _float32_bytes())


@FEW
@given(content=AUDIO_FILES)
def test_load_audio_gives_audio_or_an_input_error(content):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "caller.wav")
        with open(path, "wb") as f:
            f.write(content)
        try:
            samples = load_audio(path)
        except AudioInputError as exc:
            assert "caller.wav" in str(exc) and len(str(exc)) < MAX_ERROR_CHARS
            return
    assert_usable(samples, bounded=False)


@pytest.mark.parametrize("rate", [1, 999, 768001, 2**40])
def test_sample_rates_outside_the_range_are_refused_before_resampling(rate):
    """From 1 Hz, 100 000 samples resampled to 1.6e9 (half a minute, 6 GB); from 2**60 Hz soxr
    never returned."""
    with pytest.raises(AudioInputError, match=r"sample rate must be 1000\.\.768000 Hz"):
        validate_audio(np.zeros(100_000, np.float32), rate)


def test_a_clip_that_resamples_to_nothing_is_refused():
    with pytest.raises(AudioInputError, match="too short: 1 samples at 48000 Hz give none"):
        validate_audio(np.zeros(1, np.float32), 48000)
    with pytest.raises(AudioFormatError, match="too short: 2 bytes of pcm16 at 48000 Hz"):
        decode_utterance(b"\0\0", InputFormat("pcm16", 48000, 2))


# ---- messages: parsing from the wire ----

@FEW
@given(cls=st.sampled_from(all_message_classes()), data=st.binary(max_size=200))
def test_every_public_message_parses_random_bytes_or_refuses_them(cls, data):
    try:
        msg = cls.FromString(data)
    except DecodeError:
        return
    assert isinstance(msg, cls)
    assert cls.FromString(msg.SerializeToString()) == msg


@FEW
@given(event=messages(pb.ClientEvent), cut=st.integers(0, 10**6))
def test_truncated_client_events_parse_or_refuse(event, cut):
    wire = event.SerializeToString()
    try:
        pb.ClientEvent.FromString(wire[:cut % (len(wire) + 1)])
    except DecodeError:
        pass


@pytest.mark.parametrize("data", [
    b"\x4b" * 100_000,  # unknown field 9 opening groups, nested far past the parser's recursion limit
    b"\x0b" * 100_000,  # the same on field 1 (session), with the wrong wire type
    b"\x0a\xff\xff\xff\xff\x0f",  # session: a 4 GiB length with nothing behind it
    b"\x12\x05\x0a\x03ab",  # audio: truncated inside the bytes
])
def test_hostile_wire_bytes_are_a_decode_error(data):
    with pytest.raises(DecodeError):
        pb.ClientEvent.FromString(data)


# ---- the call configuration ----

def check_config(cfg: pb.SessionConfig) -> CallConfig | ApiError:
    try:
        out = parse_config(cfg, VOICES, MAX_NEW_TOKENS)
    except ApiError as exc:
        assert exc.code in CONFIG_CODES and exc.event == "session"
        assert exc.message and len(exc.message) < MAX_ERROR_CHARS, exc.message[:200]
        return exc
    assert isinstance(out, CallConfig)
    return out


@FEW
@given(cfg=messages(pb.SessionConfig))
def test_parse_config_gives_a_config_or_a_precise_refusal(cfg):
    out = check_config(cfg)
    if isinstance(out, ApiError):
        return
    # what was accepted is usable downstream: the wire types of the model services, a finite sampler
    assert out.seed is None or 0 <= out.seed + 1 < 2**63
    assert out.speech.get("top_k", 0) < 2**31
    assert all(math.isfinite(v) for k, v in out.speech.items() if k != "top_k")
    assert all(isinstance(t["function"]["parameters"], dict) for t in out.tools)
    assert out.input_format.sample_rate == out.sample_rate  # the stored format is usable again
    out.sampling()


@FEW
@given(req=messages(pb.RespondRequest))
def test_respond_requests_from_the_wire_parse_then_configure_or_refuse(req):
    wire = req.SerializeToString()
    check_config(pb.RespondRequest.FromString(wire).config)


@pytest.mark.parametrize("generation, pattern", [
    (pb.Generation(seed=2**64 - 1), r"seed must be <= 9223372036854775806"),
    (pb.Generation(seed=2**63 - 1), r"seed must be <= "),
    (pb.Generation(top_k=2**32 - 1), r"top_k must be <= 2147483647"),
    (pb.Generation(temperature=1.4e-45), r"temperature must be >= 0\.001.*greedy"),
    (pb.Generation(repetition_penalty=1e-40), r"repetition_penalty must be >= 0\.001"),
    (pb.Generation(temperature=math.nan), r"temperature must be a finite number"),
])
def test_generation_values_the_model_services_cannot_take(generation, pattern):
    """Each of these passed before and failed later, in a model service: int64/int32 overflow when
    the request was built, or a sampler dividing the logits to inf."""
    with pytest.raises(ApiError, match=pattern):
        parse_config(pb.SessionConfig(generation=generation), VOICES, MAX_NEW_TOKENS)


@pytest.mark.parametrize("params, pattern", [
    ("[" * 60_000, "nested too deeply"),  # was a RecursionError (within the tools' size limit)
    ("1", "must be a JSON object"),
    ('{"a": NaN}', "not valid JSON: NaN is not a JSON value"),
    ("{", "not valid JSON"),
])
def test_tool_parameters_that_are_not_a_schema(params, pattern):
    with pytest.raises(ApiError, match=pattern):
        parse_config(pb.SessionConfig(tools=[pb.Tool(name="f", parameters_json=params)]), VOICES, MAX_NEW_TOKENS)


def test_refusals_quote_huge_strings_cut():
    name = HUGE_TEXT[:30_000]  # a tool name within the tools' size limit (60 kB of UTF-8)
    for cfg, text in ((pb.SessionConfig(voice=HUGE_TEXT), HUGE_TEXT),
                      (pb.SessionConfig(tools=[pb.Tool(name=name, parameters_json="1")]), name)):
        with pytest.raises(ApiError) as info:
            parse_config(cfg, VOICES, MAX_NEW_TOKENS)
        assert len(info.value.message) < 300 and f"({len(text)} characters)" in info.value.message


# ---- a Converse call: any well-formed event after the session ----

class FakeStore:
    async def append_turns(self, session_id, turns):
        return len(turns)

    async def delete_turn(self, session_id, item_id):
        return False  # no such turn: NOT_FOUND


class RecordingCall(ConverseCall):
    """A call whose turns are recorded, not generated: only the event handling is under test."""

    def __init__(self, cfg: CallConfig):
        service = SimpleNamespace(settings=SimpleNamespace(max_chunk_ms=1000, max_turn_s=60.0, encode_while_speaking=False),
                                  store=FakeStore())
        super().__init__(service, "sid", cfg)
        self.turns: list[int] = []

    async def start_turn(self, audio, stopped=None) -> None:
        self.turns.append(len(audio) if audio is not None else 0)  # None: `respond`, no new speech


CLIENT_EVENTS = messages(pb.ClientEvent).filter(lambda e: e.WhichOneof("event") != END_EVENT)


@FEW
@given(events=st.lists(CLIENT_EVENTS, max_size=6), fmt=FORMATS)
def test_a_call_refuses_bad_events_precisely_and_keeps_serving(events, fmt):
    async def main():
        call = RecordingCall(CallConfig(vad=None, encoding=fmt.encoding, sample_rate=fmt.sample_rate))
        for event in events:
            before = len(call.outbox.items)
            await call.handle(event)  # never raises
            for item in list(call.outbox.items)[before:]:
                assert isinstance(item, pb.ServerEvent)  # never an ApiError: that would end the call
                if item.WhichOneof("event") == "error":
                    kind = event.WhichOneof("event")
                    assert item.error.code in EVENT_CODES and item.error.message
                    assert item.error.event == (kind or "")
        # then a good turn: clear, 100 ms of audio, commit
        turns, before = len(call.turns), len(call.outbox.items)
        await call.handle(pb.ClientEvent(clear=pb.InputAudioClear()))
        chunk = b"\0" * (fmt.bytes_per_sample * (fmt.sample_rate // 5))  # 200 ms: more than the resampler holds
        await call.handle(pb.ClientEvent(audio=pb.InputAudioAppend(audio=chunk)))
        await call.handle(pb.ClientEvent(commit=pb.InputAudioCommit()))
        assert len(call.outbox.items) == before and len(call.turns) == turns + 1 and call.turns[-1] > 0
    asyncio.run(main())


@pytest.mark.parametrize("rate", [8000, 44100])
def test_each_manual_turn_gets_all_of_its_audio(rate):
    async def main():
        call = RecordingCall(CallConfig(vad=None, encoding="pcm16", sample_rate=rate))
        for _ in range(3):
            await call.handle(pb.ClientEvent(audio=pb.InputAudioAppend(audio=b"\1\0" * (rate // 2))))
            await call.handle(pb.ClientEvent(commit=pb.InputAudioCommit()))
        return call.turns
    assert all(abs(n - SAMPLE_RATE // 2) <= 1 for n in asyncio.run(main()))  # 500 ms each


@settings(FEW, max_examples=10)
@given(chunks=st.lists(AUDIO_BYTES, max_size=4))
def test_a_server_vad_call_takes_any_audio(chunks):
    """With the Silero VAD in the loop: garbage audio is refused or fed to it, never a crash."""
    pytest.importorskip("silero_vad")

    async def main():
        call = RecordingCall(CallConfig())
        for chunk in chunks:
            await call.handle(pb.ClientEvent(audio=pb.InputAudioAppend(audio=chunk)))
        await call.handle(pb.ClientEvent(commit=pb.InputAudioCommit()))
        for item in call.outbox.items:
            assert isinstance(item, pb.ServerEvent)
            if item.WhichOneof("event") == "error":
                assert (item.error.code, item.error.event) == ("INVALID_ARGUMENT", "audio")
    asyncio.run(main())


# ---- the fuzz target (fuzz/fuzz_audio_and_events.py) still works ----

FUZZ_TARGET = Path(__file__).resolve().parents[2] / "fuzz" / "fuzz_audio_and_events.py"


def test_the_fuzz_target_takes_its_seed_corpus():
    spec = importlib.util.spec_from_file_location("fuzz_audio_and_events", FUZZ_TARGET)
    target = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(target)
    seeds = target.seed_corpus()
    assert {data[0] % len(target.TARGETS) for data in seeds} == set(range(len(target.TARGETS)))
    for data in seeds:
        target.one_input(data)


def test_the_fuzz_target_runs_under_atheris(tmp_path):
    """A few thousand coverage-guided runs from the seed corpus (crash files would land in tmp_path)."""
    pytest.importorskip("atheris")
    result = subprocess.run([sys.executable, str(FUZZ_TARGET), "-runs=3000", "-max_total_time=20", "-seed=1",
                             "-timeout=10"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and re.search(r"Done \d+ runs", result.stderr), result.stderr[-4000:]
