"""The vocoder against the reference CosyVoice 3 token2wav (../shared/golden/cosyvoice3-token2wav-tiny-a):
offline mel, waveform and intermediates, and reference-mode streaming call by call, within 1e-4;
loading and importing the released weights by name; the CLI commands that use the vocoder."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from funchat.cli import main as cli_main
from funchat.errors import CheckpointError
from funchat.vocoder.checkpoint import load_reference_folder, load_vocoder, read_cosyvoice_yaml

TOL = 1e-4


@pytest.fixture(scope="module")
def golden(shared):
    return shared / "golden" / "cosyvoice3-token2wav-tiny-a"


@pytest.fixture(scope="module")
def expected(golden):
    return np.load(golden / "expected.npz")


@pytest.fixture()
def inputs(expected, tmp_path):
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"speech_tokens": expected["in_tokens"].tolist()}))
    spk = tmp_path / "spk.npy"
    np.save(spk, expected["in_spk"][0])
    return tokens, spk


def _compare(ours, expected, keys):
    worst = {}
    for key in keys:
        a, b = ours[key], expected[key]
        assert a.shape == b.shape, f"{key}: shape {a.shape} vs golden {b.shape}"
        if b.dtype.kind == "f":
            worst[key] = float(np.abs(a - b).max())
            assert worst[key] <= TOL, f"{key}: max abs diff {worst[key]:.3g}"
        else:
            assert (a == b).all(), f"{key}: {a.tolist()} vs {b.tolist()}"
    return worst


def test_vocoder_dump_reproduces_offline_and_reference_streaming(golden, expected, inputs, tmp_path):
    tokens, spk = inputs
    out = tmp_path / "dump.npz"
    assert cli_main(["vocoder-dump", "--checkpoint", str(golden / "checkpoint"), "--tokens", str(tokens),
                     "--speaker-embedding", str(spk), "--out", str(out), "--stream-mode", "reference"]) == 0
    ours = np.load(out)
    keys = [k for k in expected.files if k not in ("hift_rand_ini",)]
    worst = _compare(ours, expected, keys)
    print("largest differences:", {k: f"{v:.2g}" for k, v in worst.items()})


def test_incremental_dump_has_the_same_call_table_and_length(golden, expected, inputs, tmp_path):
    tokens, spk = inputs
    out = tmp_path / "inc.npz"
    assert cli_main(["vocoder-dump", "--checkpoint", str(golden / "checkpoint"), "--tokens", str(tokens),
                     "--speaker-embedding", str(spk), "--out", str(out), "--stream-mode", "incremental"]) == 0
    ours = np.load(out)
    assert (ours["st_calls"] == expected["st_calls"]).all()
    assert ours["st_wav"].shape == expected["off_wav"].shape


def _flow_state(golden):
    return torch.load(golden / "checkpoint" / "flow.pt", map_location="cpu", weights_only=True)


def _reference_copy(golden, tmp_path):
    ck = tmp_path / "ref"
    shutil.copytree(golden / "checkpoint", ck)
    return ck


@pytest.mark.parametrize("edit,match", [
    (lambda s: s.pop("spk_embed_affine_layer.weight"), r"missing tensor spk_embed_affine_layer.weight \(expected shape \[80, 192\]\)"),
    (lambda s: s.__setitem__("extra.weight", torch.zeros(3)), r"unexpected tensor extra.weight \(shape \[3\]\)"),
    (lambda s: s.__setitem__("input_embedding.weight", torch.zeros(6561, 40)),
     r"tensor input_embedding.weight has shape \[6561, 40\], the config implies \[6561, 80\]"),
])
def test_flow_weights_are_checked_by_name_and_shape(golden, tmp_path, edit, match):
    ck = _reference_copy(golden, tmp_path)
    state = _flow_state(golden)
    edit(state)
    torch.save(state, ck / "flow.pt")
    with pytest.raises(CheckpointError, match=match):
        load_reference_folder(ck)


def test_corrupt_hift_file_is_named(golden, tmp_path):
    ck = _reference_copy(golden, tmp_path)
    (ck / "hift.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="hift.pt: not a readable torch state dict"):
        load_reference_folder(ck)


def _released_folder(golden, expected, tmp_path):
    """A CosyVoice 3 release layout built from the golden set: its yaml with the tiny overrides."""
    cfg = json.loads((golden / "checkpoint" / "config.json").read_text())
    text = cfg["trimmed_yaml"]
    text = re.sub(r"(pre_lookahead_layer: .*\n(?:\s+.*\n)*?\s+channels:) 1024", r"\1 64", text)
    text = text.replace("dim: 1024\n            depth: 22\n            heads: 16",
                        "dim: 64\n            depth: 2\n            heads: 2")
    text = text.replace("base_channels: 512", "base_channels: 64").replace("cond_channels: 512", "cond_channels: 64")
    src = tmp_path / "Fun-CosyVoice3-0.5B"
    src.mkdir()
    (src / "cosyvoice3.yaml").write_text(text)
    shutil.copy(golden / "checkpoint" / "flow.pt", src / "flow.pt")
    shutil.copy(golden / "checkpoint" / "hift.pt", src / "hift.pt")
    torch.save({"中文女": {"embedding": torch.tensor(expected["in_spk"])}}, src / "spk2info.pt")
    return src


def test_yaml_reader_resolves_references(golden, expected, tmp_path):
    args = read_cosyvoice_yaml(_released_folder(golden, expected, tmp_path) / "cosyvoice3.yaml")
    assert args["flow"]["decoder"]["estimator"]["static_chunk_size"] == 50  # !ref <chunk_size> * <token_mel_ratio>
    assert args["flow"]["spk_embed_dim"] == 192 and args["hift"]["sampling_rate"] == 24000


def test_import_cosyvoice_then_synthesize_with_a_named_speaker(golden, expected, tmp_path, tiny_checkpoint):
    src = _released_folder(golden, expected, tmp_path)
    ck = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint, ck)
    assert cli_main(["import-cosyvoice", "--src", str(src), "--out", str(ck)]) == 0
    model, speakers = load_vocoder(ck)
    assert set(speakers) == {"中文女", "default"}
    tokens = tmp_path / "t.json"
    tokens.write_text(json.dumps({"speech_tokens": [6561, 6561] + expected["in_tokens"].tolist() + [6562] * 5}))
    wav_path = tmp_path / "out.wav"
    assert cli_main(["synthesize", "--checkpoint", str(ck), "--tokens", str(tokens), "--output", str(wav_path),
                     "--speaker", "中文女"]) == 0
    wav, rate = sf.read(wav_path, dtype="float32")
    assert rate == 24000 and wav.shape == (57600,)
    assert np.abs(wav - expected["off_wav"][0]).max() < 2 / 32768 + TOL  # 16-bit WAV quantisation


def test_synthesize_errors_exit_2(golden, inputs, tmp_path, tiny_checkpoint, capsys):
    tokens, _ = inputs
    assert cli_main(["synthesize", "--checkpoint", str(tiny_checkpoint), "--tokens", str(tokens),
                     "--output", str(tmp_path / "o.wav"), "--speaker", "nobody"]) == 2
    assert "unknown speaker 'nobody'" in capsys.readouterr().err
    empty = tmp_path / "e.json"
    empty.write_text(json.dumps({"speech_tokens": [6561, 6562]}))
    assert cli_main(["synthesize", "--checkpoint", str(tiny_checkpoint), "--tokens", str(empty),
                     "--output", str(tmp_path / "o.wav")]) == 2
    assert "2 outside 0..6560 dropped" in capsys.readouterr().err
    bad_spk = tmp_path / "s.npy"
    np.save(bad_spk, np.ones(10, np.float32))
    assert cli_main(["synthesize", "--checkpoint", str(tiny_checkpoint), "--tokens", str(tokens),
                     "--output", str(tmp_path / "o.wav"), "--speaker-embedding", str(bad_spk)]) == 2
    assert "speaker embedding has 10 values, the vocoder expects 192" in capsys.readouterr().err


def test_respond_writes_the_spoken_reply(tiny_checkpoint, example_wav, tmp_path):
    out_json, out_wav = tmp_path / "r.json", tmp_path / "r.wav"
    assert cli_main(["respond", "--checkpoint", str(tiny_checkpoint), "--input", str(example_wav), "--greedy",
                     "--max-new-tokens", "12", "--output-tokens", str(out_json), "--output", str(out_wav)]) == 0
    data = json.loads(out_json.read_text())
    wav, rate = sf.read(out_wav, dtype="float32")
    assert rate == 24000 and len(wav) == 960 * len(data["vocoder_tokens"])
