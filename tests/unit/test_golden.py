"""Exactness against the public reference implementation (../shared/golden/).

`funchat reference-dump` feeds the golden log-mel features and prompt ids through our model and
generation loop; every generated id must equal the reference's, SRH tokens at every forward
included, and every float array must be within 1e-4.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from funchat.cli import main as cli_main
from funchat.errors import PromptError
from funchat.oracle.reference_dump import run_reference_dump

FLOAT_TOLERANCE = 1e-4
CASES = [("fun-audio-chat-tiny-a", "s2s", 40), ("fun-audio-chat-tiny-a", "s2t", 40),
         ("fun-audio-chat-tiny-a-eos", "s2s", 64), ("fun-audio-chat-tiny-a-eos", "s2t", 64)]


@pytest.mark.parametrize("name,mode,max_new", CASES)
def test_reference_dump_reproduces_golden(shared, tmp_path, name, mode, max_new):
    golden = shared / "golden" / name
    out = tmp_path / "dump.npz"
    assert cli_main(["reference-dump", "--checkpoint", str(golden / "checkpoint"),
                     "--features", str(golden / "input_features.npz"), "--prompt-ids", str(golden / "input_prompt.json"),
                     "--out", str(out), "--mode", mode, "--max-new-tokens", str(max_new)]) == 0
    ours = np.load(out)
    expected = np.load(golden / f"expected_{mode}.npz")
    worst = {}
    for key in expected.files:
        assert key in ours.files, f"{key} missing from our dump"
        a, b = ours[key], expected[key]
        assert a.shape == b.shape, f"{key}: shape {a.shape} vs golden {b.shape}"
        if b.dtype.kind == "f":
            worst[key] = float(np.abs(a - b).max()) if b.size else 0.0
            assert worst[key] <= FLOAT_TOLERANCE, f"{key}: max abs diff {worst[key]:.3g}"
        else:
            mismatch = np.argwhere(a != b)
            assert mismatch.size == 0, f"{key}: first mismatch at {mismatch[0].tolist()}: {a[tuple(mismatch[0])]} vs {b[tuple(mismatch[0])]}"
    print(f"{name}/{mode}: largest float differences {worst}")


def test_golden_token_lists_match_json(shared, tmp_path):
    golden = shared / "golden" / "fun-audio-chat-tiny-a-eos"
    arrays = run_reference_dump(golden / "checkpoint", golden / "input_features.npz", golden / "input_prompt.json",
                                tmp_path / "d.npz", mode="s2s", max_new_tokens=64)
    expected = json.loads((golden / "expected_tokens.json").read_text())["s2s"]
    assert arrays["gen_text_ids"][0].tolist() == expected["gen_text_ids"]
    assert arrays["gen_speech_ids"][0].tolist() == expected["gen_speech_ids"]
    # The eos rule is exercised: speech ended, the step's text became audio_eos, the turn ended.
    assert (arrays["gen_text_ids"] != arrays["gen_text_ids_emitted"][None]).sum() == 1


@pytest.fixture()
def golden_inputs(shared, tmp_path):
    golden = shared / "golden" / "fun-audio-chat-tiny-a"
    feats = dict(np.load(golden / "input_features.npz"))
    prompt = json.loads((golden / "input_prompt.json").read_text())
    return golden, feats, prompt, tmp_path


def _dump(golden, feats, prompt, tmp_path):
    np.savez(tmp_path / "f.npz", **feats)
    (tmp_path / "p.json").write_text(json.dumps(prompt))
    return run_reference_dump(golden / "checkpoint", tmp_path / "f.npz", tmp_path / "p.json", tmp_path / "o.npz",
                              max_new_tokens=4)


def test_wrong_mel_bins_is_named(golden_inputs):
    golden, feats, prompt, tmp = golden_inputs
    feats["input_features"] = feats["input_features"][:, :80]
    with pytest.raises(PromptError, match="80 mel bins, the checkpoint expects 128"):
        _dump(golden, feats, prompt, tmp)


def test_more_placeholders_than_clips_is_named(golden_inputs):
    golden, feats, prompt, tmp = golden_inputs
    audio = 1019
    prompt["input_ids"] = prompt["input_ids"] + [audio]
    with pytest.raises(PromptError, match="2 <\\|AUDIO\\|> placeholders, more than the 1 clip"):
        _dump(golden, feats, prompt, tmp)


def test_ids_outside_vocabulary_are_named(golden_inputs):
    golden, feats, prompt, tmp = golden_inputs
    prompt["input_ids"] = prompt["input_ids"] + [5000]
    with pytest.raises(PromptError, match=r"\[5000\] are outside the text vocabulary \(size 1024\)"):
        _dump(golden, feats, prompt, tmp)


def test_missing_features_array_and_bad_prompt(golden_inputs):
    golden, feats, prompt, tmp = golden_inputs
    with pytest.raises(PromptError, match="lacks the array 'input_features'"):
        _dump(golden, {"x": np.zeros(3)}, prompt, tmp)
    with pytest.raises(PromptError, match="non-empty list of integers"):
        _dump(golden, feats, {"input_ids": []}, tmp)


def test_cli_reports_mismatch_with_exit_code_2(golden_inputs, capsys):
    golden, feats, prompt, tmp = golden_inputs
    feats["input_features"] = feats["input_features"][:, :64]
    np.savez(tmp / "f.npz", **feats)
    (tmp / "p.json").write_text(json.dumps(prompt))
    code = cli_main(["reference-dump", "--checkpoint", str(golden / "checkpoint"), "--features", str(tmp / "f.npz"),
                     "--prompt-ids", str(tmp / "p.json"), "--out", str(tmp / "o.npz")])
    assert code == 2
    assert "64 mel bins" in capsys.readouterr().err
