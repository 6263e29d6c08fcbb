"""`make run`'s scripted conversation: two caller turns through the public API (Converse).

The recording is cut at its natural pause into two turns; each is streamed in 100 ms chunks and
committed; the replies are written as WAVs with a transcript, and the first-audio latency (commit
-> first audio chunk, measured here, the client side) is printed.

    python -m funchat.dev.demo [--server HOST:PORT] [--run-dir .run] --input IN.wav --out .run

The server defaults to the local stack's (`make up`). The API key: FUNCHAT_API_KEY, else the one
`make up` wrote to <run dir>/api_key.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

from funchat.audio_io import SAMPLE_RATE, load_audio
from funchat.client import AsyncClient, FunchatClientError, resolve_api_key, session_config
from funchat.dev.stack import DEFAULT_GRPC_PORT, DEFAULT_RUN_DIR, HOST, read_api_key


def split_turns(audio: np.ndarray) -> list[np.ndarray]:
    """Two turns, cut at the quietest 100 ms near the middle (the recording's pause)."""
    hop = SAMPLE_RATE // 10
    energy = np.array([float(np.mean(audio[k:k + hop] ** 2)) for k in range(0, len(audio) - hop, hop)])
    lo, hi = len(energy) // 4, 3 * len(energy) // 4
    cut = (lo + int(np.argmin(energy[lo:hi]))) * hop
    return [audio[:cut], audio[cut:]]


async def conversation(server: str, audio: np.ndarray, out: Path, greedy: bool, seed: int, max_new: int,
                       api_key: str | None = None) -> int:
    out.mkdir(parents=True, exist_ok=True)
    transcript = []
    async with AsyncClient(server, api_key=api_key) as client:
        async with client.converse(session_config(mode="s2s", turn_detection="manual", greedy=greedy,
                                                  seed=seed, max_new_tokens=max_new)) as call:
            print(f"session {call.session.session_id} on {server}")
            for i, turn in enumerate(split_turns(audio), start=1):
                for k in range(0, len(turn), SAMPLE_RATE // 10):
                    await call.send_audio(turn[k:k + SAMPLE_RATE // 10])
                await call.commit()
                reply = await call.next_reply()
                wav = out / f"reply_{i}.wav"
                sf.write(wav, reply.audio, 24000, subtype="PCM_16")
                first = f"{reply.first_audio_s * 1000:.0f} ms" if reply.first_audio_s is not None else "n/a"
                print(f"turn {i}: caller {len(turn) / SAMPLE_RATE:.2f} s -> reply {reply.audio_s:.2f} s of audio, "
                      f"{len(reply.text_tokens)} text / {len(reply.speech_tokens)} speech tokens, "
                      f"first audio {first}, status {reply.status}  -> {wav}")
                print(f"  text: {reply.text!r}")
                for err in reply.errors:
                    print(f"  error: {err.code}: {err.message}")
                transcript.append({"turn": i, "caller_seconds": len(turn) / SAMPLE_RATE, "text": reply.text,
                                   "first_audio_ms": None if reply.first_audio_s is None else reply.first_audio_s * 1000,
                                   "latency_ms": reply.latency_ms, "wav": str(wav)})
            await call.end()
    (out / "transcript.json").write_text(json.dumps(transcript, indent=2, ensure_ascii=False) + "\n")
    print(f"transcript: {out / 'transcript.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m funchat.dev.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", default=f"{HOST}:{DEFAULT_GRPC_PORT}")
    ap.add_argument("--input", required=True)
    ap.add_argument("--out", default=".run")
    ap.add_argument("--run-dir", default=str(DEFAULT_RUN_DIR),
                    help="the local stack's run dir, whose api_key is used when FUNCHAT_API_KEY is unset")
    ap.add_argument("--greedy", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=96,
                    help="reply length cap (the tiny checkpoint's random weights rarely end a turn by themselves)")
    args = ap.parse_args(argv)
    key_file = Path(args.run_dir) / "api_key"
    try:
        api_key, source = resolve_api_key(None), "FUNCHAT_API_KEY"
    except ValueError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    if not api_key:
        api_key, source = read_api_key(Path(args.run_dir)), str(key_file)
    try:
        return asyncio.run(conversation(args.server, load_audio(args.input), Path(args.out), args.greedy, args.seed,
                                        args.max_new_tokens, api_key=api_key))
    except FunchatClientError as exc:
        hint = ""
        if exc.code == "UNAUTHENTICATED":
            hint = (f" (the key from {source} was refused)" if api_key else
                    f" (no API key: FUNCHAT_API_KEY is unset and there is no {key_file}; run `make up` first)")
        print(f"demo: {exc}{hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
