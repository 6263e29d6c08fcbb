"""Typed async clients of the model services, on `tritonclient.grpc.aio`.

    tok = AudioTokenizerClient("127.0.0.1:8001")
    rows = await tok.encode(audio)                         # [n_groups, E] float32
    llm = LlmClient("127.0.0.1:8002")
    token, h = await llm.prefill(call_id, ids, rows, sampling=GREEDY, seed=text_seed(seed))
    token, h = await llm.step(call_id, next_id, speech_group)   # the service chose `token`
    voc = VocoderClient("127.0.0.1:8004")
    pcm, state, dropped, wants = await voc.push(codes, None, final=False, speaker="default")
    pcm, state, dropped, wants = await voc.push(more, state, final=True)   # any vocoder replica

A url may name several replicas of the service, "host:port,host:port" (`Replicas`): the client holds
a channel to each. A stateless request (encode, a vocoder push: the stream's state travels with it)
goes to the next healthy replica and, when that one is unreachable (UNAVAILABLE), once more to the
next. A sequence (llm, refined_head) is pinned: its first request picks a replica (retried the same
way) and its steps follow it; when that replica dies mid-sequence the error reaches the turn, which
replays the turn on a new sequence, whose first request avoids the replica that failed.

Every Triton error (the service's own INVALID_ARG messages, Triton's input checks, an unreachable
server) is raised as `ServiceError(model, status, message)`. Each request's wait before it is sent
(from `ready_at`: when the caller had its inputs; by default when the method was called) is
recorded as `metrics.model_queue`.

Tracing: inside a recording span (a turn's), the requests that do a stage's work get a CLIENT span
of their own, `<model>.<call>`, and carry its W3C trace context in the Triton request's
parameters (`traceparent`), where the model service picks it up and joins the trace: encode,
llm.prefill, refined_head.prefill (a sequence's first request) and each vocoder push. Decode steps
(llm.step, refined_head steps) are hundreds per turn: they send nothing, and the turn records them
as one aggregated span (funchat.orchestrator.turn_runner).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import NamedTuple

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from funchat import tracing
from funchat.orchestrator import metrics
from funchat.turn.sampling import GREEDY, SamplingParams


class ServiceError(Exception):
    """A model service refused or failed a call: `model`, gRPC `status` (e.g. "StatusCode.INVALID_ARGUMENT")
    and the service's `message`."""

    def __init__(self, model: str, status: str, message: str):
        super().__init__(f"{model}: {message} ({status})")
        self.model = model
        self.status = status
        self.message = message


# A model server that restarts is back on the same address within seconds, but a gRPC channel that
# lost it waits out an exponential reconnect backoff (up to 2 minutes by default) and fails every
# request at once meanwhile: capped at 1 s, the orchestrator finds a restarted server within a second.
RECONNECT_BACKOFF_MS = 1000


