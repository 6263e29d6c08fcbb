"""The orchestrator process: the public API as a Ray Serve application with Ray Serve's gRPC ingress.

Ray Serve's gRPC proxy serves `funchat.v1.Funchat` (Converse is bidirectional streaming through
`ray.serve.grpc_util.gRPCInputStream`, verified on Ray 2.60), the standard `grpc.health.v1.Health`
service and server reflection. With a single application deployed, clients need no
`application` metadata. Each replica is a `FunchatService`; replicas share nothing but Redis
(sessions) and the resume-token key, so a call resumes on any replica.

Two ways to start it, the same application:

    python -m funchat.orchestrator.app                  # one machine: a local Ray, Serve, the app
    serve run services/orchestrator/serve_config.yaml   # an existing Ray cluster (KubeRay serveConfigV2)

The first serves until SIGTERM / SIGINT, then shuts Serve and Ray down (`make up` starts it in the
background). It also runs the public API's gateway (funchat.gateway, a thread of this process) on
FUNCHAT_GRPC_PORT, plaintext or TLS / mTLS, with keepalive, in front of Ray Serve's gRPC proxy on
the internal FUNCHAT_PROXY_PORT: Ray's proxy has neither TLS nor keepalive settings. The second
imports `funchat.orchestrator.app:app_builder` and needs the gateway beside it (`python -m
funchat.gateway`; the chart's sidecar). Both take their settings
from the `FUNCHAT_*` environment (services/orchestrator/README.md). The replicas' Prometheus
metrics are served on FUNCHAT_METRICS_PORT: by the first process, or in the second way by one of
the replicas of each node (`funchat.orchestrator.metrics` says how).
"""


import argparse
import logging
import os
import shutil
import signal
import socket
import sys
import threading

from fastapi import FastAPI, Request, WebSocket
from ray import serve
from ray.serve import Application
from ray.serve.config import gRPCOptions

from funchat import tracing
from funchat.api_keys import KeyFileError, KeyStore
from funchat.gateway.server import GatewayError, GatewayThread
from funchat.gateway.settings import GatewaySettings, GatewaySettingsError
from funchat.gateway.tls import TlsFilesError
from funchat.orchestrator import metrics
from funchat.orchestrator.realtime import endpoint as realtime
from funchat.orchestrator.service import FunchatService
from funchat.orchestrator.settings import OrchestratorSettings, SettingsError, env_name

APP_NAME = "funchat"
DEPLOYMENT_NAME = "Orchestrator"
SERVICER_FUNCTIONS = [
    "funchat.orchestrator.ingress.add_FunchatServicer_to_server",  # lenient deserializers (ingress)
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]
# The replicas only draw tokens and move audio: the cores belong to the model services. Their
# metrics go to a directory of the node (prometheus-client's multiprocess mode), which one
# exporter per node serves; `python -m funchat.orchestrator.app` gives them a fresh one instead.
RUNTIME_ENV = {"env_vars": {"OMP_NUM_THREADS": "1", metrics.MULTIPROC_ENV: metrics.DEFAULT_MULTIPROC_DIR}}
SECRET_FIELDS = ("resume_secret", "redis_password", "tracing_headers")
TRACING_SERVICE = "funchat-orchestrator"  # the traces' service.name


