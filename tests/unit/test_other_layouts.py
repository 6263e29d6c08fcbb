"""Nothing may depend on the golden checkpoint's sizes or ids: other sizes, the real 151936-token
vocabulary with the real special ids, and audio longer than 30 s go through the same code."""

from __future__ import annotations

import json

import numpy as np
import torch

from funchat.model.checkpoint import build_model, randomize, save_checkpoint
from funchat.model.config import FunAudioChatConfig
from funchat.model.presets import preset_config
from funchat.oracle.reference_dump import run_reference_dump


def other_layout_config() -> dict:
    raw = preset_config("tiny")
    text, audio = raw["text_config"], raw["audio_config"]
    text.update(vocab_size=151936, hidden_size=48, head_dim=12, num_attention_heads=4, num_key_value_heads=4,
                num_hidden_layers=3, intermediate_size=96, audio_bos_index=151670, audio_eos_index=151671,
                sil_index=151673, eos_token_id=151645, bos_token_id=151643)
    raw.update(audio_token_index=151669, hidden_size=48)
    audio.update(d_model=40, encoder_attention_heads=5, encoder_layers=3, encoder_ffn_dim=80, output_dim=48, n_window=50)
    audio["crq_transformer_config"].update(hidden_size=24, num_hidden_layers=3, head_dim=6, num_attention_heads=4,
                                           num_key_value_heads=1, intermediate_size=40)
    return raw


def test_reference_dump_on_another_layout_with_long_audio(tmp_path):
    cfg = FunAudioChatConfig.from_dict(other_layout_config())
    save_checkpoint(randomize(build_model(cfg), 5), tmp_path / "ck")
    rng = np.random.default_rng(0)
    frames = 3300  # 33 s of log-mel: 33 windows of 1 s (n_window 50), past Whisper's 30 s
    speech_len = frames // 4
    np.savez(tmp_path / "f.npz", input_features=rng.normal(size=(1, 128, frames)).astype(np.float32),
             speech_lengths=np.array([speech_len]))
    prompt = [151644, 9707, 198, 151670, 151669, 151671, 151645, 198, 151644, 77091, 198]
    (tmp_path / "p.json").write_text(json.dumps({"input_ids": prompt}))
    for mode in ("s2s", "s2t"):
        out = run_reference_dump(tmp_path / "ck", tmp_path / "f.npz", tmp_path / "p.json", tmp_path / f"{mode}.npz",
                                 mode=mode, max_new_tokens=12)
        groups = -(-speech_len // 5)
        assert out["audio_token_counts"].tolist() == [groups]
        assert out["enc_out"].shape == (1, groups * 5, 48) and out["adaptor_out"].shape == (1, groups, 48)
        assert out["text_logits"].shape == (1, len(prompt) - 1 + groups, 151936)
        n = out["gen_text_ids"].shape[1]
        assert out["step_text_logits"].shape == (n, 1, 151936)
        # greedy: each emitted id is the argmax of its step's logits, except the forced audio_bos
        argmax = out["step_text_logits"][:, 0].argmax(-1)
        start = 1 if mode == "s2s" else 0
        assert (out["gen_text_ids_emitted"][start:] == argmax[start:]).all()
        if mode == "s2s":
            assert out["gen_text_ids"][0, 0] == 151670
            assert out["gen_speech_ids"].shape[1] == 5 * int(out["step_is_speech"].sum())
            assert out["step_crq_tokens"].shape == (n, 1, 5)
