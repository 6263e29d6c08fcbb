"""The package as pip builds and installs it.

The sdist carries protos/ (never code generated from it); the wheel carries the API code that
setup.py generates from it; an installed wheel imports `funchat.api` and `funchat.client` from a
read-only folder, writing nothing; a package without the generated code says how to fix it; and
the CLI runs `--help` with no extra installed and names the extra a command is missing.

The build runs without build isolation (the venv's setuptools and pinned grpcio-tools, from
`funchat[all]`), so it needs no network, and on a copy of the sources, so it never writes into the
checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parents[2]
# What the build reads. funchat/v1 (generated) and caches are left out: the build must make the
# API code itself.
GENERATED = ["funchat/v1/__init__.py", "funchat/v1/funchat_pb2.py", "funchat/v1/funchat_pb2.pyi",
             "funchat/v1/funchat_pb2_grpc.py"]




def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def dists(tmp_path_factory, copy_sources) -> dict[str, Path]:
    """{"sdist": the .tar.gz, "wheel": the .whl built from that sdist, as pip builds it}."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = copy_sources(tmp / "src")
    out = tmp / "dist"
    # The PEP 517 hook itself: the venv has no `build` frontend, and pip does not make sdists.
    run([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(out)!r})"], cwd=src)
    (sdist,) = out.glob("funchat-*.tar.gz")
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(sdist)])
    (wheel,) = out.glob("funchat-*.whl")
    return {"sdist": sdist, "wheel": wheel}


def test_sdist_carries_the_proto_not_generated_code(dists):
    with tarfile.open(dists["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {"protos/funchat/v1/funchat.proto", "setup.py", "MANIFEST.in", "funchat/api.py"} <= names
    assert not [n for n in names if n.startswith("funchat/v1/")]


def test_wheel_carries_generated_api_code(dists):
    with zipfile.ZipFile(dists["wheel"]) as whl:
        names = set(whl.namelist())
        record = whl.read(next(n for n in names if n.endswith(".dist-info/RECORD"))).decode()
    assert set(GENERATED) <= names
    assert all(name in record for name in GENERATED)  # installed and uninstalled like any module
    assert {"funchat/api.py", "funchat/client/__init__.py", "funchat/client/call.py"} <= names


def install_wheel(wheel: Path, target: Path) -> Path:
    run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(target),
         str(wheel)])
    return target


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def set_writable(root: Path, writable: bool) -> None:
    for p in [root, *root.rglob("*")]:
        mode = p.stat().st_mode
        p.chmod(mode | 0o200 if writable else mode & ~0o222)


def python_from(target: Path, code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run code with the installed copy in `target` first on the path, the venv's site-packages
    (the dependencies) after it, and no site processing: the checkout's editable install (a .pth
    file) is not seen."""
    site_packages = sysconfig.get_paths()["purelib"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = os.pathsep.join([str(target), site_packages])
    cmd = [sys.executable, "-S", "-c", code]
    if os.geteuid() == 0 and shutil.which("setpriv"):
        # root writes through read-only permissions; without CAP_DAC_OVERRIDE it cannot.
        cmd = ["setpriv", "--bounding-set=-dac_override,-fowner", "--"] + cmd
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)


IMPORT_CHECK = """
import sys
import funchat, funchat.api, funchat.client
from funchat.api import pb
from funchat.client import session_config
assert funchat.__file__.startswith({target!r}), funchat.__file__
assert funchat.api.SERVICE_NAME == "funchat.v1.Funchat"
assert session_config(mode="s2t").mode == pb.MODE_SPEECH_TO_TEXT
print("ok", sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
"""


def test_installed_wheel_imports_from_a_read_only_folder(dists, tmp_path):
    target = install_wheel(dists["wheel"], tmp_path / "site")
    before = snapshot(target)
    set_writable(target, False)
    try:
        proc = python_from(target, IMPORT_CHECK.format(target=str(target)), cwd=tmp_path)
    finally:
        set_writable(target, True)  # so that pytest can remove it
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[0] == "ok []"  # and no torch in the client
    assert snapshot(target) == before  # nothing generated, nothing cached


def test_missing_generated_code_says_how_to_fix(dists, tmp_path):
    target = install_wheel(dists["wheel"], tmp_path / "site")
    shutil.rmtree(target / "funchat" / "v1")
    proc = python_from(target, "import funchat.api", cwd=tmp_path)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: funchat's generated API code") and "make setup" in last, proc.stderr


# ---- the CLI where an extra is missing (modules made unimportable, as in an install without it) ----

def cli_without(modules: list[str], argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    code = (f"import sys\nfor m in {modules!r}: sys.modules[m] = None\n"
            f"from funchat.cli import main\nsys.exit(main({argv!r}))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd)


def test_cli_help_needs_no_extra(tmp_path):
    proc = cli_without(["torch", "grpc", "tokenizers", "safetensors"], ["--help"], tmp_path)
    assert proc.returncode == 0 and "chat" in proc.stdout and "respond" in proc.stdout, proc.stderr


@pytest.mark.parametrize("command, blocked, extra", [
    (["respond", "--checkpoint", "ckpt", "--input", "in.wav"], "torch", "models"),
    (["chat", "--server", "127.0.0.1:1", "--input", "in.wav"], "grpc", "client"),
])
def test_cli_names_the_missing_extra(tmp_path, command, blocked, extra):
    sf.write(str(tmp_path / "in.wav"), np.zeros(1600, np.float32), 16000)
    proc = cli_without([blocked], command, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert f"needs {blocked}, which is not installed; install funchat[{extra}]" in proc.stderr

