"""A call's configuration: the caller's `SessionConfig` checked field by field into a `CallConfig`.

A bad field is refused with INVALID_ARGUMENT and a message naming it. The `CallConfig` is JSON-able
(`dataclasses.asdict`): it is what the session record keeps, so a resumed call can go on anywhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from funchat.api import pb
from funchat.audio_io import SAMPLE_RATE
from funchat.orchestrator.audio_input import ENCODING_VALUES, AudioFormatError, InputFormat
from funchat.orchestrator.audio_output import VOCODER_RATE, OutputFormat
from funchat.orchestrator.errors import ApiError
from funchat.turn.sampling import GREEDY, SamplingParams
from funchat.turn.schedule import Mode

MODES = {pb.MODE_UNSPECIFIED: Mode.S2S, pb.MODE_SPEECH_TO_SPEECH: Mode.S2S, pb.MODE_SPEECH_TO_TEXT: Mode.S2T}
PROTO_MODES = {Mode.S2S: pb.MODE_SPEECH_TO_SPEECH, Mode.S2T: pb.MODE_SPEECH_TO_TEXT}
VAD_DEFAULTS = {"threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500, "create_response": True,
                "interrupt_response": True, "idle_timeout_ms": 0}
SAMPLING_OVERRIDES = ("temperature", "top_p", "top_k", "repetition_penalty")  # Generation fields for speech
# Limits the wire types allow but the model services do not: the seed is sent as int64 and the text
# stream draws with seed + 1 (funchat.turn.sampling.text_seed); top_k is sent as int32; the sampler
# divides the logits by temperature and repetition_penalty, and below this floor (e.g. float32's
# 1.4e-45) they overflow to inf and the draw fails in the model service instead of here.
MAX_SEED = 2**63 - 2
MAX_TOP_K = 2**31 - 1
MIN_DIVISOR = 1e-3
# Text the prompt carries on every turn is re-tokenised each turn: bounded here, well above what
# fits a real prompt (the context refuses the rest), so that megabytes are refused before any work.
MAX_INSTRUCTIONS_CHARS = 16384
MAX_TOOLS = 64
MAX_TOOLS_JSON_BYTES = 65536  # all tools' names, descriptions and parameter schemas together
MAX_FUNCTION_OUTPUT_BYTES = 65536  # one function_call_output (converse)


@dataclass
class CallConfig:
    """A validated SessionConfig, JSON-able for the session record."""

    mode: str = Mode.S2S.value
    instructions: str = ""
    voice: str = ""
    tools: list[dict] = field(default_factory=list)
    vad: dict | None = field(default_factory=lambda: dict(VAD_DEFAULTS))  # None = manual commits
    encoding: str = "pcm16"
    sample_rate: int = SAMPLE_RATE
    # The reply audio's format, kept as plain names like the input's (asdict / JSON round trip); a
    # record written before output formats existed has neither key and gets the default.
    output_encoding: str = "pcm16"
    output_sample_rate: int = VOCODER_RATE
    greedy: bool = False
    seed: int | None = None
    max_new_tokens: int = 0
    speech: dict = field(default_factory=dict)  # SamplingParams overrides for the speech tokens

    @property
    def input_format(self) -> InputFormat:
        return InputFormat.from_proto(pb.AudioFormat(encoding=ENCODING_VALUES[self.encoding],
                                                     sample_rate_hz=self.sample_rate))

    @property
    def output_format(self) -> OutputFormat:
        return OutputFormat.from_proto(pb.AudioFormat(encoding=ENCODING_VALUES[self.output_encoding],
                                                      sample_rate_hz=self.output_sample_rate))

    def sampling(self) -> tuple[SamplingParams, SamplingParams]:
        """(text, speech). Text is greedy as in the reference demos; the speech tokens are sampled
        with the reference's settings unless greedy or overridden."""
        if self.greedy:
            return GREEDY, GREEDY
        return GREEDY, SamplingParams(**self.speech)


def _bad(message: str) -> ApiError:
    return ApiError("INVALID_ARGUMENT", message, "session")


