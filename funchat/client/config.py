"""Session settings as the API's SessionConfig, built from plain values."""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from funchat.api import pb

INPUT_SAMPLE_RATE = 16000   # what the model hears; the default input format
OUTPUT_SAMPLE_RATE = 24000  # reply audio by default (AudioDelta.pcm16); output_audio_format may change it
MAX_CHUNK_S = 1.0           # the server takes at most 1 s of caller audio per `audio` event

MODES = {"s2s": pb.MODE_SPEECH_TO_SPEECH, "s2t": pb.MODE_SPEECH_TO_TEXT}
ENCODINGS = {"pcm16": pb.AUDIO_ENCODING_PCM16, "float32": pb.AUDIO_ENCODING_FLOAT32,
             "pcmu": pb.AUDIO_ENCODING_PCMU, "pcma": pb.AUDIO_ENCODING_PCMA}  # G.711 μ-law, A-law
SAMPLE_BYTES = {"pcm16": 2, "float32": 4, "pcmu": 1, "pcma": 1}
TURN_DETECTION = ("server_vad", "manual")


def _tool(spec: Mapping[str, Any], i: int) -> pb.Tool:
    # Accept the OpenAI-style wrapper {"type": "function", "function": {...}} that `funchat respond
    # --tools` files use, as well as the bare {name, description, parameters}.
    fn = spec.get("function", spec) if spec.get("type") == "function" else spec
    if not isinstance(fn, Mapping) or not fn.get("name"):
        raise ValueError(f"tools[{i}] needs a name: {spec!r}")
    params = fn.get("parameters")
    return pb.Tool(name=fn["name"], description=fn.get("description", ""),
                   parameters_json=json.dumps(params) if params is not None else "")


def session_config(mode: str = "s2s", instructions: str | None = None, voice: str | None = None,
                   tools: Sequence[Mapping[str, Any]] | None = None, greedy: bool = False, seed: int | None = None,
                   max_new_tokens: int = 0, turn_detection: str = "server_vad", vad_threshold: float | None = None,
                   silence_ms: int | None = None, prefix_padding_ms: int | None = None, encoding: str = "pcm16",
                   sample_rate: int = INPUT_SAMPLE_RATE, resume_token: str | None = None,
                   temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                   repetition_penalty: float | None = None, output_encoding: str = "pcm16",
                   output_sample_rate: int = OUTPUT_SAMPLE_RATE) -> pb.SessionConfig:
    """A SessionConfig from plain values; ValueError names a bad one. Values the server checks
    (voice names, VAD ranges, sample-rate limits) are left to it, so there is one source of truth.

    seed None: the server draws one per turn (sampled speech is then not reproducible).
    max_new_tokens 0: the server's default. The VAD settings only go with turn_detection="server_vad".
    encoding / sample_rate: the caller audio's format; output_encoding / output_sample_rate: the reply
    audio's (e.g. "pcmu" at 8000 for telephony). The default reply format (PCM16 at 24 kHz) leaves
    output_audio_format unset, so the config is what it was before output formats existed.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {sorted(MODES)}")
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown audio encoding {encoding!r}; use one of {sorted(ENCODINGS)}")
    if turn_detection not in TURN_DETECTION:
        raise ValueError(f"unknown turn_detection {turn_detection!r}; use one of {list(TURN_DETECTION)}")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive integer (Hz), got {sample_rate!r}")
    if output_encoding not in ENCODINGS:
        raise ValueError(f"unknown output_encoding {output_encoding!r}; use one of {sorted(ENCODINGS)}")
    if isinstance(output_sample_rate, bool) or not isinstance(output_sample_rate, int) or output_sample_rate <= 0:
        raise ValueError(f"output_sample_rate must be a positive integer (Hz), got {output_sample_rate!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0 (0 = the server's default), got {max_new_tokens}")

    if turn_detection == "manual":
        given = [n for n, v in (("vad_threshold", vad_threshold), ("silence_ms", silence_ms),
                                ("prefix_padding_ms", prefix_padding_ms)) if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only apply to turn_detection='server_vad'")
        td = pb.TurnDetection(manual=pb.ManualTurns())
    else:
        # 0 in a ServerVad field means "the server's default".
        td = pb.TurnDetection(server_vad=pb.ServerVad(threshold=vad_threshold or 0.0,
                                                      silence_duration_ms=silence_ms or 0,
                                                      prefix_padding_ms=prefix_padding_ms or 0))
    gen = pb.Generation(greedy=greedy, max_new_tokens=max_new_tokens)
    # Optional fields are set only when given: unset means "the server's default", not zero.
    for name, value in (("seed", seed), ("temperature", temperature), ("top_p", top_p), ("top_k", top_k),
                        ("repetition_penalty", repetition_penalty)):
        if value is not None:
            setattr(gen, name, value)
    default_output = output_encoding == "pcm16" and output_sample_rate == OUTPUT_SAMPLE_RATE
    output = None if default_output else pb.AudioFormat(encoding=ENCODINGS[output_encoding],
                                                        sample_rate_hz=output_sample_rate)
    return pb.SessionConfig(
        mode=MODES[mode], instructions=instructions or "", voice=voice or "",
        tools=[_tool(t, i) for i, t in enumerate(tools or [])], turn_detection=td,
        input_audio_format=pb.AudioFormat(encoding=ENCODINGS[encoding], sample_rate_hz=sample_rate),
        resume_token=resume_token or "", generation=gen, output_audio_format=output)


def config_mode(config: pb.SessionConfig) -> str:
    """"s2s" or "s2t" (MODE_UNSPECIFIED is speech-to-speech)."""
    return "s2t" if config.mode == pb.MODE_SPEECH_TO_TEXT else "s2s"


def input_format(config: pb.SessionConfig) -> tuple[str, int, int]:
    """(encoding name, sample rate, bytes per sample) of the config's caller audio."""
    fmt = config.input_audio_format
    encoding = next((name for name, value in ENCODINGS.items() if value == fmt.encoding), "pcm16")
    return encoding, fmt.sample_rate_hz or INPUT_SAMPLE_RATE, SAMPLE_BYTES[encoding]


def output_format(config: pb.SessionConfig) -> tuple[str, int, int]:
    """(encoding name, sample rate, bytes per sample) of the config's reply audio."""
    fmt = config.output_audio_format  # unset: all zero, the default PCM16 at 24 kHz
    encoding = next((name for name, value in ENCODINGS.items() if value == fmt.encoding), "pcm16")
    return encoding, fmt.sample_rate_hz or OUTPUT_SAMPLE_RATE, SAMPLE_BYTES[encoding]
