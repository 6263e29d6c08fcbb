"""Server events: which response each belongs to, and each as one line of text."""

from __future__ import annotations

from funchat.api import pb
from funchat.client.audio import delta_format
from funchat.client.config import OUTPUT_SAMPLE_RATE, SAMPLE_BYTES

# Server events that belong to one response (they carry its response_id).
RESPONSE_EVENTS = ("response_created", "text_delta", "audio_delta", "function_call", "interrupted", "response_done")


def response_id_of(event: pb.ServerEvent) -> str:
    """The response an event belongs to ("" for session, VAD and error events)."""
    kind = event.WhichOneof("event")
    return getattr(event, kind).response_id if kind in RESPONSE_EVENTS else ""


def describe_event(event: pb.ServerEvent) -> str:
    """One line for a server event: its type and key fields (audio as a duration, never bytes)."""
    kind = event.WhichOneof("event")
    if kind is None:
        return "(empty event)"
    e = getattr(event, kind)
    if kind == "session_created":
        return (f"session_created session={e.session_id} resumed={e.resumed} turns={e.turns} "
                f"expires_in={e.expires_in_s}s")
    if kind == "speech_started":
        return f"speech_started audio_start_ms={e.audio_start_ms}"
    if kind == "speech_stopped":
        return f"speech_stopped audio_end_ms={e.audio_end_ms}"
    if kind == "committed":
        return f"committed item={e.item_id} audio_ms={e.audio_ms}"
    if kind == "response_created":
        return f"response_created response={e.response_id}"
    if kind == "text_delta":
        return f"text_delta response={e.response_id} delta={e.delta!r} tokens={len(e.token_ids)}"
    if kind == "audio_delta":
        encoding, rate = delta_format(e)
        samples = len(e.audio or e.pcm16) // SAMPLE_BYTES[encoding]
        return (f"audio_delta response={e.response_id} seq={e.sequence} start_ms={e.start_ms} "
                f"{samples * 1000 / rate:.0f} ms" + ("" if encoding == "pcm16" and rate == OUTPUT_SAMPLE_RATE
                                                     else f" {encoding} {rate} Hz"))
    if kind == "function_call":
        return f"function_call response={e.response_id} call={e.call_id} name={e.name} args={e.arguments_json}"
    if kind == "interrupted":
        return f"interrupted response={e.response_id} audio_end_ms={e.audio_end_ms} kept_text={e.kept_text!r}"
    if kind == "response_done":
        lat = " ".join(f"{k}={v:.0f}ms" for k, v in sorted(e.latency_ms.items()))
        return (f"response_done response={e.response_id} status={e.status} text={e.text!r} "
                f"text_tokens={len(e.text_tokens)} speech_tokens={len(e.speech_tokens)} audio_ms={e.audio_ms}"
                + (f" latency: {lat}" if lat else ""))
    if kind == "error":
        return f"error code={e.code} event={e.event or '-'} message={e.message!r}"
    return kind
