"""The checkpoint's file names, shared by the vocoder code and the torch-free orchestrator."""

from __future__ import annotations

import numpy as np
from safetensors.numpy import save_file

from funchat.checkpoint_files import SPEAKERS_FILE, VOCODER_DIR, vocoder_dir, voice_names


def test_voice_names_read_the_speakers_file_without_torch(tmp_path):
    assert voice_names(tmp_path) == set()  # no vocoder speakers: no voices
    (tmp_path / VOCODER_DIR).mkdir()
    save_file({"default": np.zeros(192, np.float32), "alice": np.ones(192, np.float32)},
              str(tmp_path / VOCODER_DIR / SPEAKERS_FILE))
    assert vocoder_dir(tmp_path) == tmp_path / VOCODER_DIR
    assert voice_names(tmp_path) == {"default", "alice"}
    assert voice_names(tmp_path / VOCODER_DIR) == {"default", "alice"}  # the vocoder folder itself


def test_the_vocoder_code_uses_the_same_names():
    from funchat.vocoder import checkpoint

    assert (checkpoint.VOCODER_DIR, checkpoint.SPEAKERS_FILE) == (VOCODER_DIR, SPEAKERS_FILE)
    assert checkpoint.vocoder_dir is vocoder_dir
