"""API keys: which tenant is calling. Keys are stored hashed in a key file that servers re-read
when it changes, so keys are added and revoked without a restart.

Standard library only: the orchestrator imports this module, and so does the `funchat keys` CLI,
which must work in a client-only install.

Keys: `fck_<key_id>_<secret>`, e.g. `fck_k3v7q2m4xa_<52 characters>`, all of `a-z2-7` (lower-case
base32) besides the underscores, so a key is one word to a shell, a URL and a double click.
`key_id` (10 characters, 50 bits) is public: it names the key in the key file, in `funchat keys
list`, in logs and in error messages. `secret` is 32 random bytes (256 bits). A key is shown once,
by `funchat keys create`; only its SHA-256 is kept.

Callers send the key as gRPC metadata `authorization: Bearer <key>` (RFC 6750: the scheme is
case-insensitive, one or more spaces before the key). Clients read it from FUNCHAT_API_KEY
(`API_KEY_ENV`).

The key file (FUNCHAT_API_KEYS_FILE, else .run/api_keys; a Secret in the chart) is one JSON
document, one key per line:

    {
      "version": 1,
      "keys": [
        {"key_id": "k3v7q2m4xa", "tenant": "acme", "sha256": "<64 hex>", "created": "2025-01-31T12:00:00Z"},
        {"key_id": "p5tq7c2hzd", "tenant": "acme", "sha256": "<64 hex>", "created": "...", "revoked": "..."}
      ]
    }

An optional "tenants" object overrides the server's default limits for some tenants (`funchat keys
limits`; each field optional, FUNCHAT_TENANT_* give the rest; funchat.orchestrator.tenant_limits):

      "tenants": {"acme": {"max_calls": 4, "rate_per_s": 2.5, "burst": 10}}

`sha256` is the hex SHA-256 of the whole key (UTF-8); `created` and `revoked` are ISO 8601 UTC
times; an entry with `revoked` (not null) authenticates nothing but stays, so the file keeps the
key's history. A tenant name is 1-63 characters of a-z 0-9 _ . -, starting with a letter or a
digit (`TENANT`). Other fields (a note someone added by hand) are ignored, and dropped when
`funchat keys` rewrites the file; a change of meaning gets a new "version", which older code
refuses.

The API:

    # the key file (`funchat keys create|list|revoke`; KeyFileError names the problem)
    create_key(path, tenant) -> (key, KeyEntry)   # creates the file (and its folder) when missing
    revoke_key(path, key_id_or_key) -> (KeyEntry, was_active)
    list_keys(path) -> [KeyEntry]                 # KeyEntry: key_id, tenant, sha256, created, revoked
    set_tenant_limits(path, tenant, max_calls=, rate_per_s=, burst=, clear=False) -> {field: value}
    default_keys_file() -> Path                   # $FUNCHAT_API_KEYS_FILE, else .run/api_keys

    # servers
    store = KeyStore(path, reload_interval_s=2.0)  # KeyFileError: missing or malformed file
    tenant = store.authenticate_metadata(context.invocation_metadata())  # exactly one authorization entry
    tenant = store.authenticate(authorization_value)  # "Bearer <key>", or None/"" when none was sent
    tenant = store.verify_key(key)                # the bare key
    store.refresh(force=False) -> bool            # the authenticate* calls do it; force: now
    store.tenant_limits(tenant) -> {field: value} # the tenant's overrides ({} when none)
    # AuthError: answer UNAUTHENTICATED with str(exc), which says what is wrong and names at most
    # the key id; exc.reason ("missing", "malformed", "unknown") fits a metric label, exc.key_id a log.

    # clients and logs
    bearer_metadata(key) -> (("authorization", "Bearer <key>"),)   # the key from $FUNCHAT_API_KEY
    redact(text) -> text with every key's secret replaced by <redacted>

Reloads: `authenticate*` calls `refresh()`, which at most every `reload_interval_s` (2 s) stats the
file and re-reads it when its (device, inode, size, mtime, ctime) changed. os.stat follows symlinks,
so the atomic `..data` symlink swap with which Kubernetes updates a mounted Secret counts as a
change, as does this module's own write (a new inode through os.replace) and an in-place edit. A
file that turns missing, unreadable or malformed keeps the last good keys (rejecting every call
because someone saved a half-edited file would take the service down) and logs one error per
distinct problem, never a key; the next good version is loaded. A missing or malformed file at
start is a KeyFileError: a server must not start with no idea of its keys. The check runs in the
calling thread (the event loop's too): one stat per interval, and a read of a small file when it
changed; a call that finds another one checking goes on with the current keys instead of waiting.

Writes (`create_key`, `revoke_key`) hold an exclusive flock on the file's folder (so concurrent
`funchat keys create`s do not lose each other's entries), rewrite the whole file to a temporary
file in the same folder (mode 0600) and os.replace it over the key file: a reader sees the old file
or the new one, never half of one.

Secrets: no error message, exception or log record of this module contains a key or a value that
could be one (an invalid tenant name or key id is described, not repeated); `redact(text)` cuts
the secret out of any key in a text.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

try:
    import fcntl  # POSIX; without it (Windows) writes are still atomic, just not serialized
except ImportError:  # pragma: no cover
    fcntl = None

from funchat.errors import FunchatError

log = logging.getLogger(__name__)

API_KEY_ENV = "FUNCHAT_API_KEY"             # the key a client sends
KEYS_FILE_ENV = "FUNCHAT_API_KEYS_FILE"     # the key file servers and `funchat keys` use
DEFAULT_KEYS_FILE = Path(".run/api_keys")   # `make up`'s key file, relative to the repository
KEY_PREFIX = "fck"
KEY_ID_CHARS = 10
SECRET_BYTES = 32
FILE_VERSION = 1
RELOAD_INTERVAL_S = 2.0

_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"  # base32, lower case
KEY_ID = re.compile(f"[{_ALPHABET}]{{{KEY_ID_CHARS}}}")
KEY = re.compile(f"{KEY_PREFIX}_([{_ALPHABET}]{{{KEY_ID_CHARS}}})_([{_ALPHABET}]{{52}})")  # 52 = 256 bits in base32
TENANT = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_ANY_KEY = re.compile(f"({KEY_PREFIX}_[{_ALPHABET}]{{{KEY_ID_CHARS}}}_)[A-Za-z0-9]+")  # for redact()

HOW_TO_SEND = "send `authorization: Bearer <key>`"
# The limits a key file may set per tenant, and what each must be
TENANT_LIMITS = {"max_calls": "an integer >= 0 (0: no limit)", "rate_per_s": "a number >= 0 (0: no limit)",
                 "burst": "an integer >= 1"}
TENANT_RULE = "1-63 characters of a-z 0-9 _ . -, starting with a letter or a digit"
KEY_ID_RULE = f"{KEY_ID_CHARS} characters of a-z 2-7, as `funchat keys list` shows them"


class KeyFileError(FunchatError):
    """A key file that cannot be read or written, or whose content is not a valid key file; also an
    invalid tenant name or key id given to create_key/revoke_key. The message never contains a key."""


class AuthError(Exception):
    """A call that does not authenticate. str(exc) is fit to send to the caller (UNAUTHENTICATED):
    it says what is wrong and names at most the key id.

    reason: "missing" (no authorization metadata), "malformed" (not `Bearer <key>`, or not a key
    of our format) or "unknown" (no such key id, a revoked key, or a wrong secret: one answer for
    the three, so that a caller learns nothing about which key ids exist).
    key_id: the presented key's id when it has one, else None."""

    def __init__(self, reason: str, message: str, key_id: str | None = None):
        super().__init__(message)
        self.reason = reason
        self.key_id = key_id


