"""The public API's front: a gRPC server on the public port that forwards every call to Ray
Serve's gRPC proxy, adding what that proxy lacks (Ray 2.60 binds it on all interfaces, plaintext,
without keepalive settings): TLS with optional client certificates (mTLS), certificates reloaded
from their files without a restart, and server keepalive.

Modules, in the order a call meets them: settings (FUNCHAT_* environment), server (the gRPC
server, its TLS credentials and options; `GatewayThread` for the orchestrator's process), tls (the
certificate files, re-read when they change), forward (every method forwarded as raw bytes).
`python -m funchat.gateway` runs it alone.
"""
