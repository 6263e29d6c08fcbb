"""Everything that runs inside tritonserver: the model services' logic, independent of Triton.

One module per service, each with a `load_*_engine(params)` that builds it from the service's
config parameters:
- `audio_tokenizer`: clip checks (the prompt's positions rule), log-mel + encoder over a batch.
- `llm`: `LlmEngine`, prefills and steps of many calls batched over per-call KV-cache rows, each
  forward's text token chosen here (greedy or the call's seeded draws, as the oracle);
  `llm_engines`: its fixed-shape / CUDA-graph steps and the TensorRT plans (`engine` parameter);
  `onnx_export`: the ONNX graphs the TensorRT plans are built from.
- `refined_head`: `SrhEngine`, the Speech Refined Head's g speech tokens per LLM step, seeded draws.
- `vocoder`: `VocoderEngine`, a stateless streaming push (the stream state travels with the call).
- `slot_pool`: the per-call KV-cache rows of the two stateful services (cap, idle timeout).
- `triton_adapter`: what the Triton adapters share (parameters, reading inputs, errors with their
  status, metrics, batching), free of Triton imports: the adapters pass in `pb_utils`.
- `triton_server`: the nvidia-pytriton wheel's tritonserver and its environment, and a model folder
  copied with its parameters set for one server (the image's entry point and the local launcher).

The services are `services/<model>/config.pbtxt` (inputs, outputs and parameters documented there)
plus a thin `services/<model>/1/model.py` (parse the requests through `triton_adapter`, run the
engine, answer); `python -m funchat.dev.tritonserver` serves them from `services/`.
"""
