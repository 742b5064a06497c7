"""Voice activity detection on real speech (espeak-ng), clean and at 10 dB SNR."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from media.convert import FrameConverter, PcmFrame
from media.vad import Segmenter, SegmentState, SpeechStopped, VadSettings, WebRtcVad
from tests.segmenting import SETTINGS, frames_of, segments
from tests.speech import RATE, Fixture, noise_like, rms, speak, to_48k_stereo_frames, utterances, with_noise

TEXTS = ["I would like to book an appointment", "Tomorrow morning would be great", "Thank you very much"]
SPF = RATE * SETTINGS.frame_ms // 1000


@pytest.fixture(scope="module", params=["clean", "noisy-10dB"])
def fixture(request: pytest.FixtureRequest) -> Fixture:
    clean = utterances(TEXTS)
    return clean if request.param == "clean" else with_noise(clean, snr_db=10)


def test_one_segment_per_utterance_with_accurate_boundaries(fixture: Fixture) -> None:
    found = segments(frames_of(fixture.pcm))
    assert len(found) == len(fixture.truth), [(f.start, f.stop) for f in found]
    for segment, (onset, end) in zip(found, fixture.truth, strict=True):
        start = segment.start
        assert abs(start - onset) <= 100, (start, onset)
        # With the preroll, the segment's audio covers the onset.
        assert segment.frames[0].t <= onset
        stop = segment.stop
        assert stop is not None
        assert segment.reported_at <= end + SETTINGS.stop_ms + 100, (segment.reported_at, end)
        assert stop.duration == stop.t - start


def test_frames_are_contiguous_and_nothing_is_dropped_inside_a_segment(fixture: Fixture) -> None:
    for segment in segments(frames_of(fixture.pcm)):
        ts = [f.t for f in segment.frames]
        assert ts == list(range(ts[0], ts[-1] + 1, SETTINGS.frame_ms))
        assert all(len(f.pcm) == SPF * 2 for f in segment.frames)


def test_preroll_is_the_configured_length() -> None:
    fixture = utterances(TEXTS[:1])
    [segment] = segments(frames_of(fixture.pcm))
    first = segment.frames[0].t
    assert segment.start - first == SETTINGS.preroll_ms


@pytest.mark.parametrize("kind", ["silence", "noise"])
def test_no_segment_in_ten_seconds_without_speech(kind: str) -> None:
    n = 10 * RATE
    if kind == "silence":
        pcm = np.zeros(n, np.int16)
    else:  # the noise of the 10 dB fixture, alone
        level = rms(speak(TEXTS[0])) / (10 ** (10 / 20))
        pcm = np.clip(noise_like(n, level), -32768, 32767).astype(np.int16)
    assert segments(frames_of(pcm)) == []


def test_a_short_blip_does_not_start_speech() -> None:
    pcm = np.zeros(RATE, np.int16)
    word = speak("hi")[: SPF * 2]  # 40 ms of voice: less than start_ms
    pcm[RATE // 2 : RATE // 2 + len(word)] = word
    assert segments(frames_of(pcm)) == []


def test_a_gap_in_the_stream_counts_as_silence() -> None:
    fixture = utterances(TEXTS[:1], tail_s=0.1)
    frames = frames_of(fixture.pcm)
    segmenter = Segmenter(SETTINGS)
    for frame in frames:
        segmenter.feed(frame)
    assert segmenter.speaking
    # The next frame arrives after a 2 s gap (packet loss): the hangover has passed.
    late = PcmFrame(bytes(SPF * 2), frames[-1].t + 2000)
    events = segmenter.feed(late)
    assert any(isinstance(e, SpeechStopped) for e in events)
    assert segmenter.state is SegmentState.QUIET


def test_flush_closes_an_open_segment() -> None:
    segmenter = Segmenter(SETTINGS)
    for frame in frames_of(speak(TEXTS[0])):
        segmenter.feed(frame)
    [stopped] = segmenter.flush()
    assert isinstance(stopped, SpeechStopped) and stopped.duration > 1000


def test_end_to_end_from_webrtc_frames() -> None:
    """48 kHz stereo frames as aiortc decodes them → converter → segmenter."""
    fixture = utterances(TEXTS)
    converter = FrameConverter()
    frames = [f for frame in to_48k_stereo_frames(fixture.pcm) for f in converter.feed(frame)]
    found = segments(frames)
    assert len(found) == len(fixture.truth)
    for segment, (onset, _) in zip(found, fixture.truth, strict=True):
        assert abs(segment.start - onset) <= 100


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"frame_ms": 25}, "frame_ms"),
        ({"start_ratio": 0}, "start_ratio"),
        ({"stop_ms": 5}, "stop_ms"),
        ({"sample_rate": 44100}, "sample_rate"),
        ({"aggressiveness": 4}, "aggressiveness"),
    ],
)
def test_bad_settings_are_refused(changes: dict[str, Any], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        Segmenter(VadSettings(**changes))


def test_a_pause_is_announced_once_before_the_hangover_ends_the_segment() -> None:
    """``speech.paused`` is a hint: 200 ms into a pause (once), whether the speaker goes on
    (a 350 ms pause inside the segment) or has finished (the stop follows)."""
    first, second = speak(TEXTS[0]), speak(TEXTS[1])
    pause = np.zeros(int(0.35 * RATE), np.int16)
    pcm = np.concatenate([np.zeros(RATE // 2, np.int16), first, pause, second, np.zeros(RATE, np.int16)])
    [segment] = segments(frames_of(pcm))
    assert segment.stop is not None
    assert len(segment.pauses) >= 2  # the 350 ms pause, and the end (maybe a longer gap inside a word too)
    assert segment.pauses[-1] == segment.stop.t  # the last one is where the speech ended
    assert len(set(segment.pauses)) == len(segment.pauses)  # each pause once
    quiet = segments(frames_of(pcm), dataclasses.replace(SETTINGS, pause_ms=0))
    assert [s.pauses for s in quiet] == [[]]  # off


def test_the_stop_comes_a_hangover_after_the_true_end(fixture: Fixture) -> None:
    """Regression: webrtcvad's own hangover (3 to 5 frames reported voiced after speech,
    whatever they held) came before ours, so segments ended 60 to 100 ms late; the
    detector now gives its genuine decisions (``WebRtcVad.raw``)."""
    assert WebRtcVad().raw
    found = segments(frames_of(fixture.pcm))
    for segment, (_, end) in zip(found, fixture.truth, strict=True):
        assert segment.stop is not None
        assert segment.stop.t - end <= 30, (segment.stop.t, end)  # the frame the voice ended in, and one more
        assert segment.reported_at - segment.stop.t == SETTINGS.stop_ms
    before = segments(frames_of(fixture.pcm), detector=WebRtcVad(hangover=True))
    for old, new in zip(before, found, strict=True):
        assert old.stop is not None and new.stop is not None
        assert old.stop.t - new.stop.t >= 40  # what it was: the test can tell


def test_webrtcvad_refuses_frames_it_cannot_take() -> None:
    with pytest.raises(ValueError, match="10, 20 or 30 ms"):
        WebRtcVad().is_speech(bytes(500), 16_000)
