"""The stateless model services under a real tritonserver: audio_tokenizer and vocoder.

Each service must give what the in-process code gives (the oracle's `encode_audio`, `Token2Wav.push`),
alone and under concurrent calls, a vocoder stream must continue on another replica from the state
the client carries, and a bad request must get an error naming the problem without disturbing the
server.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from funchat.audio_io import load_audio
from funchat.orchestrator.model_clients import AudioTokenizerClient, ServiceError, VocoderClient
from funchat.dev.tritonserver import PROJECT_ROOT
from funchat.vocoder.checkpoint import load_vocoder, pick_speaker

RNG_SEED = 1234


def run(coro):
    return asyncio.run(coro)


def synthetic_clip(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    clip = 0.3 * np.sin(2 * np.pi * (180 + 40 * seed) * t) + 0.05 * rng.standard_normal(t.size)
    return clip.astype(np.float32)


@pytest.fixture(scope="session")
def recording(example_wav) -> np.ndarray:
    assert example_wav.exists(), f"missing {example_wav} (set FUNCHAT_SHARED)"
    return load_audio(example_wav)


@pytest.fixture(scope="session")
def vocoder_in_process(tiny_checkpoint):
    return load_vocoder(tiny_checkpoint)


async def encode(url: str, audio: np.ndarray) -> np.ndarray:
    async with AudioTokenizerClient(url) as client:
        return await client.encode(audio)


def expected_rows(pipeline, audio: np.ndarray) -> np.ndarray:
    return pipeline.encode_audio(audio).float().numpy()


# ---- audio_tokenizer ----

def test_tokenizer_matches_oracle_on_recording(triton, tiny_pipeline, recording):
    got = run(encode(triton.endpoints["audio_tokenizer"], recording))
    want = expected_rows(tiny_pipeline, recording)
    assert got.dtype == np.float32 and got.shape == want.shape == (tiny_pipeline.audio_groups(len(recording)),
                                                                    tiny_pipeline.model.cfg.text.hidden_size)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_tokenizer_matches_oracle_on_short_clip(triton, tiny_pipeline):
    clip = synthetic_clip(0.73)  # 18 frames at 25 Hz -> 4 groups, the last one partial
    got = run(encode(triton.endpoints["audio_tokenizer"], clip))
    assert got.shape[0] == tiny_pipeline.audio_groups(len(clip)) == 4
    np.testing.assert_allclose(got, expected_rows(tiny_pipeline, clip), rtol=0, atol=1e-5)


def test_tokenizer_n_groups_output(triton, tiny_pipeline):
    """The raw service contract: [1, n] in, EMBEDDINGS [1, g, E] and N_GROUPS [1, 1] out."""
    clip = synthetic_clip(1.0, seed=3)

    async def call():
        async with grpcclient.InferenceServerClient(triton.endpoints["audio_tokenizer"]) as client:
            inp = grpcclient.InferInput("AUDIO", [1, clip.size], "FP32")
            inp.set_data_from_numpy(clip[None])
            return await client.infer("audio_tokenizer", [inp])

    result = run(call())
    g = tiny_pipeline.audio_groups(clip.size)
    assert result.as_numpy("EMBEDDINGS").shape == (1, g, tiny_pipeline.model.cfg.text.hidden_size)
    assert result.as_numpy("N_GROUPS").tolist() == [[g]]


def test_tokenizer_concurrent_requests(triton, tiny_pipeline, recording):
    clips = [synthetic_clip(s, seed=i) for i, s in enumerate([0.3, 1.1, 2.05, 0.04, 3.3, 0.9])] + [recording[:40000]]

    async def many():
        async with AudioTokenizerClient(triton.endpoints["audio_tokenizer"]) as client:
            return await asyncio.gather(*(client.encode(c) for c in clips))

    for clip, got in zip(clips, run(many())):
        np.testing.assert_allclose(got, expected_rows(tiny_pipeline, clip), rtol=0, atol=1e-5)


def test_tokenizer_windows_of_a_turn_being_spoken_add_up_to_the_whole_turn(triton, tiny_pipeline, recording):
    """The orchestrator's protocol through the service: each window as it completes (concurrently,
    batched together), then the rest of the turn: its rows and the whole turn's log-mel max."""
    from funchat.encoder_windows import EncoderWindows

    geometry = EncoderWindows(tiny_pipeline.model.cfg.audio.n_window, tiny_pipeline.model.cfg.audio.group_size)
    turn = np.tile(recording, 2)[:16000 * 11]  # 5 whole windows ready before the end

    async def go():
        async with AudioTokenizerClient(triton.endpoints["audio_tokenizer"]) as client:
            ready = geometry.ready(len(turn))
            # every window floored at the turn's max (its second window holds it): none is stale
            firsts = await asyncio.gather(*(client.encode_window(turn[slice(*geometry.segment(w))], w, -np.inf)
                                            for w in range(ready)))
            top = max(t for _, t, _ in firsts)
            held = await asyncio.gather(*(client.encode_window(turn[slice(*geometry.segment(w))], w, top)
                                          for w in range(ready)))
            rest, turn_top = await client.encode_rest(turn[geometry.segment(ready)[0]:], ready, top)
            return ready, top, [r for r, _, _ in held], rest, turn_top

    ready, top, held, rest, turn_top = run(go())
    want = expected_rows(tiny_pipeline, turn)
    assert ready == 5 and all(r.shape == (geometry.groups, want.shape[1]) for r in held)
    assert turn_top == top  # the whole turn's max is the held windows'
    np.testing.assert_allclose(np.concatenate(held + [rest]), want, rtol=0, atol=1e-5)


