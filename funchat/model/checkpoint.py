"""Checkpoint directories: load by exact public parameter names, validate first, write back.

A directory holds `config.json`, `model.safetensors` (or shards + `model.safetensors.index.json`),
optionally tokenizer files, `generation_config.json` and `special_tokens.json`. Loading checks every
tensor name and shape against the model the config declares *before* reading any weights, and
reports all problems at once (name and both shapes), so nothing is ever half-loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from funchat.errors import CheckpointError
from funchat.model.config import FunAudioChatConfig
from funchat.model.encoder import AudioEncoder, sinusoid_positions
from funchat.model.funaudiochat import FunAudioChat
from funchat.model.qwen3 import RotaryEmbedding, rope_inv_freq

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Tied to `audio_tower.embed_tokens.weight`; the reference does not store it, but accept it if present.
TIED_KEYS = ("audio_invert_tower.lm_head.weight",)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise CheckpointError(f"unknown dtype {name!r}: choose float32, bfloat16 or float16")
    return DTYPES[name]


def build_model(cfg: FunAudioChatConfig, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> FunAudioChat:
    """A randomly initialised model (use device='meta' for shapes only)."""
    with torch.device(device):
        model = FunAudioChat(cfg)
    return model.to(dtype) if str(device) != "meta" else model


def expected_shapes(cfg: FunAudioChatConfig) -> dict[str, tuple[int, ...]]:
    """Every stored tensor the config implies, by public name."""
    with torch.device("meta"):
        model = FunAudioChat(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.text.tie_word_embeddings:
        shapes.pop("language_model.lm_head.weight", None)
    return shapes


def tensor_index(ckpt: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """name -> (file, shape), read from the safetensors headers only."""
    index_path = ckpt / INDEX_FILE
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{index_path}: unreadable shard index ({exc})") from None
        files = sorted({ckpt / f for f in weight_map.values()})
    elif (ckpt / SINGLE_FILE).exists():
        files = [ckpt / SINGLE_FILE]
    else:
        raise CheckpointError(f"{ckpt}: no {SINGLE_FILE} and no {INDEX_FILE}")
    out: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for f in files:
        if not f.exists():
            raise CheckpointError(f"{f}: shard listed in {INDEX_FILE} is missing")
        try:
            with safe_open(str(f), framework="pt") as handle:
                for name in handle.keys():
                    if name in out:
                        raise CheckpointError(f"tensor {name} appears in both {out[name][0].name} and {f.name}")
                    out[name] = (f, tuple(handle.get_slice(name).get_shape()))
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{f}: not a readable safetensors file ({exc})") from None
    return out


def check_tensor_shapes(expected: dict[str, tuple[int, ...]], stored: dict[str, tuple[int, ...]], where: str,
                        optional: set[str] = frozenset(), extra: list[str] | None = None) -> None:
    """Raise one CheckpointError listing every missing, unexpected or mis-shaped tensor (name and both
    shapes). `optional` names may be stored without being expected; `extra` adds problems found elsewhere."""
    problems = [f"missing tensor {n} (expected shape {list(expected[n])})" for n in sorted(set(expected) - set(stored))]
    problems += [f"unexpected tensor {n} (shape {list(stored[n])})"
                 for n in sorted(set(stored) - set(expected) - set(optional))]
    problems += [f"tensor {n} has shape {list(stored[n])}, the config implies {list(expected[n])}"
                 for n in sorted(set(stored) & set(expected)) if tuple(stored[n]) != tuple(expected[n])]
    problems += extra or []
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise CheckpointError(f"{where}:\n  " + "\n  ".join(shown))


def validate(cfg: FunAudioChatConfig, stored: dict[str, tuple[Path, tuple[int, ...]]],
             prefixes: tuple[str, ...] | None = None) -> None:
    """Check every stored name and shape against the config. With `prefixes`, only the tensors of
    those top-level modules are checked (and must all be present); tensors of the other known
    modules are ignored, and names under no known module are still reported as unexpected."""
    full = expected_shapes(cfg)
    expected = full
    shapes = {name: shape for name, (_, shape) in stored.items()}
    if prefixes is not None:
        known = {_top(n) for n in full}
        expected = {n: s for n, s in full.items() if _top(n) in prefixes}
        shapes = {n: s for n, s in shapes.items() if _top(n) in prefixes or _top(n) not in known}
    optional = set(TIED_KEYS) | ({"language_model.lm_head.weight"} if cfg.text.tie_word_embeddings else set())
    tied, table = "audio_invert_tower.lm_head.weight", "audio_tower.embed_tokens.weight"
    table_shape = full[table]  # `expected` may leave audio_tower out
    extra = []
    if tied in shapes and shapes[tied] != table_shape:
        extra.append(f"tensor {tied} has shape {list(shapes[tied])}, it is tied to {table} {list(table_shape)}")
    check_tensor_shapes(expected, shapes, "checkpoint does not match its config.json", optional, extra)


def _top(name: str) -> str:
    """The top-level module of a parameter name: `language_model.model.norm.weight` -> `language_model`."""
    return name.split(".", 1)[0]


def module_prefixes(cfg: FunAudioChatConfig) -> tuple[str, ...]:
    """The top-level modules this config has, in checkpoint order (audio_invert_tower only with an SRH)."""
    with torch.device("meta"):
        model = FunAudioChat(cfg)
    return tuple(name for name, _ in model.named_children())


def check_prefixes(cfg: FunAudioChatConfig, prefixes) -> tuple[str, ...]:
    """The requested top-level modules as a tuple; CheckpointError names the valid ones."""
    valid = module_prefixes(cfg)
    if isinstance(prefixes, str):  # one name, not its characters
        prefixes = (prefixes,)
    chosen = tuple(dict.fromkeys(prefixes))  # keep order, drop repeats
    unknown = [p for p in chosen if p not in valid]
    if not chosen or unknown:
        what = f"unknown module prefix(es) {', '.join(map(repr, unknown))}" if unknown else "no module prefixes given"
        raise CheckpointError(f"{what}: this checkpoint's modules are {', '.join(valid)}")
    if "audio_invert_tower" in chosen and "audio_tower" not in chosen:
        # The SRH's output head is audio_tower.embed_tokens (tied), so it cannot run without it.
        raise CheckpointError("audio_invert_tower uses audio_tower.embed_tokens as its output head: "
                              "load audio_tower with it")
    return chosen


def _materialise_buffers(model: FunAudioChat, device: torch.device | str,
                         prefixes: tuple[str, ...] | None = None) -> None:
    """Recompute the non-persistent buffers (positions, RoPE frequencies) after a meta-device load,
    in the loaded top-level modules only (the others stay on the meta device)."""
    roots = [model] if prefixes is None else [getattr(model, p) for p in prefixes]
    for module in (m for root in roots for m in root.modules()):
        if isinstance(module, AudioEncoder):
            module.positional_embedding = sinusoid_positions(module.cfg.max_source_positions, module.cfg.d_model).to(device)
        elif isinstance(module, RotaryEmbedding):
            module.inv_freq = rope_inv_freq(module.head_dim, module.theta).to(device)


# What `FunAudioChat.encode_audio` runs (the audio_tokenizer service): the encoder and the grouping adaptor.
ENCODER_PREFIXES = ("continuous_audio_tower", "audio_tower")


def load_model(ckpt_dir: str | Path, dtype: str | torch.dtype = torch.float32,
               device: str | torch.device = "cpu", prefixes=None) -> FunAudioChat:
    """The model of a checkpoint directory, validated before any weight is read.

    prefixes: load only these top-level modules (e.g. ENCODER_PREFIXES); the others stay on the
    meta device (shapes and dtype only, no memory), so a service does not hold weights it never
    runs. Only the loaded modules' tensors are validated. `model.dtype` still reads the requested
    dtype; `model.device` reads the language model's, so it is "meta" when that is not loaded.
    """
    ckpt = Path(ckpt_dir)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: checkpoint directory not found")
    dtype = parse_dtype(dtype)
    cfg = FunAudioChatConfig.from_file(ckpt / "config.json")
    chosen = None if prefixes is None else check_prefixes(cfg, prefixes)
    stored = tensor_index(ckpt)
    validate(cfg, stored, chosen)

    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name, (f, _) in stored.items():
        if name not in TIED_KEYS and (chosen is None or _top(name) in chosen):
            by_file.setdefault(f, []).append(name)
    for f, names in by_file.items():
        with safe_open(str(f), framework="pt", device="cpu") as handle:
            for name in names:
                state[name] = handle.get_tensor(name).to(device=device, dtype=dtype)

    with torch.device("meta"):
        model = FunAudioChat(cfg)
    tie_lm_head = cfg.text.tie_word_embeddings and (chosen is None or "language_model" in chosen)
    if chosen is None:
        model.load_state_dict(state, strict=not cfg.text.tie_word_embeddings, assign=True)
    else:
        result = model.load_state_dict(state, strict=False, assign=True)
        may_miss = {"language_model.lm_head.weight"} if tie_lm_head else set()
        missing = [n for n in result.missing_keys if _top(n) in chosen and n not in may_miss]
        if missing or result.unexpected_keys:  # validate() should have caught these
            raise CheckpointError(f"{ckpt}: could not load {', '.join(chosen)}: missing {missing}, "
                                  f"unexpected {result.unexpected_keys}")
        for name, module in model.named_children():
            if name not in chosen:
                module.to(dtype)  # still on meta (nothing allocated); keeps `model.dtype` right
    if tie_lm_head:
        model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
    _materialise_buffers(model, device, chosen)
    return model.eval()


def save_checkpoint(model: FunAudioChat, out_dir: str | Path, max_shard_bytes: int | None = None) -> None:
    """Write config.json and the weights (one file, or shards + index when max_shard_bytes is set)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(model.cfg.raw, indent=2) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.cfg.text.tie_word_embeddings:
        state.pop("language_model.lm_head.weight", None)
    if max_shard_bytes is None:
        save_file(state, str(out / SINGLE_FILE), metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(state):
        nbytes = state[name].numel() * state[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = state[name]
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    total = sum(v.numel() * v.element_size() for v in state.values())
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


@torch.no_grad()
def randomize(model: FunAudioChat, seed: int) -> FunAudioChat:
    """Random weights with O(1) activations (not the tiny std of training init), so greedy choices
    are well separated and do not flip with thread counts or batch composition."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if name.endswith("norm.weight") or "layer_norm" in name or name.startswith("continuous_audio_tower.ln_post"):
            if name.endswith(".weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
        elif p.ndim == 1:  # biases
            p.copy_(0.02 * torch.randn(p.shape, generator=gen))
        elif "embed" in name or name.endswith("audio_bos_eos_token.weight"):
            p.copy_(torch.randn(p.shape, generator=gen))
        else:  # Linear [out, in] and Conv1d [out, in, k]: unit-variance outputs
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)
    return model
