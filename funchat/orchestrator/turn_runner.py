"""One assistant turn through the Triton model services, streamed as API events.

    audio_tokenizer -> llm prefill -> loop(llm step -> refined_head) -> text deltas
                                                   \\-> vocoder (its own task) -> audio deltas

The loop is the oracle's (`funchat.oracle.generation.generate`) with every forward replaced by a service
call: the same `TurnSchedule`; the llm service choosing the text tokens (greedy, or seeded draws on
the `text_seed` stream) and the refined_head service the speech tokens (the `speech_seed` stream),
both as the oracle does. So under greedy decoding (or a fixed seed) the tokens are the oracle's.
The vocoder runs in its own task and takes every code that has piled up each time it is free and
they make a chunk (the vocoder says how many its next chunk wants), so its work overlaps the next
LLM steps.

Every turn is a fresh llm / refined_head sequence whose prompt is rebuilt from the session history
(user speech kept as the audio tokenizer's rows): nothing of a call lives only in a model replica.
What the services kept of the conversation's last prompt (`kept_prompts`) only saves work: the
turn prefills the positions its prompt adds to the kept ones, and falls back to the whole prompt
when they are gone. If a replica loses the sequence mid-turn (restart, idle timeout, killed), the
turn is replayed from the whole prompt with the same seed on a new sequence, and what was already
streamed is not sent again; with several replicas of a service the new sequence starts on one that
is up (`model_clients.Replicas`).

Tracing (under the turn's span, `funchat.orchestrator.exchange`): llm.prefill, refined_head.prefill
and each vocoder.push are spans of their own, joined by the model services' spans
(`model_clients`); the decode steps after the prefills are one `decode` span with their counts and
summed times.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
import weakref
from dataclasses import dataclass, field

import numpy as np

from funchat import tracing
from funchat.api import pb
from funchat.audio_io import SAMPLE_RATE
from funchat.errors import AudioInputError, ContextOverflowError
from funchat.orchestrator import metrics
from funchat.orchestrator.audio_output import DEFAULT_OUTPUT, VOCODER_RATE, OutputAudioStream, OutputFormat
from funchat.orchestrator.kept_prompts import KeptPrompts, PrefillPlan
from funchat.orchestrator.model_clients import (AudioTokenizerClient, LlmClient, RefinedHeadClient, ServiceError,
                                                VocoderClient)
from funchat.orchestrator.sessions import HistoryTurn
from funchat.orchestrator.turn_windows import TurnWindows
from funchat.text.tokenizer import TextTokenizer
from funchat.turn.prompt import Prompt, PromptBuilder
from funchat.turn.sampling import GREEDY, SamplingParams, speech_seed, text_seed
from funchat.turn.schedule import Mode, TurnSchedule

OUTPUT_SAMPLE_RATE = VOCODER_RATE  # the vocoder's audio; the reply's own format is TurnRequest.output_format
MS_PER_SPEECH_TOKEN = 40  # 25 Hz speech tokens
LOST_SEQUENCE = ("StatusCode.NOT_FOUND", "StatusCode.UNAVAILABLE")  # a replica lost the call: replay
MAX_REPLAYS = 2
# After a failure, ending the turn's sequences is best effort and must not hold the caller's error
# back for another service timeout (a partitioned service never answers): a sequence not ended
# this fast is freed by the service's idle timeout instead.
FAILED_TURN_END_TIMEOUT_S = 2.0


class TurnError(Exception):
    """A turn that cannot run; `code` is the gRPC status name to answer with."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class TurnRequest:
    response_id: str
    mode: Mode
    audio_rows: np.ndarray  # [n_groups, E] float32: the caller's turn, from the audio tokenizer
    n_groups: int
    history: list[HistoryTurn] = field(default_factory=list)
    persona: str | None = None
    tools: list[dict] | None = None
    voice: str | None = None
    text_sampling: SamplingParams = GREEDY
    speech_sampling: SamplingParams = SamplingParams()
    seed: int = 0
    max_new_tokens: int = 512
    call_id: int = 0  # the llm / refined_head correlation id (0 = draw one); replays draw new ones
    conversation: str = ""  # the session: what the services kept of its last prompt is reused ("" = never)
    output_format: OutputFormat = DEFAULT_OUTPUT  # the reply audio's encoding and rate (AudioDelta)


