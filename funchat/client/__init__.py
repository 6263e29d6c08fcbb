"""A Python client of the funchat public API (protos/funchat/v1/funchat.proto) over gRPC.

    from funchat.client import AsyncClient, Client, session_config, stream_call

    reply = Client("127.0.0.1:50051").respond(audio16k, session_config(greedy=True))
    reply.text, reply.audio            # the text and the 24 kHz spoken reply

    async with AsyncClient(target) as client:
        async with client.converse(session_config(turn_detection="manual")) as call:
            await call.send_audio(audio16k)
            await call.commit()
            reply = await call.next_reply()

Every failure of an RPC is raised as `FunchatClientError(code, message)`, `code` being the gRPC
status name (INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE...); problems this client finds in what the
server sent (a reply whose audio chunks are not numbered 0, 1, 2...) are raised the same way with
code DATA_LOSS.
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterable, Mapping, Sequence

import grpc
import numpy as np
import soxr
from grpc_health.v1 import health_pb2, health_pb2_grpc

from funchat.api import pb, pb_grpc
from funchat.errors import FunchatError

INPUT_SAMPLE_RATE = 16000   # what the model hears; the default input format
OUTPUT_SAMPLE_RATE = 24000  # reply audio (AudioDelta.pcm16)
MAX_CHUNK_S = 1.0           # the server takes at most 1 s of caller audio per `audio` event

MODES = {"s2s": pb.MODE_SPEECH_TO_SPEECH, "s2t": pb.MODE_SPEECH_TO_TEXT}
ENCODINGS = {"pcm16": pb.AUDIO_ENCODING_PCM16, "float32": pb.AUDIO_ENCODING_FLOAT32}
TURN_DETECTION = ("server_vad", "manual")
# Server events that belong to one response (they carry its response_id).
RESPONSE_EVENTS = ("response_created", "text_delta", "audio_delta", "function_call", "interrupted", "response_done")


class FunchatClientError(FunchatError):
    """An RPC that failed (code: the gRPC status name) or a reply this client cannot assemble.

    unreachable: the channel never got a connection to the server (as opposed to a server that
    answered UNAVAILABLE itself, e.g. because a model service is down)."""

    def __init__(self, code: str, message: str, unreachable: bool = False):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.unreachable = unreachable


# ---------------------------------------------------------------------------------------------
# Configuration and audio


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
                   repetition_penalty: float | None = None) -> pb.SessionConfig:
    """A SessionConfig from plain values; ValueError names a bad one. Values the server checks
    (voice names, VAD ranges, sample-rate limits) are left to it, so there is one source of truth.

    seed None: the server draws one per turn (sampled speech is then not reproducible).
    max_new_tokens 0: the server's default. The VAD settings only go with turn_detection="server_vad".
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {sorted(MODES)}")
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown audio encoding {encoding!r}; use one of {sorted(ENCODINGS)}")
    if turn_detection not in TURN_DETECTION:
        raise ValueError(f"unknown turn_detection {turn_detection!r}; use one of {list(TURN_DETECTION)}")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive integer (Hz), got {sample_rate!r}")
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
    return pb.SessionConfig(
        mode=MODES[mode], instructions=instructions or "", voice=voice or "",
        tools=[_tool(t, i) for i, t in enumerate(tools or [])], turn_detection=td,
        input_audio_format=pb.AudioFormat(encoding=ENCODINGS[encoding], sample_rate_hz=sample_rate),
        resume_token=resume_token or "", generation=gen)


def config_mode(config: pb.SessionConfig) -> str:
    """"s2s" or "s2t" (MODE_UNSPECIFIED is speech-to-speech)."""
    return "s2t" if config.mode == pb.MODE_SPEECH_TO_TEXT else "s2s"


def _input_format(config: pb.SessionConfig) -> tuple[str, int, int]:
    """(encoding name, sample rate, bytes per sample) of the config's caller audio."""
    fmt = config.input_audio_format
    encoding = "float32" if fmt.encoding == pb.AUDIO_ENCODING_FLOAT32 else "pcm16"
    return encoding, fmt.sample_rate_hz or INPUT_SAMPLE_RATE, 4 if encoding == "float32" else 2