def test_tokenizer_bad_request_fails_alone_in_a_batch(triton, tiny_pipeline):
    """Bad clips sent together with good ones (dynamically batched): only the bad ones fail."""
    clips = [synthetic_clip(0.8, seed=1), np.full(3200, np.nan, np.float32), synthetic_clip(1.5, seed=2),
             np.zeros(0, np.float32), synthetic_clip(0.2, seed=3)]

    async def many():
        async with AudioTokenizerClient(triton.endpoints["audio_tokenizer"]) as client:
            return await asyncio.gather(*(client.encode(c) for c in clips), return_exceptions=True)

    results = run(many())
    assert isinstance(results[1], ServiceError) and "no finite samples" in results[1].message
    assert isinstance(results[3], ServiceError) and "AUDIO is empty" in results[3].message
    for i in (0, 2, 4):
        np.testing.assert_allclose(results[i], expected_rows(tiny_pipeline, clips[i]), rtol=0, atol=1e-5)


# ---- vocoder ----

def stream_tokens(n: int = 70, seed: int = RNG_SEED) -> list[int]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 6561, n).tolist()
    tokens[5], tokens[31] = 6561, 6562  # speech specials: dropped and counted
    return tokens


CHUNKS = [7, 13, 0, 25, 1, 20]  # pushes: sizes of the pieces; the last push (the rest) is final


def pieces(tokens: list[int]) -> list[list[int]]:
    out, at = [], 0
    for n in CHUNKS:
        out.append(tokens[at:at + n])
        at += n
    return out + [tokens[at:]]


def in_process_stream(vocoder_in_process, tokens, mode, speaker):
    model, speakers = vocoder_in_process
    state = model.start(pick_speaker(speakers, speaker), mode)
    calls = []
    parts = pieces(tokens)
    for i, part in enumerate(parts):
        chunks = model.push(state, part, final=i == len(parts) - 1)
        calls.append(torch.cat(chunks).numpy() if chunks else np.zeros(0, np.float32))
    return calls, state.dropped_codes


async def service_stream(urls: list[str], tokens, mode, speaker):
    """Push the pieces, call i to urls[i % len(urls)], the state carried by the caller."""
    clients = [VocoderClient(u) for u in urls]
    calls, state, dropped = [], None, 0
    try:
        parts = pieces(tokens)
        for i, part in enumerate(parts):
            audio, state, dropped, _ = await clients[i % len(clients)].push(
                part, state, final=i == len(parts) - 1, speaker=speaker if state is None else None,
                mode=mode if state is None else None)
            calls.append(audio)
    finally:
        for c in clients:
            await c.close()
    return calls, state, dropped


