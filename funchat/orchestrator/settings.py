"""The orchestrator's settings: environment variables `FUNCHAT_<FIELD>` (or keyword arguments).

Built once by the process (`funchat.orchestrator.app`) and passed down. The Ray Serve deployment
gets `deployment_args()`: every setting but the secrets. Each replica rebuilds its settings from
those arguments plus its own environment, where it finds the resume-token key
(`FUNCHAT_RESUME_SECRET`, or a file named by `FUNCHAT_RESUME_SECRET_FILE`, e.g. a mounted
Kubernetes Secret) and the Redis password (`FUNCHAT_REDIS_PASSWORD`): neither travels as a
deployment argument, which Ray records.

`services/orchestrator/README.md` lists every variable with its default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings import SettingsError as EnvParseError

from funchat.tracing import TracingConfig, TracingConfigError, parse_headers

ENV_PREFIX = "FUNCHAT_"
NESTED_DELIMITER = "__"


class SettingsError(ValueError):
    """Settings that are missing or malformed; the message names the environment variables."""


class ModelEndpoints(BaseModel):
    """The gRPC address (host:port) of each model service's tritonserver, or of its replicas:
    "host:port,host:port" (funchat.orchestrator.model_clients.Replicas spreads the requests and fails
    over between them)."""

    model_config = ConfigDict(extra="forbid")

    audio_tokenizer: str
    llm: str
    refined_head: str
    vocoder: str

    @field_validator("audio_tokenizer", "llm", "refined_head", "vocoder")
    @classmethod
    def _replica_list(cls, value: str) -> str:
        """Each replica host:port with a port in 1..65535, none twice; normalized to "a,b" (no spaces)."""
        addresses = [a.strip() for a in value.split(",")]
        for address in addresses:
            host, colon, port = address.rpartition(":")
            if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{address!r} is not host:port (a replica's address, e.g. 127.0.0.1:8001; "
                                 "several replicas: host:port,host:port)")
        duplicates = sorted({a for a in addresses if addresses.count(a) > 1})
        if duplicates:
            raise ValueError(f"replica {duplicates[0]} is listed twice: name each replica once")
        return ",".join(addresses)


class OrchestratorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter=NESTED_DELIMITER, extra="ignore")

    # ---- what each replica needs ----
    checkpoint: Path = Field(description="checkpoint directory: tokenizer, config.json, vocoder speakers (voices)")
    endpoints: ModelEndpoints = Field(
        description='model services, JSON {"audio_tokenizer": "host:port", "llm": ..., "refined_head": ..., '
                    '"vocoder": ...}, each a replica or several: "host:port,host:port" (or one variable each: '
                    'FUNCHAT_ENDPOINTS__LLM=host:port)')
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="the session store (rediss://: TLS)")
    redis_ca_file: Path | None = Field(None, description="with a rediss:// URL, the CA certificate (PEM) that "
                                                         "verifies the Redis server (unset: the system's CAs)")
    redis_password: SecretStr = Field(SecretStr(""), exclude=True,
                                      description="Redis AUTH password, when it is not in the URL (e.g. from a "
                                                  "Secret); never a deployment argument")
    # exclude=True: never in model_dump(), so never in the deployment arguments
    resume_secret: SecretStr = Field(SecretStr(""), exclude=True,
                                     description="HMAC key of resume tokens, the same on every replica")
    resume_secret_file: Path | None = Field(None, description="a file holding the resume-token key (instead of "
                                                              "FUNCHAT_RESUME_SECRET), e.g. a mounted Secret")
    auth: Literal["api_keys", "off"] = Field("api_keys", description="api_keys: every RPC but the health check needs "
                                                                     "`authorization: Bearer <key>` from the key file; "
                                                                     "off: no authentication (development only)")
    api_keys_file: Path | None = Field(None, description="the API key file (`funchat keys create`), re-read when it "
                                                         "changes; required unless FUNCHAT_AUTH=off")
    session_ttl_s: int = Field(3600, description="sessions expire this long after their last write")
    # Session integrity and size (funchat.orchestrator.sessions, exchange)
    resume_token_ttl_s: int = Field(600, ge=1, description="a resume token is good this long after it was issued "
                                                           "(every response_done carries a fresh one)")
    session_lease_s: float = Field(15.0, ge=1, description="a turn's hold on its session (one turn at a time), "
                                                           "renewed every third of it while the turn runs; a "
                                                           "replica that dies mid-turn frees the session so")
    session_audio_dtype: Literal["float32", "float16"] = Field(
        "float32", description="how stored caller speech rows are kept: float32 (bit-exact) or float16 (half "
                               "the bytes; rounded rows)")
    model_revision: str = Field("", description="the checkpoint's revision (e.g. its commit), part of the model "
                                                "fingerprint stored with caller speech: set it when new weights "
                                                "keep the same config.json")
    max_calls: int = Field(16, description="admission limit per replica (calls in flight)")
    # Per-tenant limits, across all replicas (funchat.orchestrator.tenant_limits); 0 = no limit
    tenant_max_calls: int = Field(32, ge=0, description="calls (Converse open + Respond in flight) one tenant may "
                                                        "hold at once across all replicas; 0 = no limit")
    tenant_rate_per_s: float = Field(20.0, ge=0, description="RPCs per second one tenant may start, sustained "
                                                             "(token bucket); 0 = no limit")
    tenant_burst: int = Field(40, ge=1, description="RPCs one tenant may start at once after a quiet spell (the "
                                                    "bucket's size)")
    tenant_slot_lease_s: float = Field(30.0, ge=1, description="a call's slot under its tenant's limit lapses "
                                                               "this long after its replica last renewed it "
                                                               "(a replica that died gives its slots back so)")
    max_new_tokens: int = Field(512, description="reply length cap (the context caps it too)")
    max_chunk_ms: int = Field(1000, description="longest caller audio chunk accepted in one event")
    max_turn_s: float = Field(60.0, description="longest caller turn (audio) accepted")
    keep_prefixes: bool = Field(True, description="the llm and refined_head services keep each conversation's rows "
                                                  "between turns, so a turn prefills only what its prompt adds "
                                                  "(false: every turn prefills its whole prompt)")
    encode_while_speaking: bool = Field(True, description="encode each 2 s window of a caller's turn as it "
                                                          "completes and prefill it into the kept rows while they "
                                                          "speak, so the end of a long turn leaves little to do "
                                                          "(false: the whole turn is encoded and prefilled at its end)")
    max_message_bytes: int = Field(16 << 20, ge=1 << 20, le=(2 << 30) - 1,
                                   description="largest gRPC message the public API accepts (Ray Serve's proxy, "
                                               "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE); a Respond of the longest turn "
                                               "at 48 kHz float32 must fit")
    idle_timeout_s: float = Field(60.0, gt=0, description="a Converse call that sends nothing this long, while no "
                                                          "reply is generating or playing, is ended "
                                                          "(DEADLINE_EXCEEDED) and its slot freed")
    max_call_s: float = Field(3600.0, gt=0, description="longest Converse call; then it ends (OUT_OF_RANGE) and "
                                                        "the caller resumes in a new call")
    service_timeout_s: float = Field(30.0, description="per model-service request")
    # Traces (funchat.tracing): the same FUNCHAT_TRACING_* variables the model services read.
    tracing_endpoint: str = Field("", description="OTLP/gRPC collector for traces: host:port, http://host:port or "
                                                  "https://host:port; empty = no tracing")
    tracing_headers: SecretStr = Field(SecretStr(""), exclude=True,
                                       description="key=value,key2=value2 sent with each trace export (e.g. a "
                                                   "vendor's API key); never a deployment argument")
    tracing_sample_ratio: float = Field(1.0, ge=0.0, le=1.0,
                                        description="share of new traces recorded (a caller's traceparent decides "
                                                    "for its own calls)")

    # ---- the process and its Ray Serve deployment ----
    grpc_port: int = Field(50051, description="the public API: the gateway (funchat.gateway; plaintext or TLS) in "
                                              "front of Ray Serve's gRPC proxy")
    proxy_port: int = Field(0, ge=0, le=65535, description="Ray Serve's gRPC proxy, which the gateway forwards to "
                                                           "(Ray binds it on all interfaces); 0 = a free port "
                                                           "picked at start")
    http_port: int = Field(8000, description="Ray Serve's HTTP proxy: the OpenAI Realtime-compatible WebSocket "
                                             "endpoint /v1/realtime and the web page at /")
    http_host: str = Field("127.0.0.1", description="the address Ray Serve's HTTP proxy binds (0.0.0.0 in a "
                                                    "container)")
    model_name: str = Field("fun-audio-chat", min_length=1, description="the model name the Realtime endpoint "
                                                                        "answers to (?model=)")
    metrics_port: int = Field(9464, ge=0, le=65535,
                              description="Prometheus /metrics of all replicas, one endpoint per pod or machine "
                                          "(all interfaces, like the gRPC port); 0 = off")
    metrics_host: str = Field("", description="the address /metrics binds: empty = all interfaces (a pod, which "
                                              "Prometheus scrapes); `make up` binds 127.0.0.1")
    replicas: int = Field(1, description="orchestrator replicas")
    replica_cpus: float = Field(0.25, description="Ray CPUs per replica (2-core machines: <= 0.5)")
    ray_cpus: int = Field(2, description="CPUs of the local Ray cluster that `python -m funchat.orchestrator.app` "
                                         "starts")

    @model_validator(mode="after")
    def _keys_when_authenticating(self) -> OrchestratorSettings:
        if self.auth == "api_keys" and self.api_keys_file is None:
            raise ValueError("FUNCHAT_API_KEYS_FILE is not set: create keys with `funchat keys create --tenant NAME "
                             "--keys-file FILE` and point it there (or set FUNCHAT_AUTH=off, for development only)")
        return self

    @model_validator(mode="after")
    def _ca_file_with_tls(self) -> OrchestratorSettings:
        if self.redis_ca_file is not None and not self.redis_url.startswith("rediss://"):
            raise ValueError("FUNCHAT_REDIS_CA_FILE is set but FUNCHAT_REDIS_URL is not a rediss:// (TLS) URL: use "
                             "rediss://host:port/db, or unset FUNCHAT_REDIS_CA_FILE")
        return self

    @model_validator(mode="after")
    def _longest_turn_fits_a_message(self) -> OrchestratorSettings:
        # a Respond carries the whole turn: the worst legal one (48 kHz float32) must get through the proxy
        needed = int(self.max_turn_s * 48000 * 4) + (64 << 10)
        if self.max_message_bytes < needed:
            raise ValueError(f"FUNCHAT_MAX_MESSAGE_BYTES={self.max_message_bytes} cannot carry a Respond of "
                             f"FUNCHAT_MAX_TURN_S={self.max_turn_s:g} s at 48 kHz float32: use at least {needed}")
        return self

    @classmethod
    def load(cls, **values) -> OrchestratorSettings:
        """The environment, overridden by `values`. Raises SettingsError naming the variables to fix."""
        unknown = sorted(set(values) - set(cls.model_fields))
        if unknown:
            raise SettingsError(f"unknown orchestrator settings {unknown}; known: {sorted(cls.model_fields)}")
        try:
            return cls(**values)
        except ValidationError as exc:
            raise SettingsError("orchestrator settings:\n" + "\n".join(_explain(e) for e in exc.errors())) from None
        except EnvParseError as exc:  # a variable that is not JSON where JSON is expected
            raise SettingsError(f"orchestrator settings: {exc} ({env_name('endpoints')} must be a JSON "
                                "object)") from None

    def tracing_config(self) -> TracingConfig:
        """The OTLP export settings (funchat.tracing). Raises SettingsError for malformed headers or
        endpoint, naming the variable."""
        try:
            return TracingConfig(endpoint=self.tracing_endpoint.strip(),
                                 headers=parse_headers(self.tracing_headers.get_secret_value()),
                                 sample_ratio=self.tracing_sample_ratio)
        except TracingConfigError as exc:
            raise SettingsError(f"orchestrator settings: {exc}") from None

    def deployment_args(self) -> dict:
        """What the Ray Serve deployment is bound with: every setting but the secrets, JSON-able."""
        return self.model_dump(mode="json")

    def read_resume_secret(self) -> SecretStr:
        """The resume-token key: FUNCHAT_RESUME_SECRET, or the contents of FUNCHAT_RESUME_SECRET_FILE.
        Read when a replica starts (not at validation), so that a process which only builds the
        application (a Serve controller) needs no access to it."""
        secret = self.resume_secret.get_secret_value()
        if self.resume_secret_file is not None:
            if secret:
                raise SettingsError(f"set {env_name('resume_secret')} or {env_name('resume_secret_file')}, not both")
            try:
                secret = self.resume_secret_file.read_text().strip()
            except OSError as exc:
                raise SettingsError(f"{env_name('resume_secret_file')}={self.resume_secret_file}: cannot read it "
                                    f"({exc.strerror})") from None
        if not secret:
            raise SettingsError(f"{env_name('resume_secret')} (or {env_name('resume_secret_file')}) is not set: "
                                "resume tokens need a key shared by all replicas")
        return SecretStr(secret)


def env_name(*loc) -> str:
    """The environment variable of a setting: ("endpoints", "llm") -> FUNCHAT_ENDPOINTS__LLM."""
    return ENV_PREFIX + NESTED_DELIMITER.join(str(part).upper() for part in loc)


def _explain(error: dict) -> str:
    loc = error["loc"]
    if not loc:  # a check across settings: its message names the variables
        return "  " + str(error["msg"]).removeprefix("Value error, ")
    field = OrchestratorSettings.model_fields.get(loc[0]) if loc else None
    what = f" ({field.description})" if field is not None and len(loc) == 1 and field.description else ""
    if error["type"] == "missing":
        return f"  {env_name(*loc)} is not set{what}"
    if error["type"] == "extra_forbidden":
        return f"  {env_name(*loc)}: no such setting"
    return f"  {env_name(*loc)}: {error['msg']} (got {error.get('input')!r}){what}"
