"""The Realtime session object (`session.update`, `session.created` / `.updated`) and the call
config it maps to (`pb.SessionConfig`, the one Converse takes).

`RealtimeSession.update(fields)` checks a `session.update`'s `session` field by field and either
returns the new session or raises `RealtimeError` naming the first field it cannot take, so a bad
update changes nothing. What the GA protocol has and this server does not do (semantic VAD, input
transcription, noise reduction, forcing a tool) is refused by name, never ignored.

Extensions (the GA protocol has no way to ask for them): `audio.input.format` `audio/pcm` at 8-48
kHz besides 24 kHz, and `generation` (greedy / seed / sampling, as in the gRPC API's `Generation`)
so that a call can be reproduced token for token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from funchat.api import pb
from funchat.orchestrator.realtime.errors import RealtimeError

# GA audio format types -> (gRPC encoding, the rates accepted, the rate when none is given)
AUDIO_TYPES = {
    "audio/pcm": (pb.AUDIO_ENCODING_PCM16, range(8000, 48001), 24000),
    "audio/pcmu": (pb.AUDIO_ENCODING_PCMU, (8000,), 8000),
    "audio/pcma": (pb.AUDIO_ENCODING_PCMA, (8000,), 8000),
}
VAD_FIELDS = {"threshold", "prefix_padding_ms", "silence_duration_ms"}
GENERATION_FIELDS = {"greedy", "seed", "temperature", "top_p", "top_k", "repetition_penalty"}
# Fields of the GA session this server takes; the rest is refused by name
SESSION_FIELDS = {"type", "model", "instructions", "audio", "tools", "tool_choice", "output_modalities",
                  "max_output_tokens", "generation", "object", "id", "expires_at"}


@dataclass(frozen=True)
class AudioFormat:
    type: str = "audio/pcm"
    rate: int = 24000

    def to_pb(self) -> pb.AudioFormat:
        return pb.AudioFormat(encoding=AUDIO_TYPES[self.type][0], sample_rate_hz=self.rate)

    def to_json(self) -> dict:
        return {"type": self.type, "rate": self.rate} if self.type == "audio/pcm" else {"type": self.type}

    @property
    def bytes_per_sample(self) -> int:
        return 2 if self.type == "audio/pcm" else 1


@dataclass(frozen=True)
class RealtimeSession:
    """What a Realtime call is configured with; defaults as the GA protocol's."""

    model: str
    instructions: str = ""
    input_format: AudioFormat = AudioFormat()
    output_format: AudioFormat = AudioFormat()
    # None: manual turns (commit + response.create); else server VAD's settings
    turn_detection: dict | None = field(default_factory=lambda: {
        "type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500,
        "create_response": True, "interrupt_response": True, "idle_timeout_ms": None})
    voice: str = ""
    tools: tuple = ()
    tool_choice: str = "auto"
    output_modalities: tuple = ("audio",)
    max_output_tokens: int | str = "inf"
    generation: dict = field(default_factory=dict)

    # ---- session.update ----

    def update(self, fields: Any) -> RealtimeSession:
        """A `session.update`'s `session` -> the session it makes; RealtimeError naming what is wrong."""
        if not isinstance(fields, dict):
            raise RealtimeError("invalid_value", "`session` must be an object", param="session")
        unknown = sorted(set(fields) - SESSION_FIELDS)
        if unknown:
            raise RealtimeError("unsupported_field", f"session.{unknown[0]} is not supported by this server",
                                param=f"session.{unknown[0]}")
        if fields.get("type", "realtime") != "realtime":
            raise RealtimeError("invalid_value", f"session.type {fields['type']!r} is not supported: only "
                                                 "'realtime' (speech in, speech and text out)", param="session.type")
        if "model" in fields and fields["model"] != self.model:
            raise RealtimeError("invalid_value", f"session.model {fields['model']!r}: this server serves "
                                                 f"{self.model!r}", param="session.model")
        new = self
        if "instructions" in fields:
            new = replace(new, instructions=_string(fields["instructions"], "session.instructions"))
        if "audio" in fields:
            new = new._with_audio(fields["audio"])
        if "tools" in fields:
            new = replace(new, tools=tuple(_tool(t, i) for i, t in enumerate(_list(fields["tools"], "session.tools"))))
        if "tool_choice" in fields:
            if fields["tool_choice"] != "auto":
                raise RealtimeError("unsupported_value", f"session.tool_choice {fields['tool_choice']!r} is not "
                                                         "supported: only 'auto' (the model decides)",
                                    param="session.tool_choice")
        if "output_modalities" in fields:
            modalities = _list(fields["output_modalities"], "session.output_modalities")
            if modalities not in (["audio"], ["text"]):
                raise RealtimeError("invalid_value", f"session.output_modalities {modalities!r}: use ['audio'] "
                                                     "(speech with its transcript) or ['text']",
                                    param="session.output_modalities")
            new = replace(new, output_modalities=tuple(modalities))
        if "max_output_tokens" in fields:
            n = fields["max_output_tokens"]
            if n != "inf" and (not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 4096):
                raise RealtimeError("invalid_value", f"session.max_output_tokens {n!r}: an integer 1-4096 or 'inf'",
                                    param="session.max_output_tokens")
            new = replace(new, max_output_tokens=n)
        if "generation" in fields:
            new = replace(new, generation=_generation(fields["generation"]))
        return new

    def _with_audio(self, audio: Any) -> RealtimeSession:
        audio = _object(audio, "session.audio", {"input", "output"})
        new = self
        if "input" in audio:
            inp = _object(audio["input"], "session.audio.input",
                          {"format", "turn_detection", "noise_reduction", "transcription"})
            for name in ("noise_reduction", "transcription"):
                if inp.get(name) is not None:
                    raise RealtimeError("unsupported_field", f"session.audio.input.{name} is not supported by this "
                                                             "server (set it to null)",
                                        param=f"session.audio.input.{name}")
            if "format" in inp:
                new = replace(new, input_format=_format(inp["format"], "session.audio.input.format", any_rate=True))
            if "turn_detection" in inp:
                new = replace(new, turn_detection=_turn_detection(inp["turn_detection"]))
        if "output" in audio:
            out = _object(audio["output"], "session.audio.output", {"format", "voice", "speed"})
            if "format" in out:
                new = replace(new, output_format=_format(out["format"], "session.audio.output.format",
                                                         any_rate=False))
            if "voice" in out:
                new = replace(new, voice=_string(out["voice"], "session.audio.output.voice"))
            if out.get("speed", 1.0) != 1.0:
                raise RealtimeError("unsupported_value", "session.audio.output.speed: only 1.0",
                                    param="session.audio.output.speed")
        return new

    # ---- what it maps to ----

    @property
    def manual(self) -> bool:
        return self.turn_detection is None

    def to_pb(self, resume_token: str = "") -> pb.SessionConfig:
        """The Converse call's config."""
        mode = pb.MODE_SPEECH_TO_TEXT if self.output_modalities == ("text",) else pb.MODE_SPEECH_TO_SPEECH
        td = self.turn_detection
        turns = pb.TurnDetection(manual=pb.ManualTurns()) if td is None else pb.TurnDetection(
            server_vad=pb.ServerVad(threshold=td["threshold"], prefix_padding_ms=td["prefix_padding_ms"],
                                    silence_duration_ms=td["silence_duration_ms"],
                                    create_response=td["create_response"],
                                    interrupt_response=td["interrupt_response"],
                                    idle_timeout_ms=td["idle_timeout_ms"] or 0))
        gen = pb.Generation(max_new_tokens=0 if self.max_output_tokens == "inf" else self.max_output_tokens,
                            **self.generation)
        cfg = pb.SessionConfig(mode=mode, instructions=self.instructions, voice=self.voice, turn_detection=turns,
                               input_audio_format=self.input_format.to_pb(), resume_token=resume_token,
                               generation=gen,
                               tools=[pb.Tool(name=t["name"], description=t.get("description", ""),
                                              parameters_json=json.dumps(t.get("parameters", {})))
                                      for t in self.tools])
        if self.output_format != AudioFormat():
            cfg.output_audio_format.CopyFrom(self.output_format.to_pb())
        return cfg

    def to_json(self, session_id: str) -> dict:
        """The session object of `session.created` / `session.updated`."""
        return {
            "type": "realtime", "object": "realtime.session", "id": session_id, "model": self.model,
            "output_modalities": list(self.output_modalities), "instructions": self.instructions,
            "audio": {"input": {"format": self.input_format.to_json(), "turn_detection": self.turn_detection,
                                "noise_reduction": None, "transcription": None},
                      "output": {"format": self.output_format.to_json(), "voice": self.voice or "default",
                                 "speed": 1.0}},
            "tools": list(self.tools), "tool_choice": self.tool_choice,
            "max_output_tokens": self.max_output_tokens, "generation": self.generation,
        }