def channel_args() -> list[tuple[str, int]]:
    """tritonclient's own channel options (message sizes, keepalive) with the reconnect backoff capped."""
    keepalive = grpcclient.KeepAliveOptions()
    return [("grpc.max_send_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
            ("grpc.max_receive_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
            ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
            ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
            ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS // 4),
            ("grpc.min_reconnect_backoff_ms", RECONNECT_BACKOFF_MS // 4),
            ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS)]


UNREACHABLE = "StatusCode.UNAVAILABLE"  # the replica did not answer: try another one
# How long a replica that answered UNAVAILABLE is passed over. A killed server stays down; a
# restarted one is back within seconds (and the channel reconnects within RECONNECT_BACKOFF_MS).
REPLICA_DOWN_S = 5.0


class Replicas:
    """Which replica of a service the next request goes to: round robin over those not marked down.

        replicas = Replicas(["10.0.0.1:8001", "10.0.0.2:8001"])
        addr = replicas.pick()            # the next one up
        replicas.failed(addr)             # it answered UNAVAILABLE: passed over for REPLICA_DOWN_S
        other = replicas.pick(avoid=addr)

    A replica marked down is tried again after `down_s`; when every one is down, the one that went
    down first is tried (a request must go somewhere, and it is the likeliest to be back).
    """

    def __init__(self, addresses: list[str], down_s: float = REPLICA_DOWN_S, clock=time.monotonic):
        if not addresses:
            raise ValueError("a service needs at least one replica address")
        self.addresses = list(addresses)
        self.down_s = down_s
        self.clock = clock
        self._down_until: dict[str, float] = {}
        self._next = 0

    def pick(self, avoid: str | None = None) -> str:
        """The next replica that is up (other than `avoid`, when there is another)."""
        now = self.clock()
        n = len(self.addresses)
        for i in range(n):
            address = self.addresses[(self._next + i) % n]
            if self._down_until.get(address, 0.0) <= now and (address != avoid or n == 1):
                self._next = (self._next + i + 1) % n
                return address
        candidates = [a for a in self.addresses if a != avoid] or self.addresses
        return min(candidates, key=lambda a: self._down_until.get(a, 0.0))

    def failed(self, address: str) -> None:
        """`address` answered UNAVAILABLE: pass it over for the next `down_s` seconds."""
        self._down_until[address] = self.clock() + self.down_s


class _Client:
    model = ""

    def __init__(self, url: str, timeout_s: float | None = None):
        """url: "host:port", or the replicas "host:port,host:port"."""
        self.url = url
        self.timeout_s = timeout_s
        self.replicas = Replicas([a.strip() for a in url.split(",") if a.strip()])
        self._clients = {a: grpcclient.InferenceServerClient(a, channel_args=channel_args())
                         for a in self.replicas.addresses}

    def _error(self, exc: InferenceServerException) -> ServiceError:
        return ServiceError(self.model, str(exc.status() or "UNKNOWN"), str(exc.message() or exc))

    async def ready(self) -> bool:
        """Some replica is up and has this model loaded (False when none is reachable)."""
        for client in self._clients.values():
            try:
                if await client.is_server_ready() and await client.is_model_ready(self.model):
                    return True
            except InferenceServerException:
                pass
        return False

    async def _infer(self, inputs: list[grpcclient.InferInput], outputs: list[str], ready_at: float,
                     span: str | None = None, attributes: dict | None = None, replica: str | None = None,
                     **sequence):
        """One request. replica: the address to send it to (a sequence's step), or None: the next healthy
        replica, and once more the next one if that is unreachable. span: the name of the CLIENT span to
        record it under (its trace context goes with the request), or None for an untraced request (a
        decode step). sequence: tritonclient's sequence_id / sequence_start / sequence_end.
        -> (the result, the replica that answered)."""
        metrics.model_queue(self.model, time.perf_counter() - ready_at)
        address = replica or self.replicas.pick()
        try:
            return await self._infer_on(address, inputs, outputs, span, attributes, sequence), address
        except ServiceError as error:
            if replica is not None or error.status != UNREACHABLE or len(self.replicas.addresses) == 1:
                raise
            other = self.replicas.pick(avoid=address)
            return await self._infer_on(other, inputs, outputs, span, attributes, sequence), other

    async def _infer_on(self, address: str, inputs, outputs, span, attributes, sequence):
        with tracing.child_span(span, {"funchat.model": self.model, "server.address": address, **(attributes or {})},
                                kind=tracing.SpanKind.CLIENT) as traced:
            try:
                return await self._clients[address].infer(
                    self.model, inputs, outputs=[grpcclient.InferRequestedOutput(n) for n in outputs],
                    parameters=tracing.inject() if traced is not None else None, client_timeout=self.timeout_s,
                    **sequence)
            except InferenceServerException as exc:
                error = self._error(exc)
                if error.status == UNREACHABLE:
                    self.replicas.failed(address)
                if traced is not None:
                    tracing.mark_error(traced, f"{error.status}: {error.message}")
                raise error from None

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def _input(name: str, array: np.ndarray, datatype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


class AudioTokenizerClient(_Client):
    model = "audio_tokenizer"

    async def encode(self, audio: np.ndarray) -> np.ndarray:
        """16 kHz mono float32 samples [n] -> the clip's LLM input rows [n_groups, E] float32."""
        ready_at = time.perf_counter()
        audio = np.asarray(audio)
        if audio.ndim != 1:
            raise ServiceError(self.model, "CLIENT", f"audio must be 1-D [samples], got shape {list(audio.shape)}")
        # Sent with its own dtype (no silent conversion: int16 PCM would need scaling): the service
        # names a dtype other than float32.
        clip = _input("AUDIO", np.ascontiguousarray(audio[None]), np_to_triton_dtype(audio.dtype))
        result, _ = await self._infer([clip], ["EMBEDDINGS", "N_GROUPS"], ready_at, span="audio_tokenizer.encode",
                                   attributes={"funchat.audio_samples": int(audio.size)})
        return result.as_numpy("EMBEDDINGS")[0]

    async def encode_window(self, segment: np.ndarray, window: int, top: float) -> tuple[np.ndarray, float, float]:
        """One encoder window of a turn still being spoken: the samples its mel frames read
        (`EncoderWindows.segment`), floored at max(top, its own log-mel max) - 8 -> (its rows
        [groups, E], its own log-mel max, its log-mel min)."""
        inputs = [_input("AUDIO", np.ascontiguousarray(segment, dtype=np.float32)[None], "FP32"),
                  _input("WINDOW", np.array([[window]], dtype=np.int64), "INT64")]
        if np.isfinite(top):
            inputs.append(_input("TOP", np.array([[top]], dtype=np.float32), "FP32"))
        result, _ = await self._infer(inputs, ["EMBEDDINGS", "MEL_MAX", "MEL_MIN"], time.perf_counter(),
                                      span="audio_tokenizer.window", attributes={"funchat.window": window})
        return (result.as_numpy("EMBEDDINGS")[0], float(result.as_numpy("MEL_MAX").reshape(-1)[0]),
                float(result.as_numpy("MEL_MIN").reshape(-1)[0]))

    async def encode_rest(self, rest: np.ndarray, encoded: int, top: float) -> tuple[np.ndarray, float]:
        """The end of a turn whose windows 0 .. encoded - 1 were encoded while it was spoken: `rest`,
        its samples from where window `encoded` reads on (`EncoderWindows.segment`), and `top`, the
        held windows' log-mel max -> (the rest's rows, the whole turn's log-mel max)."""
        inputs = [_input("AUDIO", np.ascontiguousarray(rest, dtype=np.float32)[None], "FP32"),
                  _input("ENCODED", np.array([[encoded]], dtype=np.int64), "INT64"),
                  _input("TOP", np.array([[top]], dtype=np.float32), "FP32")]
        result, _ = await self._infer(inputs, ["EMBEDDINGS", "MEL_MAX"], time.perf_counter(),
                                      span="audio_tokenizer.encode",
                                      attributes={"funchat.audio_samples": int(rest.size), "funchat.windows_held": encoded})
        return result.as_numpy("EMBEDDINGS")[0], float(result.as_numpy("MEL_MAX").reshape(-1)[0])


class VocoderReply(NamedTuple):
    """What one vocoder push returns."""

    audio: np.ndarray  # [m] float32 24 kHz samples ready after this push (possibly none)
    state: bytes  # the stream's state, for its next push
    dropped: int  # codes dropped so far in the stream (speech specials)
    wants: int  # codes the stream needs before its next chunk (0: the next push makes one, or finished)


class VocoderClient(_Client):
    model = "vocoder"
    # Codes a new stream needs for its first chunk, learned from the service's first reply to a
    # stream (codes kept + WANTS); 0 until then. A caller holds a new stream's codes until it has
    # this many, as it holds a running stream's until it has the last reply's `wants`.
    first_chunk_codes = 0

    async def push(self, tokens, state: bytes | None, final: bool, speaker: str | None = None,
                   mode: str | None = None, ready_at: float | None = None) -> "VocoderReply":
        """Push new speech codes into a stream. state: what the previous push returned (None starts a
        stream, with `speaker` and `mode`). ready_at: time.perf_counter() when the oldest code was
        produced (default: now). -> VocoderReply (samples ready now, the new state, codes dropped so
        far, codes the next chunk still needs)."""
        ready_at = time.perf_counter() if ready_at is None else ready_at
        codes = np.ascontiguousarray(np.asarray(tokens, dtype=np.int64).reshape(1, -1))  # [1, n]: a batch of one
        inputs = [_input("TOKENS", codes, "INT64"), _input("FINAL", np.array([[bool(final)]]), "BOOL")]
        if state:
            inputs.append(_input("STATE", np.array([[bytes(state)]], dtype=np.object_), "BYTES"))
        if speaker is not None:
            inputs.append(_input("SPEAKER", np.array([[speaker.encode()]], dtype=np.object_), "BYTES"))
        if mode is not None:
            inputs.append(_input("MODE", np.array([[mode.encode()]], dtype=np.object_), "BYTES"))
        result, _ = await self._infer(inputs, ["AUDIO", "STATE", "DROPPED", "WANTS"], ready_at, span="vocoder.push",
                                   attributes={"funchat.codes": int(codes.size), "funchat.final": bool(final),
                                               "funchat.stream_start": state is None})
        audio = result.as_numpy("AUDIO")
        reply = VocoderReply(
            audio.reshape(-1).astype(np.float32, copy=False) if audio is not None else np.zeros(0, np.float32),
            bytes(result.as_numpy("STATE").reshape(-1)[0]), int(result.as_numpy("DROPPED").reshape(-1)[0]),
            int(result.as_numpy("WANTS").reshape(-1)[0]))
        if state is None and not final and reply.audio.size == 0:  # a new stream's first push, no chunk yet
            self.first_chunk_codes = int(codes.size) - reply.dropped + reply.wants
        return reply


class _SequenceClient(_Client):
    """A stateful service: every request belongs to a call (Triton sequence, correlation id), which
    lives in one replica: its first request picks the replica, the others follow (`pinned`)."""

    KEPT_AT_CAPACITY = 65536  # keep ids whose replica is remembered (least recently kept dropped first)

    def __init__(self, url: str, timeout_s: float | None = None):
        super().__init__(url, timeout_s)
        self.pinned: dict[int, str] = {}  # call id -> the replica holding its sequence, until it ends
        self.kept_at: OrderedDict[int, str] = OrderedDict()  # keep id -> the replica keeping its row

    async def _infer_seq(self, inputs: list[grpcclient.InferInput], outputs: list[str], call_id: int,
                         start: bool, end: bool, ready_at: float, attributes: dict | None = None,
                         keep_id: int = 0, prefix: int = 0):
        """A sequence's first request (its prefill) is traced as `<model>.prefill`; the steps are not.
        An end of a sequence this client never started (a turn that died with another orchestrator
        replica) goes to every replica: only the one holding it knows it. A start that continues a
        kept row (prefix > 0) goes to the replica keeping it (NOT_FOUND when none is known); an end
        with a keep id remembers where the row stays."""
        span = f"{self.model}.prefill" if start else None
        attributes = {"funchat.correlation_id": call_id, **(attributes or {})}
        if keep_id:
            inputs = inputs + [_input("KEEP_ID", np.array([[keep_id]], dtype=np.int64), "INT64")]
        if start and prefix:
            inputs = inputs + [_input("PREFIX", np.array([[prefix]], dtype=np.int64), "INT64")]
            attributes["funchat.kept_prefix"] = prefix
        sequence = {"sequence_id": call_id, "sequence_start": start, "sequence_end": end}
        replica = self.pinned.get(call_id) if not start else self.kept_at.pop(keep_id, None) if prefix else None
        if start and prefix and replica is None:
            raise ServiceError(self.model, "StatusCode.NOT_FOUND", f"no replica is known to keep row {keep_id}")
        try:
            if not start and replica is None and end and len(self.replicas.addresses) > 1:
                return await self._end_anywhere(inputs, outputs, ready_at, attributes, sequence)
            result, self.pinned[call_id] = await self._infer(inputs, outputs, ready_at, span, attributes,
                                                             replica=replica, **sequence)
            if end and keep_id:
                self.kept_at[keep_id] = self.pinned[call_id]
                while len(self.kept_at) > self.KEPT_AT_CAPACITY:
                    self.kept_at.popitem(last=False)
            return result
        finally:
            if end:
                self.pinned.pop(call_id, None)

    async def _end_anywhere(self, inputs, outputs, ready_at, attributes, sequence):
        error = None
        for address in self.replicas.addresses:
            try:
                result, _ = await self._infer(inputs, outputs, ready_at, None, attributes, replica=address, **sequence)
                return result
            except ServiceError as exc:
                error = exc
        raise error


class LlmClient(_SequenceClient):
    """The llm service chooses each forward's text token itself (greedy, or the call's seeded draws
    set at start), so a response is one int64 id and, when asked, the SRH input: not the logits."""

    model = "llm"

    async def prefill(self, call_id: int, input_ids, audio_embeds: np.ndarray | None = None, end: bool = False,
                      sampling: SamplingParams = GREEDY, seed: int = 0,
                      srh_input: bool = True, keep_id: int = 0, prefix: int = 0) -> tuple[int, np.ndarray | None]:
        """Start a call with its prompt ids [T] (and the <|AUDIO|> rows [n, E]) and how its text
        tokens are chosen (seed: the text stream, `funchat.turn.sampling.text_seed`) -> (the chosen
        text id, srh_input [T, E], or None when srh_input=False: a speech-to-text turn needs none).
        keep_id, prefix: continue the row kept under keep_id, cut back to `prefix` positions;
        input_ids and audio_embeds are then the rest of the prompt."""
        ready_at = time.perf_counter()
        inputs = [_input("INPUT_IDS", np.asarray(input_ids, dtype=np.int64).reshape(1, -1), "INT64")]
        if audio_embeds is not None and len(audio_embeds):
            rows = np.ascontiguousarray(audio_embeds, dtype=np.float32)[None]
            inputs.append(_input("AUDIO_EMBEDS", rows, "FP32"))
        inputs += _sampling_inputs(sampling, seed)
        return await self._run(inputs, call_id, True, end, srh_input, ready_at,
                               {"funchat.prompt_tokens": len(input_ids),
                                "funchat.audio_rows": 0 if audio_embeds is None else len(audio_embeds)},
                               keep_id=keep_id, prefix=prefix)

    async def step(self, call_id: int, text_token: int, speech_group=None, end: bool = False,
                   srh_input: bool = True, keep_id: int = 0) -> tuple[int, np.ndarray | None]:
        """One LLM step of a call: its text id (+ the last speech group to fuse) -> (the chosen text
        id, srh_input [1, E], or None when srh_input=False). keep_id with end: keep the row."""
        ready_at = time.perf_counter()
        inputs = [_input("INPUT_IDS", np.array([[int(text_token)]], dtype=np.int64), "INT64")]
        if speech_group is not None:
            inputs.append(_input("SPEECH_GROUP", np.asarray(speech_group, dtype=np.int64).reshape(1, -1), "INT64"))
        return await self._run(inputs, call_id, False, end, srh_input, ready_at, keep_id=keep_id)

    async def _run(self, inputs, call_id: int, start: bool, end: bool, srh_input: bool,
                   ready_at: float, attributes: dict | None = None, keep_id: int = 0,
                   prefix: int = 0) -> tuple[int, np.ndarray | None]:
        outputs = list(LLM_STEP_OUTPUTS if srh_input else LLM_STEP_OUTPUTS[:1])  # only what the caller uses
        result = await self._infer_seq(inputs, outputs, call_id, start, end, ready_at, attributes,
                                       keep_id=keep_id, prefix=prefix)
        return int(result.as_numpy("TEXT_TOKEN").reshape(-1)[0]), \
            result.as_numpy("SRH_INPUT")[0] if srh_input else None


LLM_STEP_OUTPUTS = ("TEXT_TOKEN", "SRH_INPUT")  # what a speech-to-speech turn requests per llm forward


def _sampling_inputs(sampling: SamplingParams, seed: int) -> list[grpcclient.InferInput]:
    """The START inputs of a call's sampling settings (greedy sends GREEDY alone)."""
    inputs = [_input("GREEDY", np.array([[sampling.greedy]]), "BOOL"),
              _input("SEED", np.array([[seed]], dtype=np.int64), "INT64")]
    if not sampling.greedy:
        inputs += [_input("TEMPERATURE", np.array([[sampling.temperature]], dtype=np.float32), "FP32"),
                   _input("TOP_P", np.array([[sampling.top_p]], dtype=np.float32), "FP32"),
                   _input("TOP_K", np.array([[sampling.top_k]], dtype=np.int32), "INT32"),
                   _input("REPETITION_PENALTY", np.array([[sampling.repetition_penalty]], dtype=np.float32),
                          "FP32")]
    return inputs


class RefinedHeadClient(_SequenceClient):
    model = "refined_head"

    async def run(self, call_id: int, srh_input: np.ndarray, start: bool = False, end: bool = False,
                  appended=None, greedy: bool = True, temperature: float = 0.8, top_p: float = 0.9, top_k: int = 0,
                  repetition_penalty: float = 1.2, seed: int = 0, keep_id: int = 0, prefix: int = 0,
                  partial: bool = False) -> np.ndarray:
        """One forward's speech group: srh_input [T, E] from the llm service -> speech ids [5].
        appended: speech ids the turn appended since the previous request (repetition penalty history);
        the sampling settings are read at start. keep_id, prefix: as the llm's (prefix in LLM
        positions); partial: a prompt chunk that does not end the prompt (no speech ids: [0])."""
        ready_at = time.perf_counter()
        inputs = [_input("SRH_INPUT", np.ascontiguousarray(srh_input, dtype=np.float32)[None], "FP32")]
        if appended is not None and len(appended):
            inputs.append(_input("APPENDED", np.asarray(appended, dtype=np.int64).reshape(1, -1), "INT64"))
        if start:
            inputs += [_input("GREEDY", np.array([[greedy]]), "BOOL"),
                       _input("TEMPERATURE", np.array([[temperature]], dtype=np.float32), "FP32"),
                       _input("TOP_P", np.array([[top_p]], dtype=np.float32), "FP32"),
                       _input("TOP_K", np.array([[top_k]], dtype=np.int32), "INT32"),
                       _input("REPETITION_PENALTY", np.array([[repetition_penalty]], dtype=np.float32), "FP32"),
                       _input("SEED", np.array([[seed]], dtype=np.int64), "INT64")]
        if partial:
            inputs.append(_input("PARTIAL", np.array([[True]]), "BOOL"))
        result = await self._infer_seq(inputs, ["SPEECH_TOKENS"], call_id, start, end, ready_at,
                                       {"funchat.positions": int(srh_input.shape[0])} if start else None,
                                       keep_id=keep_id, prefix=prefix)
        return result.as_numpy("SPEECH_TOKENS")[0]
