"""API keys (funchat.api_keys, `funchat keys`): create, authenticate, revoke; the authorization
value's checks; reloads without a new KeyStore (and keeping the last good keys); the key file's
mode and atomic writes; and no key's secret in any error message or log record."""

from __future__ import annotations

import json
import logging
import os
import stat
import threading

import pytest

from funchat import api_keys
from funchat.api_keys import AuthError, KeyFileError, KeyStore, create_key, list_keys, revoke_key, set_tenant_limits
from funchat.cli import main as cli_main


def _secret(key: str) -> str:
    return key.split("_", 2)[2]


def _bump(path, seconds: int = 10) -> None:
    """Move the file's mtime forward explicitly, so that a change never hides in the same mtime tick."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def keys_file(tmp_path):
    return tmp_path / "run" / "api_keys"


def test_create_authenticate_revoke_round_trip(keys_file):
    key, entry = create_key(keys_file, "acme")
    assert api_keys.KEY.fullmatch(key) and key.startswith(f"fck_{entry.key_id}_")
    assert len(_secret(key)) == 52 and entry.tenant == "acme" and entry.active
    assert entry.sha256 == api_keys.hash_key(key) and key not in keys_file.read_text()
    store = KeyStore(keys_file, reload_interval_s=0)
    assert store.authenticate(f"Bearer {key}") == "acme"
    assert store.verify_key(key) == "acme"
    assert store.authenticate_metadata([("user-agent", "x"), ("authorization", f"Bearer {key}")]) == "acme"

    revoked, was_active = revoke_key(keys_file, entry.key_id)
    assert was_active and revoked.revoked is not None
    _bump(keys_file)
    with pytest.raises(AuthError) as err:
        store.authenticate(f"Bearer {key}")
    assert err.value.reason == "unknown" and err.value.key_id == entry.key_id
    assert str(err.value) == f"unknown or revoked API key (key id {entry.key_id})"
    assert revoke_key(keys_file, entry.key_id)[1] is False  # revoking again changes nothing
    assert [e.revoked is not None for e in list_keys(keys_file)] == [True]


def test_keys_are_random_and_each_names_its_tenant(keys_file):
    made = [create_key(keys_file, t) for t in ("acme", "acme", "beta.2", "c_d-e")]
    store = KeyStore(keys_file)
    assert [store.authenticate(f"Bearer {k}") for k, _ in made] == ["acme", "acme", "beta.2", "c_d-e"]
    assert len({k for k, _ in made}) == len({e.key_id for _, e in made}) == 4
    assert [e.key_id for e in list_keys(keys_file)] == [e.key_id for _, e in made]


@pytest.mark.parametrize("value, reason, says", [
    (None, "missing", "missing authorization metadata: send `authorization: Bearer <key>`"),
    ("", "missing", "missing authorization metadata"),
    ("   ", "missing", "missing authorization metadata"),
    ("Bearer", "malformed", "no key after Bearer"),
    ("Bearer   ", "malformed", "no key after Bearer"),
    ("Basic dXNlcjpwYXNz", "malformed", "the scheme must be Bearer"),
    ("Token {key}", "malformed", "the scheme must be Bearer"),
    ("{key}", "malformed", "the scheme must be Bearer (the key alone was sent)"),
    ("Bearer\t{key}", "malformed", "the scheme must be Bearer"),
    ("Bearer {key} extra", "malformed", "more than one word after Bearer"),
    ("Bearer {key}\tx", "malformed", "more than one word after Bearer"),
    ("Bearer not-a-key", "malformed", "malformed API key: expected fck_<key id>_<secret>"),
    ("Bearer {key}x", "malformed", "malformed API key"),
    ("Bearer {upper}", "malformed", "malformed API key"),
])
def test_bad_authorization_values_are_rejected_and_named(keys_file, value, reason, says):
    key, _ = create_key(keys_file, "acme")
    store = KeyStore(keys_file)
    if value is not None:
        value = value.format(key=key, upper=key.upper())
    with pytest.raises(AuthError) as err:
        store.authenticate(value)
    assert err.value.reason == reason and says in str(err.value)
    assert _secret(key) not in str(err.value) and _secret(key).upper() not in str(err.value)


@pytest.mark.parametrize("value", ["Bearer {key}", "bearer {key}", "BEARER  {key}", "  Bearer {key}  "])
def test_accepted_authorization_spellings(keys_file, value):
    """RFC 6750: the scheme is case-insensitive, one or more spaces before the key; the value's own
    surrounding whitespace does not count."""
    key, _ = create_key(keys_file, "acme")
    assert KeyStore(keys_file).authenticate(value.format(key=key)) == "acme"


def test_wrong_secret_and_unknown_key_id_get_the_same_answer(keys_file):
    key, entry = create_key(keys_file, "acme")
    store = KeyStore(keys_file)
    forged = api_keys.new_key(entry.key_id)  # the right key id, another secret
    stranger = api_keys.new_key()
    for bad in (forged, stranger):
        with pytest.raises(AuthError) as err:
            store.authenticate(f"Bearer {bad}")
        assert err.value.reason == "unknown" and str(err.value).startswith("unknown or revoked API key (key id ")
        assert _secret(bad) not in str(err.value)


def test_metadata_needs_exactly_one_authorization_entry(keys_file):
    key, _ = create_key(keys_file, "acme")
    store = KeyStore(keys_file)
    with pytest.raises(AuthError, match="^missing authorization metadata"):
        store.authenticate_metadata([("x-other", "y")])
    with pytest.raises(AuthError, match="sent 2 times"):
        store.authenticate_metadata([("authorization", f"Bearer {key}"), ("authorization", f"Bearer {key}")])
    assert store.authenticate_metadata([("Authorization", f"Bearer {key}".encode())]) == "acme"
    assert store.authenticate_metadata(api_keys.bearer_metadata(key)) == "acme"


def test_reload_picks_up_new_keys_and_revocations_without_a_new_store(keys_file):
    first, first_entry = create_key(keys_file, "acme")
    clock = FakeClock()
    store = KeyStore(keys_file, reload_interval_s=2.0, clock=clock)
    second, _ = create_key(keys_file, "beta")
    _bump(keys_file)
    with pytest.raises(AuthError):  # the interval has not passed: the file is not even looked at
        store.authenticate(f"Bearer {second}")
    clock.now += 2.0
    assert store.authenticate(f"Bearer {second}") == "beta"

    revoke_key(keys_file, first_entry.key_id)
    _bump(keys_file, 20)
    assert store.authenticate(f"Bearer {first}") == "acme"  # checked 0 s ago
    clock.now += 2.5
    with pytest.raises(AuthError, match="unknown or revoked"):
        store.authenticate(f"Bearer {first}")
    assert store.authenticate(f"Bearer {second}") == "beta"


def test_an_in_place_edit_is_seen(keys_file):
    """Not only this module's os.replace (a new inode): an editor writing the file in place too."""
    key, entry = create_key(keys_file, "acme")
    store = KeyStore(keys_file, reload_interval_s=0)
    doc = json.loads(keys_file.read_text())
    doc["keys"][0]["tenant"] = "renamed"
    inode = os.stat(keys_file).st_ino
    with open(keys_file, "r+") as f:
        f.write(json.dumps(doc))
        f.truncate()
    _bump(keys_file)
    assert os.stat(keys_file).st_ino == inode
    assert store.authenticate(f"Bearer {key}") == "renamed"