# ---- field checks ----

def _string(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise RealtimeError("invalid_type", f"{name} must be a string", param=name)
    return value


def _list(value: Any, name: str) -> list:
    if not isinstance(value, list):
        raise RealtimeError("invalid_type", f"{name} must be an array", param=name)
    return value


def _object(value: Any, name: str, known: set[str]) -> dict:
    if not isinstance(value, dict):
        raise RealtimeError("invalid_type", f"{name} must be an object", param=name)
    unknown = sorted(set(value) - known)
    if unknown:
        raise RealtimeError("unsupported_field", f"{name}.{unknown[0]} is not supported by this server",
                            param=f"{name}.{unknown[0]}")
    return value


def _format(value: Any, name: str, any_rate: bool) -> AudioFormat:
    value = _object(value, name, {"type", "rate"})
    kind = value.get("type")
    if kind not in AUDIO_TYPES:
        raise RealtimeError("unsupported_value", f"{name}.type {kind!r} is not supported: use one of "
                                                 f"{', '.join(AUDIO_TYPES)}", param=f"{name}.type")
    _, rates, default = AUDIO_TYPES[kind]
    rate = value.get("rate", default)
    accepted = rates if any_rate else (default,)
    if not isinstance(rate, int) or isinstance(rate, bool) or rate not in accepted:
        hint = f"{default}" + (" (8000-48000 as an extension)" if any_rate and kind == "audio/pcm" else "")
        raise RealtimeError("unsupported_value", f"{name}.rate {rate!r} is not supported for {kind}: use {hint}",
                            param=f"{name}.rate")
    return AudioFormat(kind, rate)


def _turn_detection(value: Any) -> dict | None:
    name = "session.audio.input.turn_detection"
    if value is None:
        return None
    value = _object(value, name, {"type", "create_response", "interrupt_response", "idle_timeout_ms"} | VAD_FIELDS
                    | {"eagerness"})
    if value.get("type") != "server_vad":
        raise RealtimeError("unsupported_value", f"{name}.type {value.get('type')!r} is not supported: use "
                                                 "'server_vad', or null for manual turns", param=f"{name}.type")
    td = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500,
          "create_response": True, "interrupt_response": True, "idle_timeout_ms": None}
    for flag in ("create_response", "interrupt_response"):
        if flag in value:
            if not isinstance(value[flag], bool):
                raise RealtimeError("invalid_type", f"{name}.{flag} must be a boolean", param=f"{name}.{flag}")
            td[flag] = value[flag]
    idle = value.get("idle_timeout_ms")
    if idle is not None:
        if not isinstance(idle, int) or isinstance(idle, bool) or not 1000 <= idle <= 60000:
            raise RealtimeError("invalid_value", f"{name}.idle_timeout_ms {idle!r} is out of range (1000-60000 ms, "
                                                 "or null)", param=f"{name}.idle_timeout_ms")
        td["idle_timeout_ms"] = idle
    for key in VAD_FIELDS:
        if key in value:
            v = value[key]
            ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 < v < 1.0) if key == "threshold" \
                else (isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 10000)
            if not ok:
                raise RealtimeError("invalid_value", f"{name}.{key} {v!r} is out of range "
                                                     + ("(0-1)" if key == "threshold" else "(0-10000 ms)"),
                                    param=f"{name}.{key}")
            td[key] = v
    return td


