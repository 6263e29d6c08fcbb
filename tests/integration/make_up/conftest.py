"""One stack started the way `make up` starts it (funchat.dev.stack up: redis-server with AUTH and
TLS, the four tritonservers, the Ray Serve orchestrator behind the gateway), shared by this
folder's modules: what it exposes, the soak, and tracing across its processes.

It is started once for the folder and stopped after its last test (a package fixture: this folder
has an __init__.py for that), which saves a stack start per module. Every process of it exports
spans to `otlp_receiver`, as a stack with FUNCHAT_TRACING_ENDPOINT set does; the tracing tests look
only at the traces they started, so the other modules' calls do not disturb them.
"""

from __future__ import annotations

import json

import pytest

from funchat.dev import stack as dev_stack
from funchat.dev.otlp_receiver import OtlpReceiver
from funchat.dev.tritonserver import free_port


@pytest.fixture(scope="package")
def otlp_receiver():
    with OtlpReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="package")
def make_up_stack(tiny_checkpoint, tmp_path_factory, otlp_receiver) -> dict:
    """{"run_dir", "endpoints" (its .run/endpoints.json), "api_key"} of the running stack."""
    run_dir = tmp_path_factory.mktemp("make-up-stack")
    args = ["--run-dir", str(run_dir)]
    with pytest.MonkeyPatch.context() as env:
        # every process of the stack reads these: the tritonservers and the orchestrator's replicas
        env.setenv("FUNCHAT_TRACING_ENDPOINT", otlp_receiver.endpoint)
        env.setenv("FUNCHAT_TRACING_HEADERS", "x-funchat-test=1")
        rc = dev_stack.main(["up", *args, "--checkpoint", str(tiny_checkpoint), "--grpc-port", str(free_port()),
                             "--http-port", str(free_port())])
    try:
        log = run_dir / "orchestrator.log"
        assert rc == 0, log.read_text()[-5000:] if log.exists() else "the stack did not start"
        yield {"run_dir": run_dir, "endpoints": json.loads((run_dir / "endpoints.json").read_text()),
               "api_key": dev_stack.read_api_key(run_dir)}
    finally:
        dev_stack.main(["down", *args])
