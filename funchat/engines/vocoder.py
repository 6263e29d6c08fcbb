"""The vocoder service's logic: CosyVoice 3 token2wav streamed statelessly.

Why stateless: the whole stream state (`funchat.vocoder.token2wav.StreamState`: tokens so far, the
bounded mel/f0/phase history HiFT needs, samples sent, speaker x-vector) is serialised with
`to_bytes()` and travels with every call: the caller sends the state it got back last time and
receives the updated one. So any replica can serve the next chunk (no sticky routing, replicas
scale and restart freely), and a call abandoned half-way leaks nothing on the server: there is no
per-stream slot to time out. In incremental mode the state stays small (the HiFT receptive field,
a few KB plus the token list); in reference mode it holds the whole mel history, as that path needs.

Each request is one push: `Token2Wav.push(state, tokens, final=final)`, its chunks concatenated.
Requests that arrive together (Triton's dynamic batcher) are pushed together
(`Token2Wav.push_many`): the chunk calls of different calls run as one flow forward and, in
mid-call, one HiFT run; a request refused for its own input is answered alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from funchat.engines.triton_adapter import ServiceParams
from funchat.errors import FunchatError
from funchat.vocoder.checkpoint import load_vocoder, pick_speaker
from funchat.vocoder.token2wav import MODES, StreamPush, StreamState, Token2Wav, VocoderInputError


@dataclass
class VocoderPush:
    tokens: np.ndarray  # [n] int64 speech codes (n may be 0)
    final: bool  # the stream's last push: flush and finish
    state: bytes = b""  # the state the previous push returned; b"" starts a stream
    speaker: str | None = None  # checked on every push; used when a stream starts
    mode: str | None = None  # "incremental" | "reference"; must match the stream's on a later push


@dataclass
class VocoderOutput:
    audio: np.ndarray  # [m] float32 24 kHz samples ready after this push (possibly none)
    state: bytes  # the updated state, for the next push
    dropped: int  # codes dropped so far in the stream (speech specials)
    wants: int = 0  # codes the stream needs before its next chunk (0: finished, or the next push makes one)


class VocoderEngine:
    def __init__(self, vocoder: Token2Wav, speakers: dict[str, torch.Tensor]):
        self.vocoder = vocoder
        self.speakers = speakers

    def push(self, push: VocoderPush) -> VocoderOutput:
        result = self.push_batch([push])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def push_batch(self, pushes: list[VocoderPush]) -> list[VocoderOutput | FunchatError]:
        """Pushes of different streams, run together: -> per push its output, or the input error
        that refused it (bad state, speaker, mode or tokens; the others go on)."""
        results: list[VocoderOutput | FunchatError | None] = [None] * len(pushes)
        accepted: list[tuple[int, StreamPush]] = []
        for i, push in enumerate(pushes):
            try:
                accepted.append((i, StreamPush(self._state(push), push.tokens, push.final)))
            except FunchatError as exc:
                results[i] = exc
        outcomes = self.vocoder.push_many([p for _, p in accepted])
        for (i, p), chunks in zip(accepted, outcomes):
            if isinstance(chunks, Exception):
                results[i] = chunks
                continue
            audio = torch.cat(chunks).numpy() if chunks else np.zeros(0, dtype=np.float32)
            results[i] = VocoderOutput(audio.astype(np.float32, copy=False), p.state.to_bytes(), p.state.dropped_codes,
                                       self.vocoder.codes_wanted(p.state))
        return results

    def _state(self, push: VocoderPush) -> StreamState:
        """The stream's state: a new one (from speaker and mode) or the caller's, decoded and checked."""
        if push.speaker is not None:
            pick_speaker(self.speakers, push.speaker)  # checked on every call: a typo fails at once
        mode = push.mode
        if mode is not None and mode not in MODES:
            raise VocoderInputError(f"MODE {mode!r} is unknown: choose incremental or reference")
        if not push.state:
            return self.vocoder.start(pick_speaker(self.speakers, push.speaker), mode or "incremental")
        try:
            state = StreamState.from_bytes(push.state)
            if state.mode not in MODES:
                raise ValueError(f"unknown mode {state.mode!r}")
            state.xvec = self.vocoder.check_xvec(state.xvec)
        except Exception as exc:  # truncated, foreign or tampered bytes
            raise VocoderInputError(f"STATE ({len(push.state)} bytes) is not a vocoder stream state of this "
                                    f"model: {exc}") from None
        if mode is not None and mode != state.mode:
            raise VocoderInputError(f"MODE {mode!r} does not match the stream's mode {state.mode!r}")
        return state


FLOW_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_vocoder_engine(params: ServiceParams) -> VocoderEngine:
    """The vocoder service's engine from its config parameters: `checkpoint`, `device` (cpu, cuda,
    cuda:N; a KIND_GPU instance's "cuda" is its own GPU), `dtype` (the flow's: float32, bfloat16 or
    float16; HiFT always runs in float32), `threads`. Stream states and the fixed noise stay on the
    CPU whatever the device."""
    device = params.device
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"vocoder parameter device={device!r} is not accepted: use cpu, cuda or cuda:N")
    if params.dtype not in FLOW_DTYPES:
        raise ValueError(f"vocoder parameter dtype={params.dtype!r} is not accepted: use one of "
                         f"{', '.join(FLOW_DTYPES)}")
    params.apply_threads()
    vocoder, speakers = load_vocoder(params.checkpoint)
    vocoder.to_device(device, FLOW_DTYPES[params.dtype])
    if not speakers:
        raise ValueError(f"vocoder: {params.checkpoint} has no speakers")
    vocoder.noise.draw_all()  # memory fixed at load, not grown with the longest reply served
    return VocoderEngine(vocoder, speakers)
