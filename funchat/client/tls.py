"""TLS on the client side: how a client reaches a server that serves TLS (or mTLS).

A client is plaintext unless told otherwise: `tls=True` (the system's root certificates), or
`tls=TlsOptions(ca_file=..., cert_file=..., key_file=...)` (a private CA; a client certificate
for a server that asks for one, mTLS). `tls=None` reads the environment, as the CLI and the load
tests do: FUNCHAT_TLS_CA_FILE, FUNCHAT_TLS_CLIENT_CERT_FILE and FUNCHAT_TLS_CLIENT_KEY_FILE (any of
them turns TLS on), or FUNCHAT_TLS=1 (TLS with the system's roots).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import grpc

TLS_ENV = "FUNCHAT_TLS"
CA_FILE_ENV = "FUNCHAT_TLS_CA_FILE"
CERT_FILE_ENV = "FUNCHAT_TLS_CLIENT_CERT_FILE"
KEY_FILE_ENV = "FUNCHAT_TLS_CLIENT_KEY_FILE"


@dataclass(frozen=True)
class TlsOptions:
    """ca_file: PEM roots the server's certificate must chain to (None: the system's);
    cert_file + key_file: the client's certificate and key, for a server that requires one (mTLS)."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def __post_init__(self):
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError(f"a client certificate needs its key: give both cert_file and key_file "
                             f"({CERT_FILE_ENV} and {KEY_FILE_ENV}), or neither")

    @classmethod
    def from_env(cls) -> "TlsOptions | None":
        """TLS as the environment asks (see the module doc); None: plaintext."""
        files = {name: os.environ.get(env) or None for name, env in (("ca_file", CA_FILE_ENV),
                                                                     ("cert_file", CERT_FILE_ENV),
                                                                     ("key_file", KEY_FILE_ENV))}
        if not any(files.values()) and os.environ.get(TLS_ENV, "").strip().lower() not in ("1", "true", "yes"):
            return None
        return cls(**{name: Path(value) if value else None for name, value in files.items()})

    def credentials(self) -> grpc.ChannelCredentials:
        """The channel credentials; ValueError names a file that cannot be read."""
        def read(path: Path | None) -> bytes | None:
            if path is None:
                return None
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise ValueError(f"cannot read the TLS file {path}: {exc.strerror}") from None
        return grpc.ssl_channel_credentials(root_certificates=read(self.ca_file), private_key=read(self.key_file),
                                            certificate_chain=read(self.cert_file))


def resolve_tls(tls: "bool | TlsOptions | None") -> TlsOptions | None:
    """A client's `tls=` as TlsOptions, or None for plaintext: None reads the environment, False is
    plaintext, True is TLS with the system's root certificates."""
    if tls is None:
        return TlsOptions.from_env()
    if tls is True:
        return TlsOptions()
    if tls is False:
        return None
    if not isinstance(tls, TlsOptions):
        raise TypeError(f"tls must be a bool, a TlsOptions or None, not {type(tls).__name__}")
    return tls


def open_channel(target: str, tls: TlsOptions | None, aio: bool = True, options=None):
    """A grpc.aio (aio=True) or blocking channel to `target`, TLS when `tls` is given."""
    grpc_module = grpc.aio if aio else grpc
    if tls is None:
        return grpc_module.insecure_channel(target, options=options)
    return grpc_module.secure_channel(target, tls.credentials(), options=options)
