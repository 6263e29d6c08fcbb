"""Triton model `llm`: thin adapter to funchat.engines.llm.LlmEngine.

The engine (eager torch, torch with CUDA-graph steps, or TensorRT plans) follows the `engine`,
`cuda_graphs`, `max_context` and `tensorrt_plans` parameters: funchat.engines.llm_engines. Each
response carries the chosen TEXT_TOKEN, the SRH_INPUT when asked for (a speech-to-text call does
not need it), and TOP_IDS / TOP_LOGITS only when the request sets RETURN_TOP_K.
"""

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from funchat.engines.llm import LlmRequest
from funchat.engines.llm_engines import describe_engine, load_llm_engine
from funchat.engines.triton_adapter import (ServiceMetrics, ServiceParams, TritonIO, start_tracing,
                                            stop_tracing)
from funchat.model.sampling import GREEDY


def _tensor(array):
    return None if array is None else torch.from_numpy(array[0].copy())  # drop Triton's batch dimension


class TritonPythonModel:
    def initialize(self, args):
        start_tracing("llm")  # first: a bad FUNCHAT_TRACING_* setting fails the load at once
        self.engine = load_llm_engine(ServiceParams.from_args(args, "llm"))
        self.io = TritonIO(pb_utils, "llm")
        self.metrics = ServiceMetrics(pb_utils, "llm")
        pb_utils.Logger.log_info(f"llm: {describe_engine(self.engine)}")

    def execute(self, requests):
        responses = self.io.answer_batch(
            requests, self._parse, self.engine.run, self._outputs, self.metrics,
            kind=lambda batch: "prefill" if any(r.start for r in batch) else "step")
        self.metrics.set_pool(self.engine.pool)
        return responses

    def _parse(self, request) -> LlmRequest:
        io = self.io
        cid, start, end = io.sequence(request)
        sampling, seed = io.sampling(request) if start else (GREEDY, 0)
        return LlmRequest(cid, start, end, input_ids=_tensor(io.required(request, "INPUT_IDS")),
                          audio=_tensor(io.optional(request, "AUDIO_EMBEDS")),
                          speech_group=_tensor(io.optional(request, "SPEECH_GROUP")),
                          sampling=sampling, seed=seed, return_top_k=int(io.scalar(request, "RETURN_TOP_K", 0)),
                          keep_id=int(io.scalar(request, "KEEP_ID", 0)), prefix=int(io.scalar(request, "PREFIX", 0)))

    def _outputs(self, request, result):
        wanted = self.io.requested(request)  # None: the client named no outputs, so all
        outputs = {"TEXT_TOKEN": np.array([[result.token]], dtype=np.int64)}  # [1, 1]
        if wanted is None or "SRH_INPUT" in wanted:
            outputs["SRH_INPUT"] = result.srh_input.float().cpu().numpy()[None]  # [1, T, E]
        if result.top_ids is not None:
            outputs["TOP_IDS"] = result.top_ids.cpu().numpy()[None]  # [1, k]
            outputs["TOP_LOGITS"] = result.top_logits.float().cpu().numpy()[None]  # [1, k]
        return outputs

    def finalize(self):
        stop_tracing()
