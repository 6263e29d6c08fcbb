"""Start and stop a local `redis-server`, the session store of the orchestrator (tests, `make up`).

The Debian `redis-server` binary is used as is (`apt-get install redis-server`); nothing runs as a
system service. One server per call of `start_redis`, in its own process group, with its working
directory and log under `<run_dir>/redis/`:

    with start_redis(run_dir) as server:   # a free 127.0.0.1 port, no persistence
        store = SessionStore(server.url, ...)

Persistence: by default nothing is written to disk (`--save "" --appendonly no`): sessions live as
long as the server, which is what tests and a single-machine stack want. `persist=True` turns the
append-only file on (`--appendonly yes --appendfsync always`, in `<run_dir>/redis/appendonlydir/`):
a server started again with the same `run_dir` (and port) reloads the sessions, so calls survive a
Redis restart, even a SIGKILL, with every write Redis acknowledged. ("everysec" is not enough: when
an fsync lags, Redis holds back the file write for up to 2 s but still answers the writes, and a
SIGKILL lost a turn's last writes in tests/integration/test_faults_processes.py.)

Security (what `make up` asks for; tests that start their own server leave both off):

- `auth=True`: AUTH with a password made once into `<run_dir>/redis_password` (mode 0600). It
  reaches redis-server through a config file, `<run_dir>/redis/redis.conf` (mode 0600,
  `requirepass`), never its command line, which `ps` shows to every user. `server.password` holds
  it for clients.
- `tls=True`: TLS only (`--port 0 --tls-port P`), with a local CA and a server certificate for
  127.0.0.1, ::1 and localhost made once into `<run_dir>/tls/` (`ensure_tls_files`; made anew when
  they are about to expire). `server.url` is then `rediss://…` and `server.ca_file` the CA that
  clients verify the server with. Debian's redis-server is built with TLS (it links libssl).

A server started again with the same `run_dir` and options (a restart) has the same password and
certificates, so its clients reconnect unchanged.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from funchat.dev.tritonserver import _alive as _pid_alive  # one liveness check (zombies count as gone)

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

INSTALL_HINT = "apt-get install redis-server"
PASSWORD_FILE = "redis_password"  # in run_dir
TLS_DIR = "tls"                   # in run_dir: ca.crt, redis.crt, redis.key
CERT_DAYS = 365
RENEW_BEFORE = datetime.timedelta(days=1)  # certificates this close to their end are made anew


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the local CA's certificate, the server's certificate and its key."""

    ca_file: Path
    cert_file: Path
    key_file: Path


