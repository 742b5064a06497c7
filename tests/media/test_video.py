"""The sans-I/O parts of video forwarding: keyframes, rewriting, gaps, bitrates."""

from __future__ import annotations

import fractions

import numpy as np
import pytest
from aiortc.codecs.h264 import H264Encoder
from aiortc.codecs.vpx import Vp8Encoder
from av import VideoFrame

from media.video import Bitrates, Gaps, Rewriter, h264_keyframe, vp8_keyframe


def pictures(count: int) -> list[VideoFrame]:
    frames = []
    for i in range(count):
        image = np.zeros((240, 320, 3), dtype=np.uint8)
        image[:, (i * 8) % 320 :] = (40, 160, 220)
        frame = VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts, frame.time_base = i * 3000, fractions.Fraction(1, 90_000)
        frames.append(frame)
    return frames


@pytest.mark.parametrize(("encoder", "keyframe"), [(Vp8Encoder, vp8_keyframe), (H264Encoder, h264_keyframe)])
def test_only_the_first_packet_of_a_keyframe_is_one(encoder: type, keyframe: object) -> None:
    """Real encoder output: a forced keyframe's first packet says so; its other packets,
    and every packet of the frames between, do not."""
    codec = encoder()
    found = []
    for i, frame in enumerate(pictures(12)):
        payloads, _ = codec.encode(frame, force_keyframe=i in (0, 8))
        found.append([keyframe(p) for p in payloads])  # type: ignore[operator]
    assert [flags[0] for flags in found] == [i in (0, 8) for i in range(12)]
    assert not any(flag for flags in found for flag in flags[1:])


def test_malformed_payloads_are_not_keyframes() -> None:
    for payload in (b"", b"\x90", b"\x90\x80", b"\x90\x80\x80\x01", b"\x10", b"\x11\x00"):
        assert vp8_keyframe(payload) is False  # cut short, or not partition 0
    assert h264_keyframe(b"") is False and h264_keyframe(b"\x65") is False
    assert vp8_keyframe(b"\x10\x00") is True  # S=1, PID=0, P=0
    assert vp8_keyframe(b"\x10\x01") is False  # an interframe
    assert h264_keyframe(b"\x18\x00\x01\x67\x00\x01\x65") is True  # STAP-A: SPS then IDR
    assert h264_keyframe(b"\x18\x00\x05\x61") is False  # a size beyond the payload
    assert h264_keyframe(b"\x7c\x85") is True and h264_keyframe(b"\x7c\x05") is False  # FU-A start / middle


def test_a_switch_waits_for_a_keyframe_and_carries_on() -> None:
    r = Rewriter()
    first = r.rewrite("a", 100, 5000, True, now=0.0)
    assert first is not None
    seq0, ts0 = first
    assert r.rewrite("a", 101, 5000, False, now=0.01) == ((seq0 + 1) & 0xFFFF, ts0)
    assert r.rewrite("a", 102, 8000, False, now=0.04) == ((seq0 + 2) & 0xFFFF, (ts0 + 3000) & 0xFFFFFFFF)
    # Another source: nothing until its keyframe, then the next number and a later time.
    assert r.rewrite("b", 7000, 1, False, now=0.05) is None
    assert r.rewrite("b", 7001, 1, False, now=0.06) is None
    assert r.waiting == 2
    switched = r.rewrite("b", 7002, 90_000, True, now=0.14)
    assert switched == ((seq0 + 3) & 0xFFFF, (ts0 + 3000 + 9000) & 0xFFFFFFFF)  # 100 ms on
    # Reordering and loss in the new source stay as they were.
    assert r.rewrite("b", 7004, 93_000, False, now=0.2) == ((seq0 + 5) & 0xFFFF, (ts0 + 15000) & 0xFFFFFFFF)
    assert r.rewrite("b", 7003, 93_000, False, now=0.2) == ((seq0 + 4) & 0xFFFF, (ts0 + 15000) & 0xFFFFFFFF)
    assert r.next_sequence == (seq0 + 6) & 0xFFFF  # the late one did not move it back
    # A packet of the new source from before its keyframe is dropped.
    assert r.rewrite("b", 7001, 1, False, now=0.2) is None
    # And the old source is a switch again, not a continuation.
    assert r.rewrite("a", 103, 8000, False, now=0.2) is None


def test_wraps_of_sequence_numbers_and_timestamps() -> None:
    r = Rewriter()
    r.next_sequence, r.last_timestamp = 0xFFFF, 0xFFFFFF00
    assert r.rewrite("a", 10, 0, True, now=0.0) == (0xFFFF, 0xFFFFFF00)
    assert r.rewrite("a", 11, 0x200, False, now=0.01) == (0, 0x100)
    assert r.next_sequence == 1


def test_gaps_are_found_filled_and_bounded() -> None:
    g = Gaps(window=100)
    assert g.add(10) is False
    assert g.add(11) is False
    assert g.add(14) is True and g.missing == {12, 13}
    assert g.add(13) is False and g.missing == {12}
    assert g.add(14) is False  # a duplicate
    assert g.add(0xFFFF) is False  # old
    assert g.add(300) is False and g.missing == set()  # a jump beyond the window: a new start
    g.add(0xFFFE)  # older than 300 by less than half the space? no: far ahead, a restart
    g2 = Gaps(window=100)
    g2.add(0xFFFE)
    assert g2.add(1) is True and g2.missing == {0xFFFF, 0}  # across the wrap
    g2.add(90)
    assert 0xFFFF in g2.missing
    g2.add(150)  # 0xFFFF is now more than 100 behind: forgotten
    assert 0xFFFF not in g2.missing and 0 not in g2.missing


def test_the_sender_hears_the_lowest_fresh_bitrate() -> None:
    b = Bitrates(interval=1.0, stale=5.0)
    assert b.report("r1", 2_000_000, now=0.0) == 2_000_000
    assert b.report("r2", 1_900_000, now=0.1) is None  # under 10 % lower, within the interval
    assert b.report("r2", 1_000_000, now=0.2) == 1_000_000  # a drop is said at once
    assert b.report("r1", 2_000_000, now=1.3) == 1_000_000  # once a second
    assert b.report("r1", 2_000_000, now=1.5) is None
    assert b.report("r1", 2_000_000, now=5.5) == 2_000_000  # r2's report went stale
    b.forget("r1")
    assert b.report("r3", 500_000, now=5.6) == 500_000


def test_a_long_stream_keeps_flowing_past_the_sequence_number_wrap() -> None:
    """A stream of 70 000 packets (13 minutes of video) is forwarded whole: the check that
    drops packets from before the keyframe must not turn on again when the numbers wrap."""
    r = Rewriter()
    start = r.rewrite("a", 500, 0, True, now=0.0)
    assert start is not None
    for i in range(1, 70_000):
        mapped = r.rewrite("a", (500 + i) & 0xFFFF, i * 1000, False, now=i / 90)
        assert mapped == ((start[0] + i) & 0xFFFF, (start[1] + i * 1000) & 0xFFFFFFFF), i
