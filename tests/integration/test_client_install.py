"""`funchat[client]` alone: a fresh venv with only `pip install '.[client]'` has no torch, and its
`funchat chat` talks to a running stack (redis-server, the four tritonservers, the orchestrator,
which takes only calls with an API key) without importing torch or any model code.

The venv is made with the machine's pip configuration (and pip's cache), from a copy of the
sources: pip builds in the source folder, and the checkout is not ours to write into.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import soundfile as sf

from funchat.dev.redis_server import start_redis
from funchat.dev.stack import start_orchestrator
from funchat.dev.tritonserver import free_port

REPO = Path(__file__).resolve().parents[2]
MAX_NEW = 24
# Modules a client must never load: torch, the model code (model, oracle, vocoder, engines and
# what builds their inputs) and the server side.
FORBIDDEN = ("torch", "funchat.model", "funchat.oracle", "funchat.vocoder", "funchat.engines",
             "funchat.turn", "funchat.text", "funchat.orchestrator", "funchat.dev", "tritonclient", "ray")




def venv_env(venv: Path) -> dict[str, str]:
    """This environment without the test venv: its bin off PATH, no PYTHON* or VIRTUAL_ENV."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
    test_bin = str(Path(sys.executable).parent)
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != test_bin]
    env["PATH"] = os.pathsep.join([str(venv / "bin"), *path])
    return env


def run_in(venv: Path, cmd: list[str], cwd: Path, timeout: float = 600,
           api_key: str | None = None) -> subprocess.CompletedProcess:
    """cmd in the venv; api_key: its FUNCHAT_API_KEY (None: none, whatever this shell has)."""
    # cwd is never the checkout: `python -c` puts cwd first on sys.path, where ./funchat would shadow
    # the installed package.
    env = {k: v for k, v in venv_env(venv).items() if k != "FUNCHAT_API_KEY"}
    if api_key is not None:
        env["FUNCHAT_API_KEY"] = api_key
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory, copy_sources) -> Path:
    tmp = tmp_path_factory.mktemp("client-install")
    src = copy_sources(tmp / "src")
    venv = tmp / "venv"
    # Without a pip of its own (ensurepip takes ~10 s): this venv's pip installs into it (--python).
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True)
    t0 = time.monotonic()
    # A regular build, with build isolation: [build-system].requires alone must be enough.
    proc = run_in(venv, [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                         f"{src}[client]"], cwd=tmp)
    took = time.monotonic() - t0
    assert proc.returncode == 0, f"pip install '.[client]' failed:\n{proc.stdout}\n{proc.stderr}"
    print(f"pip install '.[client]' into a fresh venv: {took:.1f} s")
    return venv


@pytest.fixture(scope="module")
def stack(tiny_checkpoint, tmp_path_factory, make_api_key, model_services):
    """-> (target, orchestrator log, API key)"""
    run_dir = tmp_path_factory.mktemp("client-install-stack")
    keys_file, key = make_api_key(run_dir, "dev")
    redis_server = start_redis(run_dir)
    cluster, orch = model_services, None  # the model services are shared (tests/integration/conftest.py)
    try:
        env = {"FUNCHAT_CHECKPOINT": str(tiny_checkpoint), "FUNCHAT_REDIS_URL": redis_server.url,
               "FUNCHAT_RESUME_SECRET": "test-secret-" + "0" * 20,
               "FUNCHAT_ENDPOINTS": json.dumps(cluster.endpoints), "FUNCHAT_AUTH": "api_keys",
               "FUNCHAT_API_KEYS_FILE": str(keys_file)}
        orch = start_orchestrator(run_dir, env, free_port(), timeout=180)
        yield SimpleNamespace(target=orch.target, log=orch.log, key=key)
    finally:
        if orch is not None:
            orch.stop()
        redis_server.stop()


def test_client_venv_has_no_torch(client_venv, tmp_path):
    proc = run_in(client_venv, [str(client_venv / "bin" / "python"), "-c", "import torch"], cwd=tmp_path)
    assert proc.returncode != 0 and "No module named 'torch'" in proc.stderr, proc.stderr


def test_funchat_help_runs(client_venv, tmp_path):
    proc = run_in(client_venv, [str(client_venv / "bin" / "funchat"), "--help"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "chat" in proc.stdout and "call" in proc.stdout


def test_funchat_chat_writes_the_spoken_reply(client_venv, stack, example_wav, tmp_path):
    out = tmp_path / "reply.wav"
    proc = run_in(client_venv, [str(client_venv / "bin" / "funchat"), "chat", "--server", stack.target,
                                "--input", str(example_wav), "--output", str(out), "--greedy", "--seed", "0",
                                "--max-new-tokens", str(MAX_NEW)], cwd=tmp_path, api_key=stack.key)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\norchestrator log {stack.log}"
    info = sf.info(str(out))
    assert info.samplerate == 24000 and info.frames > 0, proc.stdout


def test_funchat_chat_without_a_key_says_what_to_set(client_venv, stack, example_wav, tmp_path):
    funchat = str(client_venv / "bin" / "funchat")
    proc = run_in(client_venv, [funchat, "chat", "--server", stack.target, "--input", str(example_wav)], cwd=tmp_path)
    assert proc.returncode == 2, f"{proc.stdout}\n{proc.stderr}"
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and "answered UNAUTHENTICATED" in proc.stderr
    assert "no API key was sent: set FUNCHAT_API_KEY" in proc.stderr
    # the key from a file (--api-key-file) gets past authentication: an unknown session is NOT_FOUND
    key_file = tmp_path / "api_key"
    key_file.write_text(stack.key + "\n")
    proc = run_in(client_venv, [funchat, "chat", "--server", stack.target, "--input", str(example_wav),
                                "--api-key-file", str(key_file), "--session", "sess_nobody"], cwd=tmp_path)
    assert proc.returncode == 2 and "answered NOT_FOUND" in proc.stderr, proc.stderr
    assert stack.key.rsplit("_", 1)[1] not in proc.stderr + proc.stdout


CHAT_AND_LIST_MODULES = """
import json, sys
from funchat.cli import main
rc = main(sys.argv[1:])
forbidden = {forbidden!r}
loaded = sorted(m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in forbidden))
print(json.dumps({{"rc": rc, "loaded": loaded, "funchat": sys.modules["funchat"].__file__}}))
"""


def test_chat_imports_neither_torch_nor_model_code(client_venv, stack, example_wav, tmp_path):
    code = CHAT_AND_LIST_MODULES.format(forbidden=FORBIDDEN)
    proc = run_in(client_venv, [str(client_venv / "bin" / "python"), "-c", code, "chat", "--server", stack.target,
                                "--input", str(example_wav), "--output", str(tmp_path / "reply.wav"), "--greedy",
                                "--seed", "0", "--max-new-tokens", str(MAX_NEW)], cwd=tmp_path, api_key=stack.key)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["rc"] == 0, proc.stdout
    assert result["funchat"].startswith(str(client_venv)), result  # the installed package, not the checkout
    assert result["loaded"] == [], result