@dataclass
class RedisServer:
    """A running redis-server. A context manager: leaving it stops the server."""

    host: str
    port: int
    pid: int
    log: Path
    process: subprocess.Popen | None = field(default=None, repr=False)
    password: str = field(default="", repr=False)  # AUTH; "" without
    tls: TlsFiles | None = None

    @property
    def url(self) -> str:
        """redis:// or, with TLS, rediss://; never with the password in it (it would end up in logs)."""
        return f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}/0"

    @property
    def ca_file(self) -> Path | None:
        """With TLS, the CA that signed the server's certificate: clients verify the server with it."""
        return self.tls.ca_file if self.tls else None

    def client(self, **kwargs) -> redis.Redis:
        """A synchronous client with this server's password and CA."""
        tls = {"ssl_ca_certs": str(self.tls.ca_file)} if self.tls else {}
        return redis.Redis.from_url(self.url, password=self.password or None, **tls, **kwargs)

    def alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return _pid_alive(self.pid)

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log, lines)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the server's process group, wait up to `timeout` s, then SIGKILL it. Idempotent."""
        if not self.alive():
            self._reap()
            return
        _signal_group(self.pid, signal.SIGTERM)  # redis exits cleanly on SIGTERM (and fsyncs its AOF)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.alive():
            time.sleep(0.02)
        if self.alive():
            _signal_group(self.pid, signal.SIGKILL)
        self._reap()

    def _reap(self) -> None:
        # Wait for our own child so that it leaves no zombie behind (and alive() reads False).
        if self.process is not None:
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_redis(run_dir: Path, port: int | None = None, host: str = "127.0.0.1", persist: bool = False,
                timeout: float = 10.0, auth: bool = False, tls: bool = False) -> RedisServer:
    """Launch redis-server on `host:port` (a free port when None) and wait until it answers PING.

    auth: require the password of `<run_dir>/redis_password` (made once). tls: serve TLS only, with
    the certificates of `<run_dir>/tls/` (made once). Raises RuntimeError when the binary is missing,
    or when the server exits or does not answer within `timeout` seconds (the message holds the
    tail of its log).
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError(f"redis-server is not installed (not on PATH); install it: {INSTALL_HINT}")
    run_dir = Path(run_dir).resolve()
    work = run_dir / "redis"
    work.mkdir(parents=True, exist_ok=True)
    log = work / "redis.log"
    password = ensure_password(run_dir) if auth else ""
    tls_files = ensure_tls_files(run_dir / TLS_DIR) if tls else None
    config = _write_config(work, password)
    # A free port found here can be taken by someone else before redis binds it: then try another
    # (only when we picked the port; a port the caller asked for is theirs to sort out).
    attempt = 0
    while True:
        attempt += 1
        server = _launch(binary, work, log, host, port if port is not None else _free_port(host), persist,
                         config, password, tls_files)
        try:
            _wait_ready(server, timeout)
            return server
        except RuntimeError as exc:
            server.stop()
            if port is None and attempt < 3 and "Address already in use" in str(exc):
                continue
            raise


def ensure_password(run_dir: Path) -> str:
    """The Redis password in `<run_dir>/redis_password`, made (mode 0600) when there is none."""
    path = Path(run_dir) / PASSWORD_FILE
    if not path.exists() or not path.read_text().strip():
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_private(path, secrets.token_urlsafe(32) + "\n")
    return path.read_text().strip()


def ensure_tls_files(tls_dir: Path, hosts: tuple[str, ...] = ("127.0.0.1", "::1", "localhost")) -> TlsFiles:
    """A local CA and a server certificate for `hosts` (IP addresses or names) in `tls_dir`: the files
    already there when they are complete and good for at least another day, else new ones. The CA's
    key is not kept: nothing else is ever signed with it (new certificates come with a new CA)."""
    tls_dir = Path(tls_dir)
    files = TlsFiles(tls_dir / "ca.crt", tls_dir / "redis.crt", tls_dir / "redis.key")
    if _still_valid(files):
        return files
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=CERT_DAYS)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "funchat local CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_cert = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
                   .issuer_name(ca_name).public_key(server_key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
                   .add_extension(x509.SubjectAlternativeName(names), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .sign(ca_key, hashes.SHA256()))
    tls_dir.mkdir(parents=True, exist_ok=True)
    _write_private(files.key_file, server_key.private_bytes(serialization.Encoding.PEM,
                                                            serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()).decode())
    files.cert_file.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    files.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    return files


def _still_valid(files: TlsFiles) -> bool:
    from cryptography import x509

    try:
        certs = [x509.load_pem_x509_certificate(path.read_bytes()) for path in (files.ca_file, files.cert_file)]
        if not files.key_file.read_bytes():
            return False
    except (OSError, ValueError):
        return False
    soon = datetime.datetime.now(datetime.timezone.utc) + RENEW_BEFORE
    return all(cert.not_valid_after_utc > soon for cert in certs)


def _write_private(path: Path, text: str) -> None:
    """Write `text` into `path`, a file only its owner can read, created so (never readable by others,
    not even for a moment), replacing it atomically."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _write_config(work: Path, password: str) -> Path:
    """<work>/redis.conf (mode 0600), rewritten at each start: what must stay off the command line."""
    config = work / "redis.conf"
    lines = ["# funchat.dev.redis_server writes this file at each start: settings kept off the command line"]
    if password:
        lines.append(f"requirepass {password}")
    _write_private(config, "\n".join(lines) + "\n")
    return config


def _launch(binary: str, work: Path, log: Path, host: str, port: int, persist: bool, config: Path,
            password: str, tls: TlsFiles | None) -> RedisServer:
    args = [binary, str(config), "--bind", host, "--save", "", "--dir", str(work), "--logfile", str(log),
            "--daemonize", "no"]
    if tls:  # TLS only: no plaintext port at all
        args += ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(tls.cert_file),
                 "--tls-key-file", str(tls.key_file), "--tls-ca-cert-file", str(tls.ca_file),
                 "--tls-auth-clients", "no"]  # clients prove who they are with the password, not a certificate
    else:
        args += ["--port", str(port)]
    if persist:
        args += ["--appendonly", "yes", "--appendfsync", "always"]  # see the module docstring
    else:
        args += ["--appendonly", "no"]
    with open(log, "ab") as out:
        out.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} starting redis-server on {host}:{port}"
                  f" (persist={persist}, auth={bool(password)}, tls={tls is not None})\n".encode())
        out.flush()
        # stdout/stderr go to the log too: errors in the arguments are printed before --logfile
        # takes effect. Own session, so that stop() can signal the whole group.
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   cwd=str(work), start_new_session=True)
    return RedisServer(host=host, port=port, pid=process.pid, log=log, process=process, password=password, tls=tls)


def _wait_ready(server: RedisServer, timeout: float) -> None:
    # No retries inside the client: this loop is the retry, and it must notice an exited server.
    client = server.client(socket_connect_timeout=0.5, socket_timeout=1.0, retry=Retry(NoBackoff(), 0))
    deadline = time.monotonic() + timeout
    try:
        while True:
            if not server.alive():
                code = server.process.poll() if server.process is not None else None
                raise RuntimeError(f"redis-server on {server.host}:{server.port} exited (code {code}) while "
                                   f"starting; log {server.log}:\n{server.log_tail()}")
            try:
                if client.ping():
                    return
            except redis.exceptions.BusyLoadingError:
                pass  # still loading its append-only file: wait
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on {server.host}:{server.port} did not answer PING within "
                                   f"{timeout:g} s; log {server.log}:\n{server.log_tail()}")
            time.sleep(0.05)
    finally:
        client.close()


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the server leads its own process group (start_new_session)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])