def test_vocoder_says_how_many_codes_its_next_chunk_wants(triton):
    """WANTS: the codes a stream needs before its next chunk (first: 15 + 3 look-ahead, then 15)."""

    async def go():
        async with VocoderClient(triton.endpoints["vocoder"]) as client:
            client.first_chunk_codes = 0
            first = await client.push(list(range(5)), None, final=False)
            learned = client.first_chunk_codes
            second = await client.push(list(range(5, 18)), first.state, final=False)
            third = await client.push(list(range(18, 30)), second.state, final=False)
            last = await client.push([], third.state, final=True)
            return first, learned, second, third, last

    first, learned, second, third, last = run(go())
    assert (first.audio.size, first.wants, learned) == (0, 13, 18)  # too few: stored, 13 more wanted
    assert second.audio.size > 0 and second.wants == 15  # the first chunk; a hop of 15 for the next
    assert third.audio.size == 0 and third.wants == 3
    assert last.wants == 0 and (second.audio.size + last.audio.size) == 30 * 960


def assert_same_calls(got, want):
    assert [len(a) for a in got] == [len(a) for a in want]
    for i, (g, w) in enumerate(zip(got, want)):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-6, err_msg=f"push {i}")


@pytest.mark.parametrize("mode", ["incremental", "reference"])
def test_vocoder_stream_matches_in_process(triton, vocoder_in_process, mode):
    tokens = stream_tokens()
    want, want_dropped = in_process_stream(vocoder_in_process, tokens, mode, "speaker1")
    got, state, dropped = run(service_stream([triton.endpoints["vocoder"]], tokens, mode, "speaker1"))
    assert_same_calls(got, want)
    assert dropped == want_dropped == 2
    assert sum(len(a) for a in got) == 960 * (len(tokens) - 2)
    assert state  # the finished state still comes back


@pytest.mark.parametrize("mode", ["incremental", "reference"])
def test_vocoder_stream_continues_on_another_replica(triton, triton_vocoder2, vocoder_in_process, mode):
    tokens = stream_tokens(seed=RNG_SEED + 1)
    want, _ = in_process_stream(vocoder_in_process, tokens, mode, "default")
    urls = [triton.endpoints["vocoder"], triton_vocoder2.endpoints["vocoder"]]
    assert urls[0] != urls[1]
    got, _, _ = run(service_stream(urls, tokens, mode, None))  # alternate replicas on every push
    assert_same_calls(got, want)


def test_vocoder_concurrent_streams(triton, triton_vocoder2, vocoder_in_process):
    streams = [stream_tokens(40 + 9 * i, seed=i) for i in range(4)]
    urls = [triton.endpoints["vocoder"], triton_vocoder2.endpoints["vocoder"]]

    async def all_streams():
        return await asyncio.gather(*(service_stream(urls[i % 2:] + urls[:i % 2], t, "incremental", "speaker1")
                                      for i, t in enumerate(streams)))

    for tokens, (got, _, _) in zip(streams, run(all_streams())):
        assert_same_calls(got, in_process_stream(vocoder_in_process, tokens, "incremental", "speaker1")[0])


def batch_counts(cluster, model: str) -> tuple[float, float]:
    """(executes, executes that ran one request) of funchat_<model>_batch_size, from the metrics port."""
    text = urllib.request.urlopen(f"http://{cluster.metrics_endpoints[model]}/metrics", timeout=10).read().decode()
    lines = text.splitlines()
    total = next(l for l in lines if l.startswith(f"funchat_{model}_batch_size_count"))
    single = next(l for l in lines if l.startswith(f"funchat_{model}_batch_size_bucket") and 'le="1"' in l)
    return float(total.split()[-1]), float(single.split()[-1])


def test_vocoder_pushes_that_wait_together_run_as_one_batch(triton, vocoder_in_process):
    """Pushes of 6 calls queued behind a long push run in one execute (the dynamic batcher), and
    each call gets the samples it gets alone (to the float32 rounding of a batched forward)."""
    url = triton.endpoints["vocoder"]
    streams = [stream_tokens(33 + 4 * i, seed=50 + i) for i in range(6)]
    executes_before, singles_before = batch_counts(triton, "vocoder")

    async def main():
        async with VocoderClient(url) as slow, VocoderClient(url) as client:
            busy = asyncio.create_task(slow.push(list(range(1, 200)), None, True))
            await asyncio.sleep(0.3)  # the long push is running: the next pushes queue behind it
            results = await asyncio.gather(*(client.push(t, None, final=True, speaker="speaker1") for t in streams))
            await busy
            return results

    results = run(main())
    executes, singles = batch_counts(triton, "vocoder")
    assert executes - executes_before < 7 and executes - executes_before - (singles - singles_before) >= 1
    model, speakers = vocoder_in_process
    for tokens, (audio, _, dropped, wants) in zip(streams, results):
        want = torch.cat(model.push(model.start(pick_speaker(speakers, "speaker1")), tokens, final=True)).numpy()
        assert audio.shape == want.shape and dropped == 2 and wants == 0
        np.testing.assert_allclose(audio, want, rtol=0, atol=5e-4)


