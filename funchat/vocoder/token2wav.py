"""CosyVoice 3 token2wav: 25 Hz speech codes + speaker x-vector -> 24 kHz waveform, offline and streamed.

Offline is one flow call over all tokens and one HiFT call over all mel (finalize). Streaming
emits a chunk once `first_hop + lookahead` tokens exist, then every `hop` tokens, and flushes the
rest at the end; only new samples are returned and the total is exactly 960 samples per token.
Two streaming modes share one serialisable `StreamState`:

- `reference`: the reference's server path, call by call: every chunk re-runs the flow over all
  tokens so far (full attention, noise from column 0), appends that call's new frames to a mel
  history, re-runs HiFT over the whole history and returns the samples past what was sent.
  Cost grows with the square of the call length.
- `incremental` (default): bounded work per chunk. The flow runs over a window of
  `flow_left_tokens` tokens of left context plus the new tokens, with the noise taken at the
  window's absolute frame positions; HiFT re-runs only `hift_left_frames` frames of mel history
  (its whole causal receptive field) with the source phase and the committed f0 carried in the
  state and the source noise at absolute sample positions, so it continues the waveform exactly
  as one causal run over the whole call would.

Devices: `to_device(device, flow_dtype)` puts the model on a GPU, the flow (the DiT, nearly all of
the work) in float32, bfloat16 or float16 and HiFT in float32 (its STFT and float64 phase sums
need it). Stream states, noise and returned chunks stay on the CPU: each call moves what it needs,
so a state is the same bytes whichever device served it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn
from torch.nn.utils import parametrize

from funchat.errors import FunchatError
from funchat.vocoder.flow import Flow, FlowConfig
from funchat.vocoder.hift import Hift, HiftConfig
from funchat.vocoder.noise import FixedNoise

MODES = ("incremental", "reference")


class VocoderInputError(FunchatError, ValueError):
    """Tokens, speaker or stream calls the vocoder cannot use (message names the problem)."""


@dataclass
class StreamConfig:
    first_hop: int = 15  # tokens in the first chunk (emitted once first_hop + lookahead exist)
    hop: int = 15  # tokens per later chunk
    flow_left_tokens: int = 50  # incremental: tokens of left context the flow window re-runs
    hift_left_frames: int = 0  # incremental: mel frames of HiFT history (0 = the model's receptive field)
    max_tokens: int = 7500  # longest call; the reference's noise covers 300 s = 7500 tokens

    def __post_init__(self):
        for name in ("first_hop", "hop"):
            if getattr(self, name) < 1:
                raise VocoderInputError(f"stream {name} must be >= 1 (got {getattr(self, name)})")
        if self.flow_left_tokens < 0 or self.hift_left_frames < 0:
            raise VocoderInputError("stream context sizes must be >= 0")


@dataclass
class VocoderConfig:
    flow: FlowConfig
    hift: HiftConfig
    stream: StreamConfig = field(default_factory=StreamConfig)

    @property
    def sample_rate(self) -> int:
        return self.hift.sampling_rate

    @property
    def samples_per_token(self) -> int:
        return self.flow.token_mel_ratio * self.hift.samples_per_frame  # 960

    @property
    def codes(self) -> int:
        return self.flow.vocab_size  # codes 0 .. 6560

    def to_dict(self) -> dict[str, Any]:
        return {"format": "funchat-vocoder/1", "flow": self.flow.to_dict(), "hift": self.hift.to_dict(),
                "stream": asdict(self.stream)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VocoderConfig":
        return cls(FlowConfig.from_dict(d["flow"]), HiftConfig.from_dict(d["hift"]),
                   StreamConfig(**d.get("stream", {})))

    @classmethod
    def from_constructor_args(cls, d: dict[str, Any]) -> "VocoderConfig":
        """From the reference's resolved constructor arguments (the golden set's config.json)."""
        args = d.get("constructor_args", d)
        return cls(FlowConfig.from_constructor_args(args), HiftConfig.from_constructor_args(args))

    @classmethod
    def preset(cls, name: str) -> "VocoderConfig":
        if name == "tiny":
            return cls(FlowConfig.tiny(), HiftConfig.tiny())
        if name in ("full", "8b"):
            return cls(FlowConfig.full(), HiftConfig.full())
        raise VocoderInputError(f"unknown vocoder preset {name!r}: choose tiny or full")


@dataclass
class StreamState:
    """Everything needed to produce the next chunk of one utterance, on any replica."""

    mode: str
    xvec: torch.Tensor  # [192]
    tokens: list[int] = field(default_factory=list)  # codes received so far (0..6560)
    token_offset: int = 0  # tokens whose mel is final (sent to HiFT)
    samples_sent: int = 0
    finished: bool = False
    dropped_codes: int = 0  # codes outside 0..6560 that were received and dropped
    # reference mode: the whole mel history; incremental: the last frames HiFT needs as context
    mel: torch.Tensor | None = None  # [80, frames]
    mel_start: int = 0  # absolute frame index of mel[:, 0]
    f0: torch.Tensor | None = None  # incremental: committed f0 of frames [mel_start, committed) [frames]
    cycles: torch.Tensor | None = None  # incremental: running phase of those frames [frames, 9] float64

    def to_bytes(self) -> bytes:
        tensors = {"xvec": self.xvec.contiguous()}
        for name in ("mel", "f0", "cycles"):
            value = getattr(self, name)
            if value is not None:
                tensors[name] = value.contiguous()
        meta = {"mode": self.mode, "tokens": self.tokens, "token_offset": self.token_offset,
                "samples_sent": self.samples_sent, "finished": self.finished,
                "dropped_codes": self.dropped_codes, "mel_start": self.mel_start}
        return st_save(tensors, metadata={"state": json.dumps(meta)})

    @classmethod
    def from_bytes(cls, data: bytes) -> "StreamState":
        try:
            tensors = st_load(data)
            meta = json.loads(_metadata(data)["state"])
        except Exception as exc:  # truncated or foreign bytes
            raise VocoderInputError(f"not a serialised vocoder stream state ({exc})") from None
        return cls(xvec=tensors["xvec"], mel=tensors.get("mel"), f0=tensors.get("f0"), cycles=tensors.get("cycles"),
                   **meta)


@dataclass
class StreamPush:
    """One push into one stream (`Token2Wav.push_many` takes several, of different streams)."""

    state: StreamState
    tokens: list[int] | np.ndarray
    final: bool = False


@dataclass
class _HiftRun:
    """A stream's HiFT input in a batched call: its mel history plus new frames, and the frames
    already sent (`committed`) and given an f0 (`f0_new_end`), absolute."""

    index: int
    state: StreamState
    mel_all: torch.Tensor  # [80, frames from state.mel_start]
    committed: int
    f0_new_end: int
    cycles: torch.Tensor | None = None  # [frames, 9] float64 running phase, set by the batch


def _move_state(state: StreamState, device: torch.device) -> None:
    """Put the state's tensors on `device` (no copy when they are there already)."""
    for name in ("xvec", "mel", "f0", "cycles"):
        value = getattr(state, name)
        if value is not None:
            setattr(state, name, value.to(device))