@dataclass
class TurnOutcome:
    response_id: str
    status: str  # completed | cancelled | interrupted
    text: str
    text_tokens: list[int]
    text_tokens_emitted: list[int]
    speech_tokens: list[int]
    vocoder_tokens: list[int]
    prompt_tokens: int
    history_turns_dropped: int
    audio_samples: int  # 24 kHz samples streamed
    latency_ms: dict[str, float]
    # For cutting the turn at a barge-in: the reply-audio position (ms) at which each emitted text
    # token is spoken (its step's position in the speech stream).
    text_audio_ms: list[int] = field(default_factory=list)
    function_calls: list[dict] = field(default_factory=list)

    @property
    def audio_ms(self) -> int:
        return self.audio_samples * 1000 // OUTPUT_SAMPLE_RATE

    def text_heard(self, tokenizer: TextTokenizer, played_ms: int) -> str:
        """The reply text the caller heard when playback stopped at played_ms (step granularity)."""
        kept = [t for t, at in zip(self.text_tokens_emitted, self.text_audio_ms) if at < played_ms]
        return tokenizer.decode(kept, skip_special_tokens=True)

    def done_event(self) -> pb.ServerEvent:
        return pb.ServerEvent(response_done=pb.ResponseDone(
            response_id=self.response_id, status=self.status, text=self.text,
            usage=pb.Usage(input_tokens=self.prompt_tokens, output_text_tokens=len(self.text_tokens),
                           output_speech_tokens=len(self.speech_tokens),
                           history_turns_dropped=self.history_turns_dropped),
            latency_ms=self.latency_ms, text_tokens=self.text_tokens, text_tokens_emitted=self.text_tokens_emitted,
            speech_tokens=self.speech_tokens, vocoder_tokens=self.vocoder_tokens, audio_ms=self.audio_ms))


_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
_TOOL_CALL_BLOCK = re.compile(r"\s*<tool_call>.*?</tool_call>", re.S)


def parse_tool_calls(text: str) -> list[dict]:
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks of a reply (malformed ones skipped)."""
    calls = []
    for body in _TOOL_CALL.findall(text):
        try:
            obj = json.loads(body)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("name"), str):
            args = obj.get("arguments", {})
            calls.append({"call_id": "call_" + secrets.token_hex(8), "name": obj["name"],
                          "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)})
    return calls


def without_tool_calls(text: str) -> str:
    """A reply's text less its `<tool_call>` blocks: the history keeps the calls apart (HistoryTurn.tool_calls)
    and the chat template renders them after the text, so leaving them in the text would show each twice."""
    return _TOOL_CALL_BLOCK.sub("", text).strip()


def new_call_id() -> int:
    """A Triton correlation id unique across orchestrator replicas (random 62 bits, never 0)."""
    return secrets.randbits(62) | 1


class ModelServices:
    """The four model services' clients (one set per orchestrator replica, shared by its calls)."""

    def __init__(self, endpoints: dict[str, str], timeout_s: float | None = 30.0):
        self.endpoints = dict(endpoints)
        self.tokenizer = AudioTokenizerClient(endpoints["audio_tokenizer"], timeout_s)
        self.llm = LlmClient(endpoints["llm"], timeout_s)
        self.refined_head = RefinedHeadClient(endpoints["refined_head"], timeout_s)
        self.vocoder = VocoderClient(endpoints["vocoder"], timeout_s)

    async def close(self) -> None:
        for c in (self.tokenizer, self.llm, self.refined_head, self.vocoder):
            await c.close()