def cancelled_count(cluster, model: str) -> float:
    """funchat_<model>_cancelled_requests_total, read from the server's metrics port."""
    text = urllib.request.urlopen(f"http://{cluster.metrics_endpoints[model]}/metrics", timeout=10).read().decode()
    line = next(l for l in text.splitlines() if l.startswith(f"funchat_{model}_cancelled_requests_total"))
    return float(line.split()[-1])


def counter_reaches(read, want: float, within_s: float = 10.0) -> float:
    """Poll `read()` until it reaches `want` or `within_s` passes; its last value (then settled)."""
    deadline = time.monotonic() + within_s
    value = read()
    while value < want and time.monotonic() < deadline:
        time.sleep(0.1)
        value = read()
    time.sleep(0.3)  # anything past `want` would show now
    return read()


def test_vocoder_requests_whose_deadline_passed_in_the_queue_are_not_run(triton):
    """A request that waited past its caller's deadline (the vocoder busy with a long push) is answered
    CANCELLED without running: under overload the queue drains instead of running abandoned work."""
    url = triton.endpoints["vocoder"]
    long_push = list(range(1, 400))  # seconds of work for the one vocoder instance
    before = cancelled_count(triton, "vocoder")

    async def main():
        async with VocoderClient(url) as slow, VocoderClient(url, timeout_s=0.2) as impatient:
            busy = asyncio.create_task(slow.push(long_push, None, True))
            await asyncio.sleep(0.3)  # the long push is running
            refused = []
            for _ in range(2):
                with pytest.raises(ServiceError) as info:
                    await impatient.push(long_push, None, True)
                refused.append(info.value.status)
            audio = (await busy).audio
            return refused, audio

    refused, audio = run(main())
    assert refused == ["StatusCode.DEADLINE_EXCEEDED"] * 2 and audio.size == 960 * len(long_push)
    # The queued requests are answered after the long push's reply has gone out, so the counter may
    # lag that reply by a moment: wait for it, then check that it counted exactly these two.
    assert counter_reaches(lambda: cancelled_count(triton, "vocoder") - before, 2) == 2
    assert push_once_ok(url)  # and the service still answers


def push_once_ok(url: str) -> bool:
    audio = run(push_once(url, [1, 2, 3], None, True)).audio
    return audio.size == 960 * 3


# ---- bad inputs: an error naming the problem, then the server still answers ----

async def raw_infer(url: str, model: str, inputs: list[tuple[str, np.ndarray, str]]):
    async with grpcclient.InferenceServerClient(url) as client:
        tensors = []
        for name, array, dtype in inputs:
            t = grpcclient.InferInput(name, list(array.shape), dtype)
            t.set_data_from_numpy(array)
            tensors.append(t)
        try:
            await client.infer(model, tensors)
        except InferenceServerException as exc:
            return ServiceError(model, str(exc.status()), str(exc.message()))
    return None


async def push_once(url: str, *args, **kwargs):
    async with VocoderClient(url) as client:
        return await client.push(*args, **kwargs)


async def finished_state(url: str) -> bytes:
    async with VocoderClient(url) as client:
        return (await client.push([1, 2, 3], None, final=True))[1]


