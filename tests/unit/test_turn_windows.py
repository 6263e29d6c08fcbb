"""A caller's turn encoded window by window while they speak (the audio tokenizer engine driven the
way the orchestrator's `TurnWindows` drives it) gives the rows of the whole turn encoded at its end:
the windows are independent, a window the rising log-mel max made stale is encoded again, and at
the end the tokenizer sends the rows from the first window the turn's own max would change."""

from __future__ import annotations

import math

import numpy as np
import pytest

from funchat.audio_io import load_audio
from funchat.encoder_windows import EncoderWindows
from funchat.engines.audio_tokenizer import AudioTokenizerEngine
from funchat.errors import AudioInputError
from funchat.model.checkpoint import ENCODER_PREFIXES, load_model
from funchat.orchestrator.turn_windows import TurnWindows

ATOL = 1e-5


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return AudioTokenizerEngine(load_model(tiny_checkpoint, prefixes=ENCODER_PREFIXES), "cpu")


@pytest.fixture(scope="module")
def recording(example_wav):
    return load_audio(str(example_wav))


def encode_while_speaking(tokenizer, audio: np.ndarray, chunk: int = 3200) -> tuple[TurnWindows, int]:
    """Feed the turn in chunks, encoding each window once it is ready and the stale ones again;
    -> (the windows held at the end, how many window requests were sent)."""
    turn = TurnWindows(tokenizer.windows)
    requests = 0
    for i in range(0, len(audio), chunk):
        turn.append(audio[i:i + chunk])
        while (window := turn.next_window()) is not None:
            todo = [window]
            while todo:
                w = todo.pop(0)
                sent = turn.top
                (out,) = tokenizer.encode([tokenizer.check(turn.segment(w)[None], window=w, top=sent)])
                requests += 1
                assert out.rows.shape == (tokenizer.windows.groups, 64) and out.first_window == w
                todo += [s for s in turn.add(w, out.rows, out.top, out.low, sent) if s not in todo]
        assert turn.consistent()
    return turn, requests


def end_of_turn(tokenizer, turn: TurnWindows) -> tuple[np.ndarray, int]:
    """-> (the turn's rows: the windows held, those the whole turn's max made stale encoded again,
    then the rest from the tokenizer; how many were stale)."""
    audio, k = turn.audio(), len(turn.windows)
    if not k:
        return whole(tokenizer, audio), 0
    start = tokenizer.windows.segment(k)[0]
    (out,) = tokenizer.encode([tokenizer.check(audio[start:][None], top=turn.top, encoded=k)])
    assert out.first_window == k
    stale = turn.raise_top(out.top)
    for w in stale:
        (again,) = tokenizer.encode([tokenizer.check(turn.segment(w)[None], window=w, top=out.top)])
        turn.add(w, again.rows, again.top, again.low, out.top)
    assert turn.consistent()
    return np.concatenate([turn.rows(k), out.rows]), len(stale)


def whole(tokenizer, audio: np.ndarray) -> np.ndarray:
    return tokenizer.encode([tokenizer.check(audio[None])])[0].rows


def test_geometry_of_the_real_checkpoint_shape():
    g = EncoderWindows(n_window=100, group_size=5)
    assert (g.mel_frames, g.samples, g.groups) == (200, 32000, 10)
    assert g.segment(0) == (0, 32040) and g.segment(3) == (95800, 128040)
    assert g.ready(32039) == 0 and g.ready(32040) == 1 and g.ready(64039) == 1 and g.ready(64040) == 2


def test_a_long_turn_encoded_while_spoken_equals_it_encoded_at_the_end(tokenizer, recording):
    audio = np.tile(recording, 3)[:16000 * 15 + 1234]  # 15 s: the max comes in the first copy
    turn, requests = encode_while_speaking(tokenizer, audio)
    assert len(turn.windows) == 7 and requests > 7  # the first windows were encoded again when the max rose
    rows, stale = end_of_turn(tokenizer, turn)
    assert stale == 0  # all held: only the last, partial window is encoded at the end
    want = whole(tokenizer, audio)
    assert rows.shape == want.shape
    np.testing.assert_allclose(rows, want, atol=ATOL, rtol=0)


def test_a_turn_whose_loudest_moment_is_at_its_end_is_encoded_again_from_the_first_stale_window(tokenizer,
                                                                                                recording):
    audio = np.tile(recording, 2)[:16000 * 9]
    audio[-8000:] = np.clip(audio[-8000:] * 30.0, -1, 1)  # the last half second: far louder, after every window
    turn, _ = encode_while_speaking(tokenizer, audio)
    assert len(turn.windows) == 4
    rows, stale = end_of_turn(tokenizer, turn)
    assert stale > 0  # the turn's own floor changed windows that were held
    np.testing.assert_allclose(rows, whole(tokenizer, audio), atol=ATOL, rtol=0)


def test_a_turn_that_ends_just_after_its_last_whole_window(tokenizer, recording):
    audio = np.tile(recording, 2)[:64040 + 30]  # the rest holds no 25 Hz frame of its own
    turn, _ = encode_while_speaking(tokenizer, audio)
    assert len(turn.windows) == 2
    rows, _ = end_of_turn(tokenizer, turn)
    np.testing.assert_allclose(rows, whole(tokenizer, audio), atol=ATOL, rtol=0)


def test_silence_then_speech_and_a_turn_shorter_than_one_window(tokenizer, recording):
    audio = np.concatenate([np.zeros(40000, np.float32), recording[:50000]])
    turn, _ = encode_while_speaking(tokenizer, audio, chunk=5000)
    rows, _ = end_of_turn(tokenizer, turn)
    np.testing.assert_allclose(rows, whole(tokenizer, audio), atol=ATOL, rtol=0)
    short = recording[:20000]
    turn, requests = encode_while_speaking(tokenizer, short)
    assert requests == 0
    rows, stale = end_of_turn(tokenizer, turn)
    assert stale == 0
    np.testing.assert_allclose(rows, whole(tokenizer, short), atol=ATOL, rtol=0)


@pytest.mark.parametrize("kwargs, n, words", [
    ({"window": 1}, 32000, "AUDIO has 32000 samples; window 1 reads 32240 (samples 31800 to 64040 of the turn)"),
    ({"window": -1}, 32040, "WINDOW is -1"),
    ({"window": 0, "encoded": 1}, 32040, "WINDOW and ENCODED exclude each other"),
    ({"encoded": 2, "top": 1.0}, 100, "ENCODED is 2, but a turn of 63900 samples (AUDIO: its 100 from sample "
                                      "63800 on) has 1 whole windows"),
    ({"encoded": -1, "top": 1.0}, 40000, "ENCODED is -1"),
    ({"encoded": 1}, 40000, "with ENCODED send the log-mel max of the windows held"),
    ({"window": 0, "top": math.nan}, 32040, "TOP is NaN"),
])
def test_bad_window_requests_are_named(tokenizer, kwargs, n, words):
    with pytest.raises(AudioInputError) as info:
        tokenizer.check(np.zeros((1, n), np.float32) + 0.01, **kwargs)
    assert words in str(info.value)
