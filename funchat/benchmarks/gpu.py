"""`make bench-gpu`: the serving engines at production shapes on one GPU, in one prepared run.

Built with random weights (8B shapes, bfloat16; timings do not depend on the values) and driven
in process through the same engine objects the Triton services run (`LlmEngine` with its CUDA
graph step runner, `SrhEngine`, `Token2Wav`), so no network hop is counted. Sections:

1. llm step: one batched decode step against batch size and held context, through the engine
   (what a Triton execute() costs) and as the bare CUDA graph replay.
2. SRH step: one Speech Refined Head step (g = 5 speech tokens) against batch size, through the
   engine with its `SrhStepRunner` (CUDA graphs per sub-step).
3. vocoder: first chunk and per-call real-time factor against concurrent calls (each push runs
   alone: chunks of different calls are not batched yet), and the flow's mel SNR in bf16/fp16
   against float32, and on the GPU against the CPU.
4. first audio at 1 call: log-mel, encoder, llm and SRH prefill, the 4 steps that yield the
   first 18 speech tokens, the vocoder's first chunk, back to back on one GPU.
5. tier capacity: N calls, each a loop of turns (arrive, prefill a prompt of `--prompt`
   positions, decode 25 steps = 5 s of speech, then 2 s of the caller speaking), scheduled as the
   services batch them: every tick prefills the arrivals and runs one batched step of every
   decoding call. A level holds when 95% of ticks take at most 200 ms (each tick adds 200 ms of
   speech to every decoding call) and first audio p95 <= 500 ms. First audio there is the tier's
   time to the 18th speech token plus the vocoder's 1-call first chunk from section 3 (the
   vocoder runs on its own GPU in the gpu profile).
6. DRSR gain: the GPU time of one second of speech with the shared LLM at 25 Hz (25 llm steps)
   against 5 Hz (5 llm steps + 5 SRH steps), from sections 1 and 2.

`--device cpu` (the default there: the tiny preset, small grids) checks that the script runs;
its numbers mean nothing for a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from funchat.engines.llm import LlmEngine, LlmRequest
from funchat.engines.llm_engines import CudaGraphStepRunner, context_buckets
from funchat.engines.refined_head import SrhRequest, build_srh_engine
from funchat.model.config import FunAudioChatConfig
from funchat.model.funaudiochat import FunAudioChat
from funchat.model.mel import log_mel_spectrogram
from funchat.model.presets import preset_config
from funchat.turn.prompt import groups_for_frames, speech_frames_for_samples
from funchat.vocoder.token2wav import StreamPush, Token2Wav, VocoderConfig

SAMPLE_RATE = 16_000
STEP_AUDIO_S = 0.2  # one llm step = one SRH group = 5 speech tokens at 25 Hz
FIRST_CHUNK_TOKENS = 18  # the vocoder's first hop (15) + its look-ahead (3)
HOP_TOKENS = 15
FIRST_AUDIO_P95_MS = 500.0
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Plan:
    """What to measure; `for_device` gives the full GPU grid or the small CPU smoke grid."""

    preset: str
    vocoder_preset: str
    dtype: str
    batches: list[int]
    contexts: list[int]  # held llm positions for the step grid (each a context bucket)
    srh_positions: int  # llm positions a call holds in the SRH step grid
    vocoder_calls: list[int]
    vocoder_hops: int
    first_audio_repeats: int
    levels: list[int]
    level_seconds: float
    warmup_seconds: float
    prompt: int  # prompt positions of a turn in the capacity run
    reply_steps: int = 25
    caller_seconds: float = 2.0
    audio_seconds: float = 3.0
    repeats: int = 10
    capacity: int = field(init=False)

    def __post_init__(self):
        # room for a conversation's kept turns (the capacity simulation's prompts grow turn by turn)
        groups_per_turn = math.ceil(self.audio_seconds * 5)  # 5 Hz <|AUDIO|> positions
        per_turn = REPLY_AS_TEXT + 3 + groups_per_turn + self.reply_steps + 1
        self.capacity = max(max(self.contexts), self.prompt + TURNS_KEPT * per_turn + 8)

    @classmethod
    def for_device(cls, device: torch.device, quick: bool) -> "Plan":
        if device.type == "cuda" and not quick:
            return cls("8b", "full", "bfloat16", batches=[1, 8, 32, 64, 128], contexts=[512, 1024, 2048],
                       srh_positions=256, vocoder_calls=[1, 4, 16], vocoder_hops=5, first_audio_repeats=5,
                       levels=[16, 32, 64, 96, 128], level_seconds=8.0, warmup_seconds=2.0, prompt=256)
        return cls("tiny", "tiny", "float32" if device.type == "cpu" else "bfloat16", batches=[1, 4],
                   contexts=[64, 128], srh_positions=32, vocoder_calls=[1, 2], vocoder_hops=2,
                   first_audio_repeats=2, levels=[2, 4], level_seconds=1.5, warmup_seconds=0.5, prompt=48,
                   reply_steps=6, caller_seconds=0.3, audio_seconds=2.0, repeats=3)


# ---- building ----

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def randomize_on_device(model: torch.nn.Module, seed: int) -> None:
    """`funchat.model.checkpoint.randomize`'s statistics (O(1) activations), drawn on the model's
    device: an 8B model drawn on the CPU would take minutes."""
    for i, (name, p) in enumerate(sorted(model.named_parameters())):
        gen = torch.Generator(device=p.device).manual_seed(seed + i)
        noise = torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32)
        if name.endswith("norm.weight") or "layer_norm" in name or name.startswith("continuous_audio_tower.ln_post"):
            p.copy_(1.0 + 0.1 * noise if name.endswith(".weight") else 0.02 * noise)
        elif p.ndim == 1:
            p.copy_(0.02 * noise)
        elif "embed" in name or name.endswith("audio_bos_eos_token.weight"):
            p.copy_(noise)
        else:
            p.copy_(noise / p[0].numel() ** 0.5)


def build_model(preset: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> FunAudioChat:
    cfg = FunAudioChatConfig.from_dict(preset_config(preset))
    with torch.device(device):
        model = FunAudioChat(cfg)
    model = model.to(dtype).eval()
    randomize_on_device(model, seed)
    return model


def build_vocoder(preset: str, seed: int = 0) -> Token2Wav:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Token2Wav(VocoderConfig.preset(preset))
    model.noise.draw_all()
    return model.eval()


def timed_ms(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 2) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    sync(device)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    return summarize(samples)


def summarize(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"median_ms": statistics.median(ordered), "p95_ms": percentile(ordered, 95), "n": len(ordered)}


def percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


# ---- the engines ----

class Tier:
    """The llm and refined_head engines of one GPU, and the cids handed out to the benchmark's calls."""

    def __init__(self, model: FunAudioChat, plan: Plan, device: torch.device):
        self.model = model
        self.device = device
        self.cfg = model.cfg
        max_batch = max(max(plan.batches), max(plan.levels))
        contexts = sorted(set(context_buckets(plan.capacity, smallest=min(plan.contexts))) | set(plan.contexts))
        contexts = [c for c in contexts if c <= plan.capacity]
        self.graphs_error = None
        t0 = time.perf_counter()
        try:
            self._build_llm(model, plan, max_batch, contexts, use_graphs=device.type == "cuda")
        except Exception:  # reported, and the same fixed-shape steps run without capture
            self.graphs_error = traceback.format_exc()
            log(f"CUDA graph capture failed; stepping without graphs:\n{self.graphs_error}")
            self._build_llm(model, plan, max_batch, contexts, use_graphs=False)
        self.capture_s = time.perf_counter() - t0
        # the SRH holds a conversation's kept turns too (TURNS_KEPT prompts growing by what each adds)
        per_turn = REPLY_AS_TEXT + 3 + groups_for_frames(speech_frames_for_samples(int(plan.audio_seconds * SAMPLE_RATE),
                                                                                   SAMPLE_RATE), model.cfg.audio.group_size)
        srh_context = max(plan.srh_positions, plan.prompt + TURNS_KEPT * (per_turn + plan.reply_steps + 1)) + 8
        t1 = time.perf_counter()
        self.srh = build_srh_engine(model, max_batch, max_context=srh_context, max_batch=max_batch,
                                    cuda_graphs="true" if device.type == "cuda" else "false")
        self.srh_capture_s = time.perf_counter() - t1
        self.next_cid = 1
        self.width = model.cfg.text.hidden_size

    def _build_llm(self, model: FunAudioChat, plan: Plan, max_batch: int, contexts: list[int], use_graphs: bool) -> None:
        self.runner = CudaGraphStepRunner(model, max_batch=max_batch, use_graphs=use_graphs, context_sizes=contexts)
        self.llm = LlmEngine(model, max_sequences=max_batch, capacity=plan.capacity, step_runner=self.runner)
        self.runner.capture_all()

    def cids(self, n: int) -> list[int]:
        first = self.next_cid
        self.next_cid += n
        return list(range(first, first + n))

    def prompt_ids(self, positions: int, n_groups: int) -> torch.Tensor:
        """A prompt shaped like a turn's: text, then the caller's audio run, then the assistant header."""
        cfg = self.cfg
        text = [i % (cfg.text.vocab_size - 16) for i in range(max(4, positions - n_groups - 2))]
        ids = text[:-3] + [cfg.audio_bos_index] + [cfg.audio_token_index] * n_groups + [cfg.audio_eos_index] + text[-3:]
        return torch.tensor(ids, dtype=torch.long)

    def start_short(self, cids: list[int]) -> None:
        """Open sequences with a 1-position prompt in llm and SRH (the step grids set their lengths)."""
        self.llm.run([LlmRequest(cid, True, False, torch.tensor([1])) for cid in cids])
        zeros = torch.zeros(1, self.width)
        self.srh.run([SrhRequest(cid, True, False, zeros) for cid in cids])

    def set_held(self, cids: list[int], llm_positions: int | None, srh_positions: int | None) -> None:
        """Pretend each call already holds that many positions (the stale keys cost what real ones do)."""
        for engine, held in ((self.llm, llm_positions), (self.srh, srh_positions)):
            if held is None:
                continue
            with engine.pool.lock:
                for cid in cids:
                    engine.pool.cache.lengths[engine.pool.slots[cid].row] = held

    def free(self, cids: list[int]) -> None:
        for cid in cids:
            self.llm.pool.free(cid)
            self.srh.pool.free(cid)

    def llm_steps(self, cids: list[int], tokens: list[int], groups: list[torch.Tensor | None],
                  end: bool = False, keep_ids: list[int] | None = None) -> list:
        keep_ids = keep_ids or [0] * len(cids)
        reqs = [LlmRequest(cid, False, end, torch.tensor([tok]), speech_group=group, keep_id=keep)
                for cid, tok, group, keep in zip(cids, tokens, groups, keep_ids)]
        return checked(self.llm.run(reqs))

    def srh_steps(self, cids: list[int], srh_inputs: list[torch.Tensor], end: bool = False,
                  keep_ids: list[int] | None = None) -> list[torch.Tensor]:
        # srh_input crosses to the CPU as it does between the services (llm -> orchestrator -> refined_head)
        keep_ids = keep_ids or [0] * len(cids)
        reqs = [SrhRequest(cid, False, end, x.float().cpu(), keep_id=keep)
                for cid, x, keep in zip(cids, srh_inputs, keep_ids)]
        return checked(self.srh.run(reqs))


