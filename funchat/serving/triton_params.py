"""Reading a Triton Python-backend model's parameters (checkpoint, device, limits) from its config.

Kept free of Triton imports so it can be unit-tested; the `model.py` files pass in the `args`
dict Triton gives `initialize`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def model_parameters(args: dict[str, Any]) -> dict[str, str]:
    """`parameters { key: ... value: { string_value: ... } }` of config.pbtxt as a plain dict."""
    config = json.loads(args["model_config"])
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


def resolve_checkpoint(args: dict[str, Any], params: dict[str, str], default: str = "checkpoints/tiny") -> Path:
    """An absolute checkpoint path; a relative one is taken from the project root (the parent of the
    model repository that holds this model)."""
    path = Path(params.get("checkpoint") or default)
    if path.is_absolute():
        return path
    repo = Path(args["model_repository"]).resolve()  # .../model_repository/<model>
    return (repo.parent.parent / path).resolve()


def load_engine(args: dict[str, Any], engine_cls):
    """The model of the `checkpoint`/`device`/`dtype` parameters wrapped in a per-call engine
    (`LlmEngine` or `SrhEngine`) with the `max_sequences` and `idle_timeout_s` parameters."""
    from funchat.model.checkpoint import load_model

    params = model_parameters(args)
    model = load_model(resolve_checkpoint(args, params), dtype=params.get("dtype", "float32"),
                       device=params.get("device", "cpu"))
    return engine_cls(model, max_sequences=int(params.get("max_sequences", 64)),
                      idle_timeout_s=float(params.get("idle_timeout_s", 60)))
