"""Converse's dispatch table: one handler per client event kind of the proto, and an explicit error
for an empty or unknown event."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from funchat.api import pb
from funchat.orchestrator.call_config import CallConfig
from funchat.orchestrator.converse import END_EVENT, ConverseCall


def proto_kinds() -> set[str]:
    return {f.name for f in pb.ClientEvent.DESCRIPTOR.oneofs_by_name["event"].fields}


def test_every_client_event_kind_has_a_handler():
    assert set(ConverseCall.HANDLERS) | {END_EVENT} == proto_kinds()
    assert END_EVENT not in ConverseCall.HANDLERS  # the reading loop stops there
    for kind, handler in ConverseCall.HANDLERS.items():
        assert handler.__name__ == f"on_{kind}" and asyncio.iscoroutinefunction(handler)


def manual_call() -> ConverseCall:
    """A call with manual turns (no VAD model) and a stand-in service: only the settings are read."""
    service = SimpleNamespace(settings=SimpleNamespace(max_chunk_ms=1000, max_turn_s=60.0,
                                                      encode_while_speaking=False))
    return ConverseCall(service, "sid", CallConfig(vad=None))


def errors_after(events: list[pb.ClientEvent]) -> list[pb.Error]:
    async def main():
        call = manual_call()
        for event in events:
            await call.handle(event)
        return [e.error for e in call.outbox.items if e.WhichOneof("event") == "error"]
    return asyncio.run(main())


def test_an_empty_event_is_an_explicit_error():
    (error,) = errors_after([pb.ClientEvent()])
    assert (error.code, error.event) == ("INVALID_ARGUMENT", "")
    assert error.message == "unknown or empty client event None"


def test_events_refused_by_their_handlers():
    errors = errors_after([
        pb.ClientEvent(session=pb.SessionConfig()),
        pb.ClientEvent(audio=pb.InputAudioAppend(audio=b"\0\0\0")),
        pb.ClientEvent(commit=pb.InputAudioCommit()),
        pb.ClientEvent(cancel=pb.ResponseCancel()),
        pb.ClientEvent(playback=pb.PlaybackAck(response_id="resp_x", played_ms=5)),
        pb.ClientEvent(function_call_output=pb.FunctionCallOutput(output="{}")),
        pb.ClientEvent(clear=pb.InputAudioClear()),  # always fine
    ])
    assert [(e.code, e.event) for e in errors] == [
        ("FAILED_PRECONDITION", "session"), ("INVALID_ARGUMENT", "audio"), ("INVALID_ARGUMENT", "commit"),
        ("FAILED_PRECONDITION", "cancel"), ("INVALID_ARGUMENT", "playback"),
        ("INVALID_ARGUMENT", "function_call_output")]


def test_manual_audio_is_buffered_until_the_commit():
    async def main():
        call = manual_call()
        await call.handle(pb.ClientEvent(audio=pb.InputAudioAppend(audio=b"\1\0" * 1600)))
        buffered = call.buffered
        await call.handle(pb.ClientEvent(clear=pb.InputAudioClear()))
        return buffered, call.buffered, list(call.outbox.items)
    buffered, after_clear, events = asyncio.run(main())
    assert buffered == 1600 and after_clear == 0 and events == []