@dataclasses.dataclass(frozen=True)
class KeyEntry:
    """One key of the key file: everything but the key itself."""

    key_id: str
    tenant: str
    sha256: str
    created: str
    revoked: str | None = None

    @property
    def active(self) -> bool:
        return self.revoked is None

    def to_json(self) -> dict[str, str]:
        entry = {"key_id": self.key_id, "tenant": self.tenant, "sha256": self.sha256, "created": self.created}
        if self.revoked is not None:
            entry["revoked"] = self.revoked
        return entry


# --- keys --------------------------------------------------------------------------------------

def _random_base32(n_chars: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(n_chars))


def hash_key(key: str) -> str:
    """Hex SHA-256 of the whole key. A fast hash is right here: a key carries 256 random bits, so
    guessing it from its hash is hopeless however fast the hash; slow password hashes (bcrypt,
    scrypt, argon2) only help low-entropy secrets, and would cost milliseconds on every call."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key(key_id: str | None = None) -> str:
    """A fresh key: `fck_<key_id>_<secret>` (a random key id unless given)."""
    secret = base64.b32encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii").rstrip("=").lower()
    return f"{KEY_PREFIX}_{key_id or _random_base32(KEY_ID_CHARS)}_{secret}"


def parse_key(key: str) -> str:
    """The key id of a well-formed key; AuthError("malformed") otherwise (without repeating it)."""
    m = KEY.fullmatch(key)
    if m is None:
        raise AuthError("malformed", f"malformed API key: expected {KEY_PREFIX}_<key id>_<secret> "
                                     f"as printed by `funchat keys create`")
    return m.group(1)


def parse_authorization(value: str | None) -> str:
    """The key in an authorization value `Bearer <key>`. Surrounding whitespace is ignored (HTTP/2
    drops it anyway); the scheme is case-insensitive and followed by one or more spaces (RFC 6750);
    anything else is AuthError, whose message repeats nothing of the value."""
    value = (value or "").strip()
    if not value:
        raise AuthError("missing", f"missing authorization metadata: {HOW_TO_SEND}")
    scheme, _, rest = value.partition(" ")
    if scheme.lower() != "bearer":
        hint = " (the key alone was sent)" if KEY.fullmatch(scheme) else ""
        raise _malformed(f"the scheme must be Bearer{hint}")
    key = rest.lstrip(" ")
    if not key:
        raise _malformed("no key after Bearer")
    if len(key.split()) != 1:
        raise _malformed("more than one word after Bearer")
    return key


def _malformed(problem: str) -> AuthError:
    return AuthError("malformed", f"malformed authorization metadata: {problem}; {HOW_TO_SEND}")


def redact(text: str) -> str:
    """`text` with the secret of every key in it replaced by `<redacted>` (the key id stays)."""
    return _ANY_KEY.sub(r"\1<redacted>", text)


def bearer_metadata(key: str) -> tuple[tuple[str, str], ...]:
    """The gRPC metadata a client sends with `key`."""
    return (("authorization", f"Bearer {key}"),)


def default_keys_file(environ: Mapping[str, str] | None = None) -> Path:
    """$FUNCHAT_API_KEYS_FILE, else .run/api_keys."""
    environ = os.environ if environ is None else environ
    return Path(environ.get(KEYS_FILE_ENV) or DEFAULT_KEYS_FILE)


def _utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_tenant(tenant: str) -> str:
    """`tenant` when it is a valid tenant name; KeyFileError (which does not repeat it) otherwise."""
    if not isinstance(tenant, str) or TENANT.fullmatch(tenant) is None:
        what = f"{len(tenant)} characters" if isinstance(tenant, str) else type(tenant).__name__
        raise KeyFileError(f"invalid tenant name ({what}): a tenant name is {TENANT_RULE}")
    return tenant


# --- the key file ------------------------------------------------------------------------------

def _is_utc_time(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        return datetime.fromisoformat(value).utcoffset() is not None
    except ValueError:
        return False


def _entry_from_json(i: int, raw: Any) -> KeyEntry:
    """Entry i (0-based) of a key file; KeyFileError naming the entry and the field, not the value."""
    if not isinstance(raw, dict):
        raise KeyFileError(f"keys[{i}] is not an object")
    key_id = raw.get("key_id")
    if not isinstance(key_id, str) or KEY_ID.fullmatch(key_id) is None:
        raise KeyFileError(f"keys[{i}]: key_id must be {KEY_ID_CHARS} characters of a-z 2-7")
    where = f"keys[{i}] (key id {key_id})"
    tenant = raw.get("tenant")
    if not isinstance(tenant, str) or TENANT.fullmatch(tenant) is None:
        raise KeyFileError(f"{where}: tenant must be {TENANT_RULE}")
    digest = raw.get("sha256")
    if not isinstance(digest, str) or SHA256_HEX.fullmatch(digest) is None:
        raise KeyFileError(f"{where}: sha256 must be 64 lower-case hex digits (the SHA-256 of the key, not the key)")
    if not _is_utc_time(raw.get("created")):
        raise KeyFileError(f"{where}: created must be an ISO 8601 time with a UTC offset, e.g. 2025-01-31T12:00:00Z")
    revoked = raw.get("revoked")
    if revoked is not None and not _is_utc_time(revoked):
        raise KeyFileError(f"{where}: revoked must be null or an ISO 8601 time with a UTC offset")
    return KeyEntry(key_id=key_id, tenant=tenant, sha256=digest, created=raw["created"], revoked=revoked)


def parse_key_file(data: bytes) -> dict[str, KeyEntry]:
    """The entries of a key file's content by key id; KeyFileError when it is not a valid key file.
    (json's own messages give a line and column, never the text.)"""
    return _parse_key_file(data)[0]


def _check_limit(where: str, field: str, value: Any) -> int | float:
    """A tenant limit's value, or KeyFileError saying what it must be (not repeating it)."""
    if field not in TENANT_LIMITS:
        raise KeyFileError(f"{where}: unknown limit {field!r}; known: {', '.join(TENANT_LIMITS)}")
    valid = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
             and value >= (1 if field == "burst" else 0) and (field == "rate_per_s" or float(value).is_integer()))
    if not valid:
        raise KeyFileError(f"{where}: {field} must be {TENANT_LIMITS[field]}")
    return value if field == "rate_per_s" else int(value)


