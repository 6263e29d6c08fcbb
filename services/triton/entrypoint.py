"""Entry point of the model-services image: one tritonserver serving one of the four model services.

    funchat-triton [MODEL] [extra tritonserver arguments ...]

MODEL (or FUNCHAT_MODEL): audio_tokenizer | llm | refined_head | vocoder. Settings (environment):

    FUNCHAT_MODEL           the model to load, when not given as the first argument
    FUNCHAT_CHECKPOINT      checkpoint directory (default: the config's `checkpoints/tiny`, taken
                            relative to /opt/funchat, i.e. /opt/funchat/checkpoints/tiny)
    FUNCHAT_CONFIG          config variant: `gpu` uses services/<model>/configs/gpu.pbtxt (KIND_GPU, cuda, bf16)
    FUNCHAT_PARAMS          more config parameters, "KEY=VALUE KEY=VALUE" (e.g. "device=cuda dtype=bfloat16")
    FUNCHAT_REPO            model repository holding the four folders [/opt/funchat/services]
    FUNCHAT_RUN_DIR         writable folder for the per-run repository [/tmp/funchat]
    TRITONSERVER            the tritonserver binary [auto: /opt/tritonserver/bin/tritonserver where the
                            base image has one (NVIDIA's Triton image), else the one in the
                            nvidia-pytriton wheel]

The Python backend (libtriton_python.so, its utils and the backend stub built for this image's
Python 3.11) always comes from the nvidia-pytriton wheel: the stub must match the Python the models
run in. It was copied to /opt/triton-backends/python at build time. The server listens on
0.0.0.0: gRPC 8001, HTTP 8000, metrics 8002 (Triton's defaults; extra arguments may change them).

    /opt/venv/bin/tritonserver ARGS     (first on PATH: services/triton/tritonserver.sh)

runs `entrypoint.py --exec-tritonserver ARGS`: the same binary, environment and Python backend
(`--backend-directory` added unless given), for callers that write the whole command line themselves
(e.g. `tritonserver --model-repository=/opt/funchat/services --model-control-mode=explicit --load-model=llm`).
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from funchat.engines.triton_server import MODELS, TritonServerError, find_triton, prepare_model_repo, server_env

IMAGE_TRITON = Path("/opt/tritonserver/bin/tritonserver")
BACKENDS = Path("/opt/triton-backends")


def server_binary_env() -> tuple[str, dict[str, str]]:
    """The tritonserver binary to run and its environment (libraries, PATH for the backend stub)."""
    install = find_triton()
    binary = os.environ.get("TRITONSERVER") or (str(IMAGE_TRITON) if IMAGE_TRITON.is_file() else str(install.binary))
    image_libs = [Path("/opt/tritonserver/lib")] if binary == str(IMAGE_TRITON) and Path("/opt/tritonserver/lib").is_dir() \
        else []
    return binary, server_env(install, image_libs)


def exec_tritonserver(argv: list[str]) -> int:
    """`tritonserver ARGS` as the image's /opt/venv/bin/tritonserver: the same server and Python backend
    as the entry point, for callers that write the whole command line themselves."""
    try:
        binary, env = server_binary_env()
    except TritonServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not any(a.startswith("--backend-directory") for a in argv):
        argv = [f"--backend-directory={BACKENDS}", *argv]
    os.execvpe(binary, [binary, *argv], env)
    return 0  # not reached


def main(argv: list[str]) -> int:
    if argv[:1] == ["--exec-tritonserver"]:
        return exec_tritonserver(argv[1:])
    model = os.environ.get("FUNCHAT_MODEL", "")
    if argv and not argv[0].startswith("-"):
        model, argv = argv[0], argv[1:]
    if model not in MODELS:
        print(f"error: name the model to serve (first argument or FUNCHAT_MODEL): one of {', '.join(MODELS)}"
              + (f"; got {model!r}" if model else ""), file=sys.stderr)
        return 2
    repo = Path(os.environ.get("FUNCHAT_REPO", "/opt/funchat/services"))
    run_dir = Path(os.environ.get("FUNCHAT_RUN_DIR", "/tmp/funchat"))
    params: dict[str, str] = {}
    for item in shlex.split(os.environ.get("FUNCHAT_PARAMS", "")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"error: FUNCHAT_PARAMS: {item!r} is not KEY=VALUE", file=sys.stderr)
            return 2
        params[key] = value
    if os.environ.get("FUNCHAT_CHECKPOINT"):
        params["checkpoint"] = os.environ["FUNCHAT_CHECKPOINT"]
    try:
        binary, env = server_binary_env()
        model_repo = prepare_model_repo(model, repo, run_dir, params=params,
                                        config_name=os.environ.get("FUNCHAT_CONFIG") or None)
    except TritonServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    command = [binary, f"--model-repository={model_repo}", f"--backend-directory={BACKENDS}",
               "--model-control-mode=explicit", f"--load-model={model}",
               "--exit-on-error=false", "--strict-readiness=true", *argv]
    print("+ " + shlex.join(command), flush=True)
    os.chdir(repo.parent)  # relative path parameters are taken from the server's working directory
    os.execvpe(binary, command, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
