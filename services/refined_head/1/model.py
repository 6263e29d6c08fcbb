"""Triton model `refined_head`: thin adapter from Triton requests to funchat.engines.sequences.SrhEngine."""

import torch
import triton_python_backend_utils as pb_utils

from funchat.model.sampling import GREEDY, SamplingParams
from funchat.engines.sequences import SrhEngine, SrhRequest
from funchat.engines.triton_batch import answer_batch
from funchat.engines.triton_metrics import ServiceMetrics
from funchat.engines.triton_params import load_engine


def _value(request, name, default):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return default if tensor is None else tensor.as_numpy().reshape(-1)[0].item()


def _sampling(request):
    if _value(request, "GREEDY", True):
        return GREEDY
    return SamplingParams(greedy=False, temperature=_value(request, "TEMPERATURE", 0.8), top_p=_value(request, "TOP_P", 0.9),
                          top_k=int(_value(request, "TOP_K", 0)),
                          repetition_penalty=_value(request, "REPETITION_PENALTY", 1.2))


class TritonPythonModel:
    def initialize(self, args):
        self.engine = load_engine(args, SrhEngine)
        self.metrics = ServiceMetrics(pb_utils, "refined_head")

    def execute(self, requests):
        parsed, responses = [], [None] * len(requests)
        for i, request in enumerate(requests):
            try:
                start = bool(_value(request, "START", 0))
                appended = pb_utils.get_input_tensor_by_name(request, "APPENDED")
                parsed.append((i, SrhRequest(
                    cid=int(_value(request, "CORRID", 0)), start=start, end=bool(_value(request, "END", 0)),
                    srh_input=torch.from_numpy(pb_utils.get_input_tensor_by_name(request, "SRH_INPUT").as_numpy()[0].copy()),
                    appended=None if appended is None else torch.from_numpy(appended.as_numpy()[0].copy()),
                    sampling=_sampling(request) if start else GREEDY, seed=int(_value(request, "SEED", 0)))))
            except Exception as exc:  # malformed request or sampling values: answer it alone
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"refined_head: bad request: {exc}",
                                                                                   pb_utils.TritonError.INVALID_ARG))
        return answer_batch(pb_utils, "refined_head", self.engine, self.metrics, parsed, responses,
                            lambda tokens: [pb_utils.Tensor("SPEECH_TOKENS", tokens.cpu().numpy()[None])])
