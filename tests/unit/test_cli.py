"""The `funchat` command line: init-checkpoint, respond, and their errors (exit code 2, named problem)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from funchat.cli import main as cli_main
from funchat.model.checkpoint import load_model


def test_init_checkpoint_writes_the_public_layout(tmp_path):
    out = tmp_path / "ck"
    assert cli_main(["init-checkpoint", "--preset", "tiny", "--out", str(out), "--seed", "3"]) == 0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "preprocessor_config.json"):
        assert (out / name).exists(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "funaudiochat" and "audio_config" in cfg and "text_config" in cfg
    model = load_model(out)
    assert model.cfg.text.vocab_size == 1024


def test_init_checkpoint_is_deterministic_per_seed(tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        cli_main(["init-checkpoint", "--preset", "tiny", "--out", str(tmp_path / name), "--seed", str(seed)])
    weights = {n: (tmp_path / n / "model.safetensors").read_bytes() for n in "abc"}
    assert weights["a"] == weights["b"] != weights["c"]


def test_sharded_checkpoint_loads(tmp_path):
    assert cli_main(["init-checkpoint", "--preset", "tiny", "--out", str(tmp_path), "--shard-mb", "0.5"]) == 0
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    load_model(tmp_path)


def test_unknown_preset_exits_2(tmp_path, capsys):
    assert cli_main(["init-checkpoint", "--preset", "huge", "--out", str(tmp_path)]) == 2
    assert "unknown preset 'huge'" in capsys.readouterr().err


def test_respond_writes_token_json_from_stereo_int16_44k(tiny_checkpoint, example_wav, tmp_path):
    audio, rate = sf.read(example_wav, dtype="float32")
    stereo = np.stack([audio, audio * 0.5], axis=1)
    import soxr
    stereo44 = soxr.resample(stereo, rate, 44100)
    wav = tmp_path / "in.wav"
    sf.write(wav, stereo44, 44100, subtype="PCM_16")
    out = tmp_path / "out.json"
    code = cli_main(["respond", "--checkpoint", str(tiny_checkpoint), "--input", str(wav), "--mode", "s2s",
                     "--greedy", "--seed", "0", "--max-new-tokens", "16", "--output-tokens", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert {"text", "text_tokens", "speech_tokens"} <= set(data)
    assert len(data["text_tokens"]) <= 16 and len(data["speech_tokens"]) % 5 == 0


def test_respond_greedy_matches_the_oracle(tiny_checkpoint, tiny_pipeline, example_wav, tmp_path):
    from funchat.audio_io import load_audio
    from funchat.oracle.generation import GenerationConfig
    from funchat.turn.schedule import Mode

    out = tmp_path / "o.json"
    cli_main(["respond", "--checkpoint", str(tiny_checkpoint), "--input", str(example_wav), "--greedy",
              "--max-new-tokens", "20", "--output-tokens", str(out), "--system-prompt", "Be brief."])
    data = json.loads(out.read_text())
    ref = tiny_pipeline.respond(load_audio(example_wav), system_prompt="Be brief.",
                                gen=GenerationConfig.greedy(Mode.S2S, 20))
    assert data["text_tokens"] == ref.text_tokens and data["speech_tokens"] == ref.speech_tokens


@pytest.mark.parametrize("content,match", [
    (b"", "empty|unreadable|not"),
    (b"RIFF\x00\x00garbage bytes that are not audio", "unreadable|not"),
])
def test_respond_bad_files_exit_2(tiny_checkpoint, tmp_path, capsys, content, match):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(content)
    assert cli_main(["respond", "--checkpoint", str(tiny_checkpoint), "--input", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.wav" in err


def test_respond_nan_wav_and_missing_checkpoint(tiny_checkpoint, tmp_path, capsys):
    wav = tmp_path / "nan.wav"
    sf.write(wav, np.full(16000, np.nan, np.float32), 16000, subtype="FLOAT")
    assert cli_main(["respond", "--checkpoint", str(tiny_checkpoint), "--input", str(wav)]) == 2
    assert "16000 NaN" in capsys.readouterr().err
    assert cli_main(["respond", "--checkpoint", str(tmp_path / "nope"), "--input", str(wav)]) == 2
    assert "checkpoint directory not found" in capsys.readouterr().err


def test_console_script_runs(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "funchat.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "init-checkpoint" in proc.stdout and "reference-dump" in proc.stdout
