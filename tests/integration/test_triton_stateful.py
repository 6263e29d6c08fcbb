"""llm and refined_head under a real tritonserver: greedy turns driven through both services equal
the in-process oracle (alone, interleaved, concurrent), seeded text and speech sampling equals the
oracle's, the llm answers one token id (top-k logits only when asked), abandoned calls are freed,
bad requests are named and the servers keep serving."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from funchat.oracle.generation import GenerationConfig
from funchat.model.sampling import GREEDY, SamplingParams
from funchat.turn.sampling import speech_seed, text_seed
from funchat.turn.schedule import Mode, TurnSchedule
from funchat.orchestrator.model_clients import LlmClient, RefinedHeadClient, ServiceError
from funchat.dev.tritonserver import start_servers

IDLE_S = 15.0  # long enough that a loaded 2-core CI machine never idles out a live call


@pytest.fixture(scope="module")
def stateful(tiny_checkpoint, tmp_path_factory):
    params = {"*": {"checkpoint": str(tiny_checkpoint), "idle_timeout_s": str(IDLE_S), "max_sequences": "8"}}
    cluster = start_servers(models=["llm", "refined_head"], run_dir=tmp_path_factory.mktemp("triton-stateful"),
                            params=params, timeout=120)
    try:
        yield cluster
    finally:
        cluster.stop()


async def _turn(cluster, pipeline, call_id, audio, persona=None, max_new=16, sampling=None, seed=0,
                text_sampling=GREEDY, mode=Mode.S2S):
    """One turn through the services; each gets its stream of the turn seed, as the oracle."""
    llm, srh = LlmClient(cluster.endpoints["llm"]), RefinedHeadClient(cluster.endpoints["refined_head"])
    speech = mode is Mode.S2S
    try:
        ids = pipeline.prompts.ids(mode.value, persona, None, [], pipeline.audio_groups(len(audio)))
        sched = TurnSchedule(pipeline.token_ids, mode, max_new, prompt_last_token=ids[-1])
        token, h = await llm.prefill(call_id, ids, pipeline.encode_audio(audio).numpy(), sampling=text_sampling,
                                     seed=text_seed(seed), srh_input=speech)
        kw = {} if sampling is None else dict(greedy=False, temperature=sampling.temperature, top_p=sampling.top_p,
                                              top_k=sampling.top_k, repetition_penalty=sampling.repetition_penalty,
                                              seed=speech_seed(seed))
        group = await srh.run(call_id, h, start=True, **kw) if speech else None
        out = sched.observe(token, None if group is None else group.tolist())
        while not sched.finished:
            nxt = sched.next_input
            token, h = await llm.step(call_id, nxt.text_token, nxt.speech_group, srh_input=speech)
            assert (h is not None) == speech  # a speech-to-text turn does not receive the SRH input
            group = await srh.run(call_id, h, appended=out.speech_group) if speech else None
            out = sched.observe(token, None if group is None else group.tolist())
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
            with pytest.raises(ServiceError, match="unknown or ended sequence 301") as info:
                await llm.step(301, 4)
            assert info.value.status == "StatusCode.NOT_FOUND"
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
            token, h = await llm.step(404, 7, end=True)  # the good call goes on
            assert 0 <= token < 1024 and h.shape == (1, 64)
        finally:
            await llm.close()
            await srh.close()

    asyncio.run(main())


TEXT_SAMPLING = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, repetition_penalty=1.3)


@pytest.mark.parametrize("mode", [Mode.S2T, Mode.S2S])
def test_seeded_text_sampling_in_the_llm_service_equals_the_oracle(stateful, tiny_pipeline, speech, mode):
    """The llm service draws the text tokens with the call's text_seed stream (repetition penalty
    included), the refined_head the speech tokens with speech_seed: the oracle's turn for that seed."""
    speech_params = SamplingParams(temperature=0.8, top_p=0.9, repetition_penalty=1.2)
    call = 601 if mode is Mode.S2T else 602
    sched = asyncio.run(_turn(stateful, tiny_pipeline, call, speech[:30000], sampling=speech_params, seed=7,
                              text_sampling=TEXT_SAMPLING, mode=mode))
    ref = tiny_pipeline.respond(speech[:30000], mode=mode, gen=GenerationConfig(
        mode=mode, max_new_tokens=16, text=TEXT_SAMPLING, speech=speech_params, seed=7))
    greedy = tiny_pipeline.respond(speech[:30000], mode=mode, gen=GenerationConfig.greedy(mode, 16))
    assert sched.text_tokens == ref.text_tokens and sched.speech_tokens == ref.speech_tokens
    assert sched.text_tokens != greedy.text_tokens  # the draws did happen


