"""load_model(prefixes=...): only some top-level modules are read (the audio_tokenizer service holds
the encoder and adaptor, not the LLM); their outputs equal the full model's; names are checked."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from funchat.audio_io import load_audio
from funchat.errors import CheckpointError
from funchat.model.checkpoint import ENCODER_PREFIXES, SINGLE_FILE, load_model, module_prefixes
from funchat.model.config import FunAudioChatConfig
from funchat.turn.prompt import speech_frames_for_samples
from funchat.model.mel import log_mel_spectrogram


@pytest.fixture(scope="module")
def clips(example_wav):
    audio = load_audio(example_wav)
    return [audio[:48000], audio[16000:30000]]


def _encode(model, clips):
    mels = [log_mel_spectrogram(c, n_mels=model.cfg.audio.num_mel_bins) for c in clips]
    frames = [speech_frames_for_samples(len(c)) for c in clips]
    with torch.inference_mode():
        return model.encode_audio(mels, frames)


def _copy_with(ckpt: Path, out: Path, edit) -> Path:
    """A copy of the checkpoint whose tensors `edit` changed in place."""
    shutil.copytree(ckpt, out)
    tensors = load_file(str(out / SINGLE_FILE))
    edit(tensors)
    save_file(tensors, str(out / SINGLE_FILE), metadata={"format": "pt"})
    return out


def test_encoder_prefixes_encode_like_the_full_model_without_the_llm(tiny_checkpoint, clips):
    full = load_model(tiny_checkpoint)
    part = load_model(tiny_checkpoint, prefixes=ENCODER_PREFIXES)
    for got, want in zip(_encode(part, clips), _encode(full, clips)):
        assert torch.equal(got, want)
    for name in ("language_model", "audio_invert_tower"):
        params = list(getattr(part, name).parameters())
        assert params and all(p.is_meta for p in params), name  # shapes only, nothing allocated
    for name in ENCODER_PREFIXES:
        assert not any(p.is_meta for p in getattr(part, name).parameters()), name
        assert not any(b.is_meta for b in getattr(part, name).buffers()), name


def test_prefixes_keep_the_dtype_and_load_the_llm_alone(tiny_checkpoint, clips):
    part = load_model(tiny_checkpoint, dtype="bfloat16", prefixes=ENCODER_PREFIXES)
    assert part.dtype == torch.bfloat16  # read from the (meta) LLM head: encode_audio casts mels to it
    assert all(r.dtype == torch.bfloat16 for r in _encode(part, clips))

    full = load_model(tiny_checkpoint)
    llm = load_model(tiny_checkpoint, prefixes=["language_model"])
    assert all(p.is_meta for p in llm.continuous_audio_tower.parameters())
    x = torch.randn(2, 5, full.cfg.text.hidden_size)
    lengths = torch.tensor([5, 3])
    with torch.inference_mode():
        h_full, logits_full = full.llm_forward(x, full.new_llm_cache(2), lengths)
        h_part, logits_part = llm.llm_forward(x, llm.new_llm_cache(2), lengths)
    assert torch.equal(h_full, h_part) and torch.equal(logits_full, logits_part)


def test_unknown_or_incomplete_prefixes_are_named(tiny_checkpoint):
    cfg = FunAudioChatConfig.from_file(tiny_checkpoint / "config.json")
    assert module_prefixes(cfg) == ("continuous_audio_tower", "audio_tower", "language_model", "audio_invert_tower")
    valid = "continuous_audio_tower, audio_tower, language_model, audio_invert_tower"
    with pytest.raises(CheckpointError, match=rf"unknown module prefix\(es\) 'encoder': this checkpoint's modules "
                                              rf"are {valid}"):
        load_model(tiny_checkpoint, prefixes=["audio_tower", "encoder"])
    with pytest.raises(CheckpointError, match="no module prefixes given"):
        load_model(tiny_checkpoint, prefixes=[])
    with pytest.raises(CheckpointError, match="load audio_tower with it"):
        load_model(tiny_checkpoint, prefixes=["audio_invert_tower"])
    one = load_model(tiny_checkpoint, prefixes="audio_tower")  # a single name, not its characters
    assert all(p.is_meta for p in one.continuous_audio_tower.parameters())
    assert not any(p.is_meta for p in one.audio_tower.parameters())


def test_loaded_prefixes_are_still_validated(tiny_checkpoint, tmp_path):
    name = "audio_tower.continual_output_matching.weight"

    def reshape(tensors):
        tensors[name] = tensors[name][:, :-1].contiguous()

    bad_adaptor = _copy_with(tiny_checkpoint, tmp_path / "bad-adaptor", reshape)
    with pytest.raises(CheckpointError, match=rf"tensor {name} has shape \[64, 63\], the config implies \[64, 64\]"):
        load_model(bad_adaptor, prefixes=ENCODER_PREFIXES)

    missing = "continuous_audio_tower.proj.bias"
    no_bias = _copy_with(tiny_checkpoint, tmp_path / "no-bias", lambda t: t.pop(missing))
    with pytest.raises(CheckpointError, match=rf"missing tensor {missing}"):
        load_model(no_bias, prefixes=ENCODER_PREFIXES)

    # A broken LLM tensor does not concern a service that does not load the LLM...
    llm_name = "language_model.model.norm.weight"
    bad_llm = _copy_with(tiny_checkpoint, tmp_path / "bad-llm",
                         lambda t: t.update({llm_name: t[llm_name][:-1].clone()}))
    load_model(bad_llm, prefixes=ENCODER_PREFIXES)
    with pytest.raises(CheckpointError, match=rf"tensor {llm_name} has shape \[63\]"):
        load_model(bad_llm)  # ... but the full load still refuses it
    # and a tensor under no known module is reported whatever is loaded
    junk = _copy_with(tiny_checkpoint, tmp_path / "junk", lambda t: t.update({"junk.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor junk.weight"):
        load_model(junk, prefixes=ENCODER_PREFIXES)
