"""The model services under Triton (issue [3]).

- `tritonserver`: find the `tritonserver` binary and Python backend shipped in the pytriton wheel,
  start one server per model service on its own 127.0.0.1 ports (`start_servers`, and the
  `python -m funchat.dev.tritonserver up|down` CLI), wait for readiness, stop them.
- `clients`: typed async gRPC clients of the stateless services (`AudioTokenizerClient`,
  `VocoderClient`), Triton errors mapped to `ServiceError`.
- `sequences`: per-call KV-cache slots of the stateful services (`llm`, `refined_head`).

The services themselves are `model_repository/<name>/config.pbtxt` + a thin `1/model.py` that
imports this package.
"""
