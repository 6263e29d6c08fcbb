"""The orchestrator's kept prefixes against the real llm and refined_head engines (in process, no
Triton): a conversation's turns answered from kept rows, with and without a prefill ahead, give
the same text and speech tokens as turns that prefill their whole prompt."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from funchat.engines.llm import LlmEngine, LlmRequest
from funchat.engines.refined_head import SrhEngine, SrhRequest
from funchat.engines.slot_pool import SequenceError
from funchat.model.checkpoint import load_model
from funchat.model.sampling import GREEDY, SamplingParams
from funchat.orchestrator.kept_prompts import KeptPrompts
from funchat.orchestrator.model_clients import ServiceError, VocoderReply
from funchat.orchestrator.sessions import HistoryTurn
from funchat.orchestrator.turn_runner import TurnRequest, TurnRunner
from funchat.turn.prompt import PromptBuilder
from funchat.turn.schedule import Mode


def raised(model: str, result):
    if isinstance(result, SequenceError):
        raise ServiceError(model, f"StatusCode.{result.status.replace('INVALID_ARG', 'INVALID_ARGUMENT')}", str(result))
    return result


class EngineLlm:
    """LlmClient's calls answered by an in-process LlmEngine."""

    def __init__(self, engine: LlmEngine):
        self.engine = engine

    async def prefill(self, call_id, ids, rows, end=False, sampling=GREEDY, seed=0, srh_input=True, keep_id=0,
                      prefix=0):
        audio = torch.from_numpy(np.asarray(rows, np.float32)) if rows is not None and len(rows) else None
        (res,) = self.engine.run([LlmRequest(call_id, True, end, torch.tensor(list(ids)), audio, sampling=sampling,
                                             seed=seed, keep_id=keep_id, prefix=prefix)])
        res = raised("llm", res)
        return res.token, res.srh_input.numpy() if srh_input else None

    async def step(self, call_id, text_token, speech_group=None, end=False, srh_input=True, keep_id=0):
        group = None if speech_group is None else torch.tensor(list(speech_group))
        (res,) = self.engine.run([LlmRequest(call_id, False, end, torch.tensor([int(text_token)]), None, group,
                                             keep_id=keep_id)])
        res = raised("llm", res)
        return res.token, res.srh_input.numpy() if srh_input else None


class EngineSrh:
    def __init__(self, engine: SrhEngine):
        self.engine = engine

    async def run(self, call_id, srh_input, start=False, end=False, appended=None, greedy=True, temperature=0.8,
                  top_p=0.9, top_k=0, repetition_penalty=1.2, seed=0, keep_id=0, prefix=0, partial=False):
        sampling = GREEDY if greedy else SamplingParams(False, temperature, top_p, top_k, repetition_penalty)
        appended = None if appended is None else torch.tensor(list(appended))
        (res,) = self.engine.run([SrhRequest(call_id, start, end, torch.from_numpy(np.asarray(srh_input, np.float32)),
                                             appended, sampling, seed, keep_id, prefix, partial)])
        return raised("refined_head", res).numpy()


class Vocoder:
    first_chunk_codes = 0  # a stream's codes are pushed as they come (no chunk size learned)

    async def push(self, tokens, state, final, speaker=None, ready_at=None):
        return VocoderReply(np.zeros(960 * len(tokens), np.float32), b"state", 0, 0)


class Services:
    def __init__(self, model):
        self.llm, self.refined_head = EngineLlm(LlmEngine(model, 8)), EngineSrh(SrhEngine(model, 8))
        self.vocoder = Vocoder()


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint)


@pytest.fixture(scope="module")
def builder(tiny_checkpoint) -> PromptBuilder:
    return PromptBuilder.from_checkpoint(tiny_checkpoint)


def answer(runner: TurnRunner, req: TurnRequest):
    async def emit(event):
        pass

    return asyncio.run(runner.run(req, emit, asyncio.Event()))


@pytest.mark.parametrize("ahead", [False, True])
def test_turns_from_kept_rows_equal_whole_prompt_turns(model, builder, ahead):
    width = builder.facts.hidden_size
    clips = [np.random.default_rng(k).normal(0, 1, (n, width)).astype(np.float32) for k, n in enumerate((4, 3, 5))]
    speech = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, repetition_penalty=1.3)
    kept = TurnRunner(builder, Services(model), KeptPrompts(builder.special.audio))
    whole = TurnRunner(builder, Services(model))
    history: list[HistoryTurn] = []
    for turn, clip in enumerate(clips):
        def request():
            return TurnRequest(response_id=f"r{turn}", mode=Mode.S2S, audio_rows=clip, n_groups=len(clip),
                               history=list(history), max_new_tokens=12, seed=turn, speech_sampling=speech,
                               conversation="s1")
        got, want = answer(kept, request()), answer(whole, request())
        assert got.text_tokens == want.text_tokens and got.speech_tokens == want.speech_tokens, turn
        assert (got.latency_ms["kept_prefix"] > 0) == (turn > 0)
        history += [HistoryTurn("user", audio_rows=clip, n_groups=len(clip)), HistoryTurn("assistant", text=got.text)]
        if ahead:
            assert asyncio.run(kept.prefill_ahead(request(), history)) > 0
