"""Several replicas of a model service: which replica a request goes to (`Replicas`, round robin
over those not marked down), and the FUNCHAT_ENDPOINTS lists that name them."""

from __future__ import annotations

import pytest

from funchat.orchestrator.model_clients import Replicas
from funchat.orchestrator.settings import OrchestratorSettings, SettingsError

A, B, C = "10.0.0.1:8001", "10.0.0.2:8001", "10.0.0.3:8001"


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_round_robin_over_the_replicas():
    replicas = Replicas([A, B, C])
    assert [replicas.pick() for _ in range(6)] == [A, B, C, A, B, C]


def test_a_failed_replica_is_passed_over_then_tried_again():
    clock = Clock()
    replicas = Replicas([A, B], down_s=5.0, clock=clock)
    replicas.failed(A)
    assert [replicas.pick() for _ in range(3)] == [B, B, B]
    clock.now += 5.0
    assert {replicas.pick(), replicas.pick()} == {A, B}


def test_avoid_picks_another_replica_when_there_is_one():
    replicas = Replicas([A, B])
    assert all(replicas.pick(avoid=A) == B for _ in range(4))
    assert Replicas([A]).pick(avoid=A) == A  # a single replica is the only choice


def test_all_down_picks_the_one_down_longest():
    clock = Clock()
    replicas = Replicas([A, B, C], clock=clock)
    replicas.failed(B)
    clock.now += 1
    replicas.failed(A)
    clock.now += 1
    replicas.failed(C)
    assert replicas.pick() == B
    assert replicas.pick(avoid=B) == A


def test_a_single_address_is_one_replica():
    replicas = Replicas([A])
    replicas.failed(A)
    assert replicas.pick() == A


@pytest.fixture
def settings_env(no_funchat_env, monkeypatch):
    monkeypatch.setenv("FUNCHAT_AUTH", "off")


def endpoints(**over) -> dict:
    return {"audio_tokenizer": "a:1", "llm": "b:2", "refined_head": "c:3", "vocoder": "d:4", **over}


@pytest.mark.usefixtures("settings_env")
def test_endpoints_take_comma_separated_replicas():
    settings = OrchestratorSettings.load(checkpoint="/ckpt", endpoints=endpoints(llm=f"{A}, {B}", vocoder="[::1]:9"))
    assert settings.endpoints.llm == f"{A},{B}"
    assert settings.endpoints.vocoder == "[::1]:9"
    assert settings.endpoints.audio_tokenizer == "a:1"


@pytest.mark.usefixtures("settings_env")
@pytest.mark.parametrize("value, says", [
    ("b", "'b' is not host:port"),
    ("b:2,", "'' is not host:port"),
    ("b:2,c", "'c' is not host:port"),
    (":2", "':2' is not host:port"),
    ("b:0", "'b:0' is not host:port"),
    ("b:65536", "'b:65536' is not host:port"),
    ("b:x", "'b:x' is not host:port"),
    ("b:2,b:2", "replica b:2 is listed twice"),
])
def test_malformed_replica_lists_are_refused_naming_the_variable(value, says):
    with pytest.raises(SettingsError) as err:
        OrchestratorSettings.load(checkpoint="/ckpt", endpoints=endpoints(llm=value))
    assert "FUNCHAT_ENDPOINTS__LLM" in str(err.value)
    assert says in str(err.value)