def _tenants_from_json(raw: Any) -> dict[str, dict[str, int | float]]:
    """The "tenants" object of a key file: limits by tenant name; KeyFileError naming what is wrong."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise KeyFileError('"tenants" must be an object of tenant name -> limits')
    tenants = {}
    for tenant, limits in raw.items():
        if TENANT.fullmatch(tenant) is None:
            raise KeyFileError(f"tenants: a tenant name is {TENANT_RULE}")
        if not isinstance(limits, dict):
            raise KeyFileError(f"tenants.{tenant}: must be an object such as {{\"max_calls\": 4}}")
        tenants[tenant] = {field: _check_limit(f"tenants.{tenant}", field, value) for field, value in limits.items()}
    return tenants


def _parse_key_file(data: bytes) -> tuple[dict[str, KeyEntry], dict[str, dict[str, int | float]]]:
    """(entries by key id, limits by tenant) of a key file's content."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise KeyFileError("not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise KeyFileError(f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(doc, dict) or doc.get("version") != FILE_VERSION or not isinstance(doc.get("keys"), list):
        raise KeyFileError(f'expected a JSON object {{"version": {FILE_VERSION}, "keys": [...]}}')
    entries: dict[str, KeyEntry] = {}
    for i, raw in enumerate(doc["keys"]):
        entry = _entry_from_json(i, raw)
        if entry.key_id in entries:
            raise KeyFileError(f"keys[{i}]: key id {entry.key_id} appears twice")
        entries[entry.key_id] = entry
    return entries, _tenants_from_json(doc.get("tenants"))


