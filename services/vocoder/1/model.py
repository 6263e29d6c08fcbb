"""Triton model `vocoder`: thin adapter to funchat.engines.vocoder.VocoderEngine (stateless streaming:
the stream's state travels with every call; see that module). The pushes of a dynamic batch are
checked one by one (a bad one is answered alone) and run together."""

import numpy as np
import triton_python_backend_utils as pb_utils

from funchat.engines.triton_adapter import (ServiceMetrics, ServiceParams, TritonIO, start_tracing,
                                            stop_tracing)
from funchat.engines.vocoder import VocoderPush, load_vocoder_engine


class TritonPythonModel:
    def initialize(self, args):
        start_tracing("vocoder")  # first: a bad FUNCHAT_TRACING_* setting fails the load at once
        params = ServiceParams.from_args(args, "vocoder")
        self.engine = load_vocoder_engine(params)
        self.io = TritonIO(pb_utils, "vocoder")
        self.metrics = ServiceMetrics(pb_utils, "vocoder", kinds=("chunk",), stateful=False)
        pb_utils.Logger.log_info(f"vocoder: {params.checkpoint}, speakers {', '.join(sorted(self.engine.speakers))}")

    def execute(self, requests):
        # The requests of a dynamic batch are pushes of different calls: run together.
        return self.io.answer_batch(requests, parse=self._parse, run=self.engine.push_batch, outputs=self._outputs,
                                    metrics=self.metrics, kind=lambda items: "chunk")

    def _parse(self, request):
        io = self.io
        return VocoderPush(tokens=io.required(request, "TOKENS").reshape(-1), final=bool(io.scalar(request, "FINAL")),
                           state=io.raw_bytes(request, "STATE"), speaker=io.text(request, "SPEAKER"),
                           mode=io.text(request, "MODE"))

    @staticmethod
    def _outputs(request, out):  # each output with the request's batch dimension of 1
        return {"AUDIO": out.audio[None], "STATE": np.array([[out.state]], dtype=np.object_),
                "DROPPED": np.array([[out.dropped]], dtype=np.int64), "WANTS": np.array([[out.wants]], dtype=np.int64)}

    def finalize(self):
        self.engine = None
        stop_tracing()
