"""The Converse call's events (`pb.ServerEvent`) as the Realtime protocol's server events.

One funchat event may make several Realtime ones: a reply's first audio chunk opens its assistant
message item and content part (`response.output_item.added`, `conversation.item.added`,
`response.content_part.added`) before its `response.output_audio.delta`, and `response_done`
closes them all before `response.done`. `ServerEvents` keeps what that needs: the items of the
reply in progress, and which assistant item belongs to which reply (`conversation.item.truncate`
names the item, Converse the reply).
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass, field
from typing import Callable

from funchat.api import pb
from funchat.orchestrator.realtime.errors import event_id, from_status
from funchat.orchestrator.realtime.session import RealtimeSession

# Converse's response status -> (Realtime status, status_details)
STATUS = {
    "completed": ("completed", None),
    "cancelled": ("cancelled", {"type": "cancelled", "reason": "client_cancelled"}),
    "interrupted": ("cancelled", {"type": "cancelled", "reason": "turn_detected"}),
    "failed": ("failed", {"type": "failed", "error": None}),
}


def item_id() -> str:
    return "item_" + secrets.token_hex(8)


def user_audio_item(item: str, audio_ms: int | None = None) -> dict:
    return {"id": item, "object": "realtime.item", "type": "message", "role": "user", "status": "completed",
            "content": [{"type": "input_audio", "transcript": None}]}


@dataclass
class ReplyState:
    """One reply's items as the Realtime protocol sees them."""

    response_id: str
    message: dict | None = None  # the assistant message item, once text or audio came
    text: str = ""
    audio: bool = False
    calls: list[dict] = field(default_factory=list)  # function_call items

    @property
    def output(self) -> list[dict]:
        return ([self.message] if self.message else []) + self.calls