class TurnRunner:
    """Runs turns; events go to an `emit` coroutine (the call's outgoing stream)."""

    def __init__(self, info: PromptBuilder, services: ModelServices, kept: KeptPrompts | None = None):
        """kept: what the services keep of each conversation's last prompt (None: every turn sends
        its whole prompt and nothing is kept)."""
        self.info = info
        self.services = services
        self.kept = kept
        # One prefill at a time per conversation: a turn waits for the prefill ahead of it, which
        # moves the kept rows (weak: a conversation's lock goes when nothing holds it)
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def conversation_lock(self, conversation: str) -> asyncio.Lock:
        lock = self._locks.get(conversation)
        if lock is None:
            lock = self._locks[conversation] = asyncio.Lock()
        return lock

    async def prefill_ahead(self, req: TurnRequest, history: list[HistoryTurn],
                            caller_rows: np.ndarray | None = None) -> int:
        """Prefill, into the conversation's kept rows, what its next prompt will begin with: after
        `req`'s turn was stored (`history` ends with it), up to the caller's next audio; while the
        caller speaks, also the rows of their turn so far (`caller_rows` [n, E], whole encoder
        windows). -> the positions sent (0 when there was nothing to do or it failed: the next turn
        then prefills more itself)."""
        kept = self.kept
        if kept is None or not req.conversation:
            return 0
        spoken = 0 if caller_rows is None else len(caller_rows)
        try:
            prompt = self.info.build(req.mode.value, req.persona, req.tools, history, max(1, spoken),
                                     req.max_new_tokens)
            if spoken and prompt.dropped != self.info.build(req.mode.value, req.persona, req.tools, history, 1,
                                                            req.max_new_tokens).dropped:
                # The caller's turn has grown past the room the history leaves: the prompt now drops
                # more of the history than the one prefilled ahead, so a window would re-prefill all
                # of it again (and again with the next). The end of the turn prefills what it needs.
                return 0
        except ContextOverflowError:
            return 0
        ids = prompt.ids
        audio_bos = len(ids) - ids[::-1].index(self.info.token_ids.audio_bos)  # the next audio's first position
        known = ids[:audio_bos + spoken]
        clips = [t.audio_rows for t in prompt.kept(history) if t.audio_rows is not None]
        if spoken:
            clips.append(caller_rows)
        width = self.info.facts.hidden_size
        rows = np.concatenate(clips, axis=0).astype(np.float32, copy=False) if clips else np.zeros((0, width), np.float32)
        with_srh = req.mode is Mode.S2S
        async with self.conversation_lock(req.conversation):
            plan = kept.plan(req.conversation, known, rows, with_srh)
            if plan.prefix >= len(known):
                return 0
            cid = new_call_id()
            try:
                _, h = await self.services.llm.prefill(cid, known[plan.prefix:], rows[plan.audio_rows:], end=True,
                                                       srh_input=with_srh, keep_id=plan.keep_id, prefix=plan.prefix)
                if with_srh:
                    await self.services.refined_head.run(cid, h, start=True, end=True, keep_id=plan.keep_id,
                                                         prefix=plan.prefix, partial=True)
            except ServiceError:  # the rows are in an unknown state: the next turn sends its whole prompt
                kept.forget(req.conversation)
                return 0
            kept.remember(req.conversation, plan.keep_id, known, rows, with_srh, complete=True)
            metrics.kept_prefix("ahead", plan.prefix, len(known) - plan.prefix)
            return len(known) - plan.prefix

    async def encode(self, audio16k: np.ndarray, windows: TurnWindows | None = None) -> tuple[np.ndarray, int]:
        """Caller speech (16 kHz float32) -> (rows [n_groups, E], n_groups) from the audio tokenizer.
        windows: the turn's encoder windows encoded while it was spoken (their audio a prefix of
        `audio16k`): the tokenizer then encodes only the rest and the windows its floor made stale."""
        try:
            n_groups = self.info.check_clip(len(audio16k), "the turn's audio")
        except AudioInputError as exc:
            raise TurnError("INVALID_ARGUMENT", str(exc)) from None
        clip = np.ascontiguousarray(audio16k, dtype=np.float32)
        try:
            if windows is not None and windows.windows:
                rows = await self._encode_rest(clip, windows)
            else:
                rows = await self.services.tokenizer.encode(clip)
        except ServiceError as exc:
            raise TurnError("INVALID_ARGUMENT" if "INVALID" in exc.status else "UNAVAILABLE",
                            f"audio tokenizer: {exc.message}") from None
        if rows.shape[0] != n_groups:
            raise TurnError("INTERNAL", f"audio tokenizer returned {rows.shape[0]} rows, expected {n_groups}")
        return rows, n_groups

    async def _encode_rest(self, clip: np.ndarray, windows: TurnWindows) -> np.ndarray:
        """A turn whose first windows were encoded while it was spoken: the rest from the tokenizer,
        and the held windows the whole turn's log-mel max makes stale encoded again -> its rows."""
        tokenizer = self.services.tokenizer
        held = len(windows.windows)
        start = windows.geometry.segment(held)[0]
        rest, top = await tokenizer.encode_rest(clip[start:], held, windows.top)
        stale = windows.raise_top(top)
        again = await asyncio.gather(*(tokenizer.encode_window(windows.segment(w), w, top) for w in stale))
        for w, (rows, own_top, low) in zip(stale, again):
            windows.add(w, rows, own_top, low, top)
        metrics.caller_windows("held", held - len(stale))
        metrics.caller_windows("stale", len(stale))
        return np.concatenate([windows.rows(held), rest])

    async def end_sequences(self, call_id: int) -> None:
        """End call `call_id`'s llm and refined_head sequences, left open by a turn that died with its
        replica; one that is unknown (already freed, never started) is refused, which is fine."""
        width = self.info.facts.hidden_size
        await asyncio.gather(
            self.services.llm.step(call_id, self.info.token_ids.end_ids[0], None, end=True, srh_input=False),
            self.services.refined_head.run(call_id, np.zeros((1, width), np.float32), end=True),
            return_exceptions=True)

    def prompt(self, req: TurnRequest) -> tuple[Prompt, np.ndarray]:
        """-> (the prompt, the <|AUDIO|> rows in prompt order [N, E])."""
        try:
            prompt = self.info.build(req.mode.value, req.persona, req.tools, req.history, req.n_groups,
                                     req.max_new_tokens)
        except ContextOverflowError as exc:
            raise TurnError("INVALID_ARGUMENT", str(exc)) from None
        clips = [t.audio_rows for t in prompt.kept(req.history) if t.audio_rows is not None] + [req.audio_rows]
        return prompt, np.concatenate(clips, axis=0).astype(np.float32, copy=False)

    async def run(self, req: TurnRequest, emit, cancel: asyncio.Event, t_end_of_turn: float | None = None
                  ) -> TurnOutcome:
        """Generate the reply, emitting text/audio deltas as they are produced. Stops early (status
        "cancelled") when `cancel` is set: no more events are emitted after that, unsent audio is dropped."""
        t0 = t_end_of_turn or time.perf_counter()
        prompt, rows = self.prompt(req)
        ids, max_new = prompt.ids, prompt.max_new_tokens
        stream = _TurnStream(self, req, emit, cancel, t0)
        for attempt in range(MAX_REPLAYS + 1):
            try:
                await stream.generate(ids, rows, max_new)
                break
            except ServiceError as exc:
                await stream.close_sequences(timeout_s=FAILED_TURN_END_TIMEOUT_S, keep=False)
                if exc.status in LOST_SEQUENCE and exc.model in ("llm", "refined_head") and attempt < MAX_REPLAYS:
                    stream.replays += 1
                    continue  # replay from the prefill on a new sequence; streamed output is not repeated
                await stream.abandon()
                raise TurnError("UNAVAILABLE", f"model service {exc.model} failed: {exc.message}") from None
            except BaseException:
                await stream.close_sequences(timeout_s=FAILED_TURN_END_TIMEOUT_S, keep=False)
                await stream.abandon()
                raise
        return await stream.finish(len(ids), prompt.dropped)


