"""One Respond call (the whole utterance in one request, the reply streamed back), measured like a
Converse turn: the caller's turn ends when the request is sent."""

from __future__ import annotations

import time
import uuid

import grpc

from funchat.api import pb, pb_grpc
from funchat.client.audio import encode_audio
from funchat.client.auth import authed_stub
from funchat.loadgen.records import CallRecord, TurnRecord
from funchat.loadgen.replies import ReplyTracker
from funchat.loadgen.settings import CallerSettings
from funchat.loadgen.utterances import Utterance


def respond_call(channel: grpc.Channel, utterance: Utterance, settings: CallerSettings = CallerSettings(),
                 seed: int | None = None, call_id: str | None = None, api_key: str | None = None) -> CallRecord:
    """One Respond RPC (deadline: settings.turn_timeout_s) -> a CallRecord of one turn. api_key: the
    API key it sends (None: $FUNCHAT_API_KEY; "": none)."""
    call_id = call_id or uuid.uuid4().hex[:12]
    request = pb.RespondRequest(config=settings.session(seed), audio=encode_audio(utterance.audio, "pcm16"))
    record = TurnRecord("respond", call_id, 0, time.time())
    tracker = ReplyTracker()
    response_id = ""
    sent_at = time.monotonic()
    try:
        stub = authed_stub(pb_grpc.FunchatStub(channel), api_key)
        for event in stub.Respond(request, timeout=settings.turn_timeout_s):
            t = time.monotonic()
            kind = event.WhichOneof("event")
            if kind == "error" and not record.error:
                record.error, record.error_message = event.error.code or "UNKNOWN", event.error.message
            elif kind == "response_created":
                response_id = event.response_created.response_id
            tracker.on_event(t, event)
    except grpc.RpcError as exc:
        if not record.error:
            record.error, record.error_message = exc.code().name, exc.details() or ""
    state = tracker.replies.get(response_id)
    if state is not None:
        record.status = state.status
        record.audio_s = round(state.audio_s, 4)
        record.underruns, record.underrun_s = state.underruns, round(state.underrun_s, 4)
        if state.first_audio_at is not None:
            record.first_audio_s = state.first_audio_at - sent_at
        if state.done_at is not None:
            record.reply_s = state.done_at - sent_at
    if not record.error and record.status != "completed":
        record.error = "FAILED"
        record.error_message = f"the reply's status is {record.status or '(none: no response_done)'}"
    record.status = record.status or "failed"
    return CallRecord("respond", call_id, record.started_at, time.monotonic() - sent_at, [record])
