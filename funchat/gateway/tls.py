"""The public API's TLS credentials, re-read from their files when they change (no restart).

gRPC asks `CertificateFiles.fetch` before each TLS handshake (`grpc.dynamic_ssl_server_credentials`):
it answers None while the files are unchanged, else a new certificate configuration. A Kubernetes
Secret mounted as a directory is updated by swapping a symlink (`..data`), so a change is seen by
stat()ing the files through their symlinks. A pair that does not load (a key that is not the
certificate's, a file half written, a CA that is not PEM) is logged once and the last good one is
kept: a bad rotation never takes the API down. At start, a bad pair is an error.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger("funchat.gateway")


class TlsFilesError(ValueError):
    """The certificate, key or client CA files cannot be used; the message names the file."""


@dataclass(frozen=True)
class _Pem:
    cert: bytes
    key: bytes
    client_ca: bytes | None


def _signature(paths: list[Path]) -> tuple:
    """What changes when a file is replaced, rewritten or re-pointed (symlinks followed)."""
    signature = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as exc:
            signature.append((str(path), exc.errno))
        else:
            signature.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(signature)


def load_pem(cert_file: Path, key_file: Path, client_ca_file: Path | None) -> _Pem:
    """The files' contents, checked the way a TLS server would use them (Python's ssl module, the
    same OpenSSL checks: PEM, and the key is the certificate's). Raises TlsFilesError."""
    def read(path: Path) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise TlsFilesError(f"cannot read {path}: {exc.strerror}") from None

    cert, key = read(cert_file), read(key_file)
    client_ca = read(client_ca_file) if client_ca_file is not None else None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError) as exc:
        raise TlsFilesError(f"{cert_file} and {key_file} are not a PEM certificate chain and its private key "
                            f"({getattr(exc, 'reason', None) or exc})") from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cadata=client_ca.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as exc:
            raise TlsFilesError(f"{client_ca_file} is not a PEM CA bundle ({exc})") from None
    # read again: a file rewritten between the read and the check would pair a checked file with an unchecked one
    if (read(cert_file), read(key_file)) != (cert, key):
        raise TlsFilesError(f"{cert_file} or {key_file} changed while it was read")
    return _Pem(cert, key, client_ca)


class CertificateFiles:
    """The certificate configuration of the files; `fetch` is gRPC's certificate-configuration fetcher."""

    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None = None):
        self.paths = [Path(cert_file), Path(key_file)] + ([Path(client_ca_file)] if client_ca_file else [])
        self.client_auth = client_ca_file is not None
        self._lock = threading.Lock()  # gRPC may ask from several threads at once
        self._seen = _signature(self.paths)
        self._failed: tuple | None = None  # the signature last logged as broken: log each breakage once
        self.reloads = 0
        self.initial = self._configuration(load_pem(*self._files()))  # TlsFilesError at start

    def _files(self) -> tuple[Path, Path, Path | None]:
        return self.paths[0], self.paths[1], self.paths[2] if self.client_auth else None

    @staticmethod
    def _configuration(pem: _Pem):
        return grpc.ssl_server_certificate_configuration([(pem.key, pem.cert)], root_certificates=pem.client_ca)

    def fetch(self):
        """None while the files are unchanged (gRPC keeps the current configuration), else the new one.
        Never raises: gRPC calls it before each handshake."""
        with self._lock:
            signature = _signature(self.paths)
            if signature == self._seen:
                return None
            try:
                configuration = self._configuration(load_pem(*self._files()))
            except TlsFilesError as exc:
                if signature != self._failed:
                    self._failed = signature
                    log.error("TLS files changed but cannot be used, keeping the previous certificate: %s", exc)
                return None
            self._seen, self._failed = signature, None
            self.reloads += 1
            log.warning("TLS certificate reloaded from %s", self.paths[0])
            return configuration

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self.initial, self.fetch,
                                                   require_client_authentication=self.client_auth)
