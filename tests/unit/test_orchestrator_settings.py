"""The orchestrator's settings: required values named by their environment variables, the
resume-token key kept out of everything the Ray Serve deployment is given."""

from __future__ import annotations

import json

import pytest
from pydantic import SecretStr

from funchat.orchestrator.settings import OrchestratorSettings, SettingsError

ENDPOINTS = {"audio_tokenizer": "a:1", "llm": "b:2", "refined_head": "c:3", "vocoder": "d:4"}
SECRET = "resume-key-" + "x" * 20


pytestmark = pytest.mark.usefixtures("no_funchat_env", "a_keys_file")


@pytest.fixture
def a_keys_file(no_funchat_env, monkeypatch):
    """Authentication is on by default and needs a key file named (its contents are read by the
    service, not by the settings)."""
    monkeypatch.setenv("FUNCHAT_API_KEYS_FILE", "/etc/funchat/api-keys/api_keys")


def test_authentication_needs_a_key_file_unless_turned_off(monkeypatch):
    monkeypatch.delenv("FUNCHAT_API_KEYS_FILE")
    with pytest.raises(SettingsError) as err:
        OrchestratorSettings.load(checkpoint="/ckpt", endpoints=ENDPOINTS)
    assert "FUNCHAT_API_KEYS_FILE is not set" in str(err.value) and "FUNCHAT_AUTH=off" in str(err.value)
    assert OrchestratorSettings.load(checkpoint="/ckpt", endpoints=ENDPOINTS, auth="off").api_keys_file is None
    monkeypatch.setenv("FUNCHAT_AUTH", "none")
    with pytest.raises(SettingsError, match="FUNCHAT_AUTH"):
        OrchestratorSettings.load(checkpoint="/ckpt", endpoints=ENDPOINTS)


def test_limits_that_cannot_work_together_are_refused():
    with pytest.raises(SettingsError, match="FUNCHAT_MAX_MESSAGE_BYTES=16777216 cannot carry a Respond of "
                                            "FUNCHAT_MAX_TURN_S=120 s"):
        OrchestratorSettings.load(checkpoint="/ckpt", endpoints=ENDPOINTS, max_turn_s=120)
    assert OrchestratorSettings.load(checkpoint="/ckpt", endpoints=ENDPOINTS, max_turn_s=120,
                                     max_message_bytes=32 << 20).max_turn_s == 120
    for name, value in (("idle_timeout_s", 0), ("max_call_s", -1)):
        with pytest.raises(SettingsError, match=f"FUNCHAT_{name.upper()}"):
            OrchestratorSettings.load(checkpoint="/ckpt", endpoints=ENDPOINTS, **{name: value})


def test_missing_checkpoint_and_endpoints_name_their_variables():
    with pytest.raises(SettingsError) as err:
        OrchestratorSettings.load()
    assert "FUNCHAT_CHECKPOINT is not set" in str(err.value)
    assert "FUNCHAT_ENDPOINTS is not set" in str(err.value)


def test_one_missing_endpoint_is_named(monkeypatch):
    monkeypatch.setenv("FUNCHAT_CHECKPOINT", "/ckpt")
    monkeypatch.setenv("FUNCHAT_ENDPOINTS", json.dumps({k: v for k, v in ENDPOINTS.items() if k != "vocoder"}))
    with pytest.raises(SettingsError, match="FUNCHAT_ENDPOINTS__VOCODER is not set"):
        OrchestratorSettings.load()
    monkeypatch.setenv("FUNCHAT_ENDPOINTS__VOCODER", "d:4")  # one variable per service works too
    assert OrchestratorSettings.load().endpoints.vocoder == "d:4"


def test_malformed_values_are_named(monkeypatch):
    monkeypatch.setenv("FUNCHAT_MAX_CALLS", "many")
    with pytest.raises(SettingsError, match="FUNCHAT_MAX_CALLS.*'many'"):
        OrchestratorSettings.load(checkpoint="/ckpt", endpoints=ENDPOINTS)
    monkeypatch.delenv("FUNCHAT_MAX_CALLS")
    monkeypatch.setenv("FUNCHAT_ENDPOINTS", "{not json")
    with pytest.raises(SettingsError, match="FUNCHAT_ENDPOINTS must be a JSON object"):
        OrchestratorSettings.load(checkpoint="/ckpt")
    with pytest.raises(SettingsError, match="unknown orchestrator settings \\['max_call'\\]"):
        OrchestratorSettings.load(checkpoint="/ckpt", endpoints=ENDPOINTS, max_call=3)


