"""llm and refined_head under a real tritonserver: greedy turns driven through both services equal
the in-process oracle (alone, interleaved, concurrent), seeded SRH sampling equals the oracle's,
abandoned calls are freed, bad requests are named and the servers keep serving."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from funchat.audio_io import load_audio
from funchat.oracle.generation import GenerationConfig
from funchat.model.sampling import SamplingParams
from funchat.turn.schedule import Mode, TurnSchedule
from funchat.orchestrator.model_clients import LlmClient, RefinedHeadClient, ServiceError
from funchat.dev.tritonserver import start_servers

IDLE_S = 3.0


@pytest.fixture(scope="module")
def stateful(tiny_checkpoint, tmp_path_factory):
    params = {"*": {"checkpoint": str(tiny_checkpoint), "idle_timeout_s": str(IDLE_S), "max_sequences": "8"}}
    cluster = start_servers(models=["llm", "refined_head"], run_dir=tmp_path_factory.mktemp("triton-stateful"),
                            params=params, timeout=120)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def speech(example_wav):
    return load_audio(example_wav)


async def _turn(cluster, pipeline, call_id, audio, persona=None, max_new=16, sampling=None, seed=0):
    llm, srh = LlmClient(cluster.endpoints["llm"]), RefinedHeadClient(cluster.endpoints["refined_head"])
    try:
        ids = pipeline.prompts.ids(Mode.S2S.value, persona, None, [], pipeline.audio_groups(len(audio)))
        sched = TurnSchedule(pipeline.token_ids, Mode.S2S, max_new, prompt_last_token=ids[-1])
        logits, h = await llm.prefill(call_id, ids, pipeline.encode_audio(audio).numpy())
        kw = {} if sampling is None else dict(greedy=False, temperature=sampling.temperature, top_p=sampling.top_p,
                                              top_k=sampling.top_k, repetition_penalty=sampling.repetition_penalty, seed=seed)
        group = await srh.run(call_id, h, start=True, **kw)
        out = sched.observe(int(np.argmax(logits)), group.tolist())
        while not sched.finished:
            nxt = sched.next_input
            logits, h = await llm.step(call_id, nxt.text_token, nxt.speech_group)
            group = await srh.run(call_id, h, appended=out.speech_group)
            out = sched.observe(int(np.argmax(logits)), group.tolist())
        return sched
    finally:
        await llm.close()
        await srh.close()


def test_concurrent_greedy_turns_equal_the_oracle(stateful, tiny_pipeline, speech):
    cases = [(101, speech, None), (102, speech[:40000], "Be brief."), (103, speech[20000:90000], None)]

    async def main():
        return await asyncio.gather(*[_turn(stateful, tiny_pipeline, cid, a, p) for cid, a, p in cases])

    for (cid, audio, persona), sched in zip(cases, asyncio.run(main())):
        ref = tiny_pipeline.respond(audio, system_prompt=persona, gen=GenerationConfig.greedy(Mode.S2S, 16))
        assert sched.text_tokens == ref.text_tokens, cid
        assert sched.speech_tokens == ref.speech_tokens, cid


def test_seeded_sampled_srh_equals_the_oracle(stateful, tiny_pipeline, speech):
    params = SamplingParams(temperature=0.8, top_p=0.9, repetition_penalty=1.2)
    sched = asyncio.run(_turn(stateful, tiny_pipeline, 201, speech[:30000], sampling=params, seed=5))
    ref = tiny_pipeline.respond(speech[:30000], gen=GenerationConfig(mode=Mode.S2S, max_new_tokens=16, speech=params, seed=5))
    assert sched.text_tokens == ref.text_tokens and sched.speech_tokens == ref.speech_tokens


def test_abandoned_call_is_freed_after_the_idle_timeout(stateful):
    async def main():
        llm = LlmClient(stateful.endpoints["llm"])
        try:
            await llm.prefill(301, [1, 2, 3])
            await llm.step(301, 4)  # alive
            time.sleep(IDLE_S + 0.5)
            await llm.prefill(302, [1, 2, 3], end=False)  # any request reaps idle calls
            with pytest.raises(ServiceError, match="unknown or ended sequence 301"):
                await llm.step(301, 4)
            await llm.step(302, 5, end=True)
        finally:
            await llm.close()

    asyncio.run(main())


def test_bad_requests_are_named_and_the_servers_keep_serving(stateful, tiny_pipeline):
    async def main():
        llm, srh = LlmClient(stateful.endpoints["llm"]), RefinedHeadClient(stateful.endpoints["refined_head"])
        try:
            with pytest.raises(ServiceError, match="must specify the START flag"):
                await llm.step(401, 5)  # a step before START
            with pytest.raises(ServiceError, match="outside the text vocabulary 0..1023"):
                await llm.prefill(402, [1, 2, 5000])
            with pytest.raises(ServiceError, match=r"1 <\|AUDIO\|> positions but the audio gives 0"):
                await llm.prefill(403, [1, tiny_pipeline.model.cfg.audio_token_index])
            await llm.prefill(404, [1, 2, 3])
            with pytest.raises(ServiceError, match="SPEECH_GROUP must hold 5 ids"):
                await llm.step(404, 7, speech_group=[1, 2])
            with pytest.raises(ServiceError, match=r"SRH_INPUT must be \[positions, 64\]"):
                await srh.run(405, np.zeros((2, 3), np.float32), start=True)
            with pytest.raises(ServiceError, match="non-finite"):
                await srh.run(406, np.full((2, 64), np.nan, np.float32), start=True)
            assert await llm.ready() and await srh.ready()
            logits, h = await llm.step(404, 7, end=True)  # the good call goes on
            assert logits.shape == (1024,) and h.shape == (1, 64)
        finally:
            await llm.close()
            await srh.close()

    asyncio.run(main())


def _scrape(endpoint: str) -> dict[str, float]:
    import urllib.request

    text = urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("funchat_"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_custom_metrics_are_exported(stateful, tiny_pipeline, speech):
    asyncio.run(_turn(stateful, tiny_pipeline, 501, speech[:20000], max_new=4))
    for service in ("llm", "refined_head"):
        metrics = _scrape(stateful.metrics_endpoints[service])
        assert metrics[f'funchat_{service}_forward_seconds_count{{kind="prefill"}}'] >= 1
        assert metrics[f'funchat_{service}_forward_seconds_count{{kind="step"}}'] >= 3
        assert metrics[f"funchat_{service}_batch_size_count"] >= 4
        assert f"funchat_{service}_live_sequences" in metrics