# The HTTP ingress: the OpenAI Realtime-compatible WebSocket and the web page (realtime.endpoint)
http_api = FastAPI(title="funchat", docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(http_api)
class Orchestrator:
    """Ray Serve routes each gRPC method to the method of the same name, HTTP to `http_api`'s routes."""

    def __init__(self, settings: dict):
        """settings: `OrchestratorSettings.deployment_args()`, no secret in it; the replica's own
        environment gives the resume-token key."""
        settings = OrchestratorSettings.load(**settings)
        # Traces: the headers (a secret) come from this replica's environment, like the resume key
        tracing.configure(TRACING_SERVICE, settings.tracing_config())
        self.service = FunchatService(settings)
        # RayService mode: the first replica of a pod serves its /metrics (a no-op where the
        # orchestrator process already does)
        metrics.start_replica_exporter(settings.metrics_port, host=settings.metrics_host)

    async def Converse(self, request_stream, grpc_context=None):
        with metrics.unexpected_errors_counted():
            async for event in self.service.Converse(request_stream, grpc_context):
                yield event

    async def Respond(self, request, grpc_context=None):
        with metrics.unexpected_errors_counted():
            async for event in self.service.Respond(request, grpc_context):
                yield event

    async def GetSession(self, request, grpc_context=None):
        with metrics.unexpected_errors_counted():
            return await self.service.GetSession(request, grpc_context)

    async def DeleteSession(self, request, grpc_context=None):
        with metrics.unexpected_errors_counted():
            return await self.service.DeleteSession(request, grpc_context)

    @http_api.websocket("/v1/realtime")
    async def realtime(self, websocket: WebSocket, model: str | None = None):
        with metrics.unexpected_errors_counted():
            await realtime.serve_websocket(self.service, websocket, model)

    @http_api.post("/v1/realtime/client_secrets")
    async def realtime_client_secret(self, request: Request):
        with metrics.unexpected_errors_counted():
            return await realtime.create_client_secret(self.service, request)

    @http_api.get("/")
    async def web_page(self):
        return realtime.web_page()

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


# Ray's room beyond our own admission limit: a full replica still gets requests, and answers
# RESOURCE_EXHAUSTED with a retry hint itself. Past that Ray queues at most as many again at each
# proxy and refuses the rest at once with RESOURCE_EXHAUSTED (its BackPressureError), rather than
# letting them wait in a queue without bound (Ray's default).
RAY_HEADROOM = 16


def deployment_options(settings: OrchestratorSettings) -> dict:
    return dict(num_replicas=settings.replicas, ray_actor_options={"num_cpus": settings.replica_cpus},
                max_ongoing_requests=settings.max_calls + RAY_HEADROOM, max_queued_requests=RAY_HEADROOM)


def build_app(settings: OrchestratorSettings) -> Application:
    return Orchestrator.options(**deployment_options(settings)).bind(settings.deployment_args())


def app_builder(args: dict) -> Application:
    """The application for Ray Serve's config (`import_path: funchat.orchestrator.app:app_builder`):
    settings from the environment of the process building it, overridden by the config's `args`
    (setting names as keys). Secrets are refused there: Ray records a config's arguments."""
    secrets_given = [name for name in SECRET_FIELDS if name in args]
    if secrets_given:
        variables = ", ".join(env_name(name) for name in secrets_given)
        raise SettingsError(f"{secrets_given} must not be in the Serve config (Ray records its args): set {variables} "
                            f"in the replicas' environment (the resume key may also come from "
                            f"{env_name('resume_secret_file')})")
    return build_app(OrchestratorSettings.load(**args))


def replica_runtime_env(metrics_dir: str) -> dict:
    """RUNTIME_ENV with the replicas' metrics going to `metrics_dir`."""
    return {**RUNTIME_ENV, "env_vars": {**RUNTIME_ENV["env_vars"], metrics.MULTIPROC_ENV: metrics_dir}}


def gateway_settings(settings: OrchestratorSettings) -> GatewaySettings:
    """The gateway's settings: the ports and message size of `settings` (FUNCHAT_PROXY_PORT 0: a free
    port now), TLS and keepalive from the environment. Raises SettingsError naming what to fix."""
    try:
        gateway = GatewaySettings.load(grpc_port=settings.grpc_port, proxy_port=settings.proxy_port or _free_port(),
                                       max_message_bytes=settings.max_message_bytes)
    except GatewaySettingsError as exc:
        raise SettingsError(str(exc)) from None
    if gateway.max_connection_age_s and gateway.max_connection_age_grace_s < settings.max_call_s:
        raise SettingsError(f"FUNCHAT_MAX_CONNECTION_AGE_GRACE_S={gateway.max_connection_age_grace_s:g} is shorter "
                            f"than FUNCHAT_MAX_CALL_S={settings.max_call_s:g}: calls on an old connection would be "
                            "cut; raise it (or FUNCHAT_MAX_CONNECTION_AGE_S=0: connections never age out)")
    return gateway


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _check_port_free(port: int) -> None:
    """Raises GatewayError when the public port is taken (bound and released at once)."""
    family, host = (socket.AF_INET6, "::") if socket.has_ipv6 else (socket.AF_INET, "0.0.0.0")
    with socket.socket(family) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise GatewayError(f"the public port {port} (FUNCHAT_GRPC_PORT) is taken: {exc.strerror}") from None


def serve_forever(settings: OrchestratorSettings, gateway: GatewayThread) -> int:
    """A local Ray cluster, Serve with its gRPC proxy on the internal port, the application, and
    the gateway on the public port; until SIGTERM / SIGINT (0), or until the gateway stops (1).
    /metrics (all replicas) is served from here, bound before the replicas start.

    The gateway starts once ray.init has started Ray's processes: Ray forks them with a Python
    preexec_fn, and a fork while the gateway's gRPC threads are busy can hang the child (a raylet that
    never starts: "The current node timed out during startup"). A taken public port still fails
    before Ray's long start: it is tried first."""
    import ray

    metrics_dir = metrics.new_multiprocess_dir()
    exporter = None
    try:
        _check_port_free(settings.grpc_port)
        if settings.metrics_port:
            exporter = metrics.start_exporter(settings.metrics_port, metrics_dir, settings.metrics_host)
            if exporter is None:
                print(f"orchestrator: metrics port {settings.metrics_port} is taken: /metrics is not served from "
                      "here (the replicas keep trying to bind it)", file=sys.stderr, flush=True)
        # In the job's runtime_env, which Serve merges into the deployment's; not in os.environ, which
        # Ray's own processes (raylet, agents) would inherit
        ray.init(num_cpus=settings.ray_cpus, include_dashboard=False, object_store_memory=200 << 20,
                 logging_level=logging.WARNING, log_to_driver=True, runtime_env=replica_runtime_env(metrics_dir))
        try:
            gateway.start()
            # Ray's proxy binds all interfaces ([::]) whatever we ask: callers reach the gateway instead,
            # and the replicas check API keys whichever way a call comes in
            serve.start(grpc_options=gRPCOptions(port=gateway.gateway.settings.proxy_port,
                                                 grpc_servicer_functions=SERVICER_FUNCTIONS),
                        http_options={"host": settings.http_host, "port": settings.http_port})
            serve.run(build_app(settings), name=APP_NAME)
            print(f"funchat orchestrator serving gRPC on port {settings.grpc_port}: {gateway.gateway.describe()}"
                  + (f", metrics on port {settings.metrics_port}" if exporter is not None else ""), flush=True)
            stop = threading.Event()
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: stop.set())
            while not stop.wait(1.0):
                if gateway.stopped.is_set():
                    print("orchestrator: the gateway stopped: shutting down", file=sys.stderr, flush=True)
                    return 1
            return 0
        finally:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
    finally:
        gateway.stop()
        if exporter is not None:
            exporter.shutdown()
            exporter.server_close()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="python -m funchat.orchestrator.app", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    try:
        settings = OrchestratorSettings.load()
        # the replicas on this machine read the same key and tracing settings: refuse before
        # starting Ray when they cannot be used
        settings.read_resume_secret()
        settings.tracing_config()
        if settings.auth == "api_keys":
            KeyStore(settings.api_keys_file)  # readable and well-formed, or refused here
        gateway = GatewayThread(gateway_settings(settings))  # TLS files that cannot be used: refused here
    except (SettingsError, KeyFileError, TlsFilesError) as exc:
        print(f"orchestrator: {exc}", file=sys.stderr)
        return 2
    if settings.auth == "off":
        print("orchestrator: WARNING: FUNCHAT_AUTH=off: the API answers anyone, without API keys (development "
              "only)", file=sys.stderr, flush=True)
    os.environ.setdefault("RAY_SERVE_ENABLE_TASK_EVENTS", "0")  # Ray's own knob, inherited by its processes
    # Ray's gRPC proxy otherwise accepts messages up to 2 GiB, read in full before any check of ours
    os.environ["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"] = str(settings.max_message_bytes)
    try:
        return serve_forever(settings, gateway)
    except GatewayError as exc:
        print(f"orchestrator: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
