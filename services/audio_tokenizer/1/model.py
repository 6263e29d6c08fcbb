"""audio_tokenizer: 16 kHz clip -> 5 Hz LLM input rows (Triton Python backend; the work is in `funchat`).

Same computation as `funchat.oracle.pipeline.ReferencePipeline.encode_audio`: Whisper log-mel
(`funchat.model.mel`), then `FunAudioChat.encode_audio` (windowed encoder, mean of 5, Linear).
Stateless. Every request of a dynamic batch is checked on its own: a bad clip gets an error
response naming the problem and the others are still encoded (together, in one encoder call).
"""

from __future__ import annotations

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from funchat.audio_io import SAMPLE_RATE, validate_audio
from funchat.errors import FunchatError
from funchat.model.checkpoint import ENCODER_PREFIXES, load_model
from funchat.turn.prompt import groups_for_frames, speech_frames_for_samples
from funchat.model.mel import log_mel_spectrogram
from funchat.engines.triton_metrics import ServiceMetrics
from funchat.engines.triton_params import apply_threads, instance_device, model_parameters, resolve_checkpoint


def _error(message: str, internal: bool = False):
    code = pb_utils.TritonError.INTERNAL if internal else pb_utils.TritonError.INVALID_ARG
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


class TritonPythonModel:
    def initialize(self, args):
        self.metrics = ServiceMetrics(pb_utils, "audio_tokenizer", kinds=("encode",), stateful=False)
        params = model_parameters(args)
        apply_threads(params)
        self.device = instance_device(args, params.get("device", "cpu"))
        self.context_tokens = int(params.get("context_tokens") or 2048)
        checkpoint = resolve_checkpoint(args, params)
        # Only the encoder and the grouping adaptor are read; the LLM and the SRH stay on the meta
        # device (no memory), and `model.dtype` still reads the requested dtype.
        model = load_model(checkpoint, dtype=params.get("dtype") or "float32", device=self.device,
                           prefixes=ENCODER_PREFIXES)
        self.model = model
        self.n_mels = model.cfg.audio.num_mel_bins
        self.group_size = model.cfg.audio.group_size
        self.logger = pb_utils.Logger
        self.logger.log_info(f"audio_tokenizer: {checkpoint} on {self.device}, width {model.cfg.text.hidden_size}")

    def _check(self, request) -> np.ndarray:
        tensor = pb_utils.get_input_tensor_by_name(request, "AUDIO")
        if tensor is None:
            raise FunchatError("input AUDIO is missing")
        audio = tensor.as_numpy()
        if audio.ndim != 2 or audio.shape[0] != 1:
            raise FunchatError(f"AUDIO has shape {list(audio.shape)}: send one clip per request, shape [1, n]")
        audio = validate_audio(audio[0], SAMPLE_RATE, source="AUDIO")
        groups = groups_for_frames(speech_frames_for_samples(len(audio), SAMPLE_RATE), self.group_size)
        if groups < 1:
            raise FunchatError(f"AUDIO is too short: {len(audio) / SAMPLE_RATE * 1000:.1f} ms ({len(audio)} samples); "
                               f"at least 40 ms (640 samples, one 25 Hz frame) is needed")
        if groups >= self.context_tokens:
            raise FunchatError(f"AUDIO is too long: {len(audio) / SAMPLE_RATE:.1f} s takes {groups} LLM positions, "
                               f"more than the {self.context_tokens}-token context")
        return audio

    def execute(self, requests):
        with self.metrics.timed("encode", len(requests)):
            return self._execute(requests)

    def _execute(self, requests):
        responses: list = [None] * len(requests)
        clips, where = [], []
        for i, request in enumerate(requests):
            try:
                clips.append(self._check(request))
                where.append(i)
            except FunchatError as exc:
                responses[i] = _error(str(exc))
        if clips:
            try:
                with torch.inference_mode():
                    mels = [log_mel_spectrogram(c, n_mels=self.n_mels).to(self.device) for c in clips]
                    frames = [speech_frames_for_samples(len(c), SAMPLE_RATE) for c in clips]
                    rows = self.model.encode_audio(mels, frames)
                for i, r in zip(where, rows):
                    emb = r.float().cpu().numpy()[None]  # [1, g, E]
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[
                        pb_utils.Tensor("EMBEDDINGS", np.ascontiguousarray(emb, dtype=np.float32)),
                        pb_utils.Tensor("N_GROUPS", np.array([[emb.shape[1]]], dtype=np.int64))])
            except Exception as exc:  # a bug or the device: fail these requests, keep serving
                self.logger.log_error(f"audio_tokenizer: {type(exc).__name__}: {exc}")
                for i in where:
                    responses[i] = _error(f"audio_tokenizer failed: {type(exc).__name__}: {exc}", internal=True)
        return responses

    def finalize(self):
        self.model = None