def checked(results: list) -> list:
    for r in results:
        if isinstance(r, Exception):
            raise RuntimeError(f"an engine refused a benchmark request: {r}")
    return results


# ---- 1 and 2: step grids ----

def bench_llm_steps(tier: Tier, plan: Plan) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for context in plan.contexts:
        for batch in plan.batches:
            cids = tier.cids(batch)
            tier.start_short(cids)
            steps = 2 + plan.repeats
            tier.set_held(cids, context - steps - 1, None)  # every step stays inside this context bucket
            tokens = [5] * batch
            engine = timed_ms(lambda: tier.llm_steps(cids, tokens, [None] * batch), tier.device, plan.repeats)
            graph = bench_graph_replay(tier, batch, context, plan.repeats)
            tier.free(cids)
            out[f"{batch}x{context}"] = {"batch": batch, "context": context, "engine": engine, "graph": graph}
            log(f"llm step batch {batch:>3} context {context:>5}: engine {engine['median_ms']:.2f} ms"
                + (f", graph {graph['median_ms']:.2f} ms" if graph else ""))
    return out


def bench_graph_replay(tier: Tier, batch: int, context: int, repeats: int) -> dict[str, float] | None:
    """The captured step alone (CUDA events around replays): the GPU time without the engine's Python."""
    runner = tier.runner
    if not runner.use_graphs:
        return None
    n = next(size for size in runner.batch_sizes if size >= batch)
    graph, _ = runner.graphs[(n, context)]
    samples = []
    for _ in range(repeats + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()  # rewrites the positions the last engine step wrote
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return summarize(samples[2:])


def bench_srh_steps(tier: Tier, plan: Plan) -> dict[str, Any]:
    out: dict[str, Any] = {}
    g = tier.cfg.audio.group_size
    for batch in plan.batches:
        cids = tier.cids(batch)
        tier.start_short(cids)
        tier.set_held(cids, None, g * (plan.srh_positions - plan.repeats - 3))
        inputs = [torch.randn(1, tier.width) for _ in cids]
        result = timed_ms(lambda: tier.srh_steps(cids, inputs), tier.device, plan.repeats)
        tier.free(cids)
        out[str(batch)] = {"batch": batch, "held_llm_positions": plan.srh_positions, **result}
        log(f"srh step batch {batch:>3}: {result['median_ms']:.2f} ms")
    return out


def profile_steps(tier: Tier, plan: Plan, batch: int) -> dict[str, str]:
    """torch.profiler's top operators (by self CPU and by device time) of one llm and one SRH
    step at `batch`: where the engines' time goes beyond the captured graphs."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if tier.device.type == "cuda" else [])
    cids = tier.cids(batch)
    tier.start_short(cids)
    tier.set_held(cids, min(plan.contexts) - 8, tier.cfg.audio.group_size * (plan.srh_positions - 8))
    inputs = [torch.randn(1, tier.width) for _ in cids]
    tier.llm_steps(cids, [5] * batch, [None] * batch)
    tier.srh_steps(cids, inputs)
    out = {}
    for name, fn in (("llm", lambda: tier.llm_steps(cids, [5] * batch, [None] * batch)),
                     ("srh", lambda: tier.srh_steps(cids, inputs))):
        with profile(activities=activities) as prof:
            fn()
            sync(tier.device)
        table = prof.key_averages()
        out[name] = table.table(sort_by="self_cpu_time_total", row_limit=12)
        if tier.device.type == "cuda":
            out[name + "_device"] = table.table(sort_by="self_cuda_time_total", row_limit=8)
    tier.free(cids)
    return out


# ---- 3: vocoder ----

def speech_tokens(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 6561, n).tolist()


def bench_vocoder(plan: Plan, device: torch.device) -> dict[str, Any]:
    vocoder = build_vocoder(plan.vocoder_preset)
    flow_cpu = {k: v.clone() for k, v in vocoder.flow.state_dict().items()}
    xvec = torch.randn(vocoder.cfg.flow.spk_embed_dim, generator=torch.Generator().manual_seed(1))
    toks = speech_tokens(50, 7)
    out: dict[str, Any] = {"preset": plan.vocoder_preset, "mel_snr_db": {}, "by_dtype": {}}

    def set_flow(dtype: torch.dtype, on: torch.device) -> None:
        vocoder.to_device(on, torch.float32)
        vocoder.flow.load_state_dict(flow_cpu)
        vocoder.to_device(on, dtype)

    set_flow(torch.float32, torch.device("cpu"))
    _, mel_cpu = vocoder.offline(toks, xvec, return_mel=True)
    set_flow(torch.float32, device)
    _, mel_ref = vocoder.offline(toks, xvec, return_mel=True)
    out["mel_snr_db"]["device_float32_vs_cpu"] = snr_db(mel_cpu, mel_ref)
    for name in ("bfloat16", "float16"):
        set_flow(DTYPES[name], device)
        _, mel = vocoder.offline(toks, xvec, return_mel=True)
        out["mel_snr_db"][f"{name}_vs_float32"] = snr_db(mel_ref, mel)
    log(f"vocoder mel SNR: {out['mel_snr_db']}")

    for name in ("float32", plan.dtype) if plan.dtype != "float32" else ("float32",):
        set_flow(DTYPES[name], device)
        out["by_dtype"][name] = {str(n): vocoder_level(vocoder, xvec, n, plan.vocoder_hops, device) for n in plan.vocoder_calls}
        for n, r in out["by_dtype"][name].items():
            log(f"vocoder {name} {n:>3} calls: first chunk p50 {r['first_chunk_ms']['median_ms']:.1f} ms, "
                f"max {r['first_chunk_max_ms']:.1f} ms, per-call RTF {r['rtf_per_call']:.3f}")
    return out


def vocoder_level(vocoder: Token2Wav, xvec: torch.Tensor, calls: int, hops: int, device: torch.device) -> dict[str, Any]:
    """`calls` streams that start together, pushed as the vocoder service runs a dynamic batch
    (`push_many`: one flow forward and one HiFT run for all of them): their first chunks (timed from
    the common start), then `hops` rounds of one 15-token push per call; per-call RTF = round time
    / 0.6 s of speech."""
    streams = [vocoder.start(xvec) for _ in range(calls)]
    toks = [speech_tokens(FIRST_CHUNK_TOKENS + hops * HOP_TOKENS + 3, 100 + i) for i in range(calls)]
    warm = [vocoder.start(xvec) for _ in range(calls)]  # first-use costs (kernels, allocator, shapes) out of the timing
    vocoder.push_many([StreamPush(w, t[:FIRST_CHUNK_TOKENS + HOP_TOKENS]) for w, t in zip(warm, toks)])
    sync(device)
    t0 = time.perf_counter()
    firsts = vocoder.push_many([StreamPush(s, t[:FIRST_CHUNK_TOKENS]) for s, t in zip(streams, toks)])
    sync(device)
    first_ms = (time.perf_counter() - t0) * 1e3
    assert all(isinstance(c, list) and c for c in firsts), "the first 18 tokens gave no chunk"
    rounds = []
    for h in range(hops):
        lo = FIRST_CHUNK_TOKENS + h * HOP_TOKENS
        t1 = time.perf_counter()
        vocoder.push_many([StreamPush(s, t[lo:lo + HOP_TOKENS]) for s, t in zip(streams, toks)])
        sync(device)
        rounds.append(time.perf_counter() - t1)
    hop_audio_s = HOP_TOKENS / 25
    return {"calls": calls, "first_chunk_ms": summarize([first_ms]), "first_chunk_max_ms": first_ms,
            "round_s": statistics.median(rounds), "rtf_per_call": statistics.median(rounds) / hop_audio_s}


def snr_db(ref: torch.Tensor, est: torch.Tensor) -> float:
    ref, est = ref.double().cpu(), est.double().cpu()
    noise = float(((ref - est) ** 2).sum())
    return math.inf if noise == 0 else 10 * math.log10(float((ref ** 2).sum()) / noise)


# ---- 4: first audio at one call ----

def caller_audio(seconds: float, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.1, int(seconds * SAMPLE_RATE)).astype(np.float32)


def encode(tier: Tier, clips: list[np.ndarray]) -> list[torch.Tensor]:
    """Log-mel on the CPU (as the audio_tokenizer service does), the encoder on the device."""
    mels = [log_mel_spectrogram(c, tier.cfg.audio.num_mel_bins).to(tier.device) for c in clips]
    frames = [speech_frames_for_samples(len(c), SAMPLE_RATE) for c in clips]
    return [rows.cpu() for rows in tier.model.encode_audio(mels, frames)]


REPLY_AS_TEXT = 25  # text positions a reply adds to the next prompt (its words, <|im_end|>, the user header)


def start_turns(tier: Tier, cids: list[int], clips: list[np.ndarray], positions: int,
                kept: list[tuple[int, int]] | None = None) -> list:
    """Encode the callers' audio and prefill their prompts in llm and SRH, batched; -> llm results.
    kept: per call (keep id, kept prompt positions) or (keep id, 0): a call with kept rows sends only
    what its next prompt adds (the last reply as text, the new audio, the header), as the
    orchestrator does; otherwise the whole `positions`-position prompt."""
    rows = encode(tier, clips)
    g = tier.cfg.audio.group_size
    kept = kept or [(0, 0)] * len(cids)
    llm_reqs, srh_prefix = [], []
    for cid, r, (keep_id, held) in zip(cids, rows, kept):
        if held:
            share = held - 1  # as the orchestrator: all of the last prompt but its last position
            ids = tier.prompt_ids(REPLY_AS_TEXT + r.shape[0] + 2 + 1, r.shape[0])
            llm_reqs.append(LlmRequest(cid, True, False, ids, audio=r, keep_id=keep_id, prefix=share))
            srh_prefix.append(share)
        else:
            llm_reqs.append(LlmRequest(cid, True, False, tier.prompt_ids(positions, r.shape[0]), audio=r,
                                       keep_id=keep_id))
            srh_prefix.append(0)
    results = checked(tier.llm.run(llm_reqs))
    checked(tier.srh.run([SrhRequest(req.cid, True, False, res.srh_input.float().cpu(), keep_id=req.keep_id,
                                     prefix=prefix) for req, res, prefix in zip(llm_reqs, results, srh_prefix)]))
    assert all(r.shape[0] == groups_for_frames(speech_frames_for_samples(len(c), SAMPLE_RATE), g)
               for r, c in zip(rows, clips))
    return results


def bench_prefill_parts(tier: Tier, plan: Plan) -> dict[str, Any]:
    """Where a turn's prefill time goes at one call, each part timed alone (device synced): log-mel
    (CPU), encoder, llm prefill, SRH prefill (its 5 sub-steps at the last position included), for a
    whole prompt and for a later turn's suffix from kept rows."""
    clip = caller_audio(plan.audio_seconds)
    out: dict[str, Any] = {}
    for name in ("whole", "kept", "whole", "kept"):  # the first pair warms up; the second is reported
        keep_id = 3_000_000 + len(out)
        held = 0
        if name == "kept":
            (warm_cid,) = tier.cids(1)
            start_turns(tier, [warm_cid], [clip], plan.prompt, kept=[(keep_id, 0)])
            tier.llm.run([LlmRequest(warm_cid, False, True, torch.tensor([5]), keep_id=keep_id)])
            tier.srh.run([SrhRequest(warm_cid, False, True, torch.zeros(1, tier.width), keep_id=keep_id)])
            held = plan.prompt
        parts = {}
        t = time.perf_counter()
        mel = log_mel_spectrogram(clip, tier.cfg.audio.num_mel_bins).to(tier.device)
        sync(tier.device)
        parts["mel_ms"] = (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        (rows,) = tier.model.encode_audio([mel], [speech_frames_for_samples(len(clip), SAMPLE_RATE)])
        rows = rows.cpu()
        parts["encoder_ms"] = (time.perf_counter() - t) * 1e3
        (cid,) = tier.cids(1)
        if held:
            ids = tier.prompt_ids(REPLY_AS_TEXT + rows.shape[0] + 3, rows.shape[0])
            req = LlmRequest(cid, True, False, ids, audio=rows, keep_id=keep_id, prefix=held - 1)
        else:
            req = LlmRequest(cid, True, False, tier.prompt_ids(plan.prompt, rows.shape[0]), audio=rows)
        t = time.perf_counter()
        (res,) = checked(tier.llm.run([req]))
        parts["llm_prefill_ms"] = (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        checked(tier.srh.run([SrhRequest(cid, True, False, res.srh_input.float().cpu(), keep_id=req.keep_id,
                                         prefix=req.prefix)]))
        parts["srh_prefill_ms"] = (time.perf_counter() - t) * 1e3
        parts["positions"] = int(req.input_ids.numel())
        tier.free([cid])
        out[name] = parts
    log(f"prefill parts: {out}")
    return out


def bench_first_audio(tier: Tier, vocoder: Token2Wav, plan: Plan, first_chunk_warm: Callable[[], None],
                      later_turn: bool = False) -> dict[str, Any]:
    """First audio of a turn at one call: a first turn (the whole prompt), or with later_turn a
    conversation's next turn from the rows the services kept of a `plan.prompt`-position prompt."""
    xvec = torch.randn(vocoder.cfg.flow.spk_embed_dim, generator=torch.Generator().manual_seed(1))
    clip = caller_audio(plan.audio_seconds)
    samples, parts = [], []
    first_chunk_warm()
    for i in range(plan.first_audio_repeats + 1):
        kept = None
        if later_turn:  # a previous turn left its rows: prefill it whole and keep them
            keep_id = 1_000_000 + i
            (warm_cid,) = tier.cids(1)
            start_turns(tier, [warm_cid], [clip], plan.prompt, kept=[(keep_id, 0)])
            tier.llm.run([LlmRequest(warm_cid, False, True, torch.tensor([5]), keep_id=keep_id)])
            tier.srh.run([SrhRequest(warm_cid, False, True, torch.zeros(1, tier.width), keep_id=keep_id)])
            kept = (keep_id, plan.prompt)
        (cid,) = tier.cids(1)
        t0 = time.perf_counter()
        (res,) = start_turns(tier, [cid], [clip], plan.prompt, kept=[kept] if kept else None)
        sync(tier.device)
        t_prefill = time.perf_counter()
        speech: list[int] = []
        group = None
        token = tier.cfg.audio_bos_index  # the prefill's forced text token in s2s mode
        while len(speech) < FIRST_CHUNK_TOKENS:
            (res,) = tier.llm_steps([cid], [token], [group])
            (group,) = tier.srh_steps([cid], [res.srh_input])
            speech += group.tolist()
            token = res.token
        t_steps = time.perf_counter()
        stream = vocoder.start(xvec)
        assert vocoder.push(stream, [t % 6561 for t in speech[:FIRST_CHUNK_TOKENS]])
        t_end = time.perf_counter()
        tier.free([cid])
        if i == 0:
            continue  # the first turn pays one-time costs
        samples.append((t_end - t0) * 1e3)
        parts.append({"encode_prefill_ms": (t_prefill - t0) * 1e3, "steps_ms": (t_steps - t_prefill) * 1e3,
                      "vocoder_ms": (t_end - t_steps) * 1e3})
    result = {**summarize(samples), "prompt_positions": plan.prompt, "caller_audio_s": plan.audio_seconds,
              "turn": "later, from kept rows" if later_turn else "first",
              "parts_median_ms": {k: statistics.median(p[k] for p in parts) for k in parts[0]}}
    log(f"first audio at 1 call ({result['turn']} turn): {result['median_ms']:.1f} ms ({result['parts_median_ms']})")
    return result


# ---- 5: tier capacity ----

TURNS_KEPT = 4  # a simulated conversation starts over (its whole prompt again) after this many turns


@dataclass
class SimCall:
    cid: int
    arrival: float
    decoding: bool = False
    steps: int = 0
    speech: int = 0
    token: int = 0
    group: torch.Tensor | None = None
    first_audio_ms: float | None = None
    keep_id: int = 0  # with kept prefixes: the conversation's rows
    held: int = 0  # prompt positions of its kept rows (0: none kept, the next prompt goes whole)
    prompt: int = 0  # positions of the prompt being answered
    turns: int = 0


def run_level(tier: Tier, plan: Plan, calls: int, vocoder_first_chunk_ms: float, kept: bool) -> dict[str, Any]:
    """`calls` callers looping turns for warmup + level_seconds; ticks and first audio after the warm-up.
    kept: conversations keep their rows between turns and prefill only what a prompt adds (up to
    TURNS_KEPT turns, then the whole prompt again); otherwise every turn prefills a whole
    `plan.prompt`-position prompt."""
    clip = caller_audio(plan.audio_seconds, seed=calls)
    period = plan.reply_steps * STEP_AUDIO_S + plan.caller_seconds
    t_start = time.perf_counter()
    measure_from = t_start + plan.warmup_seconds
    stop_at = measure_from + plan.level_seconds
    sims = [SimCall(0, t_start + i * period / calls, keep_id=(2_000_000 + calls * 1000 + i) if kept else 0)
            for i in range(calls)]
    ticks, first_audio = [], []
    kept_turns = 0  # turns that started from kept rows
    while True:
        now = time.perf_counter()
        if now >= stop_at:
            break
        arriving = [c for c in sims if not c.decoding and c.arrival <= now]
        decoding = [c for c in sims if c.decoding]
        if not arriving and not decoding:
            time.sleep(max(0.0, min(c.arrival for c in sims) - now))
            continue
        if arriving:
            cids = tier.cids(len(arriving))
            for c in arriving:
                if c.turns >= TURNS_KEPT:
                    c.held, c.turns = 0, 0
                kept_turns += bool(c.held)
            start_turns(tier, cids, [clip] * len(arriving), plan.prompt, kept=[(c.keep_id, c.held) for c in arriving])
            for c, cid in zip(arriving, cids):
                added = REPLY_AS_TEXT + groups_for_frames(speech_frames_for_samples(len(clip), SAMPLE_RATE),
                                                          tier.cfg.audio.group_size) + 3
                c.prompt = c.held - 1 + added if c.held else plan.prompt
                c.cid, c.decoding, c.steps, c.speech, c.turns = cid, True, 0, 0, c.turns + 1
                c.token, c.group, c.first_audio_ms = tier.cfg.audio_bos_index, None, None
            decoding = [c for c in sims if c.decoding]
        last = [c.steps + 1 == plan.reply_steps for c in decoding]
        # the last step of a turn ends its sequences (END), as the orchestrator's does
        ending = [c for c, e in zip(decoding, last) if e]
        going = [c for c, e in zip(decoding, last) if not e]
        for group_calls, end in ((going, False), (ending, True)):
            if not group_calls:
                continue
            keep_ids = [c.keep_id for c in group_calls] if end else None
            results = tier.llm_steps([c.cid for c in group_calls], [c.token for c in group_calls],
                                     [c.group for c in group_calls], end=end, keep_ids=keep_ids)
            groups = tier.srh_steps([c.cid for c in group_calls], [r.srh_input for r in results], end=end,
                                    keep_ids=keep_ids)
            done = time.perf_counter()
            for c, r, grp in zip(group_calls, results, groups):
                c.token, c.group, c.steps, c.speech = r.token, grp.cpu() % 6561, c.steps + 1, c.speech + grp.numel()
                if c.first_audio_ms is None and c.speech >= FIRST_CHUNK_TOKENS:
                    c.first_audio_ms = (done - c.arrival) * 1e3 + vocoder_first_chunk_ms
                    if c.arrival >= measure_from:
                        first_audio.append(c.first_audio_ms)
                if end:
                    c.decoding, c.arrival = False, done + plan.caller_seconds
                    c.held = c.prompt if c.keep_id else 0
        tick = time.perf_counter() - now
        if now >= measure_from:
            ticks.append(tick * 1e3)
    for c in sims:
        if c.decoding:
            tier.free([c.cid])
    for engine in (tier.llm, tier.srh):  # the next level's conversations are new
        for keep_id in [c.keep_id for c in sims if c.keep_id in engine.pool.kept]:
            engine.pool._drop_kept(keep_id, None)
    ticks.sort()
    first_audio.sort()
    holds_real_time = bool(ticks) and percentile(ticks, 95) <= STEP_AUDIO_S * 1e3
    holds_first_audio = bool(first_audio) and percentile(first_audio, 95) <= FIRST_AUDIO_P95_MS
    result = {"calls": calls, "kept_prefixes": kept, "kept_turns": kept_turns, "ticks": len(ticks), "tick_p50_ms": percentile(ticks, 50),
              "tick_p95_ms": percentile(ticks, 95), "turns": len(first_audio),
              "first_audio_p50_ms": percentile(first_audio, 50), "first_audio_p95_ms": percentile(first_audio, 95),
              "real_time": holds_real_time, "holds": holds_real_time and holds_first_audio}
    log(f"tier {'kept' if kept else 'whole'} {calls:>3} calls: tick p50 {result['tick_p50_ms']:.1f} p95 {result['tick_p95_ms']:.1f} ms, "
        f"first audio p50 {result['first_audio_p50_ms']:.0f} p95 {result['first_audio_p95_ms']:.0f} ms "
        f"({len(first_audio)} turns): {'holds' if result['holds'] else 'does not hold'}")
    return result


def bench_capacity(tier: Tier, plan: Plan, vocoder_first_chunk_ms: float) -> dict[str, Any]:
    """Each variant (whole prompts every turn; kept prefixes) up to its first level that does not hold."""
    out: dict[str, Any] = {"vocoder_first_chunk_ms_added": vocoder_first_chunk_ms}
    for name, kept in (("whole", False), ("kept", True)):
        levels = []
        for calls in plan.levels:
            levels.append(run_level(tier, plan, calls, vocoder_first_chunk_ms, kept))
            if not levels[-1]["holds"]:
                break  # the next level only holds less
        held = [lv["calls"] for lv in levels if lv["holds"]]
        out[name] = {"levels": levels, "max_real_time_calls": max(held) if held else 0}
    return out


# ---- 6: DRSR ----

def drsr_gain(llm: dict[str, Any], srh: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """GPU time of 1 s of speech: 25 llm steps (the LLM at 25 Hz) against 5 llm + 5 SRH steps (5 Hz)."""
    context = min(plan.contexts)
    out = {}
    for batch in plan.batches:
        step = llm[f"{batch}x{context}"]
        t_llm = (step["graph"] or step["engine"])["median_ms"]
        t_srh = srh[str(batch)]["median_ms"]
        out[str(batch)] = {"llm_25hz_ms": 25 * t_llm, "drsr_5hz_ms": 5 * (t_llm + t_srh),
                           "gain": (25 * t_llm) / (5 * (t_llm + t_srh))}
    return {"context": context, "by_batch": out}


# ---- report ----

def finite(value: Any) -> Any:
    """JSON has no inf/nan: such numbers become null (an SNR of identical outputs is infinite)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def print_tables(report: dict[str, Any]) -> None:
    plan = report["plan"]
    print(f"funchat bench-gpu: {report['device_name']}, preset {plan['preset']} {plan['dtype']}, torch {report['torch']}")
    if "llm_step" in report:
        print("\nllm step (ms, median): engine / graph replay")
        print(f"{'batch':>6}" + "".join(f"{'ctx ' + str(c):>22}" for c in plan["contexts"]))
        for b in plan["batches"]:
            cells = []
            for c in plan["contexts"]:
                r = report["llm_step"][f"{b}x{c}"]
                g = f"{r['graph']['median_ms']:.2f}" if r["graph"] else "-"
                cells.append(f"{r['engine']['median_ms']:>12.2f} / {g:>7}")
            print(f"{b:>6}" + "".join(f"{x:>22}" for x in cells))
    if "srh_step" in report:
        print(f"\nSRH step, 5 tokens (ms, median; {plan['srh_positions']} llm positions held)")
        for b, r in report["srh_step"].items():
            print(f"{b:>6}{r['median_ms']:>12.2f}")
    if "vocoder" in report:
        v = report["vocoder"]
        print(f"\nvocoder ({v['preset']}): mel SNR " + ", ".join(f"{k} {x:.1f} dB" for k, x in v["mel_snr_db"].items()))
        print(f"{'flow dtype':>10}{'calls':>7}{'first chunk p50':>17}{'max':>9}{'RTF/call':>10}")
        for name, levels in v["by_dtype"].items():
            for n, r in levels.items():
                print(f"{name:>10}{n:>7}{r['first_chunk_ms']['median_ms']:>15.1f}ms{r['first_chunk_max_ms']:>7.1f}ms"
                      f"{r['rtf_per_call']:>10.3f}")
    if "prefill_parts" in report:
        print("\nprefill parts at 1 call (ms): " + "; ".join(
            f"{name}: " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()) for name, parts in report["prefill_parts"].items()))
    for key in ("first_audio", "first_audio_later_turn"):
        if key in report:
            f = report[key]
            print(f"\nfirst audio at 1 call, {f['turn']} turn: p50 {f['median_ms']:.1f} ms, p95 {f['p95_ms']:.1f} ms "
                  f"({f['prompt_positions']}-position prompt, {f['caller_audio_s']:g} s of caller audio): "
                  + ", ".join(f"{k} {x:.1f}" for k, x in f["parts_median_ms"].items()))
    if "capacity" in report:
        c = report["capacity"]
        print(f"\ntier capacity (llm + SRH; first audio includes the vocoder's {c['vocoder_first_chunk_ms_added']:.0f} ms)")
        print(f"{'prompts':>8}{'calls':>6}{'tick p50':>10}{'tick p95':>10}{'FA p50':>9}{'FA p95':>9}{'turns':>7}  holds")
        for name in ("whole", "kept"):
            for lv in c[name]["levels"]:
                print(f"{name:>8}{lv['calls']:>6}{lv['tick_p50_ms']:>10.1f}{lv['tick_p95_ms']:>10.1f}"
                      f"{lv['first_audio_p50_ms']:>9.0f}{lv['first_audio_p95_ms']:>9.0f}{lv['turns']:>7}  {lv['holds']}")
            print(f"{name}: largest number of real-time calls with first audio p95 <= {FIRST_AUDIO_P95_MS:.0f} ms: "
                  f"{c[name]['max_real_time_calls']}")
    if "drsr" in report:
        d = report["drsr"]
        print(f"\nDRSR gain (GPU time of 1 s of speech, context {d['context']}): "
              + ", ".join(f"batch {b}: {r['gain']:.2f}x" for b, r in d["by_batch"].items()))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="the small grid on any device")
    parser.add_argument("--sections", nargs="+",
                        default=["llm", "srh", "vocoder", "prefill_parts", "first_audio", "capacity"],
                        choices=["llm", "srh", "vocoder", "prefill_parts", "first_audio", "capacity"])
    parser.add_argument("--json", default="bench-results/bench-gpu.json")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    plan = Plan.for_device(device, args.quick)
    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"torch": torch.__version__, "plan": asdict(plan), "cpu": platform.processor() or platform.machine(),
                              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}

    def save() -> None:  # after every section: a run cut short still leaves what it measured
        json_path.write_text(json.dumps(finite(report), indent=2) + "\n")

    def section(name: str, fn: Callable[[], Any]) -> Any:
        """Run one section; a failure is recorded (with its traceback) and the next sections still run."""
        started = time.perf_counter()
        try:
            report[name] = fn()
        except Exception:
            report.setdefault("errors", {})[name] = traceback.format_exc()
            log(f"section {name} failed:\n{report['errors'][name]}")
        report.setdefault("section_s", {})[name] = time.perf_counter() - started
        save()
        return report.get(name)

    t0 = time.perf_counter()
    model = build_model(plan.preset, device, DTYPES[plan.dtype])
    tier = Tier(model, plan, device)
    report["build_s"] = time.perf_counter() - t0
    report["graph_capture_s"] = {"llm": tier.capture_s, "srh": tier.srh_capture_s}
    report["graphs_error"] = tier.graphs_error
    report["parameters"] = sum(p.numel() for p in model.parameters())
    if device.type == "cuda":
        report["gpu_memory_gib"] = torch.cuda.memory_allocated(device) / 2**30
    log(f"built {plan.preset} on {device} in {report['build_s']:.1f} s (graphs: llm {tier.capture_s:.1f} s, "
        f"srh {tier.srh_capture_s:.1f} s): "
        f"{report['parameters'] / 1e9:.2f} B parameters")
    save()
    if "llm" in args.sections:
        section("llm_step", lambda: bench_llm_steps(tier, plan))
    if "srh" in args.sections:
        section("srh_step", lambda: bench_srh_steps(tier, plan))
    if "llm" in args.sections and "srh" in args.sections:
        section("profile", lambda: profile_steps(tier, plan, max(b for b in plan.batches if b <= 64)))
    if "llm_step" in report and "srh_step" in report:
        section("drsr", lambda: drsr_gain(report["llm_step"], report["srh_step"], plan))
    if "prefill_parts" in args.sections:
        section("prefill_parts", lambda: bench_prefill_parts(tier, plan))
    vocoder_first_ms = math.nan
    if "vocoder" in args.sections and section("vocoder", lambda: bench_vocoder(plan, device)):
        levels = report["vocoder"]["by_dtype"]
        vocoder_first_ms = levels[plan.dtype if plan.dtype in levels else "float32"]["1"]["first_chunk_ms"]["median_ms"]
    if "first_audio" in args.sections or "capacity" in args.sections:
        vocoder = build_vocoder(plan.vocoder_preset).to_device(device, DTYPES[plan.dtype])
        xvec = torch.randn(vocoder.cfg.flow.spk_embed_dim, generator=torch.Generator().manual_seed(1))

        def warm() -> None:
            vocoder.push(vocoder.start(xvec), speech_tokens(FIRST_CHUNK_TOKENS, 3))

        if "first_audio" in args.sections:
            section("first_audio", lambda: bench_first_audio(tier, vocoder, plan, warm))
            section("first_audio_later_turn", lambda: bench_first_audio(tier, vocoder, plan, warm, later_turn=True))
        if "capacity" in args.sections:
            if math.isnan(vocoder_first_ms):
                warm()
                t1 = time.perf_counter()
                warm()
                sync(device)
                vocoder_first_ms = (time.perf_counter() - t1) * 1e3
            section("capacity", lambda: bench_capacity(tier, plan, vocoder_first_ms))
    report["total_s"] = time.perf_counter() - t0
    save()
    print_tables(report)
    for name, error in report.get("errors", {}).items():
        print(f"\nsection {name} FAILED:\n{error}")
    print(f"\nJSON written to {json_path}")
    return report


if __name__ == "__main__":
    main()