def format_key_file(entries: Iterable[KeyEntry], tenants: Mapping[str, Mapping[str, int | float]] | None = None
                    ) -> str:
    """A key file's text: one entry per line, so that it reads (and diffs) key by key; then the
    tenants' limits, one tenant per line, when there are any."""
    lines = [json.dumps(e.to_json(), ensure_ascii=False) for e in entries]
    body = ",\n".join("    " + line for line in lines)
    text = f'{{\n  "version": {FILE_VERSION},\n  "keys": [\n{body}{chr(10) if lines else ""}  ]'
    if tenants:
        limits = ",\n".join(f"    {json.dumps(t)}: {json.dumps(dict(v))}" for t, v in sorted(tenants.items()))
        text += f',\n  "tenants": {{\n{limits}\n  }}'
    return text + "\n}\n"


def _read_key_file(path: Path) -> tuple[dict[str, KeyEntry], dict[str, dict[str, int | float]], tuple]:
    """(entries, tenants' limits, the file's signature); KeyFileError with the file's name."""
    try:
        with open(path, "rb") as f:
            signature = _signature(os.fstat(f.fileno()))  # of the very file read, even if replaced meanwhile
            data = f.read()
    except FileNotFoundError:
        raise KeyFileError(f"no API key file at {path}: create it with `funchat keys create --tenant NAME "
                           f"--keys-file {path}`") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read API key file {path}: {exc.strerror}") from None
    try:
        return (*_parse_key_file(data), signature)
    except KeyFileError as exc:
        raise KeyFileError(f"API key file {path}: {exc}") from None


