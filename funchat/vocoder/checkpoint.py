"""Vocoder weights: the reference's `flow.pt` / `hift.pt`, and our checkpoint folder.

Our layout (a `vocoder/` folder inside a funchat checkpoint directory):
    config.json           VocoderConfig (flow + hift sizes, streaming defaults)
    model.safetensors     `flow.<reference name>` and `hift.<reference name>` tensors
    speakers.safetensors  one 192-d x-vector per speaker name
`import_cosyvoice` turns a released CosyVoice 3 folder (`cosyvoice3.yaml`, `flow.pt`, `hift.pt`,
`spk2info.pt`) into that layout. Every load checks all names and shapes first and reports every
problem at once; nothing is half-loaded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from funchat.checkpoint_files import SPEAKERS_FILE, VOCODER_DIR, vocoder_dir  # noqa: F401  (re-exported)
from funchat.errors import CheckpointError
from funchat.model.checkpoint import check_tensor_shapes
from funchat.vocoder.hift import normalize_hift_state_dict
from funchat.vocoder.token2wav import Token2Wav, VocoderConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
DEFAULT_SPEAKER = "default"


def _check_state(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], where: str) -> None:
    check_tensor_shapes({k: tuple(v.shape) for k, v in expected.items()}, {k: tuple(v.shape) for k, v in got.items()},
                        f"{where} does not match the vocoder config")


def _torch_load(path: Path) -> Any:
    if not path.exists():
        raise CheckpointError(f"{path}: not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors of many kinds
        raise CheckpointError(f"{path}: not a readable torch state dict ({exc})") from None


def load_reference_weights(model: Token2Wav, flow_pt: str | Path, hift_pt: str | Path) -> Token2Wav:
    """Load the reference's `flow.pt` and `hift.pt` by their exact parameter names."""
    flow_state = _torch_load(Path(flow_pt))
    hift_state = normalize_hift_state_dict(_torch_load(Path(hift_pt)))
    _check_state(model.flow.state_dict(), flow_state, str(flow_pt))
    _check_state(model.hift.state_dict(), hift_state, str(hift_pt))
    model.flow.load_state_dict(flow_state, strict=True)
    model.hift.load_state_dict(hift_state, strict=True)
    return model.eval()


def load_reference_folder(folder: str | Path) -> Token2Wav:
    """A folder with the reference's resolved `config.json` (constructor_args) + flow.pt + hift.pt
    (the layout of the golden set)."""
    folder = Path(folder)
    try:
        cfg = VocoderConfig.from_constructor_args(json.loads((folder / CONFIG_FILE).read_text()))
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no {CONFIG_FILE}") from None
    return load_reference_weights(Token2Wav(cfg), folder / "flow.pt", folder / "hift.pt")


# ---- our layout ----

def save_vocoder(model: Token2Wav, out_dir: str | Path, speakers: dict[str, torch.Tensor]) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(model.cfg.to_dict(), indent=2) + "\n")
    state = {f"flow.{k}": v.contiguous() for k, v in model.flow.state_dict().items()}
    state.update({f"hift.{k}": v.contiguous() for k, v in model.hift.state_dict().items()})
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    save_speakers(speakers, out / SPEAKERS_FILE, model.cfg.flow.spk_embed_dim)
    return out


def save_speakers(speakers: dict[str, torch.Tensor], path: Path, dim: int) -> None:
    if not speakers:
        raise CheckpointError("a vocoder checkpoint needs at least one speaker")
    tensors = {}
    for name, vec in speakers.items():
        v = torch.as_tensor(vec, dtype=torch.float32).reshape(-1)
        if v.numel() != dim:
            raise CheckpointError(f"speaker {name!r} has {v.numel()} values, expected {dim}")
        tensors[name] = v.clone().contiguous()  # aliases (e.g. "default") are stored as their own copy
    save_file(tensors, str(path))


def load_vocoder(checkpoint: str | Path) -> tuple[Token2Wav, dict[str, torch.Tensor]]:
    folder = vocoder_dir(checkpoint)
    if not (folder / WEIGHTS_FILE).exists():
        raise CheckpointError(f"{checkpoint}: no vocoder ({VOCODER_DIR}/{WEIGHTS_FILE}); "
                              f"create one with `funchat init-checkpoint` or `funchat import-cosyvoice`")
    try:
        cfg = VocoderConfig.from_dict(json.loads((folder / CONFIG_FILE).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{folder / CONFIG_FILE}: unreadable vocoder config ({exc})") from None
    try:
        state = load_file(str(folder / WEIGHTS_FILE))
    except Exception as exc:
        raise CheckpointError(f"{folder / WEIGHTS_FILE}: not a readable safetensors file ({exc})") from None
    model = Token2Wav(cfg)
    expected = {f"flow.{k}": v for k, v in model.flow.state_dict().items()}
    expected.update({f"hift.{k}": v for k, v in model.hift.state_dict().items()})
    _check_state(expected, state, str(folder / WEIGHTS_FILE))
    model.flow.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("flow.")}, strict=True)
    model.hift.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("hift.")}, strict=True)
    speakers = load_file(str(folder / SPEAKERS_FILE)) if (folder / SPEAKERS_FILE).exists() else {}
    return model.eval(), speakers


