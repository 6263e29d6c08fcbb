"""`make bench-model`: time each model stage in process (CPU by default), print a table, write JSON.

Stages: log-mel front end, audio encoder (+ grouping), LLM prefill of the prompt, one LLM step,
one SRH step (5 speech tokens), and a whole 64-step speech-to-speech turn (greedy). Each preset
is built with random weights; timings do not depend on the values.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from funchat.audio_io import SAMPLE_RATE, load_audio
from funchat.oracle.generation import GenerationConfig, generate
from funchat.model.checkpoint import build_model, randomize
from funchat.model.config import FunAudioChatConfig
from funchat.turn.prompt import groups_for_frames, speech_frames_for_samples
from funchat.model.mel import log_mel_spectrogram
from funchat.model.presets import preset_config
from funchat.model.sampling import GREEDY, select
from funchat.turn.schedule import Mode

STAGES = ("mel", "encoder", "llm_prefill", "llm_step", "srh_step", "turn_64_steps")


def _time(fn, repeats: int, warmup: int = 1) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    return {"median_ms": statistics.median(samples), "p90_ms": samples[min(len(samples) - 1, int(0.9 * len(samples)))],
            "n": len(samples)}


@torch.inference_mode()
def bench_preset(name: str, audio: np.ndarray, repeats: int, device: str) -> dict[str, dict[str, float]]:
    cfg = FunAudioChatConfig.from_dict(preset_config(name))
    model = randomize(build_model(cfg, device="cpu"), 0).to(device).eval()
    frames = speech_frames_for_samples(len(audio), SAMPLE_RATE)
    n_groups = groups_for_frames(frames, cfg.audio.group_size)
    mel = log_mel_spectrogram(audio, cfg.audio.num_mel_bins).to(device)
    audio_rows = model.encode_audio([mel], [frames])
    # A prompt shaped like a real one: ~35 text ids around the audio run.
    text = [i % (cfg.text.vocab_size - 16) for i in range(35)]
    ids = text[:30] + [cfg.audio_bos_index] + [cfg.audio_token_index] * n_groups + [cfg.audio_eos_index] + text[30:]
    input_ids = torch.tensor([ids], device=device)
    embeds = model.embed_prompt(input_ids, audio_rows)
    greedy_choose = lambda _j, logits: select(logits, GREEDY, None, None)  # noqa: E731

    results = {
        "mel": _time(lambda: log_mel_spectrogram(audio, cfg.audio.num_mel_bins), repeats),
        "encoder": _time(lambda: model.encode_audio([mel], [frames]), repeats),
        "llm_prefill": _time(lambda: model.llm_forward(embeds, model.new_llm_cache(1, len(ids) + 8)), repeats),
    }
    cache = model.new_llm_cache(1, len(ids) + 8 + repeats * 4)
    model.llm_forward(embeds, cache)
    step_input = model.embed_step(torch.tensor([cfg.audio_bos_index], device=device))
    results["llm_step"] = _time(lambda: model.llm_forward(step_input, cache), repeats * 3)
    state = model.new_srh_state(1, capacity=5 * (len(ids) + 8 + repeats * 4))
    hidden, _ = model.llm_forward(embeds, model.new_llm_cache(1, len(ids) + 8))
    model.srh_forward(hidden, input_ids, state, greedy_choose)
    step_hidden = hidden[:, -1:]
    step_ids = input_ids[:, -1:]
    results["srh_step"] = _time(lambda: model.srh_forward(step_hidden, step_ids, state, greedy_choose), repeats * 3)
    gen = GenerationConfig.greedy(Mode.S2S, 64)
    results["turn_64_steps"] = _time(lambda: generate(model, ids, embeds, gen), max(3, repeats // 3))
    params = sum(p.numel() for p in model.parameters())
    results["meta"] = {"parameters": params, "prompt_positions": len(ids), "audio_seconds": len(audio) / SAMPLE_RATE}
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--presets", nargs="+", default=["tiny", "mid"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--audio", default=None, help="WAV/FLAC to encode (default: the shared example, else noise)")
    parser.add_argument("--json", default="bench-results/bench-model.json")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    shared = Path(os.environ.get("FUNCHAT_SHARED", Path(__file__).resolve().parents[2].parent / "shared"))
    wav = Path(args.audio) if args.audio else shared / "data" / "fun-audio-chat-example-16k-f32.wav"
    audio = load_audio(wav) if wav.exists() else np.random.default_rng(0).normal(0, 0.1, 6 * SAMPLE_RATE).astype(np.float32)

    report = {"device": args.device, "threads": args.threads, "torch": torch.__version__,
              "cpu": platform.processor() or platform.machine(), "audio": str(wav) if wav.exists() else "noise 6 s",
              "presets": {}}
    for name in args.presets:
        report["presets"][name] = bench_preset(name, audio, args.repeats, args.device)

    header = f"{'stage (ms, median / p90)':<26}" + "".join(f"{n:>22}" for n in args.presets)
    print(f"funchat bench-model: device={args.device} threads={args.threads} torch={torch.__version__}")
    print(header)
    print("-" * len(header))
    for stage in STAGES:
        cells = "".join(f"{report['presets'][n][stage]['median_ms']:>12.2f} / {report['presets'][n][stage]['p90_ms']:>7.2f}"
                        for n in args.presets)
        print(f"{stage:<26}{cells}")
    params = "".join(f"{report['presets'][n]['meta']['parameters'] / 1e6:>21.1f}M" for n in args.presets)
    print(f"{'parameters':<26}{params}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"JSON written to {args.json}")


if __name__ == "__main__":
    main()