def test_a_malformed_or_missing_file_keeps_the_last_good_keys_and_logs_once(keys_file, caplog):
    key, _ = create_key(keys_file, "acme")
    store = KeyStore(keys_file, reload_interval_s=0)
    good = keys_file.read_text()
    caplog.set_level(logging.INFO, logger="funchat.api_keys")

    keys_file.write_text(good[: len(good) // 2])  # a half-saved file
    _bump(keys_file)
    for _ in range(3):
        assert store.authenticate(f"Bearer {key}") == "acme"
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "not valid JSON" in errors[0].getMessage()
    assert "keeping the keys loaded before" in errors[0].getMessage()

    keys_file.unlink()
    assert store.authenticate(f"Bearer {key}") == "acme"
    assert store.authenticate(f"Bearer {key}") == "acme"
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2 and "no API key file" in errors[1].getMessage()

    other, _ = create_key(keys_file, "beta")  # a good file again: its keys, and only its keys
    assert store.authenticate(f"Bearer {other}") == "beta"
    with pytest.raises(AuthError):
        store.authenticate(f"Bearer {key}")
    assert any("valid again" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("content, says", [
    ("", "not valid JSON"),
    ("[]", '"version": 1'),
    ('{"version": 2, "keys": []}', '"version": 1'),
    ('{"version": 1, "keys": [1]}', "keys[0] is not an object"),
    ('{"version": 1, "keys": [{"key_id": "short"}]}', "keys[0]: key_id must be"),
    ('{"version": 1, "keys": [{"key_id": "aaaaaaaaaa", "tenant": "Acme"}]}', "tenant must be"),
    ('{"version": 1, "keys": [{"key_id": "aaaaaaaaaa", "tenant": "a", "sha256": "{key}"}]}', "sha256 must be"),
    ('{"version": 1, "keys": [{"key_id": "aaaaaaaaaa", "tenant": "a", "sha256": "' + "0" * 64 + '", '
     '"created": "2025-01-01"}]}', "created must be"),
])
def test_a_malformed_file_at_start_is_a_clear_error_without_secrets(keys_file, content, says):
    key = api_keys.new_key()
    keys_file.parent.mkdir(parents=True)
    keys_file.write_text(content.replace("{key}", key))
    with pytest.raises(KeyFileError) as err:
        KeyStore(keys_file)
    assert says in str(err.value) and str(keys_file) in str(err.value)
    assert _secret(key) not in str(err.value)


def test_a_missing_file_at_start_is_an_error(keys_file):
    with pytest.raises(KeyFileError, match="no API key file at .*funchat keys create --tenant NAME"):
        KeyStore(keys_file)


def test_an_empty_key_file_authenticates_nobody(keys_file):
    keys_file.parent.mkdir(parents=True)
    keys_file.write_text(api_keys.format_key_file([]))
    store = KeyStore(keys_file)
    assert store.entries == []
    with pytest.raises(AuthError, match="unknown or revoked"):
        store.authenticate(f"Bearer {api_keys.new_key()}")


def test_the_key_file_is_private_and_replaced_atomically(keys_file):
    create_key(keys_file, "acme")
    assert stat.S_IMODE(os.stat(keys_file).st_mode) == 0o600
    inode = os.stat(keys_file).st_ino
    keys_file.chmod(0o644)
    create_key(keys_file, "beta")
    assert stat.S_IMODE(os.stat(keys_file).st_mode) == 0o600
    assert os.stat(keys_file).st_ino != inode  # a new file put in place, not the old one rewritten
    assert sorted(p.name for p in keys_file.parent.iterdir()) == ["api_keys"]  # no temporary or lock file left


def test_creates_from_many_threads_lose_no_entry(keys_file):
    made, errors = [], []

    def make(i):
        try:
            made.append(create_key(keys_file, f"t{i}"))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=make, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    store = KeyStore(keys_file)
    assert len(list_keys(keys_file)) == 12
    assert sorted(store.authenticate(f"Bearer {k}") for k, _ in made) == sorted(f"t{i}" for i in range(12))


def test_invalid_tenants_and_key_ids_are_described_not_repeated(keys_file):
    for tenant in ("", "Acme", "-x", "a" * 64, "a b", "ünï"):
        with pytest.raises(KeyFileError, match="invalid tenant name") as err:
            create_key(keys_file, tenant)
        assert tenant not in str(err.value) or not tenant
    assert not keys_file.exists()
    _, entry = create_key(keys_file, "acme")
    with pytest.raises(KeyFileError, match="not a key id") as err:
        revoke_key(keys_file, "fck_" + "z" * 40)
    assert "z" * 10 not in str(err.value)
    with pytest.raises(KeyFileError, match="no key with id aaaaaaaaaa"):
        revoke_key(keys_file, "aaaaaaaaaa")
    with pytest.raises(KeyFileError, match="no API key file"):
        revoke_key(keys_file.with_name("other"), entry.key_id)


def test_revoke_takes_a_whole_key_too(keys_file):
    key, entry = create_key(keys_file, "acme")
    revoked, was_active = revoke_key(keys_file, key)
    assert was_active and revoked.key_id == entry.key_id


def test_redact_keeps_the_key_id_only():
    key = api_keys.new_key()
    text = api_keys.redact(f"call with {key} failed; again: Bearer {key}.")
    assert _secret(key) not in text and text.count(key.rsplit("_", 1)[0] + "_<redacted>") == 2


def test_no_secret_in_any_message_or_log_record(keys_file, caplog, capsys):
    """Every path that fails or logs, with real keys around: the secrets show up nowhere."""
    caplog.set_level(logging.DEBUG)
    key, entry = create_key(keys_file, "acme")
    store = KeyStore(keys_file, reload_interval_s=0)
    forged = api_keys.new_key(entry.key_id)
    messages = []
    for value in (f"Bearer {forged}", forged, f"Basic {key}", f"Bearer {key} {key}", f"Bearer {key}!",
                  f"Bearer {key[:-1]}", f"{key} Bearer"):
        with pytest.raises(AuthError) as err:
            store.authenticate(value)
        messages.append(str(err.value))
    keys_file.write_text(keys_file.read_text().replace(entry.sha256, key))  # a key pasted where its hash goes
    _bump(keys_file)
    assert store.authenticate(f"Bearer {key}") == "acme"  # the bad file is ignored, and logged
    with pytest.raises(KeyFileError) as err:
        list_keys(keys_file)
    messages.append(str(err.value))
    assert cli_main(["keys", "list", "--keys-file", str(keys_file)]) == 2
    assert cli_main(["keys", "revoke", key + "x", "--keys-file", str(keys_file)]) == 2
    out = capsys.readouterr()
    logged = [r.getMessage() for r in caplog.records] + [str(r.args) for r in caplog.records]
    assert any("sha256 must be" in m for m in logged)
    for secret in (_secret(key), _secret(forged), _secret(key)[:-1]):
        for text in messages + logged + [out.out, out.err]:
            assert secret not in text


# --- the CLI ----------------------------------------------------------------------------------

def test_cli_create_prints_the_key_alone(keys_file, capsys):
    assert cli_main(["keys", "create", "--tenant", "acme", "--keys-file", str(keys_file)]) == 0
    out = capsys.readouterr()
    key = out.out.strip()
    assert out.out == key + "\n" and api_keys.KEY.fullmatch(key)
    assert str(keys_file) in out.err and "acme" in out.err and _secret(key) not in out.err
    assert KeyStore(keys_file).authenticate(f"Bearer {key}") == "acme"


def test_cli_list_and_revoke(keys_file, capsys):
    cli_main(["keys", "create", "--tenant", "acme", "--keys-file", str(keys_file)])
    cli_main(["keys", "create", "--tenant", "beta", "--keys-file", str(keys_file)])
    key = capsys.readouterr().out.splitlines()[1]
    key_id = key.split("_")[1]
    store = KeyStore(keys_file, reload_interval_s=0)

    assert cli_main(["keys", "list", "--keys-file", str(keys_file)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["KEY", "ID", "TENANT", "CREATED", "STATUS"] and len(lines) == 3
    assert lines[2].split()[:2] == [key_id, "beta"] and lines[2].endswith("active")
    assert all(e.sha256 not in "\n".join(lines) for e in list_keys(keys_file))

    assert cli_main(["keys", "revoke", key_id, "--keys-file", str(keys_file)]) == 0
    assert f"revoked key {key_id} (tenant beta)" in capsys.readouterr().out
    _bump(keys_file)
    with pytest.raises(AuthError, match="unknown or revoked"):
        store.authenticate(f"Bearer {key}")
    assert cli_main(["keys", "revoke", key_id, "--keys-file", str(keys_file)]) == 0
    assert "already revoked" in capsys.readouterr().out
    cli_main(["keys", "list", "--keys-file", str(keys_file)])
    assert "revoked 20" in capsys.readouterr().out.splitlines()[2]


def test_cli_key_file_from_the_environment_else_run_api_keys(tmp_path, monkeypatch, capsys):
    env_file = tmp_path / "env_keys"
    monkeypatch.setenv("FUNCHAT_API_KEYS_FILE", str(env_file))
    assert cli_main(["keys", "create", "--tenant", "acme"]) == 0
    assert [e.tenant for e in list_keys(env_file)] == ["acme"]
    monkeypatch.delenv("FUNCHAT_API_KEYS_FILE")
    monkeypatch.chdir(tmp_path)
    assert cli_main(["keys", "create", "--tenant", "beta"]) == 0
    assert [e.tenant for e in list_keys(tmp_path / ".run" / "api_keys")] == ["beta"]


def test_cli_errors_exit_2_with_the_problem(keys_file, capsys):
    assert cli_main(["keys", "create", "--tenant", "Not Valid", "--keys-file", str(keys_file)]) == 2
    assert "funchat keys create: error: invalid tenant name" in capsys.readouterr().err
    assert cli_main(["keys", "list", "--keys-file", str(keys_file)]) == 2
    assert "funchat keys list: error: no API key file at" in capsys.readouterr().err
    assert cli_main(["keys", "revoke", "nope", "--keys-file", str(keys_file)]) == 2
    assert "funchat keys revoke: error: not a key id" in capsys.readouterr().err


# ---- tenants' own limits ----

def test_a_tenants_limits_are_set_merged_kept_across_rewrites_and_cleared(keys_file):
    create_key(keys_file, "acme")
    assert set_tenant_limits(keys_file, "acme", max_calls=4, rate_per_s=2.5) == {"max_calls": 4, "rate_per_s": 2.5}
    assert set_tenant_limits(keys_file, "acme", burst=10, max_calls=None) == {"max_calls": 4, "rate_per_s": 2.5,
                                                                             "burst": 10}
    _, entry = create_key(keys_file, "beta")  # the file rewritten by a key's creation and revocation ...
    revoke_key(keys_file, entry.key_id)
    assert api_keys.tenant_limits(keys_file) == {"acme": {"max_calls": 4, "rate_per_s": 2.5, "burst": 10}}  # kept
    assert json.loads(keys_file.read_text())["tenants"] == {"acme": {"max_calls": 4, "rate_per_s": 2.5, "burst": 10}}
    assert set_tenant_limits(keys_file, "acme", clear=True, burst=3) == {"burst": 3}
    assert set_tenant_limits(keys_file, "acme", clear=True) == {}
    assert "tenants" not in json.loads(keys_file.read_text())
    assert [e.tenant for e in list_keys(keys_file)] == ["acme", "beta"]


@pytest.mark.parametrize("limits, says", [
    ({"max_calls": -1}, "max_calls must be an integer >= 0"),
    ({"max_calls": 1.5}, "max_calls must be an integer >= 0"),
    ({"burst": 0}, "burst must be an integer >= 1"),
    ({"rate_per_s": float("nan")}, "rate_per_s must be a number >= 0"),
    ({"rate_per_s": float("inf")}, "rate_per_s must be a number >= 0"),
])
def test_invalid_limits_are_refused_and_named(keys_file, limits, says):
    create_key(keys_file, "acme")
    with pytest.raises(KeyFileError, match=says):
        set_tenant_limits(keys_file, "acme", **limits)
    assert api_keys.tenant_limits(keys_file) == {}


@pytest.mark.parametrize("tenants, says", [
    ([], '"tenants" must be an object'),
    ({"Not Valid": {}}, "tenants: a tenant name is"),
    ({"acme": 4}, "tenants.acme: must be an object"),
    ({"acme": {"max_call": 4}}, "tenants.acme: unknown limit 'max_call'; known: max_calls, rate_per_s, burst"),
    ({"acme": {"max_calls": True}}, "tenants.acme: max_calls must be an integer >= 0"),
    ({"acme": {"rate_per_s": "fast"}}, "tenants.acme: rate_per_s must be a number >= 0"),
])
def test_a_malformed_tenants_section_is_named(keys_file, tenants, says):
    keys_file.parent.mkdir(parents=True)
    keys_file.write_text(json.dumps({"version": 1, "keys": [], "tenants": tenants}))
    with pytest.raises(KeyFileError, match=says):
        KeyStore(keys_file)


def test_the_store_serves_a_tenants_limits_and_reloads_them(keys_file):
    create_key(keys_file, "acme")
    clock = [0.0]
    store = KeyStore(keys_file, clock=lambda: clock[0])
    assert store.tenant_limits("acme") == {}
    set_tenant_limits(keys_file, "acme", max_calls=2)
    clock[0] += api_keys.RELOAD_INTERVAL_S
    assert store.refresh()
    assert store.tenant_limits("acme") == {"max_calls": 2} and store.tenant_limits("other") == {}


def test_cli_limits(keys_file, capsys):
    cli_main(["keys", "create", "--tenant", "acme", "--keys-file", str(keys_file)])
    capsys.readouterr()
    assert cli_main(["keys", "limits", "--tenant", "acme", "--max-calls", "4", "--rate", "2.5",
                     "--keys-file", str(keys_file)]) == 0
    assert capsys.readouterr().out == (f"tenant acme in {keys_file}: own limits max_calls 4, rate_per_s 2.5; "
                                       "servers reading this file apply them within 2 s\n")
    assert cli_main(["keys", "limits", "--tenant", "acme", "--burst", "0", "--keys-file", str(keys_file)]) == 2
    assert "burst must be an integer >= 1" in capsys.readouterr().err
    assert cli_main(["keys", "limits", "--tenant", "acme", "--clear", "--keys-file", str(keys_file)]) == 0
    assert "own limits none (the server's defaults)" in capsys.readouterr().out