TOKENIZER_BAD = {
    "empty": (lambda url: encode(url, np.zeros(0, np.float32)), "AUDIO is empty (0 samples)"),
    "nan": (lambda url: encode(url, np.array([0.1, np.nan] * 4000, np.float32)),
            "AUDIO has non-finite samples: 4000 NaN and 0 inf out of 8000"),
    "inf only": (lambda url: encode(url, np.full(2000, np.inf, np.float32)), "no finite samples"),
    "too short": (lambda url: encode(url, np.zeros(500, np.float32)), "AUDIO is too short"),
    "too long": (lambda url: encode(url, np.zeros(16000 * 410, np.float32)),
                 "takes 2050 LLM positions, more than the 2048-token context"),
    "wrong dtype": (lambda url: encode(url, np.zeros(16000, np.float64)), "'AUDIO' data-type is 'FP64'"),
    "int16 pcm": (lambda url: encode(url, np.zeros(16000, np.int16)), "'AUDIO' data-type is 'INT16'"),
    "missing input": (lambda url: raw_infer(url, "audio_tokenizer", []), "missing required input(s) ['AUDIO']"),
    "two clips in one request": (lambda url: raw_infer(url, "audio_tokenizer",
                                                       [("AUDIO", np.zeros((2, 16000), np.float32), "FP32")]),
                                 "send one clip per request"),
    "wrong rank": (lambda url: raw_infer(url, "audio_tokenizer", [("AUDIO", np.zeros((1, 2, 800), np.float32), "FP32")]),
                   "unexpected shape for input 'AUDIO'"),
    "window of the wrong length": (lambda url: encode_window(url, np.full(32000, 0.1, np.float32), 1),
                                   "AUDIO has 32000 samples; window 1 reads 32240"),
    "windows beyond the turn": (lambda url: encode_rest(url, np.full(100, 0.1, np.float32), 3, 1.0),
                                "ENCODED is 3, but a turn of 95900 samples (AUDIO: its 100 from sample 95800 on) "
                                "has 2 whole windows"),
}


async def encode_window(url: str, segment: np.ndarray, window: int):
    async with AudioTokenizerClient(url) as client:
        return await client.encode_window(segment, window, -np.inf)


async def encode_rest(url: str, audio: np.ndarray, encoded: int, top: float):
    async with AudioTokenizerClient(url) as client:
        return await client.encode_rest(audio, encoded, top)


@pytest.mark.parametrize("case", list(TOKENIZER_BAD))
def test_tokenizer_bad_input(triton, tiny_pipeline, case):
    url = triton.endpoints["audio_tokenizer"]
    call, expected = TOKENIZER_BAD[case]

    async def go():
        try:
            result = await call(url)
        except ServiceError as exc:
            result = exc
        assert isinstance(result, ServiceError), f"{case}: no error"
        assert result.model == "audio_tokenizer" and "INVALID_ARGUMENT" in result.status, result
        assert expected in result.message, result.message
        async with AudioTokenizerClient(url) as client:  # still serving
            assert await client.ready()
            clip = synthetic_clip(0.5, seed=7)
            np.testing.assert_allclose(await client.encode(clip), expected_rows(tiny_pipeline, clip), atol=1e-5)

    run(go())
    assert triton.alive("audio_tokenizer")