class ServerEvents:
    """Translates one Realtime call's Converse events; `session` is read at each reply (it may change)."""

    def __init__(self, session: Callable[[], RealtimeSession], client_event_of: Callable[[str], str | None],
                 on_reply_done: Callable[[], None] | None = None,
                 rate_limits: Callable[[], list[dict]] | None = None):
        """client_event_of: a Converse error's `event` kind -> the id of the client event it answers.
        on_reply_done: called after each `response.done` (the call applies a deferred session.update).
        rate_limits: the caller's limits, sent after each `response.done` (`rate_limits.updated`)."""
        self.session = session
        self.rate_limits = rate_limits
        self.client_event_of = client_event_of
        self.on_reply_done = on_reply_done
        self.session_id = ""
        self.resume_token = ""
        self.announced_session = False
        self.last_item: str | None = None  # previous_item_id of the next item
        self.user_item: str | None = None  # the caller's turn in progress (VAD: from speech_started)
        self.reply: ReplyState | None = None  # the reply in progress
        self.replies: dict[str, ReplyState] = {}  # response_id -> its items (truncate, late interrupted)
        self.reply_of_item: dict[str, str] = {}  # assistant item id (message, function call) -> response_id
        self.turn_of_item: dict[str, str] = {}  # a caller's audio item id -> its turn's id in Converse
        self.manual_item: str | None = None  # manual turns: the item whose commit went to Converse last
        self.deleting: dict[str, str] = {}  # Converse turn id -> the item id the client asked to delete

    @property
    def responding(self) -> bool:
        return self.reply is not None

    def text_only(self) -> bool:
        return self.session().output_modalities == ("text",)

    # ---- items the call announces itself (manual commits, conversation.item.create) ----

    def added_item(self, item: dict) -> list[dict]:
        previous, self.last_item = self.last_item, item["id"]
        return [{"type": "conversation.item.added", "event_id": event_id(), "previous_item_id": previous,
                 "item": item},
                {"type": "conversation.item.done", "event_id": event_id(), "previous_item_id": previous,
                 "item": item}]

    def committed(self, item: str) -> list[dict]:
        previous = self.last_item
        return [{"type": "input_audio_buffer.committed", "event_id": event_id(), "previous_item_id": previous,
                 "item_id": item}] + self.added_item(user_audio_item(item))

    # ---- Converse's events ----

    def translate(self, ev: pb.ServerEvent) -> list[dict]:
        kind = ev.WhichOneof("event")
        return getattr(self, "on_" + kind)(getattr(ev, kind))

    def on_session_created(self, e: pb.SessionCreated) -> list[dict]:
        self.session_id, self.resume_token = e.session_id, e.resume_token
        kind = "session.updated" if self.announced_session else "session.created"
        self.announced_session = True
        return [{"type": kind, "event_id": event_id(), "session": self.session().to_json(e.session_id)}]

    def on_speech_started(self, e: pb.SpeechStarted) -> list[dict]:
        self.user_item = item_id()
        return [{"type": "input_audio_buffer.speech_started", "event_id": event_id(),
                 "audio_start_ms": e.audio_start_ms, "item_id": self.user_item}]

    def on_speech_stopped(self, e: pb.SpeechStopped) -> list[dict]:
        return [{"type": "input_audio_buffer.speech_stopped", "event_id": event_id(),
                 "audio_end_ms": e.audio_end_ms, "item_id": self.user_item}]

    def on_idle_timeout(self, e: pb.IdleTimeout) -> list[dict]:
        """The caller's silence after a reply is committed as their turn (it is answered next)."""
        self.user_item = item_id()
        return [{"type": "input_audio_buffer.timeout_triggered", "event_id": event_id(),
                 "audio_start_ms": e.audio_start_ms, "audio_end_ms": e.audio_end_ms, "item_id": self.user_item}]

    def on_committed(self, e: pb.InputAudioCommitted) -> list[dict]:
        if self.session().manual:  # announced at the client's commit (RealtimeCall.on_commit)
            if self.manual_item is not None:
                self.turn_of_item[self.manual_item], self.manual_item = e.item_id, None
            return []
        item, self.user_item = self.user_item or item_id(), None
        self.turn_of_item[item] = e.item_id
        return self.committed(item)

    def on_turn_deleted(self, e: pb.TurnDeleted) -> list[dict]:
        item = self.deleting.pop(e.item_id, e.item_id)
        return [{"type": "conversation.item.deleted", "event_id": event_id(), "item_id": item}]

    def on_response_created(self, e: pb.ResponseCreated) -> list[dict]:
        self.reply = self.replies[e.response_id] = ReplyState(e.response_id)
        return [{"type": "response.created", "event_id": event_id(),
                 "response": self.response_object(self.reply, "in_progress")}]

    def open_message(self, reply: ReplyState) -> list[dict]:
        """The assistant message item and its content part, before its first delta."""
        if reply.message is not None:
            return []
        item = reply.message = {"id": item_id(), "object": "realtime.item", "type": "message",
                                "role": "assistant", "status": "in_progress", "content": []}
        self.reply_of_item[item["id"]] = reply.response_id
        previous, self.last_item = self.last_item, item["id"]
        part = {"type": "text", "text": ""} if self.text_only() else {"type": "audio", "transcript": ""}
        where = {"response_id": reply.response_id, "item_id": item["id"], "output_index": 0}
        return [{"type": "response.output_item.added", "event_id": event_id(), "response_id": reply.response_id,
                 "output_index": 0, "item": dict(item)},
                {"type": "conversation.item.added", "event_id": event_id(), "previous_item_id": previous,
                 "item": dict(item)},
                {"type": "response.content_part.added", "event_id": event_id(), **where, "content_index": 0,
                 "part": part}]

    def on_text_delta(self, e: pb.TextDelta) -> list[dict]:
        reply = self.replies.get(e.response_id)
        if reply is None:
            return []
        reply.text += e.delta
        kind = "response.output_text.delta" if self.text_only() else "response.output_audio_transcript.delta"
        return self.open_message(reply) + [{"type": kind, "event_id": event_id(), **self.where(reply),
                                            "delta": e.delta}]

    def on_audio_delta(self, e: pb.AudioDelta) -> list[dict]:
        reply = self.replies.get(e.response_id)
        if reply is None:
            return []
        reply.audio = True
        data = e.pcm16 or e.audio
        return self.open_message(reply) + [{"type": "response.output_audio.delta", "event_id": event_id(),
                                            **self.where(reply), "delta": base64.b64encode(data).decode()}]

    def on_function_call(self, e: pb.FunctionCall) -> list[dict]:
        reply = self.replies.get(e.response_id)
        if reply is None:
            return []
        item = {"id": item_id(), "object": "realtime.item", "type": "function_call", "status": "completed",
                "call_id": e.call_id, "name": e.name, "arguments": e.arguments_json}
        index = len(reply.output)
        reply.calls.append(item)
        self.reply_of_item[item["id"]] = reply.response_id
        previous, self.last_item = self.last_item, item["id"]
        where = {"response_id": reply.response_id, "item_id": item["id"], "output_index": index,
                 "call_id": e.call_id}
        added = {**item, "status": "in_progress", "arguments": ""}
        return [{"type": "response.output_item.added", "event_id": event_id(), "response_id": reply.response_id,
                 "output_index": index, "item": added},
                {"type": "conversation.item.added", "event_id": event_id(), "previous_item_id": previous,
                 "item": added},
                {"type": "response.function_call_arguments.delta", "event_id": event_id(), **where,
                 "delta": e.arguments_json},
                {"type": "response.function_call_arguments.done", "event_id": event_id(), **where,
                 "name": e.name, "arguments": e.arguments_json},
                {"type": "response.output_item.done", "event_id": event_id(), "response_id": reply.response_id,
                 "output_index": index, "item": item},
                {"type": "conversation.item.done", "event_id": event_id(), "previous_item_id": previous,
                 "item": item}]

    def on_interrupted(self, e: pb.ResponseInterrupted) -> list[dict]:
        reply = self.replies.get(e.response_id)
        if reply is None or reply.message is None:
            return []
        return [{"type": "conversation.item.truncated", "event_id": event_id(), "item_id": reply.message["id"],
                 "content_index": 0, "audio_end_ms": e.audio_end_ms}]

    def on_response_done(self, e: pb.ResponseDone) -> list[dict]:
        if e.resume_token:
            self.resume_token = e.resume_token
        reply = self.replies.get(e.response_id)
        if reply is None:
            return []
        status, details = STATUS.get(e.status, ("failed", None))
        out = []
        if reply.message is not None:
            where = self.where(reply)
            if self.text_only():
                part = {"type": "text", "text": reply.text}
                out.append({"type": "response.output_text.done", "event_id": event_id(), **where, "text": reply.text})
            else:
                part = {"type": "audio", "transcript": reply.text}
                if reply.audio:
                    out.append({"type": "response.output_audio.done", "event_id": event_id(), **where})
                out.append({"type": "response.output_audio_transcript.done", "event_id": event_id(), **where,
                            "transcript": reply.text})
            reply.message.update(status="completed" if status == "completed" else "incomplete", content=[part])
            out += [{"type": "response.content_part.done", "event_id": event_id(), **where, "part": part},
                    {"type": "response.output_item.done", "event_id": event_id(), "response_id": reply.response_id,
                     "output_index": 0, "item": dict(reply.message)},
                    {"type": "conversation.item.done", "event_id": event_id(), "previous_item_id": None,
                     "item": dict(reply.message)}]
        response = self.response_object(reply, status, details)
        u = e.usage
        response["usage"] = {
            "total_tokens": u.input_tokens + u.output_text_tokens + u.output_speech_tokens,
            "input_tokens": u.input_tokens, "output_tokens": u.output_text_tokens + u.output_speech_tokens,
            "input_token_details": {"text_tokens": u.input_tokens, "audio_tokens": 0, "cached_tokens": 0},
            "output_token_details": {"text_tokens": u.output_text_tokens, "audio_tokens": u.output_speech_tokens}}
        # funchat's extension: the tokens (to check a greedy call against the reference), the
        # latency of each stage, the history turns dropped to fit the context
        response["funchat"] = {"text_tokens": list(e.text_tokens), "speech_tokens": list(e.speech_tokens),
                               "vocoder_tokens": list(e.vocoder_tokens), "latency_ms": dict(e.latency_ms),
                               "audio_ms": e.audio_ms, "history_turns_dropped": u.history_turns_dropped}
        out.append({"type": "response.done", "event_id": event_id(), "response": response})
        if self.rate_limits is not None:
            out.append({"type": "rate_limits.updated", "event_id": event_id(), "rate_limits": self.rate_limits()})
        if self.reply is reply:
            self.reply = None
            if self.on_reply_done is not None:
                self.on_reply_done()
        return out

    def on_error(self, e: pb.Error) -> list[dict]:
        return [from_status(e.code, e.message, self.client_event_of(e.event)).event()]

    # ---- helpers ----

    def where(self, reply: ReplyState) -> dict:
        return {"response_id": reply.response_id, "item_id": reply.message["id"], "output_index": 0,
                "content_index": 0}

    def response_object(self, reply: ReplyState, status: str, details: dict | None = None) -> dict:
        s = self.session()
        return {"object": "realtime.response", "id": reply.response_id, "status": status,
                "status_details": details, "output": [dict(i) for i in reply.output],
                "conversation_id": self.session_id, "output_modalities": list(s.output_modalities),
                "audio": {"output": {"format": s.output_format.to_json(), "voice": s.voice or "default"}},
                "max_output_tokens": s.max_output_tokens, "usage": None, "metadata": None}
