"""Ephemeral client secrets (funchat/orchestrator/realtime/client_secrets.py): signed, expiring, not
forgeable without the deployment's key."""

from __future__ import annotations

import pytest

from funchat.orchestrator.realtime import client_secrets as cs

SECRET = b"resume-secret-" + b"0" * 20


def test_a_secret_round_trips_its_tenant_key_session_and_expiry():
    value, expires_at = cs.issue(SECRET, "acme", "abcdefgh23", {"instructions": "hi"}, ttl_s=60, now=1000)
    assert value.startswith("ek_") and expires_at == 1060
    got = cs.verify(SECRET, value, now=1059)
    assert (got.tenant, got.key_id, got.expires_at, got.session) == ("acme", "abcdefgh23", 1060, {"instructions": "hi"})


@pytest.mark.parametrize("change, words", [
    (lambda v: v[:-1] + ("A" if v[-1] != "A" else "B"), "signature"),   # the signature altered
    (lambda v: "ek_" + v[4:], "signature"),                               # the payload altered
    (lambda v: v.replace("ek_", "xx_"), "malformed"),
    (lambda v: v.split(".")[0], "malformed"),
])
def test_an_altered_secret_is_refused(change, words):
    value, _ = cs.issue(SECRET, "acme", "k", {}, now=1000)
    with pytest.raises(cs.ClientSecretError, match=words):
        cs.verify(SECRET, change(value), now=1001)


def test_another_deployments_key_or_an_expired_secret_is_refused():
    value, _ = cs.issue(SECRET, "acme", "k", {}, ttl_s=10, now=1000)
    with pytest.raises(cs.ClientSecretError, match="signature"):
        cs.verify(b"another-secret-" + b"1" * 20, value, now=1001)
    with pytest.raises(cs.ClientSecretError, match="expired"):
        cs.verify(SECRET, value, now=1010)


@pytest.mark.parametrize("request_, seconds", [({}, 600), ({"expires_after": {"anchor": "created_at", "seconds": 10}}, 10),
                                               ({"expires_after": {"seconds": 7200}}, 7200)])
def test_the_expiry_asked_for(request_, seconds):
    assert cs.expiry_seconds(request_) == seconds


@pytest.mark.parametrize("after", [{"seconds": 9}, {"seconds": 7201}, {"seconds": "60"}, {"anchor": "now"}, 60])
def test_a_bad_expiry_is_refused(after):
    with pytest.raises(ValueError, match="expires_after"):
        cs.expiry_seconds({"expires_after": after})
