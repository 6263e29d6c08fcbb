"""Shared test fixtures: where ../shared is, and a tiny checkpoint written once per session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    return Path(os.environ.get("FUNCHAT_SHARED", REPO.parent / "shared")).resolve()


@pytest.fixture(scope="session")
def shared() -> Path:
    path = shared_dir()
    assert path.is_dir(), f"the shared folder is missing at {path} (set FUNCHAT_SHARED)"
    return path


@pytest.fixture(scope="session")
def example_wav(shared: Path) -> Path:
    return shared / "data" / "fun-audio-chat-example-16k-f32.wav"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from funchat.model.init_checkpoint import init_checkpoint

    return init_checkpoint("tiny", tmp_path_factory.mktemp("tiny-ckpt"), seed=0)


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_checkpoint):
    from funchat.oracle.pipeline import ReferencePipeline

    return ReferencePipeline(tiny_checkpoint)


# What a package build reads: a copy of these builds like the checkout, without its generated API code.
BUILD_INPUTS = ["pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "protos", "funchat"]


def copy_build_inputs(dst: Path) -> Path:
    """A copy of the package's build inputs in dst (no generated code, no caches) -> dst."""
    generated = REPO / "funchat" / "v1"

    def leave_out(folder: str, names: list[str]) -> list[str]:
        return [n for n in names if n == "__pycache__" or n.endswith(".pyc") or Path(folder, n) == generated]

    dst.mkdir(parents=True)
    for name in BUILD_INPUTS:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=leave_out)
        else:
            shutil.copy2(src, dst / name)
    return dst


@pytest.fixture(scope="session")
def copy_sources():
    """copy_build_inputs, for the tests that build the package."""
    return copy_build_inputs


@pytest.fixture
def no_funchat_env(monkeypatch):
    """Only what a test sets: no FUNCHAT_* from the shell running the tests."""
    for name in list(os.environ):
        if name.startswith("FUNCHAT_"):
            monkeypatch.delenv(name)
