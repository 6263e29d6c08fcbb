"""The tritonserver of the nvidia-pytriton wheel, and a model folder configured for one server.

Used wherever a model service's tritonserver is started: the model-services image's entry point
(`services/triton/entrypoint.py`) and the local launcher (`funchat.dev.tritonserver`). Nothing here
knows where a source checkout is.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

MODELS = ("audio_tokenizer", "llm", "refined_head", "vocoder")
PATH_PARAMS = ("checkpoint", "tensorrt_plans")  # parameters holding a path; relative ones are made absolute


class TritonServerError(RuntimeError):
    """tritonserver could not be found, started, or a model did not become ready (message says why)."""


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backend_files: tuple[Path, ...]  # libtriton_python.so, triton_python_backend_utils.py, the stub
    lib_dirs: tuple[Path, ...]  # LD_LIBRARY_PATH entries


def find_triton() -> TritonInstall:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonServerError("the nvidia-pytriton package (which ships tritonserver) is not installed in "
                                f"{sys.prefix}; run `make setup`")
    pkg = Path(list(spec.submodule_search_locations)[0])
    root = pkg / "tritonserver"
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    binary = root / "bin" / "tritonserver"
    backend = root / "backends" / "python"
    files = (backend / "libtriton_python.so", backend / "triton_python_backend_utils.py",
             root / "python_backend_stubs" / py / "triton_python_backend_stub")
    missing = [str(p) for p in (binary, *files) if not p.exists()]
    if missing:
        raise TritonServerError("the pytriton wheel lacks tritonserver files (for Python " + py + "): "
                                + ", ".join(missing))
    libdir = sysconfig.get_config_var("LIBDIR")  # libpython3.x.so, which the backend stub links against
    lib_dirs = tuple(p for p in (Path(libdir) if libdir else None, pkg.parent / "nvidia_pytriton.libs")
                     if p is not None and p.is_dir())
    return TritonInstall(binary, files, lib_dirs)


MMAP_THRESHOLD_BYTES = 1 << 20  # see server_env


def server_env(install: TritonInstall, extra_lib_dirs: Iterable[Path] = ()) -> dict[str, str]:
    """This process's environment for the server: the libraries the binary and the backend stub
    need on LD_LIBRARY_PATH, and this Python first on PATH."""
    env = dict(os.environ)
    lib_dirs = [str(p) for p in (*install.lib_dirs, *extra_lib_dirs)]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(lib_dirs + ([env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH") else []))
    # The backend stub finds its packages through the first python3 on PATH: this venv's.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("PYTHONUNBUFFERED", "1")
    # glibc raises its mmap threshold to the size of each large block freed (up to 32 MB), after which
    # such blocks come from the heap and stay resident: a model service's memory then climbs in steps
    # for its first minutes of traffic (prefills of new lengths: transient attention scores, gathered
    # caches) before it levels off. A fixed threshold keeps every block of 1 MB or more mapped on its
    # own and returned when freed, so a service's resident memory follows its live data.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD_BYTES))
    return env


# ---- a model folder configured for one server ----

def _set_parameters(config_text: str, params: Mapping[str, str], root: Path) -> str:
    """config.pbtxt with `parameters` set (added or replaced) and relative path parameters made absolute."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = model_config_pb2.ModelConfig()
    text_format.Parse(config_text, config)
    for key, value in params.items():
        config.parameters[key].string_value = str(value)
    for key in PATH_PARAMS:
        if key in config.parameters:
            value = config.parameters[key].string_value
            if value and not Path(value).is_absolute():
                config.parameters[key].string_value = str((root / value).resolve())
    return text_format.MessageToString(config)


def prepare_model_repo(model: str, repo: Path, run_dir: Path, params: Mapping[str, str] | None = None,
                       tag: str | None = None, config_name: str | None = None) -> Path:
    """`<run_dir>/triton/repos/<tag>/` holding a copy of `repo/<model>` with its parameters set; returns it.
    config_name: use `repo/<model>/configs/<name>.pbtxt` (e.g. "gpu") instead of config.pbtxt, where it exists."""
    src = Path(repo) / model
    if not (src / "config.pbtxt").is_file():
        raise TritonServerError(f"{src}: no config.pbtxt (models in {repo}: {', '.join(available_models(repo)) or 'none'})")
    out = Path(run_dir) / "triton" / "repos" / (tag or model)
    if out.exists():
        shutil.rmtree(out)
    dst = out / model
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    try:
        variant = src / "configs" / f"{config_name}.pbtxt" if config_name else None
        config_file = variant if variant is not None and variant.is_file() else src / "config.pbtxt"
        text = _set_parameters(config_file.read_text(), params or {}, Path(repo).resolve().parent)
    except Exception as exc:  # text_format.ParseError and friends
        raise TritonServerError(f"{src / 'config.pbtxt'}: cannot be read as a model config ({exc})") from None
    (dst / "config.pbtxt").write_text(text)
    return out


def available_models(repo: Path) -> list[str]:
    repo = Path(repo)
    return sorted(p.name for p in repo.iterdir() if (p / "config.pbtxt").is_file()) if repo.is_dir() else []
