"""The orchestrator: the public gRPC API (Converse, Respond, sessions) as a Ray Serve application.

Modules: `settings` (configuration), `audio_input` (caller audio decoding), `vad` (Silero VAD and
turn detection), `sessions` (Redis session store and resume tokens), `turn` (one assistant turn
through the Triton model services), `service` (the gRPC methods), `serve_app` (the Ray Serve
deployment), `stack` (`make up` / `make down`).
"""