def _metadata(data: bytes) -> dict[str, str]:
    # safetensors layout: 8-byte little-endian header length, then a JSON header with "__metadata__".
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]).get("__metadata__", {})


class Token2Wav(nn.Module):
    def __init__(self, cfg: VocoderConfig):
        super().__init__()
        self.cfg = cfg
        self.flow = Flow(cfg.flow)
        self.hift = Hift(cfg.hift)
        self.noise = FixedNoise.for_configs(cfg.hift, vocab_size=cfg.flow.vocab_size,
                                            flow_input_size=cfg.flow.input_size, spk_embed_dim=cfg.flow.spk_embed_dim,
                                            flow_output_size=cfg.flow.output_size)

    # ---- device ----

    @property
    def device(self) -> torch.device:
        return self.flow.input_embedding.weight.device

    @property
    def flow_dtype(self) -> torch.dtype:
        return self.flow.input_embedding.weight.dtype

    def to_device(self, device: str | torch.device, flow_dtype: torch.dtype = torch.float32) -> "Token2Wav":
        """Move the flow (in flow_dtype) and HiFT (float32) to `device`; the noise stays on the CPU."""
        if flow_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise VocoderInputError(f"flow dtype {flow_dtype} is not supported: use float32, bfloat16 or float16")
        self.flow.to(device=device, dtype=flow_dtype)
        self.hift.to(device=device)
        return self

    def _speaker(self, xvec: torch.Tensor) -> torch.Tensor:
        """x-vector [B, 192] on any device -> the flow's projected speaker [B, 80] on the model's device."""
        return self.flow.speaker_embedding(xvec.to(self.device))

    # ---- inputs ----

    def clean_tokens(self, tokens: list[int] | np.ndarray) -> tuple[list[int], int]:
        """Keep codes 0..codes-1 (speech bos/eos/pad and anything else are dropped); count the dropped."""
        arr = np.asarray(tokens).reshape(-1)
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise VocoderInputError(f"speech tokens must be integers, got {arr.dtype}")
        keep = (arr >= 0) & (arr < self.cfg.codes)
        return arr[keep].astype(np.int64).tolist(), int((~keep).sum())

    def check_xvec(self, xvec: torch.Tensor | np.ndarray) -> torch.Tensor:
        if isinstance(xvec, torch.Tensor):
            xvec = xvec.detach().cpu().numpy()
        x = torch.tensor(np.asarray(xvec, dtype=np.float32)).reshape(-1)  # a copy: the caller may change theirs
        if x.numel() != self.cfg.flow.spk_embed_dim:
            raise VocoderInputError(f"speaker embedding has {x.numel()} values, the vocoder expects "
                                    f"{self.cfg.flow.spk_embed_dim}")
        if not torch.isfinite(x).all() or float(x.norm()) == 0.0:
            raise VocoderInputError("speaker embedding must be finite and non-zero")
        return x

    @property
    def noise_tokens(self) -> int:
        """Tokens the reference's fixed noise covers (7500 = 300 s): the limit of offline and reference mode."""
        return self.noise.max_flow_frames // self.cfg.flow.token_mel_ratio

    def _check_length(self, n_tokens: int, mode: str = "incremental") -> None:
        # Incremental mode indexes the noise by absolute position and wraps past its end, so only
        # the configured maximum applies; the reference paths read noise from column 0 and cannot.
        limit = self.cfg.stream.max_tokens if mode == "incremental" else min(self.cfg.stream.max_tokens, self.noise_tokens)
        if n_tokens > limit:
            raise VocoderInputError(f"{n_tokens} speech tokens exceed the {mode} vocoder's maximum of {limit} "
                                    f"({limit / 25:.0f} s of speech)")

    # ---- offline ----

    @torch.inference_mode()
    def offline(self, tokens: list[int], xvec: torch.Tensor, return_mel: bool = False):
        """All tokens at once (finalize): -> wav [N * 960] float32 (and the mel [80, 2N])."""
        codes, _ = self.clean_tokens(tokens)
        if not codes:
            raise VocoderInputError("no speech tokens to synthesise (empty, or all outside 0..6560)")
        self._check_length(len(codes), "offline")
        xvec = self.check_xvec(xvec)
        t = len(codes) * self.cfg.flow.token_mel_ratio
        device = self.device
        mel = self.flow.inference(torch.tensor([codes], device=device), xvec[None].to(device),
                                  self.noise.flow_noise(t).to(device), finalize=True)  # [1, 80, t] float32
        wav = self.hift.inference(mel, self.noise.source_noise(t * self.cfg.hift.samples_per_frame).to(device),
                                  finalize=True)
        return (wav[0].cpu(), mel[0].cpu()) if return_mel else wav[0].cpu()

    # ---- streaming ----

    def start(self, xvec: torch.Tensor, mode: str = "incremental") -> StreamState:
        if mode not in MODES:
            raise VocoderInputError(f"unknown stream mode {mode!r}: choose incremental or reference")
        return StreamState(mode=mode, xvec=self.check_xvec(xvec))

    def push(self, state: StreamState, tokens: list[int], final: bool = False,
             trace: list[dict[str, Any]] | None = None) -> list[torch.Tensor]:
        """Add tokens to the stream; return the chunks (1-D float32) that became ready, in order.
        With final=True the rest is flushed and the state is finished. `trace`, if given, gets one
        record per vocoder call (tokens so far, token offset, finalize, samples, the call's flow mel)."""
        result = self.push_many([StreamPush(state, tokens, final)], trace)[0]
        if isinstance(result, Exception):
            raise result
        return result

    def push_many(self, pushes: list["StreamPush"],
                  trace: list[dict[str, Any]] | None = None) -> list[list[torch.Tensor] | VocoderInputError]:
        """Push into several streams at once (one push per stream): -> per push, its chunks as in
        `push`, or the VocoderInputError that refused it (that push changes nothing; the others
        go on). Calls of different streams run together: the k-th vocoder call of every push is
        one batched flow forward (windows padded and masked) and, for windows of equal length, one
        batched HiFT run; each stream's samples equal those of pushing it alone (to float rounding)."""
        results: list[list[torch.Tensor] | VocoderInputError] = []
        plans: dict[int, list[tuple[int, bool]]] = {}
        for i, push in enumerate(pushes):
            try:
                self._accept(push)
            except VocoderInputError as exc:
                results.append(exc)
                continue
            results.append([])
            plans[i] = self._chunk_calls(push.state, push.final)
        for r in range(max((len(plan) for plan in plans.values()), default=0)):
            group = [i for i, plan in plans.items() if r < len(plan)]
            chunks = self._run_calls([(pushes[i].state, *plans[i][r]) for i in group], trace)
            for i, chunk in zip(group, chunks):
                if chunk.numel():
                    results[i].append(chunk)
        for i in plans:
            if pushes[i].final:
                pushes[i].state.finished = True
        return results

    def _accept(self, push: "StreamPush") -> None:
        """Check a push and add its codes to its stream; raises (changing nothing) if it is refused."""
        state = push.state
        if state.finished:
            raise VocoderInputError("the stream is already finished")
        codes, dropped = self.clean_tokens(push.tokens)
        self._check_length(len(state.tokens) + len(codes), state.mode)  # before any change: no partial output
        state.dropped_codes += dropped
        state.tokens.extend(codes)

    def codes_wanted(self, state: StreamState) -> int:
        """Codes the stream still needs before its next chunk can be made (its hop and the
        look-ahead); 0 when a push would make one now, or the stream is finished. A caller that
        holds its codes until it has this many saves the pushes that could only store them."""
        if state.finished:
            return 0
        hop = self.cfg.stream.first_hop if state.token_offset == 0 else self.cfg.stream.hop
        return max(0, state.token_offset + hop + self.cfg.flow.pre_lookahead_len - len(state.tokens))

    def _chunk_calls(self, state: StreamState, final: bool) -> list[tuple[int, bool]]:
        """The vocoder calls the stream's tokens allow now: (tokens the call takes, finalize) each.
        A chunk per hop once its look-ahead exists (and is not the stream's last token on a final
        push), then on a final push the flush of the rest. A non-final call's look-ahead tokens are
        only context: the stream's token offset moves to the hop's end."""
        la = self.cfg.flow.pre_lookahead_len
        offset, n, calls = state.token_offset, len(state.tokens), []
        while True:
            end = offset + (self.cfg.stream.first_hop if offset == 0 else self.cfg.stream.hop)
            if end + la > n or (final and end + la >= n):
                break  # not enough look-ahead yet, or the final call covers it with real context
            calls.append((end + la, False))
            offset = end
        if final and offset < n:
            calls.append((n, True))
        return calls

    @torch.inference_mode()
    def _run_calls(self, calls: list[tuple[StreamState, int, bool]],
                   trace: list[dict[str, Any]] | None) -> list[torch.Tensor]:
        """One vocoder call per stream (state, tokens it takes, finalize), of different streams:
        -> each call's new samples [m] on the CPU. Incremental calls run batched."""
        offsets = [state.token_offset for state, _, _ in calls]
        results: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(calls)  # (chunk, flow mel)
        for state, _, _ in calls:
            _move_state(state, self.device)
        try:
            with parametrize.cached():
                incremental = []
                for k, (state, n, finalize) in enumerate(calls):
                    if state.mode == "reference":
                        results[k] = self._reference_call(state, state.tokens[:n], finalize)
                    else:
                        incremental.append(k)
                if incremental:
                    batch = [calls[k] for k in incremental]
                    mels = self.incremental_flow(batch)
                    chunks = self.incremental_hift([(state, mel, finalize)
                                                    for (state, _, finalize), mel in zip(batch, mels)])
                    for k, chunk, mel in zip(incremental, chunks, mels):
                        results[k] = (chunk, mel)
        finally:
            for state, _, _ in calls:
                _move_state(state, torch.device("cpu"))  # states travel as bytes: they live on the CPU
        out = []
        for (state, n, finalize), offset, (chunk, flow_mel) in zip(calls, offsets, results):
            chunk, flow_mel = chunk.cpu(), flow_mel.cpu()
            if trace is not None:
                trace.append({"tokens": n, "offset": offset, "finalize": finalize,
                              "samples": chunk.numel(), "flow_mel": flow_mel})
            out.append(chunk)
        return out

    def _reference_call(self, state: StreamState, tokens: list[int], finalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One call of the reference's server path; -> (new samples, this call's whole flow mel [80, T])."""
        ratio, spf = self.cfg.flow.token_mel_ratio, self.cfg.hift.samples_per_frame
        n = len(tokens)
        frames = (n if finalize else n - self.cfg.flow.pre_lookahead_len) * ratio
        device = self.device
        mel = self.flow.inference(torch.tensor([tokens], device=device), state.xvec[None],
                                  self.noise.flow_noise(frames).to(device), finalize)  # [1, 80, T] float32
        new = mel[0, :, state.token_offset * ratio:]  # [80, new frames]
        state.mel = new if state.mel is None else torch.cat([state.mel, new], dim=1)
        total = state.mel.shape[1]
        if not finalize and total <= self.hift.lookahead_frames:
            state.token_offset = n - self.cfg.flow.pre_lookahead_len
            return torch.zeros(0), mel[0]
        wav = self.hift.inference(state.mel[None], self.noise.source_noise(total * spf).to(device), finalize)[0]
        chunk = wav[state.samples_sent:]
        state.samples_sent += chunk.numel()
        state.token_offset = n if finalize else n - self.cfg.flow.pre_lookahead_len
        return chunk, mel[0]

    def incremental_flow(self, calls: list[tuple[StreamState, int, bool]]) -> list[torch.Tensor]:
        """Calls (state, tokens it takes, finalize) of different streams -> the mel frames each
        makes final [80, new frames], from bounded flow windows run as one batch.

        Each window is [start, n): `flow_left_tokens` of left context plus the new tokens (and the
        look-ahead), its noise at absolute frame positions. Windows of different lengths are
        padded on the right and masked: the DiT's position convs are causal and padded frames are
        masked out of attention, so padding changes no valid frame."""
        cfg = self.cfg
        ratio = cfg.flow.token_mel_ratio
        mus, noises, first_new = [], [], []
        for state, n, finalize in calls:
            end_token = n if finalize else n - cfg.flow.pre_lookahead_len  # tokens whose mel this call makes final
            start = max(0, state.token_offset - cfg.stream.flow_left_tokens)
            window = torch.tensor([state.tokens[start:n]], device=self.device)
            mus.append(self.flow.mu(window, finalize)[0])  # [80, (end_token - start) * ratio] in the flow's dtype
            noises.append(self._flow_noise_window(start * ratio, end_token * ratio)[0])  # [80, same]
            first_new.append((state.token_offset - start) * ratio)
            state.token_offset = end_token
        frames = [mu.shape[1] for mu in mus]
        longest = max(frames)
        mu = torch.stack([F.pad(m, (0, longest - m.shape[1])) for m in mus])  # [B, 80, T]
        noise = torch.stack([F.pad(z, (0, longest - z.shape[1])) for z in noises]).to(self.device)  # [B, 80, T]
        lengths = torch.tensor(frames, device=self.device)
        mask = (torch.arange(longest, device=self.device)[None] < lengths[:, None])[:, None]  # [B, 1, T] bool
        xvecs = torch.stack([state.xvec for state, _, _ in calls])  # [B, 192]
        mel = self.flow.solve(mu, self._speaker(xvecs), noise, mask=mask)  # [B, 80, T] float32
        return [mel[b, :, first:t] for b, (first, t) in enumerate(zip(first_new, frames))]  # [80, new frames] each

    def incremental_hift(self, items: list[tuple[StreamState, torch.Tensor, bool]]) -> list[torch.Tensor]:
        """Continue each stream's waveform with its new mel frames: items (state, new [80, F],
        finalize) of different streams -> each one's new samples. HiFT re-runs only its receptive
        field; streams whose HiFT inputs have the same length (every stream in mid-call: history
        plus one hop) run as one batch. The STFT's reflect padding makes HiFT sensitive to both
        ends of its input, so unequal lengths are not padded together but run in separate batches."""
        chunks: list[torch.Tensor] = [None] * len(items)
        groups: dict[tuple[int, bool], list[_HiftRun]] = {}
        for k, (state, new, finalize) in enumerate(items):
            run = self._hift_run(k, state, new, finalize)
            if run is None:  # not enough frames for samples yet: the new frames wait in the state
                chunks[k] = torch.zeros(0, device=new.device)
            else:
                groups.setdefault((run.mel_all.shape[1], finalize), []).append(run)
        for (_, finalize), runs in groups.items():
            for run, chunk in zip(runs, self._hift_batch(runs, finalize)):
                chunks[run.index] = chunk
        return chunks

    def _hift_run(self, index: int, state: StreamState, new: torch.Tensor, finalize: bool) -> "_HiftRun | None":
        """One stream's HiFT input: history (receptive field) + new frames; None when a non-final
        call would yield no samples yet (the frames are then kept in the state)."""
        hist = state.mel if state.mel is not None else new[:, :0]
        mel_all = torch.cat([hist, new], dim=1)  # frames [mel_start, total)
        total = state.mel_start + mel_all.shape[1]
        committed = state.samples_sent // self.cfg.hift.samples_per_frame  # frames whose samples are already sent
        f0_new_end = total if finalize else total - self.hift.f0_lookahead_frames
        # A non-final decode holds back conv_pre's look-ahead and one more frame: wait until it yields samples.
        if not finalize and f0_new_end - self.hift.conv_pre_lookahead_frames - 1 <= committed:
            state.mel = mel_all
            return None
        return _HiftRun(index, state, mel_all, committed, f0_new_end)

    def _hift_batch(self, runs: list["_HiftRun"], finalize: bool) -> list[torch.Tensor]:
        """HiFT over runs whose mel_all have one length: f0 and decode batched, the source per stream."""
        spf = self.cfg.hift.samples_per_frame
        mel_all = torch.stack([run.mel_all for run in runs])  # [B, 80, T]
        f0_all = self.hift.predict_f0(mel_all, finalize=finalize)  # [B, T or T - 3] frames from each mel_start
        sources, f0s = [], []
        for run, f0_run in zip(runs, f0_all):
            state = run.state
            first_new = run.committed - state.mel_start
            f0_hist = state.f0 if state.f0 is not None else f0_run[:0]
            f0 = torch.cat([f0_hist, f0_run[first_new:]])  # committed f0 kept, new f0 appended
            phase0 = state.cycles[-1:][None] if state.cycles is not None else None
            cycles_new = self.hift.m_source.cycles(f0_run[first_new:][None], phase0)[0]  # [new, 9]
            run.cycles = torch.cat([state.cycles, cycles_new]) if state.cycles is not None else cycles_new
            noise = self._source_noise_window(state.mel_start * spf, run.f0_new_end * spf).to(mel_all.device)
            sources.append(self.hift.m_source.excite(f0[None], run.cycles[None], noise)[0])  # [(f0_new_end-mel_start)*480, 1]
            f0s.append(f0)
        dec_mel = mel_all if finalize else mel_all[:, :, : f0s[0].shape[0]]
        wavs = self.hift.decode(dec_mel, torch.stack(sources), finalize=finalize)  # [B, samples] from each mel_start
        return [self._hift_commit(run, f0, wav) for run, f0, wav in zip(runs, f0s, wavs)]

    def _hift_commit(self, run: "_HiftRun", f0: torch.Tensor, wav: torch.Tensor) -> torch.Tensor:
        """Take the samples past what was sent; keep only the history the next call needs."""
        state, spf = run.state, self.cfg.hift.samples_per_frame
        chunk = wav[(run.committed - state.mel_start) * spf:]
        state.samples_sent += chunk.numel()
        keep_from = max(state.mel_start, state.samples_sent // spf - self._hift_left_frames())
        cut = keep_from - state.mel_start
        committed_now = state.samples_sent // spf
        state.mel = run.mel_all[:, cut:]
        state.f0 = f0[cut: committed_now - state.mel_start]
        state.cycles = run.cycles[cut: committed_now - state.mel_start]
        state.mel_start = keep_from
        return chunk

    def _hift_left_frames(self) -> int:
        return self.cfg.stream.hift_left_frames or self.hift.left_context_frames

    def _flow_noise_window(self, a: int, b: int) -> torch.Tensor:
        """Flow noise columns [a, b) at absolute frame positions (wrapping past the buffer's end)."""
        buf = self.noise.flow_noise(self.noise.max_flow_frames)
        idx = torch.arange(a, b) % buf.shape[2]
        return buf[:, :, idx]

    def _source_noise_window(self, a: int, b: int) -> torch.Tensor:
        """Source noise samples [a, b) at absolute sample positions (wrapping past the buffer's end)."""
        limit = self.noise.max_source_samples
        if b <= limit:
            return self.noise.source_noise(b)[:, a:b]
        return self.noise.source_noise(limit)[:, torch.arange(a, b) % limit]
