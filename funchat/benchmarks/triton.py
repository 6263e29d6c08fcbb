"""`make bench-triton`: each model service through a real tritonserver against the same module in process.

For 1, 4 and 16 concurrent calls: per-request latency p50/p99 and requests per second through the
service (async gRPC clients), and the same work in process (the service's engine, batched as the
server batches it). The ratio is the cost of the service boundary. Tiny checkpoint, CPU.

Also the bytes of one llm step's response payload (the output tensors the orchestrator requests:
the chosen TEXT_TOKEN and the SRH_INPUT), next to what the whole vocabulary's float32 logits took.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import tritonclient.grpc.aio as grpcclient

from funchat.audio_io import load_audio
from funchat.model.init_checkpoint import init_checkpoint
from funchat.oracle.pipeline import ReferencePipeline
from funchat.engines.llm import LlmEngine, LlmRequest
from funchat.engines.refined_head import SrhEngine, SrhRequest
from funchat.orchestrator.model_clients import (LLM_STEP_OUTPUTS, AudioTokenizerClient, LlmClient, RefinedHeadClient,
                                                VocoderClient)
from funchat.dev.tritonserver import start_servers
from funchat.vocoder.checkpoint import load_vocoder, pick_speaker
from funchat.vocoder.token2wav import StreamPush

CONCURRENCY = (1, 4, 16)


def _stats(latencies_s: list[float], wall_s: float) -> dict[str, float]:
    ms = sorted(x * 1e3 for x in latencies_s)
    return {"p50_ms": statistics.median(ms), "p99_ms": ms[min(len(ms) - 1, int(0.99 * len(ms)))],
            "rps": len(ms) / wall_s, "n": len(ms)}


async def _service(make_call, concurrency: int, repeats: int) -> dict[str, float]:
    """Run `concurrency` workers, each making `repeats` timed calls (make_call(worker, i) -> awaitable)."""
    latencies: list[float] = []

    async def worker(w: int):
        for i in range(repeats):
            t0 = time.perf_counter()
            await make_call(w, i)
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*[worker(w) for w in range(concurrency)])
    return _stats(latencies, time.perf_counter() - t0)


def _in_process(run_batch, concurrency: int, repeats: int) -> dict[str, float]:
    """The same work in process: each round is one batch of `concurrency` requests."""
    latencies = []
    t0 = time.perf_counter()
    for i in range(repeats):
        s = time.perf_counter()
        run_batch(concurrency, i)
        latencies += [time.perf_counter() - s] * concurrency
    return _stats(latencies, time.perf_counter() - t0)


async def llm_step_response_bytes(endpoint: str, call_id: int, prompt: list[int]) -> int:
    """Bytes of the output tensors in one llm step's response, with the outputs the orchestrator
    requests (LLM_STEP_OUTPUTS), on a call of its own."""
    async with grpcclient.InferenceServerClient(endpoint) as client:
        async def infer(ids: list[int], start: bool, end: bool):
            tensor = grpcclient.InferInput("INPUT_IDS", [1, len(ids)], "INT64")
            tensor.set_data_from_numpy(np.array([ids], dtype=np.int64))
            outputs = [grpcclient.InferRequestedOutput(n) for n in LLM_STEP_OUTPUTS]
            return await client.infer("llm", [tensor], outputs=outputs, sequence_id=call_id,
                                      sequence_start=start, sequence_end=end)

        await infer(prompt, True, False)
        step = await infer([5], False, True)
    return sum(len(raw) for raw in step.get_response().raw_output_contents)


async def bench(ckpt: Path, cluster, audio: np.ndarray, repeats: int) -> dict:
    p = ReferencePipeline(ckpt)
    e = cluster.endpoints
    tok, llm, srh, voc = AudioTokenizerClient(e["audio_tokenizer"]), LlmClient(e["llm"]), \
        RefinedHeadClient(e["refined_head"]), VocoderClient(e["vocoder"])
    llm_engine, srh_engine = LlmEngine(p.model, 64), SrhEngine(p.model, 64)
    vocoder, speakers = load_vocoder(ckpt)
    xvec = pick_speaker(speakers, None)
    prompt = list(range(1, 40))
    hidden = np.random.default_rng(0).normal(size=(1, p.model.cfg.hidden_size)).astype(np.float32)
    codes = np.random.default_rng(1).integers(0, 6561, 18).tolist()
    step_bytes = await llm_step_response_bytes(e["llm"], 999_999, prompt)
    results: dict[str, dict] = {}
    for c in CONCURRENCY:
        row: dict[str, dict] = {}
        # audio_tokenizer: one 6 s clip per request
        row["audio_tokenizer"] = {
            "service": await _service(lambda w, i: tok.encode(audio), c, repeats),
            "in_process": _in_process(lambda n, i: [p.encode_audio(audio) for _ in range(n)], c, repeats)}
        # llm: one step per request, on calls prefilled beforehand
        base = 1000 * c
        for w in range(c):
            await llm.prefill(base + w, prompt)
        llm_engine.run([LlmRequest(base + w, True, False, torch.tensor(prompt)) for w in range(c)])
        row["llm_step"] = {
            "service": await _service(lambda w, i: llm.step(base + w, 5), c, repeats),
            "in_process": _in_process(lambda n, i: llm_engine.run(
                [LlmRequest(base + w, False, False, torch.tensor([5])) for w in range(n)]), c, repeats),
            "response_bytes": step_bytes}
        # refined_head: one LLM step's 5 speech tokens per request
        for w in range(c):
            await srh.run(base + w, np.repeat(hidden, 3, 0), start=True)
        srh_engine.run([SrhRequest(base + w, True, False, torch.from_numpy(np.repeat(hidden, 3, 0))) for w in range(c)])
        row["refined_head_step"] = {
            "service": await _service(lambda w, i: srh.run(base + w, hidden), c, repeats),
            "in_process": _in_process(lambda n, i: srh_engine.run(
                [SrhRequest(base + w, False, False, torch.from_numpy(hidden)) for w in range(n)]), c, repeats)}
        for w in range(c):  # free the calls' rows
            await llm.step(base + w, 5, end=True)
            await srh.run(base + w, hidden, end=True)
        # vocoder: a first chunk (18 codes) of a new incremental stream per request
        row["vocoder_first_chunk"] = {
            "service": await _service(lambda w, i: voc.push(codes, None, final=False, mode="incremental"), c, repeats),
            "in_process": _in_process(lambda n, i: vocoder.push_many([StreamPush(vocoder.start(xvec), codes)
                                                                      for _ in range(n)]), c, repeats)}
        results[str(c)] = row
    for client in (tok, llm, srh, voc):
        await client.close()
    vocab = p.model.cfg.text.vocab_size
    return {"concurrency": results,
            "llm_step_response": {"bytes": step_bytes, "vocabulary": vocab,
                                  "vocabulary_logits_bytes": 4 * vocab}}  # what float32 LOGITS [1, V] took


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", default="bench-results/bench-triton.json")
    parser.add_argument("--audio", default=str(Path(__file__).resolve().parents[2].parent / "shared" / "data"
                                               / "fun-audio-chat-example-16k-f32.wav"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    audio = load_audio(args.audio) if Path(args.audio).exists() else \
        np.random.default_rng(0).normal(0, 0.1, 96000).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = init_checkpoint("tiny", Path(tmp) / "ckpt", seed=0)
        params = {"*": {"checkpoint": str(ckpt)}, "audio_tokenizer": {"threads": "1"}, "vocoder": {"threads": "1"}}
        with start_servers(["audio_tokenizer", "llm", "refined_head", "vocoder"], run_dir=Path(tmp) / "run",
                           params=params, timeout=180) as cluster:
            results = asyncio.run(bench(ckpt, cluster, audio, args.repeats))
    print("funchat bench-triton: tiny checkpoint, CPU, one tritonserver per model; latency per request (ms);")
    print("resp B: bytes of the output tensors in one response (llm step: TEXT_TOKEN + SRH_INPUT)")
    print(f"{'model':<22}{'calls':>6}{'svc p50':>10}{'svc p99':>10}{'svc rps':>10}"
          f"{'inproc p50':>12}{'inproc rps':>12}{'p50 ratio':>11}{'resp B':>9}")
    for c, row in results["concurrency"].items():
        for model, r in row.items():
            s, i = r["service"], r["in_process"]
            size = f"{r['response_bytes']:>9}" if "response_bytes" in r else f"{'-':>9}"
            print(f"{model:<22}{c:>6}{s['p50_ms']:>10.2f}{s['p99_ms']:>10.2f}{s['rps']:>10.1f}"
                  f"{i['p50_ms']:>12.2f}{i['rps']:>12.1f}{s['p50_ms'] / i['p50_ms']:>11.2f}{size}")
    step = results["llm_step_response"]
    print(f"llm step response: {step['bytes']} bytes (the whole vocabulary's float32 logits were "
          f"{step['vocabulary_logits_bytes']} bytes, V = {step['vocabulary']})")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({**results, "repeats": args.repeats}, indent=2) + "\n")
    print(f"JSON written to {args.json}")


if __name__ == "__main__":
    main()
