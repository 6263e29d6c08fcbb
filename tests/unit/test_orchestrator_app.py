"""The orchestrator process: what the Ray Serve deployment is given, and its Serve config file and
README agreeing with the code. (That it imports no torch: tests/unit/test_dependency_direction.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from funchat.gateway.settings import GatewaySettings
from funchat.orchestrator import app
from funchat.orchestrator.settings import OrchestratorSettings, SettingsError

REPO = Path(__file__).resolve().parents[2]
SERVE_CONFIG = REPO / "services" / "orchestrator" / "serve_config.yaml"
ENDPOINTS = {"audio_tokenizer": "a:1", "llm": "b:2", "refined_head": "c:3", "vocoder": "d:4"}
SECRET = "resume-key-" + "x" * 20


pytestmark = pytest.mark.usefixtures("no_funchat_env", "a_keys_file")


@pytest.fixture
def a_keys_file(no_funchat_env, monkeypatch):
    monkeypatch.setenv("FUNCHAT_API_KEYS_FILE", "/etc/funchat/api-keys/api_keys")  # authentication is on


def test_the_deployment_is_bound_without_the_secret():
    settings = OrchestratorSettings.load(checkpoint="/ckpt", endpoints=ENDPOINTS, resume_secret=SECRET)
    bound = app.build_app(settings)._bound_deployment
    assert bound.init_args == (settings.deployment_args(),) and not bound.init_kwargs
    assert SECRET not in json.dumps(bound.init_args) and "resume_secret" not in bound.init_args[0]


def test_the_app_builder_reads_the_environment_and_refuses_secrets_in_args(monkeypatch):
    monkeypatch.setenv("FUNCHAT_CHECKPOINT", "/ckpt")
    monkeypatch.setenv("FUNCHAT_ENDPOINTS", json.dumps(ENDPOINTS))
    bound = app.app_builder({"max_calls": "4"})._bound_deployment
    assert bound.init_args[0]["max_calls"] == 4 and bound.init_args[0]["checkpoint"] == "/ckpt"
    assert bound._deployment_config.max_ongoing_requests == 4 + 16
    with pytest.raises(SettingsError, match="must not be in the Serve config"):
        app.app_builder({"resume_secret": SECRET})
    monkeypatch.delenv("FUNCHAT_CHECKPOINT")
    with pytest.raises(SettingsError, match="FUNCHAT_CHECKPOINT is not set"):
        app.app_builder({})


def test_the_serve_config_matches_the_code():
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(SERVE_CONFIG.read_text())
    ServeDeploySchema.model_validate(raw)  # a config `serve run` / serveConfigV2 accepts
    defaults = OrchestratorSettings.load(checkpoint="/ckpt", endpoints=ENDPOINTS)
    # Ray's proxy behind the gateway (`python -m funchat.gateway`), on the port it forwards to by default
    proxy_port = GatewaySettings.model_fields["proxy_port"].default
    assert raw["grpc_options"] == {"port": proxy_port, "grpc_servicer_functions": app.SERVICER_FUNCTIONS}
    (application,) = raw["applications"]
    assert application["name"] == app.APP_NAME
    module, name = application["import_path"].split(":")
    assert module == "funchat.orchestrator.app" and getattr(app, name) is app.app_builder
    assert application["runtime_env"] == app.RUNTIME_ENV
    (deployment,) = application["deployments"]
    assert deployment == {"name": app.DEPLOYMENT_NAME, **app.deployment_options(defaults)}


def test_the_readme_lists_every_setting_with_its_default():
    readme = (REPO / "services" / "orchestrator" / "README.md").read_text()
    rows = {cells[0].strip("` "): cells[1].strip() for line in readme.splitlines()
            if line.startswith("| `FUNCHAT_") and (cells := line.strip("|").split("|"))}
    for name, field in OrchestratorSettings.model_fields.items():
        variable = f"FUNCHAT_{name.upper()}"
        assert variable in rows, variable
        if field.is_required():
            assert rows[variable] == "required", variable
        elif isinstance(field.default, (int, float, str)):
            assert rows[variable] == f"`{field.default}`", variable



def test_a_taken_public_port_is_refused_before_ray_starts():
    # serve_forever tries the public port first: the gateway itself only starts after ray.init
    import socket

    from funchat.gateway.server import GatewayError
    from funchat.orchestrator.app import _check_port_free

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(GatewayError, match=f"public port {port} \\(FUNCHAT_GRPC_PORT\\) is taken"):
            _check_port_free(port)
    _check_port_free(port)  # free again
