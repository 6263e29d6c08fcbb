"""Orchestrator configuration: environment variables `FUNCHAT_*` (or keyword arguments).

Endpoints of the model services come from `<run_dir>/endpoints.json` (written by
`make triton-up` / `make up`) unless given explicitly.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parents[2]
MODEL_SERVICES = ("audio_tokenizer", "llm", "refined_head", "vocoder")


class OrchestratorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FUNCHAT_", extra="ignore")

    checkpoint: Path = PROJECT_ROOT / "checkpoints" / "tiny"  # tokenizer, config, vocoder speakers
    run_dir: Path = PROJECT_ROOT / ".run"
    # {"audio_tokenizer": "127.0.0.1:PORT", ...}; empty = read <run_dir>/endpoints.json
    endpoints: dict[str, str] = Field(default_factory=dict)
    redis_url: str = "redis://127.0.0.1:6379/0"
    host: str = "127.0.0.1"
    grpc_port: int = 50051
    # HMAC key of resume tokens; shared by every orchestrator replica. `make up` writes one.
    resume_secret: str = ""
    session_ttl_s: int = 3600
    max_calls: int = 16                 # admission limit per orchestrator replica (calls in flight)
    max_new_tokens: int = 512           # default reply length cap (the context caps it too)
    max_chunk_ms: int = 1000            # longest caller audio chunk accepted in one event
    max_turn_s: float = 60.0            # longest caller turn (audio) accepted
    service_timeout_s: float = 30.0     # per model-service request
    replicas: int = 1
    replica_cpus: float = 0.25          # Ray CPUs per orchestrator replica (2-core machines: <= 0.5)

    def model_endpoints(self) -> dict[str, str]:
        endpoints = dict(self.endpoints)
        if not endpoints:
            path = self.run_dir / "endpoints.json"
            if path.exists():
                endpoints = {k: v for k, v in json.loads(path.read_text()).items() if k in MODEL_SERVICES}
        missing = [m for m in MODEL_SERVICES if m not in endpoints]
        if missing:
            raise RuntimeError(f"no endpoint for model services {missing}: start them (make triton-up) or set "
                               f"FUNCHAT_ENDPOINTS / {self.run_dir / 'endpoints.json'}")
        return endpoints