async def _raw_llm(endpoint, call_id, ids, start, end=False, inputs=(), outputs=None):
    """One llm request with tritonclient itself: extra inputs [(name, array, dtype)], outputs to
    request (None: all). A refusal is raised as the typed clients raise it (ServiceError)."""
    async with grpcclient.InferenceServerClient(endpoint) as client:
        tensors = []
        for name, array, dtype in [("INPUT_IDS", np.array([ids], np.int64), "INT64"), *inputs]:
            tensor = grpcclient.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        requested = None if outputs is None else [grpcclient.InferRequestedOutput(n) for n in outputs]
        try:
            return await client.infer("llm", tensors, outputs=requested, sequence_id=call_id,
                                      sequence_start=start, sequence_end=end)
        except InferenceServerException as exc:
            raise ServiceError("llm", str(exc.status()), str(exc.message())) from None


def test_the_llm_answers_one_token_and_top_k_logits_only_when_asked(stateful, tiny_pipeline):
    endpoint = stateful.endpoints["llm"]
    ids = [1, 2, 3, 4]
    model = tiny_pipeline.model
    with torch.inference_mode():
        logits = model.llm_forward(model.embed_prompt(torch.tensor([ids]), []), model.new_llm_cache(1, 8))[1][0]

    async def main():
        plain = await _raw_llm(endpoint, 701, ids, True)  # no outputs named: all it produced
        names = {o.name for o in plain.get_response().outputs}
        top_k = ("RETURN_TOP_K", np.array([[5]], np.int32), "INT32")
        asked = await _raw_llm(endpoint, 702, ids, True, inputs=[top_k])
        only_token = await _raw_llm(endpoint, 703, ids, True, outputs=["TEXT_TOKEN"])
        step = await _raw_llm(endpoint, 702, [int(asked.as_numpy("TEXT_TOKEN")[0, 0])], False, end=True,
                              inputs=[("RETURN_TOP_K", np.array([[3]], np.int32), "INT32")],
                              outputs=["TEXT_TOKEN", "TOP_IDS", "TOP_LOGITS"])
        for call in (701, 703):
            await _raw_llm(endpoint, call, [5], False, end=True, outputs=["TEXT_TOKEN"])
        return plain, names, asked, only_token, step

    plain, names, asked, only_token, step = asyncio.run(main())
    assert names == {"TEXT_TOKEN", "SRH_INPUT"} and plain.as_numpy("TOP_IDS") is None  # no logits, no top-k
    assert plain.as_numpy("TEXT_TOKEN").tolist() == [[int(logits.argmax())]]
    top = torch.topk(logits, 5)
    assert asked.as_numpy("TOP_IDS").tolist() == [top.indices.tolist()]
    np.testing.assert_allclose(asked.as_numpy("TOP_LOGITS")[0], top.values.numpy(), atol=1e-5)
    assert {o.name for o in only_token.get_response().outputs} == {"TEXT_TOKEN"}
    assert sum(len(raw) for raw in only_token.get_response().raw_output_contents) == 8  # one int64
    assert step.as_numpy("TOP_IDS").shape == (1, 3)
    assert step.as_numpy("TOP_IDS")[0, 0] == step.as_numpy("TEXT_TOKEN")[0, 0]  # greedy: the argmax


