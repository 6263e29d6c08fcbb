"""The orchestrator as a Ray Serve application with Ray Serve's gRPC ingress.

Ray Serve's gRPC proxy serves `funchat.v1.Funchat` (Converse is bidirectional streaming through
`ray.serve.grpc_util.gRPCInputStream`, verified on Ray 2.60), the standard `grpc.health.v1.Health`
service and server reflection. With a single application deployed, clients need no
`application` metadata. Each replica is a `FunchatService`; replicas share nothing but Redis
(sessions) and the resume-token key, so a call resumes on any replica.

Run in the foreground (what `make up` starts in the background):

    python -m funchat.orchestrator.app [--grpc-port 50051] [--replicas 1]

It serves until SIGTERM / SIGINT, then shuts Serve and Ray down.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading

from ray import serve
from ray.serve.config import gRPCOptions

from funchat.orchestrator.service import FunchatService
from funchat.orchestrator.settings import OrchestratorSettings

APP_NAME = "funchat"
SERVICER_FUNCTIONS = [
    "funchat.v1.funchat_pb2_grpc.add_FunchatServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]


@serve.deployment(name="Orchestrator")
class Orchestrator:
    """Ray Serve routes each gRPC method to the method of the same name."""

    def __init__(self, settings: dict):
        self.service = FunchatService(OrchestratorSettings(**settings))

    async def Converse(self, request_stream, grpc_context=None):
        async for event in self.service.Converse(request_stream, grpc_context):
            yield event

    async def Respond(self, request, grpc_context=None):
        async for event in self.service.Respond(request, grpc_context):
            yield event

    async def GetSession(self, request, grpc_context=None):
        return await self.service.GetSession(request, grpc_context)

    async def DeleteSession(self, request, grpc_context=None):
        return await self.service.DeleteSession(request, grpc_context)

    async def Check(self, request, grpc_context=None):
        """grpc.health.v1: SERVING when the session store answers ("" or "funchat.v1.Funchat")."""
        from grpc_health.v1 import health_pb2
        if request.service not in ("", "funchat.v1.Funchat"):
            import grpc
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
            grpc_context.set_details(f"unknown service {request.service!r}")
            return health_pb2.HealthCheckResponse()
        ok = await self.service.health()
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)


def build_app(settings: OrchestratorSettings):
    options = dict(num_replicas=settings.replicas, ray_actor_options={"num_cpus": settings.replica_cpus},
                   # above our own admission limit, so a full replica answers RESOURCE_EXHAUSTED itself
                   max_ongoing_requests=settings.max_calls + 16)
    data = settings.model_dump(mode="json")
    data["endpoints"] = settings.model_endpoints()  # resolved once here; replicas may run anywhere
    return Orchestrator.options(**options).bind(data)


def serve_forever(settings: OrchestratorSettings, http_port: int, num_cpus: int = 2) -> None:
    import ray

    ray.init(num_cpus=num_cpus, include_dashboard=False, object_store_memory=200 << 20,
             logging_level=logging.WARNING, log_to_driver=True,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        serve.start(grpc_options=gRPCOptions(port=settings.grpc_port, grpc_servicer_functions=SERVICER_FUNCTIONS),
                    http_options={"host": "127.0.0.1", "port": http_port})
        serve.run(build_app(settings), name=APP_NAME)
        print(f"funchat orchestrator serving gRPC on {settings.host}:{settings.grpc_port}", flush=True)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m funchat.orchestrator.app", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grpc-port", type=int, default=None)
    ap.add_argument("--http-port", type=int, default=8000, help="Ray Serve's HTTP proxy (unused by the API)")
    ap.add_argument("--replicas", type=int, default=None)
    ap.add_argument("--num-cpus", type=int, default=2, help="CPUs given to the local Ray cluster")
    args = ap.parse_args(argv)
    overrides = {k: v for k, v in (("grpc_port", args.grpc_port), ("replicas", args.replicas)) if v is not None}
    settings = OrchestratorSettings(**overrides)
    settings.model_endpoints()  # fail fast when the model services are not known
    if not settings.resume_secret:
        print("FUNCHAT_RESUME_SECRET is not set (make up writes one to .run/resume_secret)", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_SERVE_ENABLE_TASK_EVENTS", "0")
    serve_forever(settings, args.http_port, args.num_cpus)
    return 0


if __name__ == "__main__":
    sys.exit(main())