def quoted(text: str, limit: int = 64) -> str:
    """A caller's string as a refusal quotes it: cut, so an error never echoes megabytes back."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def parse_config(cfg: pb.SessionConfig, voices: set[str], max_new_tokens: int) -> CallConfig:
    """SessionConfig -> CallConfig; raises ApiError(INVALID_ARGUMENT) naming the bad field.
    The fields are checked in this order, so a config with several problems names the first."""
    if cfg.mode not in MODES:
        raise _bad(f"unknown mode {cfg.mode}; use MODE_SPEECH_TO_TEXT or MODE_SPEECH_TO_SPEECH")
    if len(cfg.instructions) > MAX_INSTRUCTIONS_CHARS:
        raise _bad(f"instructions are {len(cfg.instructions)} characters, over the {MAX_INSTRUCTIONS_CHARS} limit")
    out = CallConfig(mode=MODES[cfg.mode].value, instructions=cfg.instructions.strip())
    out.voice = _voice(cfg.voice, voices)
    out.tools = _tools(cfg.tools)
    out.vad = _turn_detection(cfg.turn_detection)
    try:
        fmt = InputFormat.from_proto(cfg.input_audio_format)
    except AudioFormatError as exc:
        raise _bad(str(exc)) from None
    out.encoding, out.sample_rate = fmt.encoding, fmt.sample_rate
    try:
        out_fmt = OutputFormat.from_proto(cfg.output_audio_format)  # unset: the default, 24 kHz PCM16
    except AudioFormatError as exc:
        raise _bad(str(exc)) from None
    out.output_encoding, out.output_sample_rate = out_fmt.encoding, out_fmt.sample_rate
    g = cfg.generation
    out.greedy = g.greedy
    out.seed = int(g.seed) if g.HasField("seed") else None
    if out.seed is not None and out.seed > MAX_SEED:
        raise _bad(f"generation.seed must be <= {MAX_SEED} (it is sent as int64), got {out.seed}")
    if g.max_new_tokens > max_new_tokens:
        raise _bad(f"generation.max_new_tokens {g.max_new_tokens} is over the server's limit {max_new_tokens}")
    out.max_new_tokens = int(g.max_new_tokens)
    out.speech = _speech_sampling(g)
    return out


def _voice(voice: str, voices: set[str]) -> str:
    if voice and voice not in voices:
        raise _bad(f"unknown voice {quoted(voice)}; available: {', '.join(sorted(voices))}")
    return voice


def _tools(tools) -> list[dict]:
    """pb.Tool list -> the chat template's function descriptions."""
    if len(tools) > MAX_TOOLS:
        raise _bad(f"{len(tools)} tools, over the limit of {MAX_TOOLS}")
    size = sum(len(t.name.encode()) + len(t.description.encode()) + len(t.parameters_json.encode()) for t in tools)
    if size > MAX_TOOLS_JSON_BYTES:
        raise _bad(f"the tools take {size} bytes (names, descriptions, parameters_json), over the "
                   f"{MAX_TOOLS_JSON_BYTES}-byte limit")
    out = []
    for i, tool in enumerate(tools):
        if not tool.name:
            raise _bad(f"tools[{i}] has no name")
        try:
            params = json.loads(tool.parameters_json, parse_constant=_no_constant) if tool.parameters_json \
                else {"type": "object", "properties": {}}
        except ValueError as exc:  # a JSONDecodeError, or NaN / Infinity (no JSON values)
            raise _bad(f"tools[{i}] ({quoted(tool.name)}): parameters_json is not valid JSON: {exc}") from None
        except RecursionError:  # "[[[[..." deeper than Python's decoder goes
            raise _bad(f"tools[{i}] ({quoted(tool.name)}): parameters_json is nested too deeply") from None
        if not isinstance(params, dict):
            raise _bad(f"tools[{i}] ({quoted(tool.name)}): parameters_json must be a JSON object (a JSON "
                       f"Schema), got {type(params).__name__}")
        out.append({"type": "function", "function": {"name": tool.name, "description": tool.description,
                                                     "parameters": params}})
    return out


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def _turn_detection(td: pb.TurnDetection) -> dict | None:
    """The server VAD's parameters (defaults where unset), or None for manual commits."""
    if td.WhichOneof("type") == "manual":
        return None
    v = td.server_vad
    vad = dict(VAD_DEFAULTS)
    if v.threshold:
        if not 0.0 < v.threshold < 1.0:
            raise _bad(f"server_vad.threshold must be in (0, 1), got {v.threshold}")
        vad["threshold"] = float(v.threshold)
    if v.prefix_padding_ms:
        if v.prefix_padding_ms > 5000:
            raise _bad(f"server_vad.prefix_padding_ms must be <= 5000, got {v.prefix_padding_ms}")
        vad["prefix_padding_ms"] = int(v.prefix_padding_ms)
    if v.silence_duration_ms:
        if not 100 <= v.silence_duration_ms <= 10000:
            raise _bad(f"server_vad.silence_duration_ms must be in 100..10000, got {v.silence_duration_ms}")
        vad["silence_duration_ms"] = int(v.silence_duration_ms)
    for flag in ("create_response", "interrupt_response"):
        if v.HasField(flag):
            vad[flag] = bool(getattr(v, flag))
    if v.idle_timeout_ms:
        if not 1000 <= v.idle_timeout_ms <= 60000:
            raise _bad(f"server_vad.idle_timeout_ms must be in 1000..60000 (0: none), got {v.idle_timeout_ms}")
        vad["idle_timeout_ms"] = int(v.idle_timeout_ms)
    return vad


def _speech_sampling(g: pb.Generation) -> dict:
    """The speech sampling overrides the caller set, checked by SamplingParams itself."""
    speech = {name: getattr(g, name) for name in SAMPLING_OVERRIDES if g.HasField(name)}
    try:
        SamplingParams(**speech)
    except ValueError as exc:
        raise _bad(f"generation: {exc}") from None
    if speech.get("top_k", 0) > MAX_TOP_K:
        raise _bad(f"generation.top_k must be <= {MAX_TOP_K} (0 = no top-k), got {speech['top_k']}")
    for name in ("temperature", "repetition_penalty"):
        if name in speech and speech[name] < MIN_DIVISOR:
            raise _bad(f"generation.{name} must be >= {MIN_DIVISOR:g}, got {speech[name]:.3g}"
                       + ("; use greedy for argmax" if name == "temperature" else ""))
    return speech