class _TurnStream:
    """One turn's generation state; survives a replay (what was streamed is remembered)."""

    def __init__(self, runner: TurnRunner, req: TurnRequest, emit, cancel: asyncio.Event, t0: float):
        self.runner, self.req, self.emit, self.cancel, self.t0 = runner, req, emit, cancel, t0
        self.info, self.services = runner.info, runner.services
        self.latency: dict[str, float] = {}
        self.replays = 0
        self.sent_text_tokens = 0  # emitted text tokens already streamed (as text)
        self.sent_text = ""
        self.sent_codes = 0  # vocoder codes already handed to the vocoder
        self.schedule: TurnSchedule | None = None
        self.text_audio_ms: list[int] = []
        self.call_id = 0
        self.sequences_open = False
        self.vocoder = _VocoderStream(self) if req.mode is Mode.S2S else None
        self.llm_seconds: list[float] = []
        self.srh_seconds: list[float] = []
        self.generation_started: float | None = None  # the first prefill sent (the real-time factor's start)
        self.decode_ns: list[int] = []  # [first decode step started, last one ended] (time.time_ns)
        self.decode_steps = {"llm": 0, "refined_head": 0}
        self.plan = PrefillPlan(0, 0, 0)  # the kept rows this attempt's prefill reuses
        self.prompt_ids: list[int] = []
        self.prompt_rows: np.ndarray | None = None

    def ms(self) -> float:
        return (time.perf_counter() - self.t0) * 1000.0

    async def generate(self, ids: list[int], rows: np.ndarray, max_new: int) -> None:
        req, llm, srh = self.req, self.services.llm, self.services.refined_head
        sched = self.schedule = TurnSchedule(self.info.token_ids, req.mode, max_new, prompt_last_token=ids[-1])
        self.call_id = req.call_id if req.call_id and not self.replays else new_call_id()
        t = time.perf_counter()
        if self.generation_started is None:
            self.generation_started = t
        self.sequences_open = True
        self.prompt_ids, self.prompt_rows = ids, rows
        kept = self.runner.kept
        if kept is not None and req.conversation:
            async with self.runner.conversation_lock(req.conversation):  # after a prefill ahead of this turn
                plan = kept.plan(req.conversation, ids, rows, sched.runs_srh)
                if self.replays:  # after a lost sequence nothing kept is trusted
                    plan = PrefillPlan(plan.keep_id, 0, 0)
                token, group = await self._prefills(plan, ids, rows, sched, t)
        else:
            token, group = await self._prefills(PrefillPlan(0, 0, 0), ids, rows, sched, t)
        appended, step_index, speech_start = None, 0, None
        while True:
            if sched.runs_srh and step_index:
                t = time.perf_counter()
                self._decode_step("refined_head")
                group = await srh.run(self.call_id, h, appended=appended)
                self.srh_seconds.append(time.perf_counter() - t)
                metrics.stage("refined_head", self.srh_seconds[-1])
                self.decode_ns[1] = time.time_ns()
                group = group.tolist()
            out = sched.observe(token, group)
            appended = out.speech_group  # the refined head's penalty history grows by what was kept
            if out.speech_group is not None and speech_start is None:
                speech_start = step_index
            if self.cancel.is_set():
                return
            await self._stream_text(step_index, speech_start)
            if self.vocoder is not None:
                await self.vocoder.offer(sched.vocoder_tokens, final=sched.finished)
            if sched.finished:
                break
            nxt = sched.next_input
            step_index += 1
            t = time.perf_counter()
            self._decode_step("llm")
            token, h = await llm.step(self.call_id, nxt.text_token, nxt.speech_group, srh_input=sched.runs_srh)
            self.llm_seconds.append(time.perf_counter() - t)
            self.decode_ns[1] = time.time_ns()
            metrics.stage("llm_step", self.llm_seconds[-1])
        await self.close_sequences()

    async def _prefills(self, plan: PrefillPlan, ids: list[int], rows: np.ndarray, sched: TurnSchedule,
                        t: float) -> tuple[int, list[int] | None]:
        """The llm prefill (it chooses the first text token: the oracle's text stream) and, in a
        speech-to-speech turn, the refined_head's on its SRH input (a speech-to-text turn does not
        ask for what it would not use) -> (text id, speech group or None). With a kept prefix only the
        rest of the prompt is sent; if either service no longer keeps it, both start over with the
        whole prompt."""
        req, llm, srh = self.req, self.services.llm, self.services.refined_head
        speech = req.speech_sampling
        while True:
            try:
                token, h = await llm.prefill(self.call_id, ids[plan.prefix:], rows[plan.audio_rows:],
                                             sampling=req.text_sampling, seed=text_seed(req.seed),
                                             srh_input=sched.runs_srh, keep_id=plan.keep_id, prefix=plan.prefix)
                seconds = time.perf_counter() - t
                metrics.stage("llm_prefill", seconds)
                self.latency.setdefault("llm_prefill", seconds * 1000.0)
                group = None
                if sched.runs_srh:
                    t_srh = time.perf_counter()
                    group = await srh.run(self.call_id, h, start=True, greedy=speech.greedy,
                                          temperature=speech.temperature, top_p=speech.top_p, top_k=speech.top_k,
                                          repetition_penalty=speech.repetition_penalty, seed=speech_seed(req.seed),
                                          keep_id=plan.keep_id, prefix=plan.prefix)
                    self.srh_seconds.append(time.perf_counter() - t_srh)
                    metrics.stage("refined_head", self.srh_seconds[-1])
                    group = group.tolist()
            except ServiceError as exc:
                if not plan.prefix or exc.status != "StatusCode.NOT_FOUND":
                    raise
                metrics.kept_prefix("miss", 0, len(ids))
                plan = PrefillPlan(plan.keep_id, 0, 0)  # the kept rows are gone: the whole prompt
                t = time.perf_counter()
                continue
            metrics.kept_prefix("hit" if plan.prefix else "none", plan.prefix, len(ids) - plan.prefix)
            self.plan = plan
            self.latency["kept_prefix"] = float(plan.prefix)
            return token, group

    def _decode_step(self, service: str) -> None:
        """Count one decode request (after the prefills) for the aggregated `decode` span."""
        if not self.decode_ns:
            now = time.time_ns()
            self.decode_ns = [now, now]
        self.decode_steps[service] += 1

    def _record_decode_span(self) -> None:
        if not self.decode_ns:
            return
        sched = self.schedule
        seconds = {"llm": self.llm_seconds, "refined_head": self.srh_seconds[1:]}  # [0]: the SRH prefill
        tracing.record_span("decode", self.decode_ns[0], self.decode_ns[1], attributes={
            "funchat.llm_steps": self.decode_steps["llm"],
            "funchat.refined_head_steps": self.decode_steps["refined_head"],
            "funchat.llm_step_seconds": float(sum(seconds["llm"])),
            "funchat.refined_head_step_seconds": float(sum(seconds["refined_head"])),
            "funchat.text_tokens": len(sched.text_tokens) if sched else 0,
            "funchat.speech_tokens": len(sched.speech_tokens) if sched else 0,
            "funchat.replays": self.replays})

    async def _stream_text(self, step_index: int, speech_start: int | None) -> None:
        sched = self.schedule
        emitted = sched.text_tokens_emitted
        while len(self.text_audio_ms) < len(emitted):  # alignment: the step's position in the speech
            self.text_audio_ms.append(max(0, step_index - (speech_start if speech_start is not None else step_index))
                                      * self.info.token_ids.group_size * MS_PER_SPEECH_TOKEN)
        if len(emitted) <= self.sent_text_tokens:
            return
        text = self.info.tokenizer.decode(emitted, skip_special_tokens=True)
        new_ids = emitted[self.sent_text_tokens:]
        self.sent_text_tokens = len(emitted)
        delta = ""
        # A trailing U+FFFD may be a multi-byte character still incomplete: it goes with a later delta.
        if text.startswith(self.sent_text) and not text.endswith("\ufffd"):
            delta, self.sent_text = text[len(self.sent_text):], text
        self.latency.setdefault("first_text", self.ms())
        await self.emit(pb.ServerEvent(text_delta=pb.TextDelta(response_id=self.req.response_id, delta=delta,
                                                               token_ids=new_ids)))

    async def flush_text(self, final_text: str) -> None:
        """What the deltas have not carried yet, so that they add up to the reply's text."""
        if final_text.startswith(self.sent_text) and len(final_text) > len(self.sent_text):
            delta, self.sent_text = final_text[len(self.sent_text):], final_text
            await self.emit(pb.ServerEvent(text_delta=pb.TextDelta(response_id=self.req.response_id, delta=delta)))

    async def close_sequences(self, timeout_s: float | None = None, keep: bool = True) -> None:
        """End the call's llm and refined_head sequences so their slots are freed now, not at the idle
        timeout, or, with `keep` (a turn that ran to its end or was cut by the caller), kept for the
        conversation's next prompt. timeout_s: give up waiting after this long (the services' idle
        timeouts free them)."""
        if not self.sequences_open:
            return
        self.sequences_open = False
        cid, sched = self.call_id, self.schedule
        kept = self.runner.kept
        keep_id = self.plan.keep_id if keep and kept is not None and self.req.conversation else 0
        nxt = sched.next_input if sched is not None and sched.next_input is not None else None
        ends = [self.services.llm.step(cid, nxt.text_token if nxt else self.info.token_ids.end_ids[0], None, end=True,
                                       srh_input=False, keep_id=keep_id)]
        with_srh = sched is not None and sched.runs_srh
        if with_srh:
            width = self.info.facts.hidden_size
            ends.append(self.services.refined_head.run(cid, np.zeros((1, width), np.float32), end=True,
                                                       keep_id=keep_id))
        ending = asyncio.gather(*ends, return_exceptions=True)  # a lost sequence needs no ending
        try:
            results = await asyncio.wait_for(ending, timeout_s)
        except asyncio.TimeoutError:
            results = [TimeoutError()]
        if kept is None or not self.req.conversation:
            return
        if keep_id and not any(isinstance(r, BaseException) for r in results):
            kept.remember(self.req.conversation, keep_id, self.prompt_ids, self.prompt_rows, with_srh)
        else:
            kept.forget(self.req.conversation)

    async def abandon(self) -> None:
        """The turn failed: stop the vocoder task, which would otherwise wait for codes forever
        (finish(), which ends it on success, never runs)."""
        if self.vocoder is not None:
            await self.vocoder.close(flush=False)

    async def finish(self, prompt_tokens: int, dropped: int) -> TurnOutcome:
        sched = self.schedule
        if self.vocoder is not None:
            await self.vocoder.close(flush=not self.cancel.is_set())
        # Read after the vocoder's tail: a barge-in while the last chunks were made cancels the
        # reply too (the unsent audio was dropped), so it is reported cut, not completed.
        cancelled = self.cancel.is_set()
        await self.close_sequences()
        self._record_decode_span()
        text_ids = sched.text_tokens
        text = self.info.tokenizer.decode(text_ids, skip_special_tokens=True)
        if not cancelled:
            await self.flush_text(text)
        lat = self.latency
        lat["total"] = self.ms()
        if self.llm_seconds:
            lat["llm_step_mean"] = float(np.mean(self.llm_seconds)) * 1000.0
        if self.srh_seconds:
            lat["srh_step_mean"] = float(np.mean(self.srh_seconds)) * 1000.0
        if self.vocoder is not None and self.vocoder.seconds:
            lat["vocoder_push_mean"] = float(np.mean(self.vocoder.seconds)) * 1000.0
        if self.replays:
            lat["replays"] = float(self.replays)
        if self.vocoder is not None and not cancelled and self.generation_started is not None:
            metrics.reply_generated(time.perf_counter() - self.generation_started,
                                    self.vocoder.samples / OUTPUT_SAMPLE_RATE)
        vocoder_tokens = sched.vocoder_tokens
        return TurnOutcome(
            response_id=self.req.response_id, status="cancelled" if cancelled else "completed", text=text,
            text_tokens=list(text_ids), text_tokens_emitted=list(sched.text_tokens_emitted),
            speech_tokens=list(sched.speech_tokens), vocoder_tokens=list(vocoder_tokens),
            prompt_tokens=prompt_tokens, history_turns_dropped=dropped,
            audio_samples=self.vocoder.samples if self.vocoder else 0, latency_ms=lat,
            text_audio_ms=self.text_audio_ms[:len(sched.text_tokens_emitted)],
            function_calls=parse_tool_calls(text) if not cancelled else [])