VOCODER_BAD = {
    "bad state bytes": (lambda url, st: push_once(url, [1, 2], b"not a state", False),
                        "STATE (11 bytes) is not a vocoder stream state"),
    "truncated state": (lambda url, st: push_once(url, [1, 2], st[: len(st) // 2], False),
                        "is not a vocoder stream state"),
    "unknown speaker": (lambda url, st: push_once(url, [1, 2], None, False, speaker="nobody"),
                        "unknown speaker 'nobody': choose one of default, speaker1"),
    "unknown mode": (lambda url, st: push_once(url, [1, 2], None, False, mode="fast"),
                     "MODE 'fast' is unknown"),
    "push after final": (lambda url, st: push_once(url, [1, 2], st, False), "already finished"),
    "too many tokens": (lambda url, st: push_once(url, np.zeros(7501, np.int64), None, False),
                        "7501 speech tokens exceed the incremental vocoder's maximum of 7500"),
    "wrong token dtype": (lambda url, st: raw_infer(url, "vocoder", [("TOKENS", np.zeros((1, 3), np.float32), "FP32"),
                                                                     ("FINAL", np.array([[False]]), "BOOL")]),
                          "'TOKENS' data-type is 'FP32'"),
    "missing FINAL": (lambda url, st: raw_infer(url, "vocoder", [("TOKENS", np.zeros((1, 3), np.int64), "INT64")]),
                      "FINAL"),
}


@pytest.mark.parametrize("case", list(VOCODER_BAD))
def test_vocoder_bad_input(triton, vocoder_in_process, case):
    url = triton.endpoints["vocoder"]
    call, expected = VOCODER_BAD[case]

    async def go():
        state = await finished_state(url)
        try:
            result = await call(url, state)
        except ServiceError as exc:
            result = exc
        assert isinstance(result, ServiceError), f"{case}: no error"
        assert result.model == "vocoder" and "INVALID_ARGUMENT" in result.status, result
        assert expected in result.message, result.message
        async with VocoderClient(url) as client:  # still serving
            assert await client.ready()
            audio = (await client.push(list(range(30)), None, final=True)).audio
            assert audio.shape == (30 * 960,) and np.isfinite(audio).all()

    run(go())
    assert triton.alive("vocoder")


# ---- the command line: up / status / down ----

def test_cli_up_down(tiny_checkpoint, tmp_path):
    run_dir = tmp_path / "run"
    cli = [sys.executable, "-m", "funchat.dev.tritonserver"]
    up = subprocess.run(cli + ["up", "--models", "vocoder", "--run-dir", str(run_dir), "--checkpoint",
                               str(tiny_checkpoint), "--param", "vocoder.threads=1", "--timeout", "120"],
                        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=180)
    assert up.returncode == 0, up.stdout + up.stderr
    endpoints = json.loads((run_dir / "endpoints.json").read_text())
    pids = json.loads((run_dir / "triton" / "pids.json").read_text())
    servers = json.loads((run_dir / "triton" / "servers.json").read_text())
    try:
        assert set(endpoints) == set(pids) == {"vocoder"}
        assert endpoints["vocoder"].startswith("127.0.0.1:")
        assert set(servers["vocoder"]) >= {"grpc", "http", "metrics", "pid", "log"}

        async def check():
            async with VocoderClient(endpoints["vocoder"]) as client:
                assert await client.ready()
                return await client.push(list(range(20)), None, final=True)

        assert run(check())[0].shape == (20 * 960,)
        again = subprocess.run(cli + ["up", "--models", "vocoder", "--run-dir", str(run_dir)], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=60)
        assert again.returncode == 1 and "already running" in again.stderr
        status = subprocess.run(cli + ["status", "--run-dir", str(run_dir)], cwd=PROJECT_ROOT,
                                capture_output=True, text=True, timeout=60)
        assert "vocoder" in status.stdout and "ready" in status.stdout
    finally:
        down = subprocess.run(cli + ["down", "--run-dir", str(run_dir)], cwd=PROJECT_ROOT,
                              capture_output=True, text=True, timeout=60)
    assert down.returncode == 0 and "stopped" in down.stdout, down.stdout + down.stderr
    assert not (run_dir / "triton" / "pids.json").exists() and not (run_dir / "endpoints.json").exists()
    assert not is_tritonserver(pids["vocoder"])


def is_tritonserver(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"tritonserver" in f.read()
    except OSError:
        return False


def test_load_failure_is_reported(tmp_path):
    """A model that cannot load: start_servers fails at once with the model's error and the log tail."""
    from funchat.dev.tritonserver import TritonServerError, start_servers

    with pytest.raises(TritonServerError) as info:
        start_servers(["vocoder"], run_dir=tmp_path, params={"vocoder": {"checkpoint": str(tmp_path / "nowhere")}},
                      timeout=60)
    message = str(info.value)
    assert "model vocoder failed to load" in message and "nowhere" in message
    assert not (tmp_path / "endpoints.json").exists()


def test_gpu_config_variants_parse_and_select_gpu(tmp_path):
    """The GPU variants (configs/gpu.pbtxt) are valid model configs for KIND_GPU, CUDA and bf16; the
    launcher uses them with config_name="gpu". (Loading them needs a GPU: not available here.)"""
    from funchat.dev.tritonserver import DEFAULT_REPO, prepare_model_repo
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    for model in ("audio_tokenizer", "llm", "refined_head", "vocoder"):
        out = prepare_model_repo(model, DEFAULT_REPO, tmp_path, {}, config_name="gpu")
        config = text_format.Parse((out / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert config.name == model
        assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]
        assert config.parameters["device"].string_value == "cuda"
        assert config.parameters["dtype"].string_value == "bfloat16"
        cpu = text_format.Parse((DEFAULT_REPO / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert [i.name for i in config.input] == [i.name for i in cpu.input]
        assert [o.name for o in config.output] == [o.name for o in cpu.output]


def test_stateless_services_export_metrics(triton):
    import urllib.request

    for service, kind in (("audio_tokenizer", "encode"), ("vocoder", "chunk")):
        text = urllib.request.urlopen(f"http://{triton.metrics_endpoints[service]}/metrics", timeout=10).read().decode()
        assert f'funchat_{service}_forward_seconds_count{{kind="{kind}"}}' in text
        assert f"funchat_{service}_batch_size_count" in text
