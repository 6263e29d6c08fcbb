"""One Realtime WebSocket call, run as a Converse call of the same replica.

The client's JSON events become `pb.ClientEvent`s on a Converse request stream
(`FunchatService.Converse`, in process: the same admission, sessions, turn detection, replies and
barge-in as the gRPC API), and Converse's events come back through `ServerEvents`. Turns are not
implemented a second time; what the Realtime protocol has and Converse has not is done here:

- The session exists from the connection on (`session.created` comes first, with the GA
  defaults), and `session.update` may change it any time. A Converse call takes one config, so an
  update that changes it ends the call and resumes the same session in a new one with the new
  config (the history is in Redis); during a reply it waits for `response.done`. Audio the caller
  had sent but not committed is dropped by that (`input_audio_buffer.cleared` is not sent: the
  protocol has no event for it), so clients configure before they speak, as they do.
- Manual turns (turn_detection null) are answered on `response.create`, not on the commit:
  `input_audio_buffer.commit` announces the user item at once and holds Converse's commit until
  `response.create`; audio the caller sends in between waits here for the next turn. A
  `response.create` with no spoken turn committed is Converse's `respond`: the history is answered
  as it stands (a user text message, a function's output).
- An append of any length is cut into pieces Converse takes (at most FUNCHAT_MAX_CHUNK_MS each).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from typing import TYPE_CHECKING, Awaitable, Callable

from funchat.api import pb
from funchat.orchestrator import metrics
from funchat.orchestrator.realtime.errors import RealtimeError, event_id
from funchat.orchestrator.realtime.server_events import ServerEvents, item_id
from funchat.orchestrator.realtime.session import RealtimeSession

if TYPE_CHECKING:
    from funchat.orchestrator.service import FunchatService

MAX_EVENT_BYTES = 15 << 20  # one client event's JSON text, as OpenAI's service bounds an append
# Converse's error `event` names -> the Realtime client event types they answer
CONVERSE_KINDS = {"audio": "input_audio_buffer.append", "commit": "input_audio_buffer.commit",
                  "clear": "input_audio_buffer.clear", "cancel": "response.cancel",
                  "truncate": "conversation.item.truncate", "function_call_output": "conversation.item.create",
                  "session": "session.update", "user_text": "conversation.item.create",
                  "respond": "response.create", "delete_turn": "conversation.item.delete"}


class CallContext:
    """What Converse reads of a gRPC servicer context: the caller's metadata, and the status it ends with.
    authenticated_tenant: the tenant of a client secret this endpoint has already verified (it is no API
    key, which Converse checks itself); a context made from the network never has it."""

    def __init__(self, metadata: list[tuple[str, str]], authenticated_tenant: str | None = None):
        self.metadata = metadata
        self.authenticated_tenant = authenticated_tenant
        self.code = None
        self.details = ""

    def invocation_metadata(self):
        return self.metadata

    def set_code(self, code) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def set_trailing_metadata(self, metadata) -> None:
        pass


class ConverseRun:
    """One Converse call of this replica fed from a queue; its events go to `deliver`."""

    def __init__(self, service: FunchatService, config: pb.SessionConfig, ctx: CallContext,
                 deliver: Callable[[pb.ServerEvent], Awaitable[None]]):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.queue.put_nowait(pb.ClientEvent(session=config))
        self.ctx = ctx
        self.events = service.Converse(self.requests(), self.ctx)
        self.deliver = deliver
        self.task = metrics.spawn(self.pump(), "realtime.converse")

    async def requests(self):
        while (event := await self.queue.get()) is not None:
            yield event

    async def pump(self) -> None:
        try:
            async for event in self.events:
                await self.deliver(event)
        finally:
            await self.events.aclose()

    def send(self, event: pb.ClientEvent) -> None:
        self.queue.put_nowait(event)

    async def end(self) -> None:
        """The caller's stream ends: Converse answers speech still pending, finishes a reply, ends."""
        self.queue.put_nowait(None)
        await asyncio.gather(self.task, return_exceptions=True)

    async def abort(self) -> None:
        """The caller is gone: stop at once (a reply still generating is cancelled, the slot given back),
        as a cancelled gRPC call is."""
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def check_config(service: FunchatService, session: RealtimeSession) -> None:
    """What only the server knows (its voices, the tools' JSON, its limits), checked as Converse will:
    RealtimeError naming what is wrong."""
    from funchat.orchestrator.call_config import parse_config
    from funchat.orchestrator.errors import ApiError
    try:
        parse_config(session.to_pb(), service.voices, service.settings.max_new_tokens)
    except ApiError as exc:
        raise RealtimeError(exc.code.lower(), exc.message, param="session") from None


