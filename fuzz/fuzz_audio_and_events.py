"""Fuzz target (atheris, coverage-guided) for everything that decodes a caller's bytes: the API's
audio decoders in each input format, the library's (arrays and files), and the public messages
followed by what the server does with them (parse_config, a Converse call's event handlers).

    .venv/bin/python fuzz/fuzz_audio_and_events.py -runs=100000
    .venv/bin/python fuzz/fuzz_audio_and_events.py -max_total_time=600 fuzz/corpus   # keeps what it finds

(libFuzzer's flags; a corpus folder is optional.) A crash is any exception other than the precise
refusals (DecodeError, AudioFormatError, AudioInputError, ApiError with an expected code) or a
broken invariant (NaN or empty audio out, a call that stops serving). libFuzzer writes the input
to crash-<sha1>; replay it with `python fuzz/fuzz_audio_and_events.py crash-<sha1>`.

The first input byte picks the target, the second the format; the rest is the target's payload.
tests/unit/test_hostile_input.py runs `one_input` over `seed_corpus()` and the fuzzer briefly.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import struct
import sys
import tempfile
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import soxr  # noqa: F401  (imported before the instrumented block: only funchat's code is instrumented)
from google.protobuf.message import DecodeError

if __name__ == "__main__":
    import atheris

    instrumented = atheris.instrument_imports(include=["funchat"])
else:  # imported by the unit test: plain code, atheris not needed
    instrumented = nullcontext()

with instrumented:
    from funchat.api import pb
    from funchat.audio_io import load_audio, validate_audio
    from funchat.errors import AudioInputError
    from funchat.orchestrator.audio_input import AudioFormatError, InputAudioStream, InputFormat, decode_utterance
    from funchat.orchestrator.call_config import CallConfig, parse_config
    from funchat.orchestrator.converse import ConverseCall
    from funchat.orchestrator.errors import ApiError

API_RATES = (16000, 8000, 11025, 22050, 24000, 44100, 48000, 32000)
LIBRARY_RATES = (16000, 8000, 44100, 48000, 1000, 768000, 0, 1, 999, 768001, -16000, 2**40)
DTYPES = (np.float32, np.float64, np.float16, np.int16, np.int32, np.int8, np.uint8, np.int64, np.complex64)
EVENT_CODES = {"INVALID_ARGUMENT", "FAILED_PRECONDITION", "NOT_FOUND"}
VOICES = {"alice"}
_DIR = tempfile.mkdtemp(prefix="funchat-fuzz-")  # where library_file writes its input
atexit.register(shutil.rmtree, _DIR, ignore_errors=True)
_LOOP = asyncio.new_event_loop()


def api_format(b: int) -> InputFormat:
    encoding, width = ("float32", 4) if b & 1 else ("pcm16", 2)
    return InputFormat(encoding, API_RATES[(b >> 1) % len(API_RATES)], width)


def frames(payload: bytes) -> list[bytes]:
    """Payload -> pieces, each prefixed by its 2-byte length (the last one takes what is left)."""
    out = []
    while payload:
        n = int.from_bytes(payload[:2], "little")
        out.append(payload[2:2 + n])
        payload = payload[2 + n:]
    return out


def check_audio(samples: np.ndarray, allow_empty: bool = False) -> None:
    assert samples.dtype == np.float32 and samples.ndim == 1, (samples.dtype, samples.shape)
    assert allow_empty or samples.size, "empty audio accepted"
    assert np.isfinite(samples).all(), "non-finite audio accepted"


# ---- the targets ----

def api_utterance(b: int, payload: bytes) -> None:
    try:
        check_audio(decode_utterance(payload, api_format(b)))
    except AudioFormatError as exc:
        assert str(exc)


def api_stream(b: int, payload: bytes) -> None:
    stream = InputAudioStream(api_format(b), max_chunk_ms=1000)
    for chunk in frames(payload):
        try:
            check_audio(stream.push(chunk), allow_empty=True)
        except AudioFormatError as exc:
            assert str(exc)
    check_audio(stream.flush(), allow_empty=True)


def library_array(b: int, payload: bytes) -> None:
    dtype = np.dtype(DTYPES[b % len(DTYPES)])
    channels = 1 + (b >> 4) % 10  # 9 and 10 are over the limit
    usable = len(payload) // (dtype.itemsize * channels) * dtype.itemsize * channels
    array = np.frombuffer(payload[:usable], dtype).reshape(-1, channels)
    if channels == 1 and b & 8:
        array = array[:, 0]
    try:
        check_audio(validate_audio(array, LIBRARY_RATES[(b >> 3) % len(LIBRARY_RATES)]))
    except AudioInputError as exc:
        assert str(exc)


def library_file(b: int, payload: bytes) -> None:
    if b & 1 and len(payload) >= 16:  # a WAV header from the payload's first 16 bytes, then its data
        fmt = payload[:16]
        payload = b"RIFF" + struct.pack("<I", 36 + len(payload) - 16) + b"WAVEfmt " + struct.pack("<I", 16) + fmt + \
            b"data" + struct.pack("<I", len(payload) - 16) + payload[16:]
    path = os.path.join(_DIR, "input.wav")
    with open(path, "wb") as f:
        f.write(payload)
    try:
        check_audio(load_audio(path))
    except AudioInputError as exc:
        assert "input.wav" in str(exc)


class RecordingCall(ConverseCall):
    """A call whose turns are recorded, not generated: only the event handling is fuzzed."""

    def __init__(self, cfg: CallConfig):
        service = SimpleNamespace(settings=SimpleNamespace(max_chunk_ms=1000, max_turn_s=60.0, encode_while_speaking=False),
                                  store=SimpleNamespace(append_turns=_append_turns, delete_turn=_delete_turn))
        super().__init__(service, "sid", cfg)
        self.turns: list[int] = []

    async def start_turn(self, audio, stopped=None) -> None:
        self.turns.append(len(audio) if audio is not None else 0)  # None: `respond`, no new speech


async def _append_turns(session_id, turns):
    return len(turns)


async def _delete_turn(session_id, item_id):
    return False


def check_config(cfg: pb.SessionConfig) -> CallConfig | None:
    try:
        return parse_config(cfg, VOICES, 512)
    except ApiError as exc:
        assert exc.code == "INVALID_ARGUMENT" and exc.message and len(exc.message) < 1000, exc.message[:200]
        return None


async def converse_events(b: int, payload: bytes) -> None:
    fmt = api_format(b)
    call = RecordingCall(CallConfig(vad=None, encoding=fmt.encoding, sample_rate=fmt.sample_rate))
    for piece in frames(payload):
        try:
            event = pb.ClientEvent.FromString(piece)
        except DecodeError:
            continue  # the gRPC layer refuses it before the call sees it
        if event.WhichOneof("event") == "end":
            continue  # the reading loop stops there; no handler
        if event.WhichOneof("event") == "session":
            check_config(event.session)
        before = len(call.outbox.items)
        await call.handle(event)
        for item in list(call.outbox.items)[before:]:
            assert isinstance(item, pb.ServerEvent), item  # an ApiError item would end the call
            if item.WhichOneof("event") == "error":
                assert item.error.code in EVENT_CODES and item.error.message, item.error
    # the call still serves: a clean 200 ms turn
    turns, before = len(call.turns), len(call.outbox.items)
    await call.handle(pb.ClientEvent(clear=pb.InputAudioClear()))
    await call.handle(pb.ClientEvent(audio=pb.InputAudioAppend(audio=b"\0" * (fmt.bytes_per_sample *
                                                                                (fmt.sample_rate // 5)))))
    await call.handle(pb.ClientEvent(commit=pb.InputAudioCommit()))
    assert len(call.outbox.items) == before and len(call.turns) == turns + 1, "the call stopped serving"


def respond_request(b: int, payload: bytes) -> None:
    try:
        request = pb.RespondRequest.FromString(payload)
    except DecodeError:
        return
    cfg = check_config(request.config)
    if cfg is not None and request.audio:
        try:
            check_audio(decode_utterance(request.audio, cfg.input_format))
        except AudioFormatError as exc:
            assert str(exc)


TARGETS = (api_utterance, api_stream, library_array, library_file,
           lambda b, payload: _LOOP.run_until_complete(converse_events(b, payload)), respond_request)


def one_input(data: bytes) -> None:
    """One fuzz input: byte 0 picks the target, byte 1 its format, the rest is its payload."""
    if len(data) < 2:
        return
    TARGETS[data[0] % len(TARGETS)](data[1], data[2:])


def seed_corpus() -> list[bytes]:
    """Small valid and broken inputs for each target: the unit test's corpus, the fuzzer's start."""
    pcm = b"\x00\x10" * 800
    f32 = struct.pack("<4f", 0.5, -0.5, float("nan"), 1.0)
    wav_fmt = struct.pack("<HHIIHH", 1, 1, 16000, 32000, 2, 16)
    audio_event = pb.ClientEvent(audio=pb.InputAudioAppend(audio=pcm)).SerializeToString()
    commit = pb.ClientEvent(commit=pb.InputAudioCommit()).SerializeToString()
    session = pb.ClientEvent(session=pb.SessionConfig(tools=[pb.Tool(name="f", parameters_json="[[1]]")]))
    request = pb.RespondRequest(config=pb.SessionConfig(generation=pb.Generation(seed=2**64 - 1)), audio=pcm)

    def framed(*pieces):
        return b"".join(len(p).to_bytes(2, "little") + p for p in pieces)
    return [
        b"\x00\x00" + pcm, b"\x00\x01" + f32, b"\x00\x0d" + b"\x00",  # utterances: 16 kHz, float32 NaN, 48 kHz
        b"\x01\x02" + framed(pcm, b"\x01", pcm),  # a stream at 8 kHz with an odd chunk
        b"\x02\x00" + f32, b"\x02\x18" + f32 * 4, b"\x02\x41" + pcm,  # arrays: float32, bad rate, float64 stereo
        b"\x03\x00" + b"RIFF", b"\x03\x01" + wav_fmt + pcm,  # files: junk, a real WAV
        b"\x04\x00" + framed(audio_event, commit, session.SerializeToString(), b"\xff\xff"),
        b"\x05\x00" + request.SerializeToString(), b"\x05\x00" + b"\x0a\xff\xff\xff\xff\x0f",
    ]


def main() -> None:
    argv = list(sys.argv)
    if not any(not arg.startswith("-") for arg in argv[1:]):  # no corpus folder or input file given
        seeds = tempfile.mkdtemp(prefix="funchat-fuzz-seeds-")
        for i, seed in enumerate(seed_corpus()):
            with open(os.path.join(seeds, f"seed-{i}"), "wb") as f:
                f.write(seed)
        argv.append(seeds)
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
