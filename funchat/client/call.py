"""stream_call: a file played into a live call as a caller would, and what came back recorded."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import soxr

from funchat.api import pb
from funchat.client.async_client import AsyncClient
from funchat.client.audio import decode_delta
from funchat.client.config import INPUT_SAMPLE_RATE, OUTPUT_SAMPLE_RATE, input_format, output_format
from funchat.client.errors import FunchatClientError
from funchat.client.events import response_id_of
from funchat.client.replies import Reply


@dataclass
class CallResult:
    session: pb.SessionCreated | None
    events: list[tuple[float, pb.ServerEvent]]  # (seconds since the first audio chunk was sent, event)
    replies: list[Reply]
    audio: np.ndarray  # timeline of the reply audio as the caller heard it, at sample_rate
    sent_s: float      # caller audio sent (the file plus trailing silence), in seconds
    timed_out: bool    # the replies were not done within the timeout (the call was ended anyway)
    sample_rate: int = OUTPUT_SAMPLE_RATE


class Player:
    """A simulated loudspeaker. Each reply plays from the arrival of its first chunk, chunk after
    chunk; a chunk that arrives after the previous one has finished starts when it arrives (an
    underrun). An `interrupted` reply stops where playback was when the event arrived. `rate`: the
    call's reply audio rate (its output_audio_format's, 24 kHz by default)."""

    def __init__(self, rate: int = OUTPUT_SAMPLE_RATE):
        self.rate = rate
        self.segments: list[list] = []  # [response_id, start (s), samples]
        self.cursor: dict[str, float] = {}  # where each reply's next chunk will start
        self.stopped: set[str] = set()

    def add(self, t: float, delta: pb.AudioDelta) -> None:
        rid = delta.response_id
        if rid in self.stopped:
            return
        start = max(t, self.cursor.get(rid, t))
        samples, rate = decode_delta(delta)
        if rate != self.rate:
            raise FunchatClientError("DATA_LOSS", f"response {rid}: audio chunk {delta.sequence} is at {rate} Hz, "
                                                  f"not the call's {self.rate} Hz")
        self.segments.append([rid, start, samples])
        self.cursor[rid] = start + len(samples) / self.rate

    def stop(self, rid: str, t: float) -> None:
        self.stopped.add(rid)
        for seg in self.segments:
            if seg[0] == rid:
                seg[2] = seg[2][:max(0, round((t - seg[1]) * self.rate))]

    def played_ms(self, rid: str, t: float) -> int:
        n = sum(min(len(s), max(0, round((t - start) * self.rate))) for r, start, s in self.segments
                if r == rid)
        return n * 1000 // self.rate

    def end_s(self) -> float:
        return max((start + len(s) / self.rate for _, start, s in self.segments), default=0.0)

    def render(self, seconds: float) -> np.ndarray:
        out = np.zeros(int(math.ceil(seconds * self.rate)), np.float32)
        for _, start, samples in self.segments:
            i = int(round(start * self.rate))
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
    the session_created event at 0). The call sends `client`'s API key (AsyncClient(api_key=...),
    else FUNCHAT_API_KEY); a server that refuses it raises FunchatClientError UNAUTHENTICATED.
    """
    if not 1 <= chunk_ms <= 1000:
        raise ValueError(f"chunk_ms must be 1..1000 (the server takes at most 1 s per chunk), got {chunk_ms}")
    _, rate, _ = input_format(config)
    audio = np.asarray(audio16k, dtype=np.float32)
    if rate != INPUT_SAMPLE_RATE:  # send in the format the config announces
        audio = soxr.resample(audio, INPUT_SAMPLE_RATE, rate).astype(np.float32)
    manual = config.turn_detection.WhichOneof("type") == "manual"
    if not manual:
        audio = np.concatenate([audio, np.zeros(int(rate * trailing_silence_ms / 1000), np.float32)])
    step = max(1, rate * chunk_ms // 1000)
    events: list[tuple[float, pb.ServerEvent]] = []
    player = Player(output_format(config)[1])
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
                      audio=player.render(max(sent_s, player.end_s())), sent_s=sent_s, timed_out=timed_out,
                      sample_rate=player.rate)
