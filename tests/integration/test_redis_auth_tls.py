"""Redis AUTH and TLS as `make up` runs redis-server (funchat.dev.redis_server, auth=True, tls=True),
against a real redis-server: every way in without the password or without TLS is refused, the
orchestrator's SessionStore gets through with both, and a restart keeps the same password and
certificates. The password never reaches a command line."""

from __future__ import annotations

import asyncio
import os
import stat

import pytest
import redis

from funchat.dev.redis_server import PASSWORD_FILE, ensure_tls_files, start_redis
from funchat.orchestrator.sessions import SessionStore
from funchat.orchestrator.settings import OrchestratorSettings, SettingsError

ENDPOINTS = {"audio_tokenizer": "h:1", "llm": "h:2", "refined_head": "h:3", "vocoder": "h:4"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("redis-secure")
    with start_redis(run_dir, persist=True, auth=True, tls=True) as server:
        yield server


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_the_secrets_are_files_only_their_owner_reads(server):
    run_dir = server.log.parent.parent
    assert server.url.startswith("rediss://127.0.0.1:")
    assert (run_dir / PASSWORD_FILE).read_text().strip() == server.password and len(server.password) >= 32
    for path in (run_dir / PASSWORD_FILE, run_dir / "redis" / "redis.conf", server.tls.key_file):
        assert mode(path) == 0o600, path


def test_the_password_is_on_no_command_line(server):
    with open(f"/proc/{server.pid}/cmdline", "rb") as f:
        assert server.password.encode() not in f.read()
    assert server.password not in server.url


def test_with_password_and_ca_it_answers(server):
    client = server.client()
    try:
        client.set("probe", "1")
        assert client.get("probe") == b"1"
    finally:
        client.close()


def test_plaintext_is_refused(server):
    plain = redis.Redis(host=server.host, port=server.port, password=server.password, socket_timeout=2)
    with pytest.raises(redis.exceptions.ConnectionError):
        plain.ping()


def test_no_password_is_refused(server):
    anonymous = redis.Redis.from_url(server.url, ssl_ca_certs=str(server.ca_file), socket_timeout=2)
    with pytest.raises(redis.exceptions.AuthenticationError):
        anonymous.ping()
    wrong = redis.Redis.from_url(server.url, ssl_ca_certs=str(server.ca_file), password="not-the-password")
    with pytest.raises(redis.exceptions.AuthenticationError):
        wrong.ping()


def test_a_server_the_client_cannot_verify_is_refused(server, tmp_path):
    # the system's CAs do not know the local CA, and another local CA is another CA
    with pytest.raises(redis.exceptions.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        redis.Redis.from_url(server.url, password=server.password).ping()
    other = ensure_tls_files(tmp_path / "other")
    with pytest.raises(redis.exceptions.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        redis.Redis.from_url(server.url, password=server.password, ssl_ca_certs=str(other.ca_file)).ping()


def test_the_session_store_connects_with_the_orchestrators_settings(server, monkeypatch):
    monkeypatch.setenv("FUNCHAT_REDIS_PASSWORD", server.password)
    settings = OrchestratorSettings.load(checkpoint="/ckpt", endpoints=ENDPOINTS, redis_url=server.url,
                                         redis_ca_file=server.ca_file, resume_secret="k" * 32, auth="off")
    assert server.password not in str(settings.deployment_args())  # the secret stays out of Ray's records

    async def round_trip() -> bool:
        async with SessionStore(settings.redis_url, secret="k" * 32, ttl_s=60, ca_file=settings.redis_ca_file,
                                password=settings.redis_password.get_secret_value()) as store:
            return await store.redis.ping()
    assert asyncio.run(round_trip())


def test_a_ca_file_without_tls_is_refused_with_what_to_fix():
    with pytest.raises(SettingsError, match="FUNCHAT_REDIS_CA_FILE .* rediss://"):
        OrchestratorSettings.load(checkpoint="/ckpt", endpoints=ENDPOINTS, redis_url="redis://127.0.0.1:6379/0",
                                  redis_ca_file="/ca.crt", auth="off")
    with pytest.raises(ValueError, match="rediss://"):
        SessionStore("redis://127.0.0.1:6379/0", secret="k", ttl_s=60, ca_file="/ca.crt")


def test_a_restart_keeps_password_certificates_and_data(tmp_path):
    with start_redis(tmp_path, persist=True, auth=True, tls=True) as first:
        password, ca = first.password, first.ca_file.read_bytes()
        client = first.client()
        client.set("kept", "yes")
        client.close()
        port = first.port
    with start_redis(tmp_path, port=port, persist=True, auth=True, tls=True) as second:
        assert second.password == password and second.ca_file.read_bytes() == ca
        client = second.client()
        try:
            assert client.get("kept") == b"yes"
        finally:
            client.close()


def test_without_the_options_it_is_the_plain_server_tests_use(tmp_path):
    with start_redis(tmp_path) as server:
        assert server.url.startswith("redis://") and server.password == "" and server.ca_file is None
        assert redis.Redis(host=server.host, port=server.port).ping()
