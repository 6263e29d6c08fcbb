"""Dependencies point one way (DESIGN.md §5): the client and the orchestrator never import torch,
the model, the vocoder, the oracle or the code that runs inside tritonserver; the client imports
only grpc, numpy, soxr and the generated protos; no logic is copied between oracle and orchestrator.

The import checks run in a subprocess where the forbidden modules cannot be imported at all, so a
lazy import buried in a function body that runs at import time fails too.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "funchat"
FORBIDDEN = ("torch", "funchat.model", "funchat.vocoder", "funchat.oracle", "funchat.engines")

# Imports every module of the given packages with FORBIDDEN made unimportable; prints the
# top-level modules that got imported (beyond the standard library) as JSON.
_PROBE = r"""
import importlib, importlib.abc, json, pkgutil, sys
FORBIDDEN = {forbidden!r}

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN):
            raise ImportError(f"{{name}} must not be imported here (dependency direction)")
        return None

sys.meta_path.insert(0, Block())
before = set(sys.modules)
for package in {packages!r}:
    pkg = importlib.import_module(package)
    for info in pkgutil.walk_packages(getattr(pkg, "__path__", []), package + "."):
        importlib.import_module(info.name)
new = {{m.split(".")[0] for m in set(sys.modules) - before}} - set(sys.stdlib_module_names)
new = sorted(m for m in new if not m.startswith("_cython_") and m != "cython_runtime")  # compiled-module runtime
print(json.dumps(new))
"""


def _imported(packages: list[str], forbidden: tuple[str, ...] = FORBIDDEN) -> set[str]:
    code = _PROBE.format(forbidden=forbidden, packages=packages)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"importing {packages} needs a forbidden module:\n{proc.stderr[-3000:]}"
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_client_imports_only_grpc_numpy_soxr_and_the_protos():
    top = _imported(["funchat.client"])
    # google = protobuf (the generated protos' runtime); typing_extensions comes with grpc/protobuf;
    # grpc loads its own optional plugins (grpc_tools, grpc_reflection) when they are installed, as
    # they are in the development venv (tests/integration/test_client_install.py checks a client-only venv)
    allowed = {"funchat", "grpc", "grpc_health", "numpy", "soxr", "google", "typing_extensions",
               "grpc_tools", "grpc_reflection"}
    assert top <= allowed, f"the client imports {sorted(top - allowed)}"


def test_load_generator_is_client_side():
    """funchat.loadgen (Locust's callers, make bench-e2e's) runs where only the client and the loadtest
    extra are installed: the client's packages plus soundfile (a base dependency) for WAV files, and
    none of the server's code."""
    server_side = ("funchat.orchestrator", "funchat.dev", "funchat.benchmarks", "funchat.turn", "funchat.text")
    top = _imported(["funchat.loadgen"], FORBIDDEN + server_side)
    allowed = {"funchat", "grpc", "grpc_health", "numpy", "soxr", "google", "typing_extensions", "grpc_tools",
               "grpc_reflection", "soundfile", "_soundfile", "_soundfile_data", "_cffi_backend", "cffi"}
    assert top <= allowed, f"the load generator imports {sorted(top - allowed)}"


def test_orchestrator_and_turn_packages_import_no_torch_and_no_model_code():
    top = _imported(["funchat.turn", "funchat.orchestrator"])
    assert "torch" not in top


def test_the_probe_does_catch_a_forbidden_import():
    """The check above can fail: the oracle needs torch and the model, so the probe refuses it."""
    code = _PROBE.format(forbidden=FORBIDDEN, packages=["funchat.oracle"])
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "must not be imported here" in proc.stderr


# ---- no copied logic between the oracle and the orchestrator ----

WINDOW = 6  # lines: the size at which a repeated block is a copy, not an idiom


def _normalised_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, code line with names, strings and numbers blurred), comments and blanks dropped."""
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        code = line.split("#", 1)[0].strip()
        if not code or code.startswith(("import ", "from ", '"""', "@")):
            continue
        code = re.sub(r"(\"[^\"]*\"|'[^']*')", "S", code)
        code = re.sub(r"\b\d+(\.\d+)?\b", "N", code)
        out.append((n, code))
    return out


def _windows(path: Path) -> dict[str, int]:
    lines = _normalised_lines(path)
    return {"\n".join(c for _, c in lines[i:i + WINDOW]): lines[i][0] for i in range(len(lines) - WINDOW + 1)}


def test_no_block_is_copied_between_the_oracle_and_the_orchestrator():
    oracle = {w: (p, n) for p in sorted((PACKAGE / "oracle").glob("*.py")) for w, n in _windows(p).items()}
    copies = [f"{p.relative_to(REPO)}:{n} repeats {oracle[w][0].relative_to(REPO)}:{oracle[w][1]}"
              for p in sorted((PACKAGE / "orchestrator").glob("*.py")) for w, n in _windows(p).items() if w in oracle]
    assert not copies, "logic copied between oracle and orchestrator (move it to funchat.turn):\n" + "\n".join(copies)


@pytest.mark.parametrize("window_source", ["a = 1\nb = 2\nc = f(a)\nd = g(b)\ne = h(c, d)\nreturn e\n"])
def test_the_copy_scan_finds_a_copy(tmp_path, window_source):
    one, two = tmp_path / "one.py", tmp_path / "two.py"
    one.write_text("def f():\n" + "".join("    " + line + "\n" for line in window_source.splitlines()))
    two.write_text("def g():\n    x = 0\n" + "".join("    " + line + "\n" for line in window_source.splitlines()))
    assert set(_windows(one)) & set(_windows(two))