def _signature(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock for a read-modify-write of the key file: a flock on its folder (not on the
    file, which os.replace swaps; and no lock file left lying next to it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _write_key_file(path: Path, entries: Iterable[KeyEntry],
                    tenants: Mapping[str, Mapping[str, int | float]] | None = None) -> None:
    """Replace the key file atomically: a temporary file (mode 0600) in its folder, os.replace."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(format_key_file(entries, tenants))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _read_for_update(path: Path) -> tuple[dict[str, KeyEntry], dict[str, dict[str, int | float]]]:
    """The entries and tenants' limits of `path` for a write; a missing file is an empty one."""
    if not path.exists():
        return {}, {}
    return _read_key_file(path)[:2]


def create_key(path: str | Path, tenant: str) -> tuple[str, KeyEntry]:
    """A new key for `tenant`, its hash added to the key file at `path` (created when missing, with
    its folder); returns (key, entry). The key is not stored anywhere: show it once."""
    path = Path(path)
    check_tenant(tenant)
    with _locked(path):
        entries, tenants = _read_for_update(path)
        key_id = _random_base32(KEY_ID_CHARS)
        while key_id in entries:  # 50 bits: a clash is all but impossible, yet cheap to rule out
            key_id = _random_base32(KEY_ID_CHARS)
        key = new_key(key_id)
        entry = KeyEntry(key_id=key_id, tenant=tenant, sha256=hash_key(key), created=_utc_now())
        entries[key_id] = entry
        _write_key_file(path, entries.values(), tenants)
    return key, entry


def revoke_key(path: str | Path, key_id: str) -> tuple[KeyEntry, bool]:
    """Mark key `key_id` (a key id, or a whole key) revoked in the key file; returns (its entry,
    whether it was active until now). Revoking a revoked key changes nothing. KeyFileError: no such
    key id, or no file."""
    path = Path(path)
    whole_key = KEY.fullmatch(key_id) if isinstance(key_id, str) else None
    if whole_key is not None:  # a leaked key pasted as is: revoke it, by its id
        key_id = whole_key.group(1)
    if not isinstance(key_id, str) or KEY_ID.fullmatch(key_id) is None:
        raise KeyFileError(f"not a key id: a key id is {KEY_ID_RULE}")
    with _locked(path):
        entries, tenants, _ = _read_key_file(path)
        entry = entries.get(key_id)
        if entry is None:
            raise KeyFileError(f"no key with id {key_id} in {path}")
        if not entry.active:
            return entry, False
        entry = dataclasses.replace(entry, revoked=_utc_now())
        entries[key_id] = entry
        _write_key_file(path, entries.values(), tenants)
    return entry, True


def set_tenant_limits(path: str | Path, tenant: str, clear: bool = False,
                      **limits: int | float | None) -> dict[str, int | float]:
    """Set some of a tenant's limits in the key file (`TENANT_LIMITS`; a limit given as None is left
    as it is; `clear` removes the others first: without limits given, the server's defaults apply
    to the tenant again); returns the
    tenant's limits now. Servers take them within their reload interval, like keys. KeyFileError: an
    invalid tenant name or value, or no file."""
    path = Path(path)
    check_tenant(tenant)
    given = {field: _check_limit("limits", field, value) for field, value in limits.items() if value is not None}
    with _locked(path):
        entries, tenants, _ = _read_key_file(path)
        current = {**({} if clear else tenants.get(tenant, {})), **given}
        if current:
            tenants[tenant] = current
        else:
            tenants.pop(tenant, None)
        _write_key_file(path, entries.values(), tenants)
    return current


def list_keys(path: str | Path) -> list[KeyEntry]:
    """The key file's entries, in file order (oldest first), revoked ones included."""
    return list(_read_key_file(Path(path))[0].values())


def tenant_limits(path: str | Path) -> dict[str, dict[str, int | float]]:
    """The limits the key file sets, by tenant."""
    return _read_key_file(Path(path))[1]


# --- the server's view -------------------------------------------------------------------------

_NO_SUCH_KEY = hash_key(new_key())  # compared against when the key id is unknown: same work either way


class KeyStore:
    """The keys of a key file, for authenticating calls; re-reads the file when it changes (see the
    module docstring). Safe to share between the event loop and threads: the keys are an immutable
    snapshot swapped in whole, and a reload is done by one caller at a time while the others go on
    with the keys they have (a reload never blocks a call)."""

    def __init__(self, path: str | Path, reload_interval_s: float = RELOAD_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.path = Path(path)
        self.reload_interval_s = reload_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        # KeyFileError: a server must know its keys
        self._keys, self._tenants, self._file_signature = _read_key_file(self.path)
        self._checked_at = clock()
        self._problem: str | None = None  # the last reload failure, logged once
        log.info("API key file %s: %s", self.path, self._summary())

    def _summary(self) -> str:
        active = sum(e.active for e in self._keys.values())
        tenants = len({e.tenant for e in self._keys.values() if e.active})
        return f"{active} active keys for {tenants} tenants ({len(self._keys) - active} revoked)"

    @property
    def entries(self) -> list[KeyEntry]:
        """The keys in use now (revoked ones included)."""
        return list(self._keys.values())

    def refresh(self, force: bool = False) -> bool:
        """Re-read the key file if it changed since it was last read and `reload_interval_s` has
        passed since the last check (or `force`); returns whether new keys were loaded. A file that
        turned missing, unreadable or malformed keeps the keys loaded before, and is logged once."""
        if not force and self._clock() - self._checked_at < self.reload_interval_s:
            return False
        if not self._lock.acquire(blocking=False):  # another caller is checking right now
            return False
        try:
            self._checked_at = self._clock()
            return self._reload_if_changed()
        finally:
            self._lock.release()

    def _reload_if_changed(self) -> bool:
        try:
            current = _signature(os.stat(self.path))
        except OSError:
            current = None  # missing or unreachable: _read_key_file below says which
        if current is not None and current == self._file_signature:
            return False
        try:
            keys, tenants, signature = _read_key_file(self.path)
        except KeyFileError as exc:
            if current is not None:
                self._file_signature = current  # do not re-read this bad version every interval
            self._report_problem(str(exc))
            return False
        self._keys, self._tenants, self._file_signature = keys, tenants, signature
        if self._problem is not None:
            log.warning("API key file %s is valid again", self.path)
        self._problem = None
        log.info("API key file %s reloaded: %s", self.path, self._summary())
        return True

    def _report_problem(self, problem: str) -> None:
        if problem != self._problem:
            log.error("%s; keeping the keys loaded before: %s", problem, self._summary())
        self._problem = problem

    def tenant_limits(self, tenant: str) -> dict[str, int | float]:
        """The limits the key file sets for `tenant` ({} when none: the server's defaults apply)."""
        return self._tenants.get(tenant, {})

    def verify_key(self, key: str) -> str:
        """The tenant of `key` (the key itself, not an authorization value); AuthError otherwise."""
        key_id = parse_key(key)
        self.refresh()
        entry = self._keys.get(key_id)
        matches = hmac.compare_digest(hash_key(key), entry.sha256 if entry is not None else _NO_SUCH_KEY)
        if entry is None or not matches or not entry.active:
            raise AuthError("unknown", f"unknown or revoked API key (key id {key_id})", key_id=key_id)
        return entry.tenant

    def active_tenant(self, key_id: str) -> str:
        """The tenant of the key `key_id` while it is active (what a credential derived from it may act
        as); AuthError once it is revoked or gone."""
        self.refresh()
        entry = self._keys.get(key_id)
        if entry is None or not entry.active:
            raise AuthError("unknown", f"unknown or revoked API key (key id {key_id})", key_id=key_id)
        return entry.tenant

    def authenticate(self, authorization: str | None) -> str:
        """The tenant of an authorization value `Bearer <key>` (None or "" when none was sent);
        AuthError, to answer UNAUTHENTICATED with, otherwise."""
        return self.verify_key(parse_authorization(authorization))

    def authenticate_metadata(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
        """The tenant of a call's gRPC metadata (e.g. `context.invocation_metadata()`), which must
        hold exactly one `authorization` entry; AuthError otherwise."""
        values = [v for k, v in (metadata or ()) if k.lower() == "authorization"]
        if len(values) > 1:
            raise AuthError("malformed", f"malformed authorization metadata: sent {len(values)} times; "
                                         f"send one `authorization: Bearer <key>`")
        value = values[0] if values else None
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        return self.authenticate(value)
