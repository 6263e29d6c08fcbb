"""Triton model `audio_tokenizer`: thin adapter to funchat.engines.audio_tokenizer.AudioTokenizerEngine.

Each request of a dynamic batch is checked on its own (a bad clip gets an error naming the
problem), the good clips are encoded together in one encoder call.
"""

import numpy as np
import triton_python_backend_utils as pb_utils

from funchat.engines.audio_tokenizer import load_audio_tokenizer_engine
from funchat.engines.triton_adapter import (ServiceMetrics, ServiceParams, TritonIO, start_tracing,
                                            stop_tracing)


class TritonPythonModel:
    def initialize(self, args):
        start_tracing("audio_tokenizer")  # first: a bad FUNCHAT_TRACING_* setting fails the load at once
        params = ServiceParams.from_args(args, "audio_tokenizer")
        self.engine = load_audio_tokenizer_engine(params)
        self.io = TritonIO(pb_utils, "audio_tokenizer")
        self.metrics = ServiceMetrics(pb_utils, "audio_tokenizer", kinds=("encode",), stateful=False)
        pb_utils.Logger.log_info(f"audio_tokenizer: {params.checkpoint} on {params.device}")

    def execute(self, requests):
        return self.io.answer_batch(
            requests, parse=lambda request: self.engine.check(self.io.required(request, "AUDIO")),
            run=self.engine.encode, outputs=self._outputs, metrics=self.metrics, kind=lambda clips: "encode")

    @staticmethod
    def _outputs(request, rows):  # rows [g, E] float32
        return {"EMBEDDINGS": rows[None], "N_GROUPS": np.array([[rows.shape[0]]], dtype=np.int64)}

    def finalize(self):
        self.engine = None
        stop_tracing()
