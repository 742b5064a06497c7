"""Playback toward the customer: pacing, marks, clear, bounds."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from media.playback import FRAME_SAMPLES, RATE, PlaybackTrack


def tone(seconds: float, rate: int, amplitude: int = 8000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * 440 * t)).astype(np.int16).tobytes()


async def drain(track: PlaybackTrack) -> list[np.ndarray]:
    frames = []
    while track.playing:
        frames.append((await track.recv()).to_ndarray().reshape(-1))
    return frames


@pytest.mark.parametrize("rate", [8_000, 16_000, 24_000, 48_000])
async def test_n_seconds_take_n_seconds(rate: int) -> None:
    track = PlaybackTrack()
    assert track.enqueue(tone(2.0, rate), rate) == int(2.0 * rate) * 2  # all of it, bytes
    started = time.monotonic()
    frames = await drain(track)
    elapsed = time.monotonic() - started
    # The first frame goes out at once; the remaining ones are paced.
    assert abs(elapsed - (len(frames) - 1) * 0.02) <= 0.02 * 2.0 + 0.005, elapsed
    assert abs(len(frames) * FRAME_SAMPLES / RATE - 2.0) <= 0.03  # resampling keeps the duration
    assert all(np.abs(f).max() > 4000 for f in frames[1:-1])  # real audio, not silence


async def test_silence_when_nothing_is_queued_and_pts_keep_counting() -> None:
    track = PlaybackTrack()
    frames = [await track.recv() for _ in range(3)]
    assert [f.pts for f in frames] == [0, 960, 1920]
    assert all(not f.to_ndarray().any() for f in frames)


async def test_clear_silences_within_one_frame_and_cancels_marks() -> None:
    track = PlaybackTrack()
    track.enqueue(tone(3.0, 16_000))
    first = track.mark("first")
    await track.recv()
    second = track.mark("second")
    cleared_at = time.monotonic()
    assert track.clear() == ["first", "second"]
    frame = await track.recv()
    assert time.monotonic() - cleared_at <= 0.02 + 0.005
    assert not frame.to_ndarray().any()
    assert await first is False and await second is False
    assert not track.playing


async def test_marks_fire_in_order_when_their_audio_has_played() -> None:
    track = PlaybackTrack()
    order: list[str] = []
    futures = []
    for name in ("a", "b", "c"):
        track.enqueue(tone(0.1, 16_000))
        future = track.mark(name)

        def record(_: asyncio.Future[bool], n: str = name) -> None:
            order.append(n)

        future.add_done_callback(record)
        futures.append(future)
    frames = 0
    while not futures[0].done():
        await track.recv()
        frames += 1
    assert frames == 5  # 100 ms = 5 frames
    assert not futures[1].done()
    await drain(track)
    await asyncio.sleep(0)  # done callbacks run
    assert order == ["a", "b", "c"] and all(f.result() for f in futures)
    assert await track.mark("idle") is True  # nothing queued: at once


async def test_the_buffer_is_bounded() -> None:
    track = PlaybackTrack(max_seconds=1.0)
    accepted = track.enqueue(tone(1.5, 16_000))
    assert accepted == 16_000 * 2  # one second of 16 kHz audio
    assert track.queued_seconds == pytest.approx(1.0, abs=0.01)
    assert track.enqueue(tone(0.1, 16_000)) == 0
    await track.recv()
    assert track.enqueue(tone(0.02, 48_000), 48_000) == 960 * 2  # room for one frame again
