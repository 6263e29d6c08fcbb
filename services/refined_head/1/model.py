"""Triton model `refined_head`: thin adapter to funchat.engines.refined_head.SrhEngine."""

import torch
import triton_python_backend_utils as pb_utils

from funchat.engines.refined_head import SrhRequest, load_srh_engine
from funchat.engines.triton_adapter import (ServiceMetrics, ServiceParams, TritonIO, start_tracing,
                                            stop_tracing)
from funchat.model.sampling import GREEDY


class TritonPythonModel:
    def initialize(self, args):
        start_tracing("refined_head")  # first: a bad FUNCHAT_TRACING_* setting fails the load at once
        self.engine = load_srh_engine(ServiceParams.from_args(args, "refined_head"))
        self.io = TritonIO(pb_utils, "refined_head")
        self.metrics = ServiceMetrics(pb_utils, "refined_head")

    def execute(self, requests):
        responses = self.io.answer_batch(
            requests, self._parse, self.engine.run,
            outputs=lambda request, tokens: {"SPEECH_TOKENS": tokens.cpu().numpy()[None]},  # [1, g] ([1, 0]: PARTIAL)
            metrics=self.metrics, kind=lambda batch: "prefill" if any(r.start for r in batch) else "step")
        self.metrics.set_pool(self.engine.pool)
        return responses

    def _parse(self, request) -> SrhRequest:
        io = self.io
        cid, start, end = io.sequence(request)
        sampling, seed = io.sampling(request) if start else (GREEDY, 0)
        appended = io.optional(request, "APPENDED")
        return SrhRequest(cid, start, end, srh_input=torch.from_numpy(io.required(request, "SRH_INPUT")[0].copy()),
                          appended=None if appended is None else torch.from_numpy(appended[0].copy()),
                          sampling=sampling, seed=seed, keep_id=int(io.scalar(request, "KEEP_ID", 0)),
                          prefix=int(io.scalar(request, "PREFIX", 0)), partial=bool(io.scalar(request, "PARTIAL", False)))

    def finalize(self):
        stop_tracing()
