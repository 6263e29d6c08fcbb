"""The orchestrator: the public gRPC API (Converse, Respond, sessions) as a Ray Serve application.

Only what runs in the Ray Serve replica (dev tooling is in `funchat.dev`, benchmarks in
`funchat.benchmarks`). No torch and no model code: the models are reached through the Triton
clients. Modules, along a request's path:

    app            the process: Ray Serve deployment, `app_builder` for Serve's config, `main()`
    settings       OrchestratorSettings (FUNCHAT_* environment), built once, passed down
    service        FunchatService: admission, sessions, Respond, Converse, GetSession, DeleteSession
    call_config    the caller's SessionConfig checked into a CallConfig
    errors         ApiError (a gRPC status and what to fix), store errors as statuses
    outbox         the events a call will send, in order
    converse       one Converse call: a handler per client event kind, barge-in
    exchange       one turn and its reply, run and stored in the session
    audio_input    caller audio decoding; vad: Silero VAD and turn detection
    audio_output   reply audio in the call's output format (resampled per reply, G.711 for telephony)
    sessions       the Redis session store and resume tokens
    turn_runner    one assistant turn through the model services; model_clients: their clients
    metrics        the Prometheus metrics, and the /metrics endpoint shared by a pod's replicas
"""
