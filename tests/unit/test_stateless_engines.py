"""The audio_tokenizer and vocoder engines without Triton: the same rows / samples as the in-process
code, clip limits from the prompt's rule, bad inputs named."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from funchat.engines.audio_tokenizer import AudioTokenizerEngine
from funchat.engines.vocoder import VocoderEngine, VocoderOutput, VocoderPush
from funchat.errors import AudioInputError, FunchatError
from funchat.model.checkpoint import ENCODER_PREFIXES, load_model
from funchat.vocoder.checkpoint import load_vocoder, pick_speaker


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return AudioTokenizerEngine(load_model(tiny_checkpoint, prefixes=ENCODER_PREFIXES), "cpu", context_tokens=10)


def test_tokenizer_rows_equal_the_oracle(tokenizer, tiny_pipeline):
    rng = np.random.default_rng(0)
    clips = [rng.normal(0, 0.1, n).astype(np.float32) for n in (11680, 640, 24000)]
    rows = [out.rows for out in tokenizer.encode([tokenizer.check(c[None]) for c in clips])]  # one encoder call
    for clip, got in zip(clips, rows):
        assert got.shape == (tiny_pipeline.audio_groups(len(clip)), 64) and got.dtype == np.float32
        np.testing.assert_allclose(got, tiny_pipeline.encode_audio(clip).float().numpy(), atol=1e-5)


@pytest.mark.parametrize("audio, words", [
    (np.zeros((2, 16000), np.float32), "send one clip per request, shape [1, n]"),
    (np.zeros((1, 639), np.float32), "AUDIO is too short"),
    (np.zeros((1, 16000 * 2), np.float32), "takes 10 LLM positions, more than the 10-token context"),
    (np.full((1, 800), np.nan, np.float32), "no finite samples"),
])
def test_tokenizer_refuses_bad_clips(tokenizer, audio, words):
    with pytest.raises(AudioInputError) as info:
        tokenizer.check(audio)
    assert words in str(info.value)


def test_vocoder_pushes_equal_token2wav_and_bad_states_are_named(tiny_checkpoint):
    model, speakers = load_vocoder(tiny_checkpoint)
    engine = VocoderEngine(model, speakers)
    tokens = np.random.default_rng(1).integers(0, 6561, 40)
    reference = model.start(pick_speaker(speakers, "speaker1"), "incremental")
    state = b""
    for i, part in enumerate((tokens[:15], tokens[15:])):
        final = i == 1
        out = engine.push(VocoderPush(part, final, state, speaker="speaker1" if not state else None))
        want = model.push(reference, part, final=final)
        np.testing.assert_allclose(out.audio, torch.cat(want).numpy() if want else np.zeros(0), atol=1e-6)
        state = out.state
    assert out.dropped == 0
    for push, words in ((VocoderPush(tokens[:3], False, b"junk"), "STATE (4 bytes) is not a vocoder stream state"),
                        (VocoderPush(tokens[:3], False, mode="fast"), "MODE 'fast' is unknown"),
                        (VocoderPush(tokens[:3], False, speaker="nobody"), "unknown speaker 'nobody'"),
                        (VocoderPush(tokens[:3], False, state, mode="reference"), "does not match the stream's mode")):
        with pytest.raises(FunchatError) as info:
            engine.push(push)
        assert words in str(info.value)


def test_vocoder_batch_answers_each_push_and_refuses_only_the_bad_ones(tiny_checkpoint):
    """A dynamic batch of pushes: good ones equal the same pushes run one at a time, each bad one
    gets its own error, and a bad one does not disturb the others."""
    model, speakers = load_vocoder(tiny_checkpoint)
    engine = VocoderEngine(model, speakers)
    rng = np.random.default_rng(2)
    parts = [rng.integers(0, 6561, n) for n in (18, 33, 60)]
    one_by_one = [engine.push(VocoderPush(p, final=k == 2, speaker="speaker1")) for k, p in enumerate(parts)]
    batch = [VocoderPush(parts[0], False, speaker="speaker1"), VocoderPush(parts[1], False, b"junk"),
             VocoderPush(parts[1], False, speaker="speaker1"), VocoderPush(parts[2], True, speaker="nobody"),
             VocoderPush(parts[2], True, speaker="speaker1")]
    out = engine.push_batch(batch)
    assert "STATE (4 bytes)" in str(out[1]) and "unknown speaker 'nobody'" in str(out[3])
    for got, want in zip((out[0], out[2], out[4]), one_by_one):
        assert isinstance(got, VocoderOutput)
        np.testing.assert_allclose(got.audio, want.audio, atol=5e-4)
        assert got.audio.shape == want.audio.shape and got.dropped == want.dropped
    # The returned states continue: the next pushes of the first two streams, batched again.
    more = engine.push_batch([VocoderPush(rng.integers(0, 6561, 15), True, out[0].state),
                              VocoderPush(rng.integers(0, 6561, 15), True, out[2].state)])
    assert all(isinstance(m, VocoderOutput) and m.audio.size > 0 for m in more)
