"""Triton model `llm`: thin adapter from Triton requests to funchat.engines.sequences.LlmEngine.

The engine (eager torch, torch with CUDA-graph steps, or TensorRT plans) follows the `engine`,
`cuda_graphs`, `max_context` and `tensorrt_plans` parameters: funchat.engines.llm_engines.
"""

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from funchat.engines.llm_engines import describe_engine
from funchat.engines.sequences import LlmRequest
from funchat.engines.triton_batch import answer_batch
from funchat.engines.triton_metrics import ServiceMetrics
from funchat.engines.triton_params import load_llm_engine


def _optional(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else torch.from_numpy(tensor.as_numpy().copy())


def _control(request, name):
    return int(pb_utils.get_input_tensor_by_name(request, name).as_numpy().reshape(-1)[0])


class TritonPythonModel:
    def initialize(self, args):
        self.engine = load_llm_engine(args)
        self.metrics = ServiceMetrics(pb_utils, "llm")
        pb_utils.Logger.log_info(f"llm: {describe_engine(self.engine)}")

    def execute(self, requests):
        parsed, responses = [], [None] * len(requests)
        for i, request in enumerate(requests):
            try:
                ids = _optional(request, "INPUT_IDS")
                audio = _optional(request, "AUDIO_EMBEDS")
                group = _optional(request, "SPEECH_GROUP")
                parsed.append((i, LlmRequest(cid=_control(request, "CORRID"), start=bool(_control(request, "START")),
                                             end=bool(_control(request, "END")), input_ids=ids[0],
                                             audio=None if audio is None else audio[0],
                                             speech_group=None if group is None else group[0])))
            except Exception as exc:  # malformed request: answer it alone
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"llm: bad request: {exc}",
                                                                                   pb_utils.TritonError.INVALID_ARG))
        return answer_batch(pb_utils, "llm", self.engine, self.metrics, parsed, responses, lambda result: [
            pb_utils.Tensor("LOGITS", result.logits.float().cpu().numpy()[None]),
            pb_utils.Tensor("SRH_INPUT", result.srh_input.float().cpu().numpy()[None].astype(np.float32)),
        ])
