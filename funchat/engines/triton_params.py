"""Reading a Triton Python-backend model's parameters (checkpoint, device, limits, engine) from its config.

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


def resolve_path(args: dict[str, Any], value: str) -> Path:
    """An absolute path as is; a relative one is taken from the project root (the parent of the
    model repository that holds this model)."""
    path = Path(value)
    if path.is_absolute():
        return path
    repo = Path(args["model_repository"]).resolve()  # .../model_repository/<model>
    return (repo.parent.parent / path).resolve()


def resolve_checkpoint(args: dict[str, Any], params: dict[str, str], default: str = "checkpoints/tiny") -> Path:
    """The `checkpoint` parameter as an absolute path (see resolve_path)."""
    return resolve_path(args, params.get("checkpoint") or default)


def instance_device(args: dict[str, Any], name: str) -> str:
    """The `device` parameter for this model instance: "cuda" on a KIND_GPU instance becomes the
    instance's own GPU (cuda:<model_instance_device_id>)."""
    if name == "cuda" and args.get("model_instance_kind") == "GPU":
        return f"cuda:{args['model_instance_device_id']}"
    return name or "cpu"


def apply_threads(params: dict[str, str]) -> None:
    """The `threads` parameter (torch intra-op threads; 0/absent = torch's default). On small CPU
    machines running several services, 1 avoids the services fighting over the cores."""
    if int(params.get("threads") or 0) > 0:
        import torch
        torch.set_num_threads(int(params["threads"]))


def load_engine(args: dict[str, Any], engine_cls):
    """The model of the `checkpoint`/`device`/`dtype` parameters wrapped in a per-call engine
    (`LlmEngine` or `SrhEngine`) with the `max_sequences` and `idle_timeout_s` parameters."""
    from funchat.model.checkpoint import load_model

    params = model_parameters(args)
    apply_threads(params)
    model = load_model(resolve_checkpoint(args, params), dtype=params.get("dtype", "float32"),
                       device=params.get("device", "cpu"))
    return engine_cls(model, max_sequences=int(params.get("max_sequences", 64)),
                      idle_timeout_s=float(params.get("idle_timeout_s", 60)))


def load_llm_engine(args: dict[str, Any]):
    """The llm service's engine from its parameters: `engine` (torch | tensorrt), `cuda_graphs`
    (auto | true | false), `max_context`, `tensorrt_plans`, plus those of load_engine
    (see funchat.engines.llm_engines). Bad values raise ValueError before any weight is read."""
    from funchat.engines.llm_engines import LlmEngineSettings, build_llm_engine

    params = model_parameters(args)
    apply_threads(params)
    settings = LlmEngineSettings.from_params(params)
    max_batch = int(json.loads(args["model_config"]).get("max_batch_size") or 1)
    return build_llm_engine(settings, resolve_checkpoint(args, params),
                            device=instance_device(args, params.get("device", "cpu")),
                            dtype=params.get("dtype", "float32"),
                            max_sequences=int(params.get("max_sequences", 64)),
                            idle_timeout_s=float(params.get("idle_timeout_s", 60)),
                            max_batch=max(1, max_batch),
                            plans_dir=resolve_path(args, settings.tensorrt_plans))
