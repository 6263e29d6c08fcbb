"""vocoder: CosyVoice 3 token2wav streamed statelessly (Triton Python backend; the work is in `funchat`).

Why stateless: the whole stream state (`funchat.vocoder.token2wav.StreamState`: tokens so far, the
bounded mel/f0/phase history HiFT needs, samples sent, speaker x-vector) is serialised with
`to_bytes()` and travels with every call: the caller sends the STATE it got back last time and
receives the updated one. So any replica can serve the next chunk (no sticky routing, replicas
scale and restart freely), and a call abandoned half-way leaks nothing on the server: there is no
per-stream slot to time out. In incremental mode the state stays small (the HiFT receptive field,
a few KB plus the token list); in reference mode it holds the whole mel history, as that path needs.

Each request is one push: `Token2Wav.push(state, TOKENS, final=FINAL)`, its chunks concatenated.
"""

from __future__ import annotations

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from funchat.errors import FunchatError
from funchat.engines.triton_metrics import ServiceMetrics
from funchat.engines.triton_params import apply_threads, model_parameters, resolve_checkpoint
from funchat.vocoder.checkpoint import load_vocoder, pick_speaker
from funchat.vocoder.token2wav import MODES, StreamState, VocoderInputError


def _error(message: str, internal: bool = False):
    code = pb_utils.TritonError.INTERNAL if internal else pb_utils.TritonError.INVALID_ARG
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


def _text(request, name: str) -> str | None:
    """An optional BYTES [1] input as text (None when absent or empty)."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    value = tensor.as_numpy().reshape(-1)
    if value.size != 1:
        raise VocoderInputError(f"{name} must hold one value, got {value.size}")
    raw = value[0]
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    except UnicodeDecodeError:
        raise VocoderInputError(f"{name} is not utf-8 text") from None
    return text or None


class TritonPythonModel:
    def initialize(self, args):
        self.metrics = ServiceMetrics(pb_utils, "vocoder", kinds=("chunk",), stateful=False)
        params = model_parameters(args)
        apply_threads(params)
        device = params.get("device") or "cpu"
        if device != "cpu":
            raise pb_utils.TritonModelException(
                f"vocoder: device {device!r} is not supported; the streaming vocoder runs on cpu")
        checkpoint = resolve_checkpoint(args, params)
        self.vocoder, self.speakers = load_vocoder(checkpoint)
        if not self.speakers:
            raise pb_utils.TritonModelException(f"vocoder: {checkpoint} has no speakers")
        pb_utils.Logger.log_info(f"vocoder: {checkpoint}, speakers {', '.join(sorted(self.speakers))}")

    def _state(self, request) -> StreamState:
        speaker = _text(request, "SPEAKER")
        if speaker is not None:
            pick_speaker(self.speakers, speaker)  # checked on every call: a typo fails at once
        mode = _text(request, "MODE")
        if mode is not None and mode not in MODES:
            raise VocoderInputError(f"MODE {mode!r} is unknown: choose incremental or reference")
        tensor = pb_utils.get_input_tensor_by_name(request, "STATE")
        raw = b""
        if tensor is not None:
            value = tensor.as_numpy().reshape(-1)
            if value.size != 1:
                raise VocoderInputError(f"STATE must hold one value, got {value.size}")
            raw = value[0] if isinstance(value[0], bytes) else bytes(value[0])
        if not raw:
            return self.vocoder.start(pick_speaker(self.speakers, speaker), mode or "incremental")
        try:
            state = StreamState.from_bytes(raw)
            if state.mode not in MODES:
                raise ValueError(f"unknown mode {state.mode!r}")
            state.xvec = self.vocoder.check_xvec(state.xvec)
        except Exception as exc:  # truncated, foreign or tampered bytes
            message = str(exc)
            raise VocoderInputError(f"STATE ({len(raw)} bytes) is not a vocoder stream state of this model: "
                                    f"{message}") from None
        if mode is not None and mode != state.mode:
            raise VocoderInputError(f"MODE {mode!r} does not match the stream's mode {state.mode!r}")
        return state

    def _push(self, request):
        tokens = pb_utils.get_input_tensor_by_name(request, "TOKENS").as_numpy().reshape(-1)
        final = pb_utils.get_input_tensor_by_name(request, "FINAL").as_numpy().reshape(-1)
        if final.size != 1:
            raise VocoderInputError(f"FINAL must hold one value, got {final.size}")
        state = self._state(request)
        chunks = self.vocoder.push(state, tokens, final=bool(final[0]))
        audio = torch.cat(chunks).numpy() if chunks else np.zeros(0, dtype=np.float32)
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("AUDIO", np.ascontiguousarray(audio, dtype=np.float32)),
            pb_utils.Tensor("STATE", np.array([state.to_bytes()], dtype=np.object_)),
            pb_utils.Tensor("DROPPED", np.array([state.dropped_codes], dtype=np.int64))])

    def execute(self, requests):
        with self.metrics.timed("chunk", len(requests)):
            return self._execute(requests)

    def _execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._push(request))
            except FunchatError as exc:
                responses.append(_error(str(exc)))
            except Exception as exc:  # a bug: fail this request, keep serving
                pb_utils.Logger.log_error(f"vocoder: {type(exc).__name__}: {exc}")
                responses.append(_error(f"vocoder failed: {type(exc).__name__}: {exc}", internal=True))
        return responses

    def finalize(self):
        self.vocoder = None
