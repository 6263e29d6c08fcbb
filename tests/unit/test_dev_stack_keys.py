"""`make up`'s API key (funchat.dev.stack): a key file and a key of tenant "dev" made once in the run
dir, kept across `up`s, readable by the owner only."""

from __future__ import annotations

import stat

from funchat.api_keys import KeyStore
from funchat.dev.stack import api_key_files, read_api_key


def test_up_makes_the_key_once_and_keeps_it(tmp_path):
    run_dir = tmp_path / "run"
    keys_file, key_file = api_key_files(run_dir)
    assert (keys_file, key_file) == (run_dir / "api_keys", run_dir / "api_key")
    for path in (keys_file, key_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    key = read_api_key(run_dir)
    assert key.startswith("fck_") and key_file.read_text() == key + "\n"
    assert KeyStore(keys_file).verify_key(key) == "dev"
    before = keys_file.read_bytes()
    assert api_key_files(run_dir) == (keys_file, key_file)  # the next `make up`
    assert read_api_key(run_dir) == key and keys_file.read_bytes() == before


def test_a_lost_key_gets_a_new_one_in_the_same_key_file(tmp_path):
    keys_file, key_file = api_key_files(tmp_path)
    old = read_api_key(tmp_path)
    key_file.unlink()
    api_key_files(tmp_path)
    new = read_api_key(tmp_path)
    assert new != old and stat.S_IMODE(key_file.stat().st_mode) == 0o600
    store = KeyStore(keys_file)
    assert store.verify_key(new) == store.verify_key(old) == "dev"
    assert read_api_key(tmp_path / "nowhere") == ""
