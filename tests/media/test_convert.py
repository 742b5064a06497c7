"""Inbound conversion: exact frames, any chunking, correct timing across gaps."""

from __future__ import annotations

import fractions

import av
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from media.convert import FrameConverter


def frame(samples: np.ndarray, rate: int, pts: int, layout: str = "mono") -> av.AudioFrame:
    f = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout=layout)
    f.sample_rate = rate
    f.pts = pts
    f.time_base = fractions.Fraction(1, rate)
    return f


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(min_value=1, max_value=1500), min_size=1, max_size=40),
    st.sampled_from([10, 20, 30]),
)
def test_frames_in_equal_frames_out_for_any_chunking(sizes: list[int], frame_ms: int) -> None:
    """16 kHz mono in: the output is the input, cut into frames, no sample lost or repeated."""
    signal = np.arange(sum(sizes), dtype=np.int64).astype(np.int16)
    converter = FrameConverter(frame_ms=frame_ms)
    out = []
    position = 0
    for size in sizes:
        out += converter.feed(frame(signal[position : position + size], 16_000, position))
        position += size
    spf = 16 * frame_ms
    assert all(len(f.pcm) == spf * 2 for f in out)
    assert [f.t for f in out] == [i * frame_ms for i in range(len(out))]
    joined = np.frombuffer(b"".join(f.pcm for f in out), dtype=np.int16)
    assert len(out) == len(signal) // spf
    assert np.array_equal(joined, signal[: len(joined)])
    tail = converter.flush()
    assert len(tail) == (1 if len(signal) % spf else 0)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.sampled_from([480, 960, 1440, 123, 2000]), min_size=5, max_size=30))
def test_48k_stereo_keeps_sample_count_and_time(sizes: list[int]) -> None:
    """48 kHz stereo (what aiortc decodes) → exactly a third as many 16 kHz samples."""
    total = sum(sizes)
    t = np.arange(total) / 48_000
    mono = (8000 * np.sin(2 * np.pi * 300 * t)).astype(np.int16)
    converter = FrameConverter()
    out = []
    position = 0
    for size in sizes:
        chunk = np.repeat(mono[position : position + size], 2)
        out += converter.feed(frame(chunk, 48_000, position, "stereo"))
        position += size
    out += converter.flush()
    produced = len(out) * 320
    assert abs(produced - total / 3) <= 320 + 64  # one partial frame plus the resampler's delay
    assert [f.t for f in out] == [i * 20 for i in range(len(out))]


def test_a_gap_keeps_timing_and_invents_nothing() -> None:
    converter = FrameConverter()
    tone = np.full(960, 1000, np.int16)  # 60 ms at 16 kHz
    out = converter.feed(frame(tone, 16_000, 0))
    assert [f.t for f in out] == [0, 20, 40]
    # 500 ms lost, then more audio that starts mid-frame.
    out = converter.feed(frame(np.full(200, 1000, np.int16), 16_000, 960 + 8000))
    assert out == []
    out = converter.feed(frame(np.full(320, 1000, np.int16), 16_000, 960 + 8000 + 200))
    assert [f.t for f in out] == [560]  # stamped from the new pts, not counted on from 60 ms
    assert converter.gaps == 1
    # A partial frame before a gap is completed with silence, never with invented audio.
    converter = FrameConverter()
    converter.feed(frame(np.full(100, 1000, np.int16), 16_000, 0))
    padded, after = converter.feed(frame(np.full(320, 7, np.int16), 16_000, 16_000))
    samples = np.frombuffer(padded.pcm, dtype=np.int16)
    assert padded.t == 0 and (samples[:100] == 1000).all() and (samples[100:] == 0).all()
    assert after.t == 1000 and (np.frombuffer(after.pcm, dtype=np.int16) == 7).all()


def test_fltp_input_is_converted() -> None:
    converter = FrameConverter()
    data = np.zeros((2, 960), dtype=np.float32)
    data[:, :] = 0.5
    f = av.AudioFrame.from_ndarray(data, format="fltp", layout="stereo")
    f.sample_rate, f.pts, f.time_base = 48_000, 0, fractions.Fraction(1, 48_000)
    out = converter.feed(f) + converter.feed(f) + converter.flush()
    assert out and abs(int(np.frombuffer(out[-2].pcm, np.int16)[100]) - 16384) < 200


def test_only_vad_frame_sizes() -> None:
    with pytest.raises(ValueError, match="frame_ms"):
        FrameConverter(frame_ms=25)


def test_reset_starts_a_fresh_timeline() -> None:
    converter = FrameConverter()
    converter.feed(frame(np.full(500, 9, np.int16), 16_000, 0))  # a frame and a partial one
    converter.reset()
    [first] = converter.feed(frame(np.full(320, 5, np.int16), 16_000, 48_000))
    assert first.t == 3000  # stamped from the new source's pts, nothing carried over
    assert (np.frombuffer(first.pcm, dtype=np.int16) == 5).all()
    assert converter.gaps == 0


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.binary(max_size=400), st.integers(min_value=0, max_value=2**40)),
        min_size=1,
        max_size=30,
    )
)
def test_hostile_opus_packets_give_exact_frames_or_nothing(packets: list[tuple[bytes, int]]) -> None:
    """A client owns its SRTP keys: any payload and any timestamp can arrive. Garbage Opus
    decodes to nothing (counted), timestamps jumping anywhere restart the timeline, and
    whatever comes out is whole 20 ms frames into the voice pipeline."""
    from media.pipeline import VoicePipeline

    pipeline = VoicePipeline()
    converter, segmenter = pipeline.converter, pipeline.segmenter
    for payload, pts in packets:
        packet = av.Packet(payload)
        packet.pts = pts
        packet.time_base = fractions.Fraction(1, 48_000)
        frames = converter.feed_packet(packet)
        assert len(frames) <= 7  # an Opus packet holds at most 120 ms (6 frames), plus a completed partial one
        assert all(len(f.pcm) == 640 for f in frames)  # 20 ms at 16 kHz, s16
        for pcm in frames:
            segmenter.feed(pcm)  # the VAD takes whatever the decoder made of it
    assert all(len(f.pcm) == 640 for f in converter.flush())


def test_an_empty_opus_payload_is_not_turned_into_concealment_audio() -> None:
    converter = FrameConverter()
    packet = av.Packet(b"")
    packet.pts = 0
    assert converter.feed_packet(packet) == []
