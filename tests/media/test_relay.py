"""Relay fan-out: one reader per source, bounded drop-oldest outputs, switchable sources."""

from __future__ import annotations

import asyncio
import fractions

from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame

from media.relay import CATCH_UP_TO, MAX_BACKLOG, QUEUE_FRAMES, OutputTrack, Relay


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
