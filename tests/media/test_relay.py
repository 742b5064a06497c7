"""Relay fan-out: one reader per source, bounded drop-oldest outputs, switchable sources."""

from __future__ import annotations

import asyncio
import fractions
import logging

import pytest
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame

from media.relay import CATCH_UP_TO, MAX_BACKLOG, QUEUE_FRAMES, MediaFrame, OutputTrack, Relay


class Numbered(MediaStreamTrack):
    """Yields frames whose pts count up; ends after ``count`` frames."""

    kind = "audio"

    def __init__(self, count: int) -> None:
        super().__init__()
        self.count = count
        self.pts = 0

    async def recv(self) -> AudioFrame:
        if self.pts >= self.count:
            raise MediaStreamError
        frame = AudioFrame(format="s16", layout="mono", samples=160)
        frame.pts, frame.time_base, frame.sample_rate = self.pts, fractions.Fraction(1, 8000), 8000
        self.pts += 1
        await asyncio.sleep(0)
        return frame


async def test_every_output_gets_every_frame_when_it_keeps_up() -> None:
    source = Numbered(50)
    outputs = [OutputTrack("audio") for _ in range(3)]
    ended = asyncio.Event()
    relay = Relay(source, on_ended=lambda _: ended.set())
    for output in outputs:
        relay.subscribe(output)
    got: list[list[int]] = [[] for _ in outputs]

    async def read(i: int) -> None:
        while len(got[i]) < 50:
            got[i].append(int((await outputs[i].recv()).pts or 0))

    await asyncio.wait_for(asyncio.gather(*(read(i) for i in range(3))), 5)
    assert all(g == list(range(50)) for g in got)
    await asyncio.wait_for(ended.wait(), 1)
    assert all(o.relay is None for o in outputs)  # detached when the source ended
    await relay.close()


async def test_a_late_output_skips_to_the_newest_frames() -> None:
    """Live media must not lag: stale frames are dropped, the reader gets the newest."""
    source = Numbered(100)
    late = OutputTrack("audio")
    ended = asyncio.Event()
    relay = Relay(source, on_ended=lambda _: ended.set())
    relay.subscribe(late)
    await asyncio.wait_for(ended.wait(), 5)  # all 100 frames relayed, none read yet
    async with asyncio.timeout(5):
        got = [(await late.recv()).pts for _ in range(CATCH_UP_TO["audio"])]
    assert got == list(range(100 - CATCH_UP_TO["audio"], 100))
    assert late.dropped == 100 - CATCH_UP_TO["audio"]  # the bounded queue's overflow plus the catch-up
    assert QUEUE_FRAMES["audio"] > MAX_BACKLOG["audio"]
    await relay.close()


async def test_switching_an_output_between_sources() -> None:
    a, b = Relay(Numbered(10_000)), Relay(Numbered(10_000))
    output = OutputTrack("audio")
    a.subscribe(output)
    await output.recv()
    b.subscribe(output)  # moves it
    assert output.relay is b and output not in a.outputs
    b.unsubscribe(output)
    assert output.relay is None
    pending = asyncio.create_task(output.recv())
    await asyncio.sleep(0.05)
    assert not pending.done()  # idles without a source, never ends
    output.stop()
    try:
        await asyncio.wait_for(pending, 1)
    except MediaStreamError:
        pass
    else:
        raise AssertionError("a stopped output must end its recv()")
    await asyncio.gather(a.close(), b.close())


class Failing(MediaStreamTrack):
    """Yields ``count`` frames, then raises what a buggy source might (not MediaStreamError)."""

    kind = "audio"

    def __init__(self, count: int) -> None:
        super().__init__()
        self.numbered = Numbered(count)

    async def recv(self) -> AudioFrame:
        if self.numbered.pts >= self.numbered.count:
            raise RuntimeError("decoder exploded")
        return await self.numbered.recv()


class BrokenSubscriber:
    """A subscriber whose push fails on every frame (a tap with a bug)."""

    def __init__(self) -> None:
        self.relay: Relay | None = None
        self.pushes = 0

    def push(self, frame: MediaFrame) -> None:
        self.pushes += 1
        raise ValueError("cannot take this frame")

    def clear(self) -> None:
        raise ValueError("cannot clear either")


class Count:
    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


async def test_a_source_that_fails_ends_the_relay_and_calls_on_ended(caplog: pytest.LogCaptureFixture) -> None:
    """Bug: a reader whose recv() raised anything but MediaStreamError ended without
    calling on_ended (and the exception vanished): its outputs stayed attached to a
    dead relay and the peer never learnt its source was gone."""
    ended: list[Relay] = []
    done = asyncio.Event()

    def on_ended(relay: Relay) -> None:
        ended.append(relay)
        done.set()

    output = OutputTrack("audio")
    failures = Count()
    with caplog.at_level(logging.ERROR, logger="talkgate.media.relay"):
        relay = Relay(Failing(5), on_ended=on_ended, reader_failures=failures)
        relay.subscribe(output)
        await asyncio.wait_for(done.wait(), 5)
        await asyncio.sleep(0)
    assert ended == [relay] and relay.finished
    assert output.relay is None and not relay.outputs  # detached, queued frames kept
    assert [(await output.recv()).pts for _ in range(2)] == [3, 4]
    assert failures.value == 1
    [record] = caplog.records
    assert "decoder exploded" in record.getMessage() and record.exc_info is not None
    await relay.close()


async def test_a_failing_subscriber_does_not_stop_the_relay_for_the_others(caplog: pytest.LogCaptureFixture) -> None:
    """Bug: one subscriber's push raising ended the reader task (or, pushed, the RTP
    callback) for every subscriber; now it misses its frames, counted and logged once."""
    broken = BrokenSubscriber()
    outputs = [OutputTrack("audio") for _ in range(2)]
    failures = Count()
    ended = asyncio.Event()
    with caplog.at_level(logging.ERROR, logger="talkgate.media.relay"):
        relay = Relay(Numbered(50), on_ended=lambda _: ended.set(), subscriber_failures=failures)
        relay.subscribe(outputs[0])
        relay.subscribe(broken)
        relay.subscribe(outputs[1])
        relay.flush()  # clear() raising is survived too (nothing delivered yet)
        got: list[list[int]] = [[], []]

        async def read(i: int) -> None:
            while len(got[i]) < 50:
                got[i].append(int((await outputs[i].recv()).pts or 0))

        await asyncio.wait_for(asyncio.gather(read(0), read(1)), 5)
        await asyncio.wait_for(ended.wait(), 1)
    assert got == [list(range(50)), list(range(50))]
    assert broken.pushes == 50
    assert relay.subscriber_failures.failed == failures.value == 51
    assert len(caplog.records) == 1  # rate-limited: not one line per frame
    assert "BrokenSubscriber" in caplog.records[0].getMessage()
    await relay.close()


async def test_a_subscriber_may_unsubscribe_another_during_a_delivery() -> None:
    """A push that changes the subscriptions (a barge-in rerouting) must not break the loop."""
    relay = Relay(Numbered(0))
    output = OutputTrack("audio")

    class Unsubscriber:
        relay: Relay | None = None

        def push(self, frame: MediaFrame) -> None:
            relay.unsubscribe(output)
            relay.unsubscribe(self)

        def clear(self) -> None:
            pass

    relay.subscribe(Unsubscriber())
    relay.subscribe(output)
    relay.deliver(AudioFrame(format="s16", layout="mono", samples=160))
    assert not relay.outputs
    await relay.close()