def _tool(value: Any, i: int) -> dict:
    name = f"session.tools[{i}]"
    value = _object(value, name, {"type", "name", "description", "parameters"})
    if value.get("type", "function") != "function":
        raise RealtimeError("unsupported_value", f"{name}.type {value.get('type')!r}: only 'function' tools",
                            param=f"{name}.type")
    if not isinstance(value.get("name"), str) or not value["name"]:
        raise RealtimeError("invalid_value", f"{name}.name: a function name is required", param=f"{name}.name")
    if not isinstance(value.get("description", ""), str):
        raise RealtimeError("invalid_type", f"{name}.description must be a string", param=f"{name}.description")
    if not isinstance(value.get("parameters", {}), dict):
        raise RealtimeError("invalid_type", f"{name}.parameters must be a JSON Schema object",
                            param=f"{name}.parameters")
    return {"type": "function", "name": value["name"], "description": value.get("description", ""),
            "parameters": value.get("parameters", {})}


def _generation(value: Any) -> dict:
    value = _object(value, "session.generation", GENERATION_FIELDS)
    out = {}
    for key, v in value.items():
        if v is None:
            continue
        if key == "greedy":
            if not isinstance(v, bool):
                raise RealtimeError("invalid_type", "session.generation.greedy must be a boolean",
                                    param="session.generation.greedy")
        elif key in ("seed", "top_k"):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise RealtimeError("invalid_value", f"session.generation.{key} must be a non-negative integer",
                                    param=f"session.generation.{key}")
        elif not isinstance(v, (int, float)) or isinstance(v, bool):
            raise RealtimeError("invalid_type", f"session.generation.{key} must be a number",
                                param=f"session.generation.{key}")
        out[key] = v
    return out