def test_environment_values_and_defaults(monkeypatch):
    monkeypatch.setenv("FUNCHAT_CHECKPOINT", "/ckpt")
    monkeypatch.setenv("FUNCHAT_ENDPOINTS", json.dumps(ENDPOINTS))
    monkeypatch.setenv("FUNCHAT_MAX_CALLS", "6")
    s = OrchestratorSettings.load()
    assert str(s.checkpoint) == "/ckpt" and s.endpoints.model_dump() == ENDPOINTS and s.max_calls == 6
    assert s.grpc_port == 50051 and s.replicas == 1
    assert OrchestratorSettings.load(max_calls=9).max_calls == 9  # arguments override the environment


def test_the_secret_is_a_secretstr_and_not_in_the_deployment_args(monkeypatch):
    monkeypatch.setenv("FUNCHAT_RESUME_SECRET", SECRET)
    s = OrchestratorSettings.load(checkpoint="/ckpt", endpoints=ENDPOINTS)
    assert isinstance(s.resume_secret, SecretStr) and SECRET not in repr(s) and SECRET not in str(s)
    args = s.deployment_args()
    assert "resume_secret" not in args and SECRET not in json.dumps(args)
    assert SECRET not in json.dumps(s.model_dump(mode="json"))
    # a replica rebuilds its settings from the args; its own environment gives the key
    replica = OrchestratorSettings.load(**args)
    assert replica.read_resume_secret().get_secret_value() == SECRET
    assert replica.deployment_args() == args


def test_the_redis_password_is_a_secret_taken_from_each_replicas_environment(monkeypatch):
    monkeypatch.setenv("FUNCHAT_REDIS_PASSWORD", "hunter2-redis")
    s = OrchestratorSettings.load(checkpoint="/ckpt", endpoints=ENDPOINTS)
    assert isinstance(s.redis_password, SecretStr) and "hunter2-redis" not in repr(s)
    args = s.deployment_args()
    assert "redis_password" not in args and "hunter2-redis" not in json.dumps(args)
    assert OrchestratorSettings.load(**args).redis_password.get_secret_value() == "hunter2-redis"


def test_the_secret_from_a_file(tmp_path):
    path = tmp_path / "resume_secret"
    path.write_text(SECRET + "\n")
    s = OrchestratorSettings.load(checkpoint="/ckpt", endpoints=ENDPOINTS, resume_secret_file=str(path))
    assert s.read_resume_secret().get_secret_value() == SECRET
    args = s.deployment_args()
    assert args["resume_secret_file"] == str(path) and SECRET not in json.dumps(args)
    assert OrchestratorSettings.load(**args).read_resume_secret().get_secret_value() == SECRET


def test_a_missing_or_doubled_secret_is_refused(tmp_path, monkeypatch):
    s = OrchestratorSettings.load(checkpoint="/ckpt", endpoints=ENDPOINTS)
    with pytest.raises(SettingsError, match="FUNCHAT_RESUME_SECRET .*is not set"):
        s.read_resume_secret()
    missing = OrchestratorSettings.load(checkpoint="/ckpt", endpoints=ENDPOINTS, resume_secret_file=tmp_path / "no")
    with pytest.raises(SettingsError, match="FUNCHAT_RESUME_SECRET_FILE=.*cannot read it"):
        missing.read_resume_secret()
    (tmp_path / "key").write_text(SECRET)
    monkeypatch.setenv("FUNCHAT_RESUME_SECRET", SECRET)
    both = OrchestratorSettings.load(checkpoint="/ckpt", endpoints=ENDPOINTS, resume_secret_file=tmp_path / "key")
    with pytest.raises(SettingsError, match="not both"):
        both.read_resume_secret()


def test_no_default_depends_on_the_source_checkout():
    """Paths are explicit: nothing defaults to a place inside the repository."""
    for name, field in OrchestratorSettings.model_fields.items():
        assert "checkpoints" not in str(field.default) and ".run" not in str(field.default), name
    assert OrchestratorSettings.model_fields["checkpoint"].is_required()
    assert OrchestratorSettings.model_fields["endpoints"].is_required()
