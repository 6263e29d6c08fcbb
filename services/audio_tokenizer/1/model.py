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
        self.metrics = ServiceMetrics(pb_utils, "audio_tokenizer", kinds=("encode", "window"), stateful=False)
        pb_utils.Logger.log_info(f"audio_tokenizer: {params.checkpoint} on {params.device}")

    def execute(self, requests):
        return self.io.answer_batch(
            requests, parse=self._parse, run=self.engine.encode, outputs=self._outputs, metrics=self.metrics,
            kind=lambda items: "window" if all(i.window is not None for i in items) else "encode")

    def _parse(self, request):
        window = self.io.scalar(request, "WINDOW")
        return self.engine.check(self.io.required(request, "AUDIO"), window=None if window is None else int(window),
                                 top=self.io.scalar(request, "TOP"), encoded=int(self.io.scalar(request, "ENCODED", 0)))

    @staticmethod
    def _outputs(request, out):  # out.rows [g, E] float32
        return {"EMBEDDINGS": out.rows[None], "N_GROUPS": np.array([[out.rows.shape[0]]], dtype=np.int64),
                "FIRST_WINDOW": np.array([[out.first_window]], dtype=np.int64),
                "MEL_MAX": np.array([[out.top]], dtype=np.float32), "MEL_MIN": np.array([[out.low]], dtype=np.float32)}

    def finalize(self):
        self.engine = None
        stop_tracing()