class _VocoderStream:
    """Feeds the vocoder service from its own task: each push takes every code waiting, so vocoder
    work overlaps the LLM steps; audio deltas go out as soon as a push returns samples. Codes are
    held until they can make a chunk (the last reply's `wants`; for a new stream what the service
    said a first chunk needs), except on the final push: a push with fewer could only store them,
    and while it was in flight the code that completes a chunk would wait for it."""

    def __init__(self, turn: _TurnStream):
        self.turn = turn
        self.codes: list[int] = []  # every code handed over so far (replays do not repeat them)
        self.final = False
        self.wake = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.state: bytes | None = None
        self.samples = 0  # 24 kHz samples made (audio_ms, the real-time factor)
        self.sequence = 0
        # the reply's audio in its output format: one resampler for the whole reply (a replay goes
        # on with it: what was streamed is not repeated)
        self.out = OutputAudioStream(turn.req.output_format)
        self.seconds: list[float] = []
        self.error: BaseException | None = None
        self.waiting_since: float | None = None  # when the codes waiting became enough for a push
        self.sent = 0  # codes pushed so far
        self.wants = 0  # codes the stream needs before its next chunk (the last reply's)

    def _pushable(self) -> bool:
        """Whether the codes waiting make a push worth sending now."""
        waiting = len(self.codes) - self.sent
        if self.final:
            return True
        needed = self.wants if self.state is not None else self.turn.services.vocoder.first_chunk_codes
        return waiting > 0 and waiting >= needed

    async def offer(self, vocoder_tokens: list[int], final: bool) -> None:
        if self.error is not None:
            raise self.error
        if len(vocoder_tokens) > len(self.codes):
            self.codes.extend(vocoder_tokens[len(self.codes):])
        self.final = self.final or final
        if self.waiting_since is None and self._pushable():
            self.waiting_since = time.perf_counter()
        if self.task is None:
            self.task = metrics.spawn(self._run(), "turn.vocoder")
        self.wake.set()

    async def _run(self) -> None:
        voc = self.turn.services.vocoder
        try:
            while True:
                await self.wake.wait()
                self.wake.clear()
                if self.turn.cancel.is_set():
                    return
                final = self.final
                if not self._pushable():
                    continue  # nothing waiting, or too few codes for a chunk: held
                batch = self.codes[self.sent:]
                if self.state is None and not batch:
                    return  # the reply has no speech: no stream to open or flush
                ready_at, self.waiting_since = self.waiting_since, None
                t = time.perf_counter()
                reply = await voc.push(batch, self.state, final=final,
                                       speaker=self.turn.req.voice if self.state is None else None,
                                       ready_at=ready_at)
                self.state, self.wants = reply.state, reply.wants
                self.seconds.append(time.perf_counter() - t)
                metrics.stage("vocoder", self.seconds[-1])
                self.sent += len(batch)
                if (reply.audio.size or final) and not self.turn.cancel.is_set():
                    await self._emit(reply.audio, final)  # final: the resampler's tail goes out too
                if final:
                    return
                if self._pushable():
                    self.waiting_since = self.waiting_since or time.perf_counter()
                    self.wake.set()
        except BaseException as exc:  # surfaced by offer()/close()
            self.error = exc

    async def _emit(self, audio: np.ndarray, final: bool = False) -> None:
        t = self.turn
        self.samples += int(audio.size)
        fields = self.out.push(audio, last=final)
        if fields is None:  # all held back by the resampler (a tiny chunk), or an empty final push
            return
        t.latency.setdefault("first_audio", t.ms())
        event = pb.AudioDelta(response_id=t.req.response_id, sequence=self.sequence, **fields)
        self.sequence += 1
        await t.emit(pb.ServerEvent(audio_delta=event))

    async def close(self, flush: bool) -> None:
        if self.task is None:
            if not flush or not self.codes and not self.final:
                return
            self.task = metrics.spawn(self._run(), "turn.vocoder")
        if flush:
            self.final = True
            self.wake.set()
            await self.task
        else:
            self.wake.set()
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        if self.error is not None and flush:
            err, self.error = self.error, None
            if isinstance(err, ServiceError):
                raise TurnError("UNAVAILABLE", f"vocoder failed: {err.message}") from None
            raise err
