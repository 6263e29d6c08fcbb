"""Where a funchat checkpoint keeps its files, for code that must not import the model packages.

The vocoder code (which writes and loads these files with torch) and the orchestrator (which only
lists the voices, without torch) both take the names from here, so they cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path

VOCODER_DIR = "vocoder"                   # the vocoder's folder inside a checkpoint directory
SPEAKERS_FILE = "speakers.safetensors"    # one x-vector per speaker (voice) name


def vocoder_dir(checkpoint: str | Path) -> Path:
    """The vocoder folder of a funchat checkpoint (or the folder itself if it is one)."""
    path = Path(checkpoint)
    return path / VOCODER_DIR if (path / VOCODER_DIR).is_dir() else path


def voice_names(checkpoint: str | Path) -> set[str]:
    """The speaker names of the checkpoint's vocoder (empty when it has no speakers file).
    Reads only the safetensors header, with numpy: no torch, no tensor data."""
    from safetensors import safe_open

    path = vocoder_dir(checkpoint) / SPEAKERS_FILE
    if not path.exists():
        return set()
    with safe_open(str(path), "np") as f:
        return set(f.keys())
