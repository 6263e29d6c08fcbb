"""Triton model `vocoder`: thin adapter to funchat.engines.vocoder.VocoderEngine (stateless streaming:
the stream's state travels with every call; see that module)."""

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
        return self.io.answer_each(requests, self._push, self.metrics, "chunk")

    def _push(self, request):
        io = self.io
        out = self.engine.push(VocoderPush(
            tokens=io.required(request, "TOKENS").reshape(-1), final=bool(io.scalar(request, "FINAL")),
            state=io.raw_bytes(request, "STATE"), speaker=io.text(request, "SPEAKER"), mode=io.text(request, "MODE")))
        return {"AUDIO": out.audio, "STATE": np.array([out.state], dtype=np.object_),
                "DROPPED": np.array([out.dropped], dtype=np.int64)}

    def finalize(self):
        self.engine = None
        stop_tracing()