def encode_audio(samples: np.ndarray, encoding: str = "pcm16") -> bytes:
    """Mono float samples in [-1, 1] -> little-endian bytes ("pcm16" or "float32").

    Samples are clipped to [-1, 1] first: the server refuses float32 beyond it, and PCM16 would wrap."""
    x = np.asarray(samples, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"audio must be 1-D mono samples, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("audio holds NaN or infinite samples")
    x = np.clip(x, -1.0, 1.0)
    if encoding == "pcm16":
        # Scale by 32768 as soundfile and the server's decoder do, so PCM16 values round-trip exactly.
        return np.clip(np.round(x * 32768.0), -32768, 32767).astype("<i2").tobytes()
    if encoding == "float32":
        return x.astype("<f4").tobytes()
    raise ValueError(f"unknown audio encoding {encoding!r}; use one of {sorted(ENCODINGS)}")


def decode_pcm16(data: bytes) -> np.ndarray:
    """PCM16 little-endian bytes -> float32 samples in [-1, 1)."""
    if len(data) % 2:
        raise ValueError(f"{len(data)} bytes is not a whole number of PCM16 samples")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / np.float32(32768.0)


# ---------------------------------------------------------------------------------------------
# Replies


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
    audio: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # 24 kHz float32
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
        return len(self.audio) / OUTPUT_SAMPLE_RATE

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


def response_id_of(event: pb.ServerEvent) -> str:
    """The response an event belongs to ("" for session, VAD and error events)."""
    kind = event.WhichOneof("event")
    return getattr(event, kind).response_id if kind in RESPONSE_EVENTS else ""


def collect_reply(events: Iterable[pb.ServerEvent], times: Sequence[float] | None = None,
                  sent_at: float | None = None, response_id: str = "", mode: str = "",
                  session_id: str = "") -> Reply:
    """Assemble a Reply from server events (pure; no I/O).

    The reply is `response_id`, or else the first response the events name; events of other
    responses are skipped, error events are all kept. times[i] is when events[i] arrived and
    sent_at when the caller's turn ended (same clock), for first_audio_s. The audio chunks must be
    numbered 0, 1, 2... with none missing or repeated (FunchatClientError DATA_LOSS otherwise);
    they are joined in sequence order, whatever order they came in.
    """
    events = list(events)
    if times is not None and len(times) != len(events):
        raise ValueError(f"{len(times)} arrival times for {len(events)} events")
    reply = Reply(response_id=response_id, mode=mode, session_id=session_id, events=events)
    deltas: list[str] = []
    chunks: dict[int, bytes] = {}
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
            if a.sample_rate_hz not in (0, OUTPUT_SAMPLE_RATE):
                raise FunchatClientError("DATA_LOSS", f"response {rid}: audio chunk {a.sequence} is at "
                                                      f"{a.sample_rate_hz} Hz, not {OUTPUT_SAMPLE_RATE}")
            if a.sequence in chunks:
                raise FunchatClientError("DATA_LOSS", f"response {rid}: audio chunk {a.sequence} came twice")
            if not chunks and times is not None and sent_at is not None:
                reply.first_audio_s = times[i] - sent_at
            chunks[a.sequence] = a.pcm16
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
    reply.audio = (decode_pcm16(b"".join(chunks[s] for s in range(len(chunks)))) if chunks
                   else np.zeros(0, np.float32))
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
        rate = e.sample_rate_hz or OUTPUT_SAMPLE_RATE
        return (f"audio_delta response={e.response_id} seq={e.sequence} start_ms={e.start_ms} "
                f"{len(e.pcm16) // 2 * 1000 / rate:.0f} ms")
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


# ---------------------------------------------------------------------------------------------
# The asynchronous client


class AsyncClient:
    """grpc.aio client of one funchat server. Use inside a running event loop (the channel is made
    on first use, in the loop it belongs to); `async with` closes it.

    timeout: deadline in seconds of each Respond / GetSession / DeleteSession / health RPC (None:
    none). A Converse call has no deadline unless converse(timeout=) gives one: calls are long."""

    def __init__(self, target: str = "127.0.0.1:50051", timeout: float | None = None):
        self.target = target
        self.timeout = timeout
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.FunchatStub | None = None

    @property
    def channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.target)
        return self._channel

    @property
    def stub(self) -> pb_grpc.FunchatStub:
        if self._stub is None:
            self._stub = pb_grpc.FunchatStub(self.channel)
        return self._stub

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        self._channel = self._stub = None

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def error(self, exc: grpc.aio.AioRpcError) -> FunchatClientError:
        """An RPC failure as FunchatClientError. UNAVAILABLE on a channel that is not connected means the
        server could not be reached; UNAVAILABLE from a connected server is the server's own answer."""
        code = exc.code().name
        unreachable = (code == "UNAVAILABLE" and self._channel is not None
                       and self._channel.get_state() is not grpc.ChannelConnectivity.READY)
        return FunchatClientError(code, exc.details() or "", unreachable=unreachable)

    # ---- unary calls ----

    async def health(self, service: str = "") -> bool:
        """grpc.health.v1 Check: True when SERVING; False when NOT_SERVING or the server is unreachable.
        Other failures (e.g. UNIMPLEMENTED: not a funchat server) raise FunchatClientError."""
        health = health_pb2_grpc.HealthStub(self.channel)
        try:
            answer = await health.Check(health_pb2.HealthCheckRequest(service=service),
                                        timeout=self.timeout if self.timeout is not None else 5.0)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return False
            raise self.error(exc) from None
        return answer.status == health_pb2.HealthCheckResponse.SERVING

    async def get_session(self, session_id: str) -> pb.Session:
        try:
            return await self.stub.GetSession(pb.GetSessionRequest(session_id=session_id), timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise self.error(exc) from None

    async def delete_session(self, session_id: str) -> bool:
        """True when the session was deleted, False when there was none (NOT_FOUND)."""
        try:
            answer = await self.stub.DeleteSession(pb.DeleteSessionRequest(session_id=session_id),
                                                   timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise self.error(exc) from None
        return answer.deleted

    # ---- Respond ----

    def _respond_request(self, audio: np.ndarray | bytes, config: pb.SessionConfig | None,
                         session_id: str | None) -> pb.RespondRequest:
        # No config: an empty one, so that every setting is the server's default (or, with session_id,
        # the session's).
        config = config if config is not None else pb.SessionConfig()
        if not isinstance(audio, (bytes, bytearray)):
            audio = encode_audio(audio, _input_format(config)[0])
        return pb.RespondRequest(config=config, audio=bytes(audio), session_id=session_id or "")

    async def _respond_timed(self, request: pb.RespondRequest) -> AsyncIterator[tuple[float, pb.ServerEvent]]:
        call = self.stub.Respond(request, timeout=self.timeout)
        try:
            while True:
                try:
                    event = await call.read()
                except grpc.aio.AioRpcError as exc:
                    raise self.error(exc) from None
                if event is grpc.aio.EOF:
                    return
                yield time.monotonic(), event
        finally:
            call.cancel()  # a no-op once the call is over; frees the server when the caller stops early

    async def respond_stream(self, audio: np.ndarray | bytes, config: pb.SessionConfig | None = None,
                             session_id: str | None = None) -> AsyncIterator[pb.ServerEvent]:
        """Respond's server events as they come. A failed RPC raises FunchatClientError after its
        `error` event has been yielded."""
        async for _, event in self._respond_timed(self._respond_request(audio, config, session_id)):
            yield event

    async def respond(self, audio: np.ndarray | bytes, config: pb.SessionConfig | None = None,
                      session_id: str | None = None) -> Reply:
        """One whole utterance -> its Reply.

        audio: float samples at the config's input rate (16 kHz by default), encoded in its encoding;
        or bytes already in that format. session_id continues that session (multi-turn)."""
        request = self._respond_request(audio, config, session_id)
        events, times = [], []
        sent_at = time.monotonic()
        async for t, event in self._respond_timed(request):
            events.append(event)
            times.append(t)
        reply = collect_reply(events, times, sent_at=sent_at, mode=config_mode(request.config))
        if reply.errors:  # an RPC that ended OK after an error event still failed the turn
            raise FunchatClientError(reply.errors[0].code or "UNKNOWN", reply.errors[0].message)
        if not reply.status:
            raise FunchatClientError("DATA_LOSS", "the Respond stream ended without response_done")
        return reply

    # ---- Converse ----

    def converse(self, config: pb.SessionConfig | None = None, timeout: float | None = None) -> "Conversation":
        """A live call: `async with client.converse(config) as call: ...`."""
        return Conversation(self, config if config is not None else session_config(), timeout)


class Conversation:
    """One Converse call. Sending and receiving run concurrently: the send methods put events on a
    queue that feeds the request stream, and events()/next_reply() read the response stream with
    the call's read(). Use one reader at a time (events() or next_reply(), not both at once).

    Every reply is also assembled as it completes: `replies` holds them all, in order."""

    def __init__(self, client: AsyncClient, config: pb.SessionConfig, timeout: float | None = None):
        self.client = client
        self.config = config
        self.timeout = timeout
        self.mode = config_mode(config)
        self.encoding, self.sample_rate, self._width = _input_format(config)
        self.session: pb.SessionCreated | None = None
        self.replies: list[Reply] = []
        self._requests: asyncio.Queue[pb.ClientEvent | None] = asyncio.Queue()
        self._call = None
        self._ended = False       # `end` sent: the request stream is closed
        self._finished = False    # the server's stream is over
        self._last_sent_at: float | None = None  # last audio chunk or commit
        self._turn_end_at: float | None = None
        self._open: dict[str, tuple[float | None, list[tuple[float, pb.ServerEvent]]]] = {}
        self._unreturned: collections.deque[Reply] = collections.deque()

    # ---- lifetime ----

    async def __aenter__(self) -> "Conversation":
        await self.start()
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            await self.close()
        else:
            self.abort()

    async def start(self) -> pb.SessionCreated:
        """Open the call, send the config, wait for SessionCreated (FunchatClientError if refused)."""
        self._call = self.client.stub.Converse(self._request_stream(), timeout=self.timeout)
        self._requests.put_nowait(pb.ClientEvent(session=self.config))
        item = await self._read()
        if item is None:
            raise FunchatClientError("UNKNOWN", "the server ended the call before SessionCreated")
        event = item[1]
        if event.WhichOneof("event") == "error":
            self.abort()
            raise FunchatClientError(event.error.code or "UNKNOWN", event.error.message)
        if event.WhichOneof("event") != "session_created":
            self.abort()
            raise FunchatClientError("UNKNOWN", f"expected session_created first, got {event.WhichOneof('event')}")
        self.session = event.session_created
        return self.session

    async def _request_stream(self) -> AsyncIterator[pb.ClientEvent]:
        while True:
            event = await self._requests.get()
            if event is None:  # end(): half-close, the server answers what is pending and finishes
                return
            yield event

    async def close(self, grace_s: float = 10.0) -> None:
        """Send `end` and read the remaining events (replies still being generated complete) for up
        to grace_s, then cancel the call."""
        await self.end()
        if self._finished or self._call is None:
            return
        try:
            await asyncio.wait_for(self._drain(), grace_s)
        except asyncio.TimeoutError:
            self.abort()

    async def _drain(self) -> None:
        while await self._read() is not None:
            pass

    def abort(self) -> None:
        """Cancel the call now."""
        self._ended = self._finished = True
        if self._call is not None:
            self._call.cancel()

    # ---- client events ----

    def _send(self, event: pb.ClientEvent) -> None:
        if self._ended:
            raise FunchatClientError("FAILED_PRECONDITION", "the call has ended; nothing more can be sent")
        self._requests.put_nowait(event)

    async def send_audio(self, audio: np.ndarray | bytes) -> None:
        """Caller audio: float samples at the config's input rate, or bytes in its format. Sent as
        events of at most 1 s each (the server's limit)."""
        data = bytes(audio) if isinstance(audio, (bytes, bytearray)) else encode_audio(audio, self.encoding)
        step = int(self.sample_rate * MAX_CHUNK_S) * self._width
        for i in range(0, len(data), step):
            self._send(pb.ClientEvent(audio=pb.InputAudioAppend(audio=data[i:i + step])))
        if data:
            self._last_sent_at = time.monotonic()

    async def commit(self) -> None:
        """End the caller's turn (manual turn detection; with server VAD it flushes the detector)."""
        self._send(pb.ClientEvent(commit=pb.InputAudioCommit()))
        self._last_sent_at = time.monotonic()

    async def clear(self) -> None:
        self._send(pb.ClientEvent(clear=pb.InputAudioClear()))

    async def cancel(self) -> None:
        """Stop the reply being generated."""
        self._send(pb.ClientEvent(cancel=pb.ResponseCancel()))

    async def ack_playback(self, response_id: str, played_ms: int) -> None:
        self._send(pb.ClientEvent(playback=pb.PlaybackAck(response_id=response_id, played_ms=max(0, int(played_ms)))))

    async def send_function_output(self, call_id: str, output: str | Mapping | list) -> None:
        text = output if isinstance(output, str) else json.dumps(output, ensure_ascii=False)
        self._send(pb.ClientEvent(function_call_output=pb.FunctionCallOutput(call_id=call_id, output=text)))

    async def end(self) -> None:
        """End the call: the server answers speech it still holds, then ends its stream."""
        if self._ended:
            return
        self._requests.put_nowait(pb.ClientEvent(end=pb.SessionEnd()))
        self._requests.put_nowait(None)
        self._ended = True

    # ---- server events ----

    async def _read(self) -> tuple[float, pb.ServerEvent] | None:
        """The next event and when it came; None at the end of a call that ended OK."""
        if self._finished:
            return None
        try:
            event = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            self._ended = self._finished = True
            raise self.client.error(exc) from None
        if event is grpc.aio.EOF:
            self._ended = self._finished = True
            return None
        t = time.monotonic()
        self._track(t, event)
        return t, event

    def _track(self, t: float, event: pb.ServerEvent) -> None:
        """Group events by response and assemble each reply when its response_done comes."""
        kind = event.WhichOneof("event")
        rid = response_id_of(event)
        if kind == "committed":
            # The turn ended with the last audio (or commit) sent before the server said so.
            self._turn_end_at = self._last_sent_at
        elif kind == "response_created":
            self._open[rid] = (self._turn_end_at, [])
        if rid and rid in self._open:
            self._open[rid][1].append((t, event))
        elif kind == "error" and event.error.event == "turn" and self._open:
            # A failed turn's error comes just before its response_done: it belongs to the latest response.
            next(reversed(self._open.values()))[1].append((t, event))
        if kind == "response_done":
            sent_at, timed = self._open.pop(rid, (None, [(t, event)]))
            reply = collect_reply([e for _, e in timed], [s for s, _ in timed], sent_at=sent_at, response_id=rid,
                                  mode=self.mode, session_id=self.session.session_id if self.session else "")
            self.replies.append(reply)
            self._unreturned.append(reply)

    async def events(self) -> AsyncIterator[pb.ServerEvent]:
        """The server's events until the call ends (FunchatClientError if it ends with an error status)."""
        while True:
            item = await self._read()
            if item is None:
                return
            yield item[1]

    async def next_reply(self) -> Reply:
        """The next reply not yet returned by next_reply (reading events until its response_done)."""
        while not self._unreturned:
            if await self._read() is None:
                raise FunchatClientError("FAILED_PRECONDITION", "the call ended before another reply was done")
        return self._unreturned.popleft()


# ---------------------------------------------------------------------------------------------
# The synchronous client


class Client:
    """Blocking wrapper of AsyncClient for one-shot calls. Each call runs in its own event loop
    (asyncio.run) with its own channel: simple and safe across threads, at the cost of a connection
    per call. Not for use inside a running event loop (use AsyncClient there)."""

    def __init__(self, target: str = "127.0.0.1:50051", timeout: float | None = None):
        self.target = target
        self.timeout = timeout

    def _run(self, method: str, *args, **kwargs):
        async def call():
            async with AsyncClient(self.target, self.timeout) as client:
                return await getattr(client, method)(*args, **kwargs)
        return asyncio.run(call())

    def respond(self, audio: np.ndarray | bytes, config: pb.SessionConfig | None = None,
                session_id: str | None = None) -> Reply:
        return self._run("respond", audio, config, session_id)

    def get_session(self, session_id: str) -> pb.Session:
        return self._run("get_session", session_id)

    def delete_session(self, session_id: str) -> bool:
        return self._run("delete_session", session_id)

    def health(self, service: str = "") -> bool:
        return self._run("health", service)


# ---------------------------------------------------------------------------------------------
# A file played as a live call


@dataclass
class CallResult:
    session: pb.SessionCreated | None
    events: list[tuple[float, pb.ServerEvent]]  # (seconds since the first audio chunk was sent, event)
    replies: list[Reply]
    audio: np.ndarray  # 24 kHz timeline of the reply audio as the caller heard it
    sent_s: float      # caller audio sent (the file plus trailing silence), in seconds
    timed_out: bool    # the replies were not done within the timeout (the call was ended anyway)
    sample_rate: int = OUTPUT_SAMPLE_RATE


class _Player:
    """A simulated loudspeaker. Each reply plays from the arrival of its first chunk, chunk after
    chunk; a chunk that arrives after the previous one has finished starts when it arrives (an
    underrun). An `interrupted` reply stops where playback was when the event arrived."""

    def __init__(self):
        self.segments: list[list] = []  # [response_id, start (s), samples]
        self.cursor: dict[str, float] = {}  # where each reply's next chunk will start
        self.stopped: set[str] = set()

    def add(self, t: float, delta: pb.AudioDelta) -> None:
        rid = delta.response_id
        if rid in self.stopped:
            return
        start = max(t, self.cursor.get(rid, t))
        samples = decode_pcm16(delta.pcm16)
        self.segments.append([rid, start, samples])
        self.cursor[rid] = start + len(samples) / OUTPUT_SAMPLE_RATE

    def stop(self, rid: str, t: float) -> None:
        self.stopped.add(rid)
        for seg in self.segments:
            if seg[0] == rid:
                seg[2] = seg[2][:max(0, round((t - seg[1]) * OUTPUT_SAMPLE_RATE))]

    def played_ms(self, rid: str, t: float) -> int:
        n = sum(min(len(s), max(0, round((t - start) * OUTPUT_SAMPLE_RATE))) for r, start, s in self.segments
                if r == rid)
        return n * 1000 // OUTPUT_SAMPLE_RATE

    def end_s(self) -> float:
        return max((start + len(s) / OUTPUT_SAMPLE_RATE for _, start, s in self.segments), default=0.0)

    def render(self, seconds: float) -> np.ndarray:
        out = np.zeros(int(math.ceil(seconds * OUTPUT_SAMPLE_RATE)), np.float32)
        for _, start, samples in self.segments:
            i = int(round(start * OUTPUT_SAMPLE_RATE))
            n = max(0, min(len(samples), len(out) - i))
            out[i:i + n] += samples[:n]
        return np.clip(out, -1.0, 1.0)


ACK_INTERVAL_S = 0.1


async def stream_call(client: AsyncClient, config: pb.SessionConfig, audio16k: np.ndarray, realtime: bool = True,
                      chunk_ms: int = 100, trailing_silence_ms: int = 1500,
                      on_event: Callable[[float, pb.ServerEvent], None] | None = None,
                      timeout_s: float = 120.0) -> CallResult:
    """Play 16 kHz audio into a Converse call as a live caller would, and record what comes back.

    The audio goes in chunk_ms chunks, one per chunk_ms when realtime (else as fast as the call
    takes them), followed by trailing_silence_ms of silence so that server VAD can end the last
    turn (with manual turn detection: a commit instead). Reply audio "plays" on a simulated
    loudspeaker in real time; playback acks report it to the server every 100 ms for the current
    reply (not after speech_started, since the caller is talking over it). When the audio is sent,
    the call waits until no turn or reply is in progress and (realtime) the last reply has played,
    at most timeout_s, then sends `end` and reads the call to its end.

    on_event(t, event) sees every event as it comes (t: seconds since the first chunk was sent;
    the session_created event at 0).
    """
    if not 1 <= chunk_ms <= 1000:
        raise ValueError(f"chunk_ms must be 1..1000 (the server takes at most 1 s per chunk), got {chunk_ms}")
    _, rate, _ = _input_format(config)
    audio = np.asarray(audio16k, dtype=np.float32)
    if rate != INPUT_SAMPLE_RATE:  # send in the format the config announces
        audio = soxr.resample(audio, INPUT_SAMPLE_RATE, rate).astype(np.float32)
    manual = config.turn_detection.WhichOneof("type") == "manual"
    if not manual:
        audio = np.concatenate([audio, np.zeros(int(rate * trailing_silence_ms / 1000), np.float32)])
    step = max(1, rate * chunk_ms // 1000)
    events: list[tuple[float, pb.ServerEvent]] = []
    player = _Player()
    state = {"current": "", "open": set(), "speaking": 0}

    async with client.converse(config) as call:
        t0 = time.monotonic()

        def seen(t: float, event: pb.ServerEvent) -> None:
            events.append((t, event))
            kind = event.WhichOneof("event")
            rid = response_id_of(event)
            if kind == "response_created":
                state["current"] = rid
                state["open"].add(rid)
            elif kind == "response_done":
                state["open"].discard(rid)
            elif kind == "audio_delta":
                player.add(t, event.audio_delta)
            elif kind == "interrupted":
                player.stop(rid, t)
            elif kind == "speech_started":
                state["speaking"] += 1
                state["current"] = ""  # no more acks for a reply the caller talks over
            elif kind == "speech_stopped":
                state["speaking"] -= 1
            if on_event is not None:
                on_event(t, event)

        seen(0.0, pb.ServerEvent(session_created=call.session))

        async def receive() -> None:
            async for event in call.events():
                seen(time.monotonic() - t0, event)

        async def ack() -> None:
            acked: dict[str, int] = {}
            while True:
                await asyncio.sleep(ACK_INTERVAL_S)
                rid = state["current"]
                if not rid or rid in player.stopped:
                    continue
                ms = player.played_ms(rid, time.monotonic() - t0)
                if ms > acked.get(rid, 0):
                    acked[rid] = ms
                    await call.ack_playback(rid, ms)

        async def send() -> None:
            for i, start in enumerate(range(0, len(audio), step)):
                if receiver.done():
                    return  # the server ended the call: stop sending
                if realtime:
                    await asyncio.sleep(max(0.0, t0 + i * chunk_ms / 1000 - time.monotonic()))
                await call.send_audio(audio[start:start + step])
            if manual:
                await call.commit()

        def busy() -> bool:
            playing = realtime and time.monotonic() - t0 < player.end_s()
            return bool(state["open"]) or state["speaking"] > 0 or playing

        receiver = asyncio.create_task(receive())
        acker = asyncio.create_task(ack())
        timed_out = False
        try:
            try:
                await send()
            except FunchatClientError:
                if not receiver.done():
                    raise
                # else the call ended under the sender; the receiver tells why (below)
            deadline = time.monotonic() + timeout_s
            while not receiver.done() and busy():
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                await asyncio.sleep(0.05)
            acker.cancel()
            if not receiver.done():
                await call.end()
                # After `end` the server answers speech it still holds and finishes; allow that, then cancel.
                done, _ = await asyncio.wait({receiver}, timeout=max(10.0, deadline - time.monotonic()))
                if not done:
                    timed_out = True
                    call.abort()
            if receiver.done() and not receiver.cancelled():
                await receiver  # raises what ended the call badly (FunchatClientError)
        finally:
            for task in (acker, receiver):
                if not task.done():
                    task.cancel()
            await asyncio.gather(acker, receiver, return_exceptions=True)

    sent_s = len(audio) / rate
    return CallResult(session=call.session, events=events, replies=list(call.replies),
                      audio=player.render(max(sent_s, player.end_s())), sent_s=sent_s, timed_out=timed_out)