def test_bad_sampling_values_at_start_are_named(stateful):
    async def main():
        llm = LlmClient(stateful.endpoints["llm"])
        try:
            for name, value, dtype, words in (("TEMPERATURE", 0.0, np.float32, "TEMPERATURE: temperature must be > 0"),
                                              ("TOP_P", 2.0, np.float32, "TOP_P: top_p must be in (0, 1]"),
                                              ("TOP_K", -1, np.int32, "TOP_K: top_k must be >= 0"),
                                              ("REPETITION_PENALTY", np.nan, np.float32, "REPETITION_PENALTY is nan")):
                with pytest.raises(ServiceError) as info:
                    await _raw_llm(stateful.endpoints["llm"], 801, [1, 2, 3], True, inputs=[
                        ("GREEDY", np.array([[False]]), "BOOL"),
                        (name, np.array([[value]], dtype), "INT32" if dtype is np.int32 else "FP32")])
                assert "INVALID_ARGUMENT" in info.value.status and words in info.value.message, info.value
            await llm.prefill(802, [1, 2, 3], sampling=TEXT_SAMPLING, seed=1)  # good values go on
            await llm.step(802, 4, end=True)
        finally:
            await llm.close()

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


def test_kept_rows_and_partial_chunks_through_the_services(stateful, tiny_pipeline, speech):
    """A prompt sent in two sequences (a partial chunk kept under a keep id, then the rest from it)
    gives the whole-prompt prefill's text token and speech group; the kept-prefix counters count it;
    a prefix the service does not keep is refused NOT_FOUND."""
    audio = speech[:24000]
    ids = tiny_pipeline.prompts.ids("s2s", None, None, [], tiny_pipeline.audio_groups(len(audio)))
    rows = tiny_pipeline.encode_audio(audio).numpy()
    audio_id = tiny_pipeline.prompts.special.audio
    cut = ids.index(audio_id) + 3  # the caller still speaking: the history and 3 audio positions so far

    async def main():
        llm, srh = LlmClient(stateful.endpoints["llm"]), RefinedHeadClient(stateful.endpoints["refined_head"])
        try:
            whole_token, h = await llm.prefill(601, ids, rows)
            whole_group = await srh.run(601, h, start=True)
            _, h1 = await llm.prefill(602, ids[:cut], rows[:3], end=True, keep_id=77)
            partial = await srh.run(602, h1, start=True, end=True, keep_id=77, partial=True)
            token, h2 = await llm.prefill(603, ids[cut:], rows[3:], keep_id=77, prefix=cut)
            group = await srh.run(603, h2, start=True, keep_id=77, prefix=cut)
            for cid in (601, 603):
                await llm.step(cid, token, None, end=True, srh_input=False)
                await srh.run(cid, np.zeros((1, h.shape[1]), np.float32), end=True)
            return whole_token, whole_group, partial, token, group, h2.shape[0]
        finally:
            await llm.close()
            await srh.close()

    whole_token, whole_group, partial, token, group, sent = asyncio.run(main())
    assert partial.shape == (0,) and sent == len(ids) - cut
    assert token == whole_token and group.tolist() == whole_group.tolist()
    for service in ("llm", "refined_head"):
        metrics = _scrape(stateful.metrics_endpoints[service])
        assert metrics[f'funchat_{service}_kept_prefix_events_total{{event="prefix_hits"}}'] >= 1
        assert f"funchat_{service}_kept_prefixes" in metrics
    with pytest.raises(ServiceError) as info:
        asyncio.run(_raw_llm(stateful.endpoints["llm"], 604, [1, 2], True,
                             inputs=[("KEEP_ID", np.array([[999]], np.int64), "INT64"),
                                     ("PREFIX", np.array([[5]], np.int64), "INT64")]))
    assert info.value.status == "StatusCode.NOT_FOUND" and "no kept prefix of 5 positions" in info.value.message
