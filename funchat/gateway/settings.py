"""The gateway's settings: environment variables `FUNCHAT_<FIELD>` (or keyword arguments).

The gateway shares its port names with the orchestrator (funchat.orchestrator.settings):
FUNCHAT_GRPC_PORT is the public API, which the gateway serves; FUNCHAT_PROXY_PORT is Ray Serve's gRPC
proxy, which it forwards to. `python -m funchat.orchestrator.app` builds these settings from its own
(ports, message size) and the environment (TLS, keepalive); `python -m funchat.gateway` (the chart's
sidecar in a RayService) from the environment alone.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "FUNCHAT_"


class GatewaySettingsError(ValueError):
    """Settings that are missing or malformed; the message names the environment variables."""


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    grpc_port: int = Field(50051, ge=1, le=65535, description="the public API the gateway serves")
    grpc_host: str = Field("[::]", description="the address it listens on: all interfaces by default")
    proxy_port: int = Field(50052, ge=1, le=65535, description="Ray Serve's gRPC proxy, forwarded to")
    proxy_host: str = Field("127.0.0.1", description="where Ray Serve's gRPC proxy is (the same machine or pod)")
    max_message_bytes: int = Field(16 << 20, ge=1 << 20, le=(2 << 30) - 1,
                                   description="largest gRPC message taken from a caller or passed back")
    send_timeout_s: float = Field(30.0, gt=0, description="a message the caller does not take this long (it "
                                                          "stopped reading) ends its call, RESOURCE_EXHAUSTED")
    # TLS: both files or neither; a client CA turns on mTLS
    tls_cert_file: Path | None = Field(None, description="PEM certificate chain of the public API (TLS)")
    tls_key_file: Path | None = Field(None, description="PEM private key of that certificate")
    tls_client_ca_file: Path | None = Field(None, description="PEM CA bundle: callers must present a client "
                                                              "certificate it signed (mTLS)")
    # Keepalive (gRPC's server channel arguments)
    keepalive_time_s: float = Field(30.0, gt=0, description="the server pings a connection silent this long")
    keepalive_timeout_s: float = Field(10.0, gt=0, description="a ping unanswered this long closes the "
                                                               "connection and cancels its calls")
    keepalive_min_ping_interval_s: float = Field(10.0, gt=0, description="callers may ping at most this often; "
                                                                         "more often gets GOAWAY too_many_pings")
    max_connection_idle_s: float = Field(300.0, ge=0, description="a connection without calls this long is "
                                                                  "closed (GOAWAY); 0 = never")
    max_connection_age_s: float = Field(1800.0, ge=0, description="a connection this old gets GOAWAY (new calls "
                                                                  "go to a new connection, maybe another pod); "
                                                                  "0 = never")
    max_connection_age_grace_s: float = Field(3600.0, ge=0, description="calls in flight on such a connection "
                                                                        "may finish this long; at least "
                                                                        "FUNCHAT_MAX_CALL_S, so no call is cut")

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> GatewaySettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("set both FUNCHAT_TLS_CERT_FILE and FUNCHAT_TLS_KEY_FILE (TLS), or neither (plaintext)")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("FUNCHAT_TLS_CLIENT_CA_FILE (mTLS) needs TLS: set FUNCHAT_TLS_CERT_FILE and "
                             "FUNCHAT_TLS_KEY_FILE too")
        if self.proxy_port == self.grpc_port and self.proxy_host in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"FUNCHAT_PROXY_PORT must differ from FUNCHAT_GRPC_PORT ({self.grpc_port}): the "
                             "gateway serves the public port and forwards to Ray Serve's proxy on the other")
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    @property
    def address(self) -> str:
        """host:port the gateway listens on."""
        return f"{self.grpc_host}:{self.grpc_port}"

    @property
    def upstream(self) -> str:
        """host:port of Ray Serve's gRPC proxy."""
        host = f"[{self.proxy_host}]" if ":" in self.proxy_host else self.proxy_host
        return f"{host}:{self.proxy_port}"

    def server_options(self) -> list[tuple[str, int]]:
        """gRPC server channel arguments: message size and keepalive."""
        ms = lambda seconds: int(seconds * 1000)  # noqa: E731
        options = [
            ("grpc.so_reuseport", 0),  # a port already taken is an error, not a second listener sharing it
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", ms(self.keepalive_time_s)),
            ("grpc.keepalive_timeout_ms", ms(self.keepalive_timeout_s)),
            # what actually closes a connection whose ping goes unanswered in gRPC 1.85 (its default is
            # 60 s whatever keepalive_timeout says; tests/unit/test_gateway.py measures it)
            ("grpc.http2.ping_timeout_ms", ms(self.keepalive_timeout_s)),
            # keep pinging a call that is quiet (a caller listening, a reply being thought up): gRPC's
            # default stops after 2 pings without data, and a dead connection then goes unnoticed
            ("grpc.http2.max_pings_without_data", 0),
            # callers may ping idle connections too (at the interval below): otherwise a client whose
            # keepalive runs without calls is cut off with too_many_pings; idle ones end by max idle
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", ms(self.keepalive_min_ping_interval_s)),
            ("grpc.http2.max_ping_strikes", 2),
        ]
        # gRPC's "off" is INT_MAX, not 0
        if self.max_connection_idle_s:
            options.append(("grpc.max_connection_idle_ms", ms(self.max_connection_idle_s)))
        if self.max_connection_age_s:
            options += [("grpc.max_connection_age_ms", ms(self.max_connection_age_s)),
                        ("grpc.max_connection_age_grace_ms", ms(self.max_connection_age_grace_s))]
        return options

    def channel_options(self) -> list[tuple[str, int]]:
        """The upstream channel's arguments: the same message size."""
        return [("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_send_message_length", self.max_message_bytes)]

    @classmethod
    def load(cls, **values) -> GatewaySettings:
        """The environment, overridden by `values`. Raises GatewaySettingsError naming the variables to fix."""
        try:
            return cls(**values)
        except ValidationError as exc:
            lines = []
            for error in exc.errors():
                if error["loc"]:
                    name = ENV_PREFIX + str(error["loc"][0]).upper()
                    lines.append(f"  {name}: {error['msg']} (got {error.get('input')!r})")
                else:
                    lines.append("  " + str(error["msg"]).removeprefix("Value error, "))
            raise GatewaySettingsError("gateway settings:\n" + "\n".join(lines)) from None
