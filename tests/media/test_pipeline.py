"""The pipeline as a relay subscriber: events to listeners and to a bounded async stream; barge-in."""

from __future__ import annotations

import asyncio

import numpy as np

from media import opus
from media.pipeline import VoicePipeline
from media.playback import PlaybackTrack
from media.vad import Event, SpeechFrame, SpeechStarted, SpeechStopped
from tests.speech import to_48k_stereo_frames, utterances

FIXTURE = utterances(["I would like to book an appointment"], lead_s=0.6, tail_s=1.0)


async def test_events_stream_in_order_to_a_consumer() -> None:
    pipeline = VoicePipeline()
    received: list[Event] = []

    async def consume() -> None:
        async for event in pipeline.events():
            received.append(event)

    consumer = asyncio.create_task(consume())
    await asyncio.sleep(0)
    for frame in to_48k_stereo_frames(FIXTURE.pcm):
        pipeline.push(frame)
    pipeline.close()
    await asyncio.wait_for(consumer, 2)
    assert isinstance(received[0], SpeechStarted)
    assert isinstance(received[-1], SpeechStopped)
    frames = [e for e in received if isinstance(e, SpeechFrame)]
    assert [f.t for f in frames] == list(range(frames[0].t, frames[-1].t + 1, 20))


async def test_a_slow_consumer_loses_audio_frames_not_starts_or_stops() -> None:
    pipeline = VoicePipeline(max_events=20)
    stream = pipeline.events()
    first = asyncio.ensure_future(anext(stream))  # a consumer that reads once, then stalls
    await asyncio.sleep(0)
    for frame in to_48k_stereo_frames(FIXTURE.pcm):
        pipeline.push(frame)
    pipeline.close()
    events = [await first]
    events += [e async for e in stream]
    assert pipeline.dropped > 0
    assert len(events) <= 21
    assert isinstance(events[0], SpeechStarted) and isinstance(events[-1], SpeechStopped)


async def test_no_queueing_without_a_consumer() -> None:
    pipeline = VoicePipeline(max_events=5)
    for frame in to_48k_stereo_frames(FIXTURE.pcm):
        pipeline.push(frame)
    assert pipeline.dropped == 0 and not pipeline._events


async def test_barge_in_clears_playback_when_the_customer_starts_talking() -> None:
    playback = PlaybackTrack()
    t = np.arange(16_000 * 5) / 16_000
    playback.enqueue((8000 * np.sin(2 * np.pi * 500 * t)).astype(np.int16).tobytes())
    mark = playback.mark("end-of-answer")
    interrupted: list[list[str]] = []
    pipeline = VoicePipeline()

    def barge_in(event: Event) -> None:
        if isinstance(event, SpeechStarted) and playback.playing:
            interrupted.append(playback.clear())

    pipeline.listeners.append(barge_in)
    for frame in to_48k_stereo_frames(FIXTURE.pcm):
        pipeline.push(frame)
        if interrupted:
            break
    assert interrupted == [["end-of-answer"]]
    assert await mark is False
    decoder = opus.Decoder(48_000)
    decoder.decode(bytes(await playback.recv()))  # may ring down the tone
    silence = decoder.decode(bytes(await playback.recv())).astype(np.float64)
    assert np.sqrt(np.mean(silence**2)) < 150  # then silence


async def test_a_failing_listener_does_not_deprive_the_others() -> None:
    """Bug: a listener that raised (a bot connector's bug) cut the event's dispatch short:
    listeners after it (the ``speaking`` flag) missed it, and the relay lost the frame."""
    pipeline = VoicePipeline()
    received: list[Event] = []

    def broken(event: Event) -> None:
        raise RuntimeError("listener bug")

    pipeline.listeners += [broken, received.append]
    for frame in to_48k_stereo_frames(FIXTURE.pcm):
        pipeline.push(frame)
    pipeline.close()
    assert isinstance(received[0], SpeechStarted) and isinstance(received[-1], SpeechStopped)
    assert pipeline.listener_failures.failed == len(received)