class RealtimeCall:
    """One WebSocket's call: `start`, then `handle` each client message (endpoint.py feeds them), then
    `abort` when the socket closes; Converse's events go out through `send` as they come."""

    def __init__(self, service: FunchatService, send: Callable[[dict], Awaitable[None]],
                 metadata: list[tuple[str, str]], model: str, tenant: str | None = None,
                 session: RealtimeSession | None = None):
        """tenant: set when the caller came with a verified client secret (then `session` is the one it
        opens with); else Converse authenticates the API key in `metadata`."""
        self.service = service
        self._send = send
        self.metadata = metadata
        self.tenant = tenant
        self.session = session or RealtimeSession(model=model)
        self.events = ServerEvents(lambda: self.session, self.client_event_of, self.reply_done, self.rate_limits)
        self.run: ConverseRun | None = None
        self.pending_update: RealtimeSession | None = None  # a session.update waiting for response.done
        self.last_event_ids: dict[str, str] = {}  # client event type -> the id of the latest one
        self.appended = 0  # bytes of caller audio since the last commit or clear (manual turns)
        self.committed: str | None = None  # manual: the user item committed, waiting for response.create
        self.held: list[pb.ClientEvent] = []  # manual: audio sent after that commit, for the next turn
        self.ended = asyncio.Event()  # the Converse call ended on its own (a limit, an error)
        self.send_lock = asyncio.Lock()
        self.max_chunk_ms = service.settings.max_chunk_ms
        self.max_turn_s = service.settings.max_turn_s

    async def send(self, event: dict) -> None:
        async with self.send_lock:
            await self._send(event)

    async def deliver(self, event: pb.ServerEvent) -> None:
        for out in self.events.translate(event):
            await self.send(out)

    def rate_limits(self) -> list[dict]:
        """The caller's tenant limits (0: none of that kind); what is left of them lives in Redis, shared by
        all replicas, and is not read for this."""
        try:
            limits = self.service.limiter.limits_of(self.service.tenant_of(self.context()))
        except Exception:  # noqa: BLE001 (a key revoked since the call began: no limits to report)
            return []
        return [{"name": "calls", "limit": limits.max_calls}, {"name": "requests_per_second", "limit": limits.rate_per_s},
                {"name": "requests_burst", "limit": limits.burst}]

    def context(self) -> CallContext:
        return CallContext(self.metadata, self.tenant)

    def client_event_of(self, kind: str) -> str | None:
        return self.last_event_ids.get(CONVERSE_KINDS.get(kind, kind))

    # ---- the call ----

    async def start(self) -> bool:
        """Open the Converse call; -> whether it was admitted (else its error was sent)."""
        return await self.open(self.session.to_pb())

    async def open(self, config: pb.SessionConfig) -> bool:
        created = asyncio.Event()

        async def deliver(event: pb.ServerEvent) -> None:
            await self.deliver(event)
            if event.WhichOneof("event") == "session_created":
                created.set()

        run = self.run = ConverseRun(self.service, config, self.context(), deliver)
        waiter = asyncio.ensure_future(created.wait())
        await asyncio.wait({waiter, run.task}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if not created.is_set():
            return False
        run.task.add_done_callback(lambda _: self.ended.set() if self.run is run else None)
        return True

    async def close(self) -> None:
        """End the Converse call as the caller's stream ending does (what was sent is answered)."""
        run, self.run = self.run, None
        if run is not None:
            await run.end()

    async def abort(self) -> None:
        """The WebSocket is gone: nobody is left to hear a reply."""
        run, self.run = self.run, None
        if run is not None:
            await run.abort()

    async def handle(self, text: str | bytes) -> None:
        """One WebSocket message; a bad one gets an `error` event, the call goes on."""
        try:
            await self.dispatch(text)
        except RealtimeError as exc:
            await self.send(exc.event())

    async def dispatch(self, text: str | bytes) -> None:
        if isinstance(text, bytes):
            raise RealtimeError("invalid_event", "binary messages are not part of the protocol: send each event "
                                                 "as a JSON text message (audio base64 in input_audio_buffer.append)")
        if len(text) > MAX_EVENT_BYTES:
            raise RealtimeError("event_too_large", f"the event is {len(text)} bytes, over the {MAX_EVENT_BYTES}-byte "
                                                   "limit: send audio in smaller input_audio_buffer.append events")
        try:
            event = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise RealtimeError("invalid_json", f"the message is not valid JSON ({exc}): send each event as a JSON "
                                                "object") from None
        if not isinstance(event, dict):
            raise RealtimeError("invalid_event", "an event must be a JSON object with a `type`")
        client_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
        kind = event.get("type")
        handler = self.HANDLERS.get(kind) if isinstance(kind, str) else None
        if handler is None:
            known = ", ".join(sorted(self.HANDLERS))
            raise RealtimeError("unknown_event_type", f"unknown event type {str(kind)[:64]!r}: this server takes "
                                                      f"{known}", param="type", event_id=client_id)
        self.last_event_ids[kind] = client_id
        try:
            await handler(self, event)
        except RealtimeError as exc:
            exc.event_id = exc.event_id or client_id
            raise

    # ---- client events ----

    async def on_session_update(self, event: dict) -> None:
        new = self.session.update(event.get("session"))
        if self.events.responding:
            self.pending_update = new  # applied at response.done
            return
        await self.apply(new)

    async def apply(self, new: RealtimeSession) -> None:
        """Take a checked session: when Converse's config changes, resume the session in a new call."""
        self.pending_update = None
        check_config(self.service, new)  # before anything changes
        changed = new.to_pb() != self.session.to_pb()
        self.session = new
        if not changed:
            await self.send({"type": "session.updated", "event_id": event_id(),
                             "session": new.to_json(self.events.session_id)})
            return
        await self.close()
        self.appended, self.committed, self.held = 0, None, []
        if not await self.open(new.to_pb(resume_token=self.events.resume_token)):
            self.ended.set()

    def reply_done(self) -> None:
        if self.pending_update is not None:
            update = self.pending_update
            metrics.spawn(self.apply_later(update), "realtime.session_update")

    async def apply_later(self, update: RealtimeSession) -> None:
        try:
            await self.apply(update)
        except RealtimeError as exc:
            await self.send(exc.event())

    async def on_append(self, event: dict) -> None:
        audio = event.get("audio")
        if not isinstance(audio, str):
            raise RealtimeError("invalid_value", "input_audio_buffer.append needs `audio`: base64 of the input "
                                                 "format's bytes", param="audio")
        try:
            data = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise RealtimeError("invalid_value", "`audio` is not valid base64", param="audio") from None
        fmt = self.session.input_format
        bytes_per_s = fmt.rate * fmt.bytes_per_sample
        if len(data) > self.max_turn_s * bytes_per_s:
            raise RealtimeError("invalid_value", f"the append carries {len(data) / bytes_per_s:.1f} s of audio, over "
                                                 f"the {self.max_turn_s:g} s a turn may last (FUNCHAT_MAX_TURN_S): "
                                                 "send audio as it is captured, in smaller appends", param="audio")
        step = max(fmt.bytes_per_sample, bytes_per_s * self.max_chunk_ms // 1000 // fmt.bytes_per_sample
                   * fmt.bytes_per_sample)
        for at in range(0, len(data), step):
            self.forward(pb.ClientEvent(audio=pb.InputAudioAppend(audio=data[at:at + step])))
        self.appended += len(data)

    def forward(self, event: pb.ClientEvent) -> None:
        """To Converse, or held while a manual commit waits for response.create."""
        if self.committed is not None and event.WhichOneof("event") == "audio":
            self.held.append(event)
        else:
            self.converse().send(event)

    def converse(self) -> ConverseRun:
        if self.run is None:
            raise RealtimeError("call_ended", "the call has ended", type="server_error")
        return self.run

    async def on_commit(self, event: dict) -> None:
        if not self.session.manual:  # server VAD: a commit ends the speech in progress
            self.converse().send(pb.ClientEvent(commit=pb.InputAudioCommit()))
            return
        if self.committed is not None:
            raise RealtimeError("commit_pending", "the committed turn has not been answered yet: send "
                                                  "response.create before committing another")
        if self.appended == 0:
            raise RealtimeError("input_audio_buffer_commit_empty", "the input audio buffer is empty: append "
                                                                   "audio before committing")
        self.committed, self.appended = item_id(), 0
        for out in self.events.committed(self.committed):
            await self.send(out)

    async def on_clear(self, event: dict) -> None:
        if self.committed is not None:
            self.held.clear()  # the committed turn stays; what came after it goes
        else:
            self.converse().send(pb.ClientEvent(clear=pb.InputAudioClear()))
        self.appended = 0
        await self.send({"type": "input_audio_buffer.cleared", "event_id": event_id()})

    async def on_response_create(self, event: dict) -> None:
        response = event.get("response") or {}
        if not isinstance(response, dict):
            raise RealtimeError("invalid_type", "`response` must be an object", param="response")
        ignored = sorted(k for k in response if k not in ("metadata",))
        if ignored:
            raise RealtimeError("unsupported_field", f"response.{ignored[0]} is not supported by this server: "
                                                     "a response takes the session's settings (session.update)",
                                param=f"response.{ignored[0]}")
        if self.events.responding:
            raise RealtimeError("conversation_already_has_active_response", "a response is in progress: wait for "
                                                                            "response.done or send response.cancel")
        run = self.converse()
        if self.committed is None:  # no spoken turn waiting: answer the history (a user text, a function output)
            run.send(pb.ClientEvent(respond=pb.ResponseCreate()))
            return
        run.send(pb.ClientEvent(commit=pb.InputAudioCommit()))
        self.events.manual_item, self.committed = self.committed, None
        for held in self.held:
            run.send(held)
        self.held.clear()

    async def on_response_cancel(self, event: dict) -> None:
        self.converse().send(pb.ClientEvent(cancel=pb.ResponseCancel()))

    async def on_output_audio_clear(self, event: dict) -> None:
        """Stop the reply's audio: its generation is cancelled (over a WebSocket nothing is buffered here)."""
        reply = self.events.reply
        if reply is not None:
            self.converse().send(pb.ClientEvent(cancel=pb.ResponseCancel()))
        await self.send({"type": "output_audio_buffer.cleared", "event_id": event_id(),
                         "response_id": reply.response_id if reply else None})

    async def on_item_truncate(self, event: dict) -> None:
        item = event.get("item_id")
        response_id = self.events.reply_of_item.get(item) if isinstance(item, str) else None
        if response_id is None:
            raise RealtimeError("invalid_value", f"item_id {str(item)[:64]!r} is not an assistant audio item of this "
                                                 "call", param="item_id")
        end_ms = event.get("audio_end_ms")
        if not isinstance(end_ms, int) or isinstance(end_ms, bool) or end_ms < 0:
            raise RealtimeError("invalid_value", "audio_end_ms must be a non-negative integer (milliseconds of the "
                                                 "item's audio the caller heard)", param="audio_end_ms")
        if event.get("content_index", 0) != 0:
            raise RealtimeError("invalid_value", "content_index: an assistant item has one content part (0)",
                                param="content_index")
        self.converse().send(pb.ClientEvent(truncate=pb.Truncate(response_id=response_id, audio_end_ms=end_ms)))

    async def on_item_create(self, event: dict) -> None:
        item = event.get("item")
        if not isinstance(item, dict):
            raise RealtimeError("invalid_value", "conversation.item.create needs an `item` object", param="item")
        if item.get("type") == "message" and item.get("role") == "user":
            await self.create_user_text(item)
            return
        if item.get("type") != "function_call_output":
            what = f"{item.get('type')!r}" + (f" ({item.get('role')})" if item.get("role") else "")
            raise RealtimeError("unsupported_value", f"conversation.item.create of a {what} item is not supported: "
                                                     "this server takes user messages of input_text and "
                                                     "function_call_output items", param="item.type")
        call_id, output = item.get("call_id"), item.get("output")
        if not isinstance(call_id, str) or not isinstance(output, str):
            raise RealtimeError("invalid_value", "a function_call_output item needs `call_id` and `output` strings",
                                param="item")
        name = item.get("id") if isinstance(item.get("id"), str) and item.get("id") else item_id()
        self.converse().send(pb.ClientEvent(function_call_output=pb.FunctionCallOutput(call_id=call_id,
                                                                                       output=output, item_id=name)))
        done = {"id": name, "object": "realtime.item", "type": "function_call_output",
                "status": "completed", "call_id": call_id, "output": output}
        for out in self.events.added_item(done):
            await self.send(out)

    async def create_user_text(self, item: dict) -> None:
        """A user message of text: a user turn in the history (response.create answers it)."""
        content = item.get("content")
        if (not isinstance(content, list) or not content
                or any(not isinstance(c, dict) or c.get("type") != "input_text" or not isinstance(c.get("text"), str)
                       for c in content)):
            raise RealtimeError("unsupported_value", "a user message's content must be input_text parts "
                                                     "({\"type\": \"input_text\", \"text\": ...}); send speech with "
                                                     "input_audio_buffer.append", param="item.content")
        text = "\n".join(c["text"] for c in content)
        name = item.get("id") if isinstance(item.get("id"), str) and item.get("id") else item_id()
        self.converse().send(pb.ClientEvent(user_text=pb.UserText(text=text, item_id=name)))
        done = {"id": name, "object": "realtime.item", "type": "message", "role": "user",
                "status": "completed", "content": [{"type": "input_text", "text": text}]}
        for out in self.events.added_item(done):
            await self.send(out)

    async def on_item_delete(self, event: dict) -> None:
        """Remove an item's turn from the history. An assistant reply is one turn: deleting its message or
        one of its function calls deletes the reply."""
        item = event.get("item_id")
        if not isinstance(item, str) or not item:
            raise RealtimeError("invalid_value", "conversation.item.delete needs an `item_id`", param="item_id")
        if item == self.committed:
            raise RealtimeError("invalid_value", f"item {item[:64]!r} is committed and waiting for response.create: "
                                                 "it joins the history when it is answered", param="item_id")
        turn = self.events.turn_of_item.get(item) or self.events.reply_of_item.get(item) or item
        self.events.deleting[turn] = item
        self.converse().send(pb.ClientEvent(delete_turn=pb.DeleteTurn(item_id=turn)))

    async def on_item_retrieve(self, event: dict) -> None:
        raise RealtimeError("unsupported_event", "conversation.item.retrieve is not supported")

    HANDLERS = {
        "session.update": on_session_update,
        "input_audio_buffer.append": on_append,
        "input_audio_buffer.commit": on_commit,
        "input_audio_buffer.clear": on_clear,
        "response.create": on_response_create,
        "response.cancel": on_response_cancel,
        "output_audio_buffer.clear": on_output_audio_clear,
        "conversation.item.truncate": on_item_truncate,
        "conversation.item.create": on_item_create,
        "conversation.item.delete": on_item_delete,
        "conversation.item.retrieve": on_item_retrieve,
    }
