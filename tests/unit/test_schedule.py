"""TurnSchedule: the generation loop's token rules, with small fake ids and no model."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from funchat.turn.schedule import Mode, StepInput, TokenIds, TurnSchedule

# Speech: codes 0..9 reach the vocoder; 10 bos, 11 eos, 12 pad, 13 spare. Groups of 3.
CODES, S_BOS, S_EOS, S_PAD, S_SPARE = 10, 10, 11, 12, 13
G = 3
# Text: a few ordinary ids and the specials.
AUDIO_BOS, AUDIO_EOS, IM_END, SIL, TXT_A, TXT_B, TXT_C = 50, 51, 52, 53, 20, 21, 22
PROMPT_LAST = 7  # "\n" after "<|im_start|>assistant"

IDS = TokenIds(audio_bos=AUDIO_BOS, audio_eos=AUDIO_EOS, end_ids=(IM_END,), speech_eos=S_EOS,
               group_size=G, vocoder_codes=CODES)


def s2s(max_new_tokens: int = 50) -> TurnSchedule:
    return TurnSchedule(IDS, Mode.S2S, max_new_tokens, prompt_last_token=PROMPT_LAST)


def s2t(max_new_tokens: int = 50) -> TurnSchedule:
    return TurnSchedule(IDS, "s2t", max_new_tokens, prompt_last_token=PROMPT_LAST)


def speaking_s2s(*groups: tuple[int, ...]) -> TurnSchedule:
    """An s2s schedule after the prefill and forward 1 (group (1, 2, 3)), then `groups` with TXT_A."""
    sched = s2s()
    sched.observe(TXT_A, (S_BOS,) * G)  # forward 0: forced audio_bos, SRH group thrown away
    sched.observe(TXT_A, (1, 2, 3))  # forward 1
    for group in groups:
        sched.observe(TXT_A, group)
    return sched


# ---------------------------------------------------------------- forced start


def test_s2s_forward0_text_is_forced_to_audio_bos():
    sched = s2s()
    out = sched.observe(TXT_A, (4, 5, 6))
    assert out.index == 0
    assert out.text_token == out.text_token_emitted == AUDIO_BOS
    assert sched.text_tokens == sched.text_tokens_emitted == [AUDIO_BOS]


def test_s2s_forward0_srh_group_is_thrown_away():
    sched = s2s()
    out = sched.observe(TXT_A, (4, 5, 6))
    assert out.speech_group is None and out.vocoder_tokens == ()
    assert sched.speech_tokens == []


def test_s2t_forward0_is_not_forced():
    sched = s2t()
    out = sched.observe(TXT_A, None)
    assert out.text_token == out.text_token_emitted == TXT_A
    assert sched.text_tokens == [TXT_A]
    assert not sched.runs_srh


def test_s2s_runs_srh_on_every_forward():
    sched = s2s()
    assert sched.runs_srh
    sched.observe(TXT_A, (1, 2, 3))
    assert sched.runs_srh


# ---------------------------------------------------------------- inputs


def test_s2s_forward1_input_is_plain_audio_bos():
    sched = s2s()
    assert not sched.speech_on  # forward 0 appends nothing
    sched.observe(TXT_A, (4, 5, 6))
    assert sched.next_input == StepInput(AUDIO_BOS, None)
    assert sched.speech_on  # forward 1 appends a group


def test_s2s_forward2_and_later_inputs_fuse_the_last_group():
    sched = s2s()
    sched.observe(TXT_A, (4, 5, 6))
    out1 = sched.observe(TXT_B, (1, 2, 3))
    assert out1.speech_group == (1, 2, 3)
    assert sched.next_input == StepInput(TXT_B, (1, 2, 3))
    sched.observe(TXT_C, (7, 8, 9))
    assert sched.next_input == StepInput(TXT_C, (7, 8, 9))
    assert sched.speech_tokens == [1, 2, 3, 7, 8, 9]


def test_s2t_inputs_are_always_plain_text():
    sched = s2t()
    for token in (TXT_A, AUDIO_BOS, TXT_B, SIL):
        out = sched.observe(token, None)
        assert out.speech_group is None
        assert sched.next_input == StepInput(token, None)
    assert sched.speech_tokens == []


def test_s2t_never_expects_srh_tokens_even_after_audio_bos():
    sched = s2t()
    sched.observe(AUDIO_BOS, None)
    assert not sched.speech_on
    out = sched.observe(TXT_A, None)  # no ValueError: speech never turns on in s2t
    assert out.speech_group is None and not out.speech_ended


# ---------------------------------------------------------------- speech delay and vocoder codes


def test_speech_delay_is_not_forced_bos_groups_are_kept_but_not_vocoded():
    sched = s2s()
    sched.observe(TXT_A, (0, 0, 0))
    out1 = sched.observe(TXT_A, (S_BOS,) * G)  # the model's own delay groups
    out2 = sched.observe(TXT_B, (S_BOS,) * G)
    out3 = sched.observe(TXT_C, (4, 5, 6))
    assert out1.speech_group == out2.speech_group == (S_BOS,) * G
    assert out1.vocoder_tokens == out2.vocoder_tokens == ()
    assert out3.vocoder_tokens == (4, 5, 6)
    assert sched.speech_tokens == [S_BOS] * (2 * G) + [4, 5, 6]
    assert sched.vocoder_tokens == [4, 5, 6]
    # the bos groups are still fused into the next input like any other group
    assert sched.next_input == StepInput(TXT_C, (4, 5, 6))


def test_codes_outside_vocoder_range_are_dropped_from_vocoder_tokens():
    sched = speaking_s2s()
    out = sched.observe(TXT_B, (S_PAD, 9, S_SPARE))
    assert out.speech_group == (S_PAD, 9, S_SPARE)
    assert out.vocoder_tokens == (9,)
    out = sched.observe(TXT_B, (0, S_BOS, -1))
    assert out.vocoder_tokens == (0,)
    assert sched.speech_tokens == [1, 2, 3, S_PAD, 9, S_SPARE, 0, S_BOS, -1]
    assert sched.vocoder_tokens == [1, 2, 3, 9, 0]


# ---------------------------------------------------------------- speech end


def test_group_with_speech_eos_becomes_all_eos():
    sched = speaking_s2s()
    out = sched.observe(TXT_B, (4, S_EOS, 5))
    assert out.speech_ended
    assert out.speech_group == (S_EOS,) * G
    assert out.vocoder_tokens == ()
    assert sched.speech_tokens == [1, 2, 3] + [S_EOS] * G


def test_speech_end_step_text_becomes_audio_eos_in_text_tokens_only():
    sched = speaking_s2s()
    out = sched.observe(TXT_B, (S_EOS, 4, 5))
    assert out.text_token == AUDIO_EOS
    assert out.text_token_emitted == TXT_B
    assert sched.text_tokens[-1] == AUDIO_EOS
    assert sched.text_tokens_emitted[-1] == TXT_B
    assert AUDIO_EOS not in sched.text_tokens_emitted


def test_after_speech_end_next_input_is_plain_audio_eos_then_plain_text():
    sched = speaking_s2s()
    sched.observe(TXT_B, (4, 5, S_EOS))
    assert sched.next_input == StepInput(AUDIO_EOS, None)
    assert not sched.speech_on
    speech_before = list(sched.speech_tokens)
    for token in (TXT_C, SIL, TXT_A):
        out = sched.observe(token, (6, 7, 8))  # the SRH still runs; its tokens are ignored
        assert out.speech_group is None and out.vocoder_tokens == () and not out.speech_ended
        assert sched.next_input == StepInput(token, None)
    assert sched.speech_tokens == speech_before


def test_after_speech_end_srh_tokens_may_be_absent():
    sched = speaking_s2s()
    sched.observe(TXT_B, (S_EOS,) * G)
    out = sched.observe(TXT_C, None)
    assert out.speech_group is None


def test_speech_restarts_when_audio_bos_is_emitted_again():
    sched = speaking_s2s()
    sched.observe(TXT_B, (S_EOS,) * G)  # speech ends
    sched.observe(TXT_C, None)
    out = sched.observe(AUDIO_BOS, (6, 6, 6))  # speech off during this forward: nothing appended
    assert out.speech_group is None
    assert sched.next_input == StepInput(AUDIO_BOS, None)  # first forward after: plain input
    assert sched.speech_on
    out = sched.observe(TXT_A, (7, 8, 9))  # ... and its group is appended
    assert out.speech_group == (7, 8, 9)
    assert sched.next_input == StepInput(TXT_A, (7, 8, 9))  # the one after: fused
    assert sched.speech_tokens == [1, 2, 3] + [S_EOS] * G + [7, 8, 9]


# ---------------------------------------------------------------- text passes through


def test_sil_tokens_pass_through_as_text():
    sched = speaking_s2s()
    out = sched.observe(SIL, (4, 5, 6))
    assert out.text_token == out.text_token_emitted == SIL
    assert out.speech_group == (4, 5, 6) and not out.finished
    assert sched.next_input == StepInput(SIL, (4, 5, 6))
    sched.observe(SIL, (7, 8, 9))
    assert sched.text_tokens[-2:] == [SIL, SIL]


# ---------------------------------------------------------------- turn end


def test_turn_ends_at_end_id_and_final_group_is_appended():
    sched = speaking_s2s()
    out = sched.observe(IM_END, (4, 5, 6))
    assert out.finished and sched.finished
    assert out.speech_group == (4, 5, 6)
    assert sched.speech_tokens == [1, 2, 3, 4, 5, 6]
    assert sched.text_tokens == [AUDIO_BOS, TXT_A, IM_END]
    assert sched.next_input is None


def test_turn_ends_at_any_of_several_end_ids():
    ids = TokenIds(AUDIO_BOS, AUDIO_EOS, (IM_END, 99), S_EOS, G, CODES)
    sched = TurnSchedule(ids, Mode.S2T, 50)
    sched.observe(TXT_A, None)
    assert sched.observe(99, None).finished


def test_end_id_in_the_speech_end_step_still_finishes():
    sched = speaking_s2s()
    out = sched.observe(IM_END, (S_EOS,) * G)
    assert out.finished and out.speech_ended
    assert sched.text_tokens[-1] == AUDIO_EOS and sched.text_tokens_emitted[-1] == IM_END
    assert sched.next_input is None


def test_turn_ends_after_max_new_tokens():
    sched = s2s(max_new_tokens=3)
    outs = [sched.observe(TXT_A, (1, 2, 3)) for _ in range(3)]
    assert [o.finished for o in outs] == [False, False, True]
    assert sched.steps == 3 and len(sched.text_tokens) == 3
    assert outs[-1].speech_group == (1, 2, 3)  # the final forward's group is still appended
    assert sched.speech_tokens == [1, 2, 3, 1, 2, 3]
    assert sched.next_input is None


def test_max_new_tokens_one_finishes_at_the_prefill():
    sched = s2t(max_new_tokens=1)
    assert sched.observe(TXT_A, None).finished


def test_s2t_turn_text_tokens():
    sched = s2t()
    for token in (TXT_A, TXT_B, TXT_C):
        sched.observe(token, None)
    out = sched.observe(IM_END, None)
    assert out.finished and out.index == 3
    assert sched.text_tokens == sched.text_tokens_emitted == [TXT_A, TXT_B, TXT_C, IM_END]


# ---------------------------------------------------------------- errors


def test_observe_after_finish_raises():
    sched = s2t(max_new_tokens=1)
    sched.observe(TXT_A, None)
    with pytest.raises(RuntimeError, match="finished"):
        sched.observe(TXT_B, None)


@pytest.mark.parametrize("srh_tokens", [None, (1, 2), (1, 2, 3, 4)])
def test_missing_or_wrong_size_srh_tokens_while_speaking_raise(srh_tokens):
    sched = s2s()
    sched.observe(TXT_A, (1, 2, 3))
    with pytest.raises(ValueError, match="SRH tokens"):
        sched.observe(TXT_B, srh_tokens)


@pytest.mark.parametrize("max_new_tokens", [0, -1])
def test_max_new_tokens_below_one_raises(max_new_tokens):
    with pytest.raises(ValueError, match="max_new_tokens"):
        TurnSchedule(IDS, Mode.S2S, max_new_tokens)


def test_unknown_mode_raises():
    with pytest.raises(ValueError, match="unknown mode"):
        TurnSchedule(IDS, "t2s", 10)


def test_schedule_module_does_not_import_torch():
    code = "import sys, funchat.turn.schedule; assert 'torch' not in sys.modules, 'funchat.turn.schedule imported torch'"
    repo = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], cwd=repo, check=True, env={**os.environ, "PYTHONPATH": str(repo)})
