"""funchat.loadgen.replies: each reply as the caller hears it (funchat call's player model): first
audio, underruns, what playback acks report, interruptions. Real API events, fed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from funchat.api import pb
from funchat.loadgen.replies import ReplyTracker

RATE = 24000


def audio(rid: str, seq: int, start_ms: int, ms: int, samples: int | None = None) -> pb.ServerEvent:
    pcm = (np.full(RATE * ms // 1000 if samples is None else samples, 1000, "<i2")).tobytes()
    return pb.ServerEvent(audio_delta=pb.AudioDelta(response_id=rid, sequence=seq, start_ms=start_ms, pcm16=pcm,
                                                    sample_rate_hz=RATE))


def created(rid: str) -> pb.ServerEvent:
    return pb.ServerEvent(response_created=pb.ResponseCreated(response_id=rid))


def done(rid: str, status: str = "completed") -> pb.ServerEvent:
    return pb.ServerEvent(response_done=pb.ResponseDone(response_id=rid, status=status))


def test_chunks_that_come_before_the_audio_runs_out_play_without_underrun():
    r = ReplyTracker()
    r.on_event(0.0, created("a"))
    r.on_event(1.0, audio("a", 0, 0, 440))     # plays 1.00 .. 1.44
    r.on_event(1.4, audio("a", 1, 440, 600))   # before 1.44: queued, plays 1.44 .. 2.04
    r.on_event(2.04, audio("a", 2, 1040, 600))  # exactly when the audio runs out: no gap
    state = r.on_event(2.1, done("a"))
    assert state.first_audio_at == 1.0 and state.underruns == 0 and state.underrun_s == 0.0
    assert state.audio_s == pytest.approx(1.64) and state.server_end_ms == 1640
    assert state.status == "completed" and state.done_at == 2.1


def test_a_late_chunk_is_an_underrun_and_playback_goes_on_from_its_arrival():
    r = ReplyTracker()
    r.on_event(1.0, audio("a", 0, 0, 440))      # runs out at 1.44
    r.on_event(2.0, audio("a", 1, 440, 600))    # 0.56 s late; plays 2.00 .. 2.60
    r.on_event(2.5, audio("a", 2, 1040, 600))   # on time against the new timeline
    r.on_event(3.5, audio("a", 3, 1640, 200))   # runs out at 3.20: 0.3 s late
    state = r.replies["a"]
    assert state.underruns == 2 and state.underrun_s == pytest.approx(0.56 + 0.3)
    assert r.ends_at("a") == pytest.approx(3.7)


def test_acks_report_what_has_been_heard_and_the_servers_count_once_all_has_played():
    r = ReplyTracker()
    r.on_event(1.0, audio("a", 0, 0, 0, samples=10571))  # 440.46 ms
    r.on_event(1.2, audio("a", 1, 441, 600))              # the server put it at 441 ms
    assert r.ack_ms("a", 1.25) == 250
    assert r.ack_ms("a", 1.44) == 440
    r.on_event(1.3, done("a"))
    # the player counts 1040.46 ms of samples, the server 441 + 600 = 1041 ms: an ack of 1040 would
    # leave the reply "still playing" on the server, and the caller's next words would cut it
    assert r.played_ms("a", 5.0) == 1040
    assert r.ack_ms("a", 5.0) == 1041
    assert r.ack_ms("a", 2.0) < 1040  # not before the end has played


def test_an_interrupted_reply_stops_playing_and_its_later_audio_is_dropped():
    r = ReplyTracker()
    r.on_event(1.0, audio("a", 0, 0, 1000))
    r.on_event(1.3, pb.ServerEvent(interrupted=pb.ResponseInterrupted(response_id="a", audio_end_ms=300)))
    r.on_event(3.0, audio("a", 1, 1000, 600))  # already queued on the wire: not played, not an underrun
    state = r.replies["a"]
    assert state.interrupted_at == 1.3 and state.underruns == 0 and state.audio_s == pytest.approx(1.0)
    assert r.played_ms("a", 10.0) == 300


def test_replies_are_kept_apart_and_other_events_are_not_replies():
    r = ReplyTracker()
    r.on_event(1.0, audio("a", 0, 0, 100))
    r.on_event(5.0, audio("b", 0, 0, 100))  # another reply: not late for "a"
    assert r.replies["a"].underruns == 0 and r.replies["b"].underruns == 0
    assert r.on_event(5.1, pb.ServerEvent(speech_started=pb.SpeechStarted(audio_start_ms=10))) is None
