"""G.711 (funchat.g711) against CPython's reference codec (`audioop`, in the standard library until
Python 3.13), for every 16-bit sample and every byte, and G.711 caller audio through the
orchestrator's input decoding and the client's encoding."""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pytest

from funchat import g711
from funchat.api import pb
from funchat.client.audio import encode_audio
from funchat.client.config import input_format, session_config
from funchat.orchestrator.audio_input import AudioFormatError, InputAudioStream, InputFormat

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

EVERY_SAMPLE = np.arange(-32768, 32768, dtype=np.int16)
EVERY_BYTE = bytes(range(256))


@pytest.mark.parametrize("law", ["ulaw", "alaw"])
def test_every_sample_and_every_byte_as_the_reference_codec(law):
    raw = EVERY_SAMPLE.astype("<i2").tobytes()
    encode, decode = (g711.pcm16_to_ulaw, g711.ulaw_to_pcm16) if law == "ulaw" else \
        (g711.pcm16_to_alaw, g711.alaw_to_pcm16)
    ref_encode, ref_decode = (audioop.lin2ulaw, audioop.ulaw2lin) if law == "ulaw" else \
        (audioop.lin2alaw, audioop.alaw2lin)
    assert encode(EVERY_SAMPLE) == ref_encode(raw, 2)
    np.testing.assert_array_equal(decode(EVERY_BYTE), np.frombuffer(ref_decode(EVERY_BYTE, 2), "<i2"))


@pytest.mark.parametrize("encoding, name", [(pb.AUDIO_ENCODING_PCMU, "pcmu"), (pb.AUDIO_ENCODING_PCMA, "pcma")])
def test_g711_caller_audio_is_decoded_and_resampled_to_16_khz(encoding, name):
    t = np.arange(8000) / 8000.0
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)  # 1 s at 8 kHz
    data = encode_audio(tone, name)
    assert len(data) == 8000  # one byte per sample
    fmt = InputFormat.from_proto(pb.AudioFormat(encoding=encoding, sample_rate_hz=8000))
    assert (fmt.encoding, fmt.bytes_per_sample) == (name, 1) and fmt.duration_ms(len(data)) == 1000.0
    decoded = fmt.decode(data)
    assert np.abs(decoded - tone).max() < 0.02  # G.711's quantisation at this level
    stream = InputAudioStream(fmt, max_chunk_ms=1000)
    out = np.concatenate([stream.push(data[:4000]), stream.push(data[4000:]), stream.flush()])
    assert abs(len(out) - 16000) <= 1
    cfg = session_config(turn_detection="manual", encoding=name, sample_rate=8000)
    assert input_format(cfg) == (name, 8000, 1)


def test_an_unknown_encoding_names_the_ones_there_are():
    with pytest.raises(AudioFormatError) as info:
        InputFormat.from_proto(pb.AudioFormat(encoding=9, sample_rate_hz=8000))
    assert "AUDIO_ENCODING_PCMU or AUDIO_ENCODING_PCMA" in str(info.value)


@pytest.mark.parametrize("encoding, name", [(pb.AUDIO_ENCODING_PCMU, "pcmu"), (pb.AUDIO_ENCODING_PCMA, "pcma")])
def test_a_call_config_keeps_its_g711_format_through_the_session_record(encoding, name):
    from funchat.orchestrator.call_config import CallConfig, parse_config

    cfg = parse_config(pb.SessionConfig(input_audio_format=pb.AudioFormat(encoding=encoding, sample_rate_hz=8000)),
                       voices=set(), max_new_tokens=512)
    again = CallConfig(**json.loads(json.dumps(dataclasses.asdict(cfg))))  # as the session record stores it
    assert (again.input_format.encoding, again.input_format.sample_rate) == (name, 8000)
