"""A Reply: one response assembled from its server events."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from funchat.api import pb
from funchat.client.audio import decode_audio, delta_format
from funchat.client.config import OUTPUT_SAMPLE_RATE
from funchat.client.errors import FunchatClientError
from funchat.client.events import RESPONSE_EVENTS, response_id_of


@dataclass
class Reply:
    """One response assembled from its server events."""

    response_id: str = ""
    status: str = ""  # completed | cancelled | interrupted | failed; "" when no response_done came
    text: str = ""
    text_tokens: list[int] = field(default_factory=list)
    text_tokens_emitted: list[int] = field(default_factory=list)
    speech_tokens: list[int] = field(default_factory=list)
    vocoder_tokens: list[int] = field(default_factory=list)
    audio: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # float32 at sample_rate
    sample_rate: int = OUTPUT_SAMPLE_RATE  # the reply audio's (24 kHz unless the call set output_audio_format)
    audio_ms: int = 0  # as the server counts it (ResponseDone.audio_ms)
    usage: dict[str, int] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)  # the server's, per stage
    first_audio_s: float | None = None  # client side: end of the caller's turn -> first audio_delta
    function_calls: list[dict[str, str]] = field(default_factory=list)  # {call_id, name, arguments_json}
    interrupted: pb.ResponseInterrupted | None = None
    errors: list[pb.Error] = field(default_factory=list)
    events: list[pb.ServerEvent] = field(default_factory=list, repr=False)
    session_id: str = ""
    mode: str = ""  # "s2s" / "s2t", from the config the client sent

    @property
    def audio_s(self) -> float:
        return len(self.audio) / self.sample_rate

    def tokens_json(self) -> dict[str, Any]:
        """The JSON `funchat respond --output-tokens` writes (TurnResult.to_json), from the API's values.

        Differences from the in-process oracle: prompt_tokens is usage.input_tokens; timings are the
        server's latency_ms converted to seconds, so their keys are the server's stages (audio_tokenizer,
        llm_prefill, first_text, first_audio, total...) rather than the oracle's (mel, encoder,
        llm_step_mean...), and they are measured from the end of the caller's turn."""
        return {
            "text": self.text, "text_tokens": list(self.text_tokens),
            "text_tokens_emitted": list(self.text_tokens_emitted), "speech_tokens": list(self.speech_tokens),
            "vocoder_tokens": list(self.vocoder_tokens), "mode": self.mode,
            "prompt_tokens": int(self.usage.get("input_tokens", 0)),
            "history_turns_dropped": int(self.usage.get("history_turns_dropped", 0)),
            "timings": {k: v / 1000.0 for k, v in self.latency_ms.items()},
        }


def collect_reply(events: Iterable[pb.ServerEvent], times: Sequence[float] | None = None,
                  sent_at: float | None = None, response_id: str = "", mode: str = "",
                  session_id: str = "") -> Reply:
    """Assemble a Reply from server events (pure; no I/O).

    The reply is `response_id`, or else the first response the events name; events of other
    responses are skipped, error events are all kept. times[i] is when events[i] arrived and
    sent_at when the caller's turn ended (same clock), for first_audio_s. The audio chunks must be
    numbered 0, 1, 2... with none missing or repeated, all in one format (FunchatClientError
    DATA_LOSS otherwise); they are joined in sequence order, whatever order they came in, and decoded
    from their format (24 kHz PCM16, or the call's output_audio_format) to float32.
    """
    events = list(events)
    if times is not None and len(times) != len(events):
        raise ValueError(f"{len(times)} arrival times for {len(events)} events")
    reply = Reply(response_id=response_id, mode=mode, session_id=session_id, events=events)
    deltas: list[str] = []
    chunks: dict[int, bytes] = {}
    fmt: tuple[str, int] | None = None  # (encoding, rate) of the reply's chunks
    done = None
    for i, event in enumerate(events):
        kind = event.WhichOneof("event")
        if kind == "session_created":
            reply.session_id = event.session_created.session_id
            continue
        if kind == "error":
            reply.errors.append(event.error)
            continue
        if kind not in RESPONSE_EVENTS:
            continue  # VAD events, commits: the caller's side of the turn
        rid = response_id_of(event)
        if not reply.response_id:
            reply.response_id = rid
        if rid != reply.response_id:
            continue
        if kind == "text_delta":
            deltas.append(event.text_delta.delta)
        elif kind == "audio_delta":
            a = event.audio_delta
            this = delta_format(a)
            if a.pcm16 and a.sample_rate_hz not in (0, OUTPUT_SAMPLE_RATE):  # pcm16 is the default format only
                raise FunchatClientError("DATA_LOSS", f"response {rid}: audio chunk {a.sequence} is at "
                                                      f"{a.sample_rate_hz} Hz, not {OUTPUT_SAMPLE_RATE}")
            if fmt is not None and this != fmt:
                raise FunchatClientError("DATA_LOSS", f"response {rid}: audio chunk {a.sequence} is {this[0]} at "
                                                      f"{this[1]} Hz, the chunks before {fmt[0]} at {fmt[1]} Hz")
            fmt = this
            if a.sequence in chunks:
                raise FunchatClientError("DATA_LOSS", f"response {rid}: audio chunk {a.sequence} came twice")
            if not chunks and times is not None and sent_at is not None:
                reply.first_audio_s = times[i] - sent_at
            chunks[a.sequence] = a.audio or a.pcm16
        elif kind == "function_call":
            f = event.function_call
            reply.function_calls.append({"call_id": f.call_id, "name": f.name, "arguments_json": f.arguments_json})
        elif kind == "interrupted":
            reply.interrupted = event.interrupted
        elif kind == "response_done":
            done = event.response_done
    if chunks and sorted(chunks) != list(range(len(chunks))):
        missing = sorted(set(range(max(chunks) + 1)) - set(chunks))
        raise FunchatClientError("DATA_LOSS", f"response {reply.response_id}: audio chunks {missing} are missing "
                                              f"(got {len(chunks)} chunks up to sequence {max(chunks)})")
    # Joined as bytes, then decoded: every format is whole samples per chunk (G.711: one byte each)
    reply.audio = (decode_audio(b"".join(chunks[s] for s in range(len(chunks))), fmt[0]) if chunks
                   else np.zeros(0, np.float32))
    if fmt is not None:
        reply.sample_rate = fmt[1]
    reply.text = "".join(deltas)
    if done is not None:
        reply.status = done.status
        # The final text is authoritative: deltas hold back a trailing incomplete multi-byte character.
        reply.text = done.text or reply.text
        reply.text_tokens, reply.text_tokens_emitted = list(done.text_tokens), list(done.text_tokens_emitted)
        reply.speech_tokens, reply.vocoder_tokens = list(done.speech_tokens), list(done.vocoder_tokens)
        reply.audio_ms = done.audio_ms
        reply.latency_ms = dict(done.latency_ms)
        if done.HasField("usage"):
            reply.usage = {f.name: getattr(done.usage, f.name) for f in done.usage.DESCRIPTOR.fields}
    return reply