def pick_speaker(speakers: dict[str, torch.Tensor], name: str | None) -> torch.Tensor:
    if not speakers:
        raise CheckpointError("the vocoder checkpoint has no speakers; pass a speaker embedding")
    if name is None:
        name = DEFAULT_SPEAKER if DEFAULT_SPEAKER in speakers else sorted(speakers)[0]
    if name not in speakers:
        raise CheckpointError(f"unknown speaker {name!r}: choose one of {', '.join(sorted(speakers))}")
    return speakers[name]


def init_vocoder(out_dir: str | Path, preset: str = "tiny", seed: int = 0, n_speakers: int = 2) -> Path:
    """Random vocoder weights of a preset, plus generated speakers ('default', 'speaker1', ...)."""
    cfg = VocoderConfig.preset(preset)
    with torch.random.fork_rng(devices=[]):  # torch's default init, seeded, without touching the caller's RNG
        torch.manual_seed(seed)
        model = Token2Wav(cfg)
    gen = torch.Generator().manual_seed(seed)
    names = [DEFAULT_SPEAKER] + [f"speaker{i}" for i in range(1, n_speakers)]
    speakers = {n: torch.randn(cfg.flow.spk_embed_dim, generator=gen) for n in names}
    return save_vocoder(model, out_dir, speakers)


# ---- importing a released CosyVoice 3 folder ----

class _TaggedLoader(yaml.SafeLoader):
    """Reads hyperpyyaml: `!new:cls` mappings become dicts with `__class__`, `!ref <x>` stays a
    reference string to resolve, other tags are kept as plain values."""


def _construct_tagged(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node, deep=True)
        return dict(value, __class__=suffix) if suffix else value
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


_TaggedLoader.add_multi_constructor("!new:", _construct_tagged)
_TaggedLoader.add_multi_constructor("!name:", _construct_tagged)
_TaggedLoader.add_multi_constructor("!apply:", lambda loader, suffix, node: None)
_TaggedLoader.add_constructor("!ref", lambda loader, node: {"__ref__": loader.construct_scalar(node)})


def _resolve(value: Any, scalars: dict[str, Any]) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__ref__"}:
            expr = re.sub(r"<([\w.]+)>", lambda m: repr(scalars[m.group(1)]), value["__ref__"])
            if not re.fullmatch(r"[\d\s.+\-*/()']*|'[^']*'", expr):
                raise CheckpointError(f"cosyvoice3.yaml: cannot resolve reference {value['__ref__']!r}")
            return eval(expr, {"__builtins__": {}})  # arithmetic on numbers only (checked above)
        return {k: _resolve(v, scalars) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, scalars) for v in value]
    return value


def read_cosyvoice_yaml(path: str | Path) -> dict[str, Any]:
    """The flow and hift constructor arguments of a released `cosyvoice3.yaml`."""
    try:
        raw = yaml.load(Path(path).read_text(), Loader=_TaggedLoader)
    except (OSError, yaml.YAMLError) as exc:
        raise CheckpointError(f"{path}: unreadable yaml ({exc})") from None
    if not isinstance(raw, dict) or "flow" not in raw or "hift" not in raw:
        raise CheckpointError(f"{path}: no 'flow' and 'hift' sections")
    scalars = {k: v for k, v in raw.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    return {"flow": _resolve(raw["flow"], scalars), "hift": _resolve(raw["hift"], scalars)}


def import_cosyvoice(src: str | Path, out_dir: str | Path) -> Path:
    """Released CosyVoice 3 folder -> our vocoder folder (config + safetensors + speakers)."""
    src = Path(src)
    yaml_path = src / "cosyvoice3.yaml"
    if not yaml_path.exists():
        raise CheckpointError(f"{src}: no cosyvoice3.yaml")
    cfg = VocoderConfig.from_constructor_args(read_cosyvoice_yaml(yaml_path))
    model = load_reference_weights(Token2Wav(cfg), src / "flow.pt", src / "hift.pt")
    speakers: dict[str, torch.Tensor] = {}
    for name in ("spk2info.pt", "new_spk2info.pt"):
        if (src / name).exists():
            for spk, info in _torch_load(src / name).items():
                emb = info.get("embedding") if isinstance(info, dict) else info
                if emb is not None and torch.as_tensor(emb).numel() == cfg.flow.spk_embed_dim:
                    speakers[str(spk)] = torch.as_tensor(emb, dtype=torch.float32).reshape(-1)
    if not speakers:
        raise CheckpointError(f"{src}: no speaker file (spk2info.pt) with {cfg.flow.spk_embed_dim}-d embeddings")
    if DEFAULT_SPEAKER not in speakers:
        speakers[DEFAULT_SPEAKER] = speakers[sorted(speakers)[0]]
    return save_vocoder(model, out_dir, speakers)


def load_speaker_file(path: str | Path) -> np.ndarray:
    try:
        return np.load(path).astype(np.float32).reshape(-1)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable .npy speaker embedding ({exc})") from None
