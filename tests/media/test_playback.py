"""Playback toward the customer: pacing, marks, clear, bounds."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any

import av
import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamError

from media import opus
from media.playback import (
    DTX_HANGOVER,
    FRAME_SAMPLES,
    IDLE_SECONDS,
    MAX_MARKS,
    RATE,
    SILENCE_PEAK,
    SILENT_PAYLOAD,
    PlaybackTrack,
)

#: RMS below which decoded audio counts as silent: Opus rings down for a few ms after
#: a tone; the 8000-peak test tone has an RMS of about 5,700.
QUIET_RMS = 150


def rms(pcm: np.ndarray) -> float:
    return float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2)))


def tone(seconds: float, rate: int, amplitude: int = 8000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * 440 * t)).astype(np.int16).tobytes()


@pytest.fixture(params=["pull", "push"])
def push(request: pytest.FixtureRequest) -> bool:
    """Both ways a track is played: ``recv()`` (aiortc's sender) and ``start`` (the gateway)."""
    return bool(request.param == "push")


class Listener:
    """Decodes what a track sends, as the customer's browser would, pulled or pushed."""

    def __init__(self, track: PlaybackTrack, push: bool = False) -> None:
        self.track = track
        self.decoder = opus.Decoder(RATE)
        self.pushed: asyncio.Queue[av.Packet[Any]] | None = None
        if push:
            self.pushed = asyncio.Queue()
            track.start(self.pushed.put_nowait)

    async def next(self) -> tuple[int, np.ndarray]:
        packet = await (self.track.recv() if self.pushed is None else self.pushed.get())
        assert packet.pts is not None
        return packet.pts, self.decoder.decode(bytes(packet)).copy()


async def drain(track: PlaybackTrack, listener: Listener | None = None) -> list[np.ndarray]:
    listener = listener or Listener(track)
    frames = []
    while track.playing:
        frames.append((await listener.next())[1])
    return frames


@pytest.mark.parametrize("rate", [8_000, 16_000, 24_000, 48_000])
async def test_n_seconds_take_n_seconds(rate: int, push: bool) -> None:
    track = PlaybackTrack()
    assert track.enqueue(tone(2.0, rate), rate) == int(2.0 * rate) * 2  # all of it, bytes
    started = time.monotonic()
    frames = await drain(track, Listener(track, push))
    elapsed = time.monotonic() - started
    # The first frame goes out at once; the remaining ones are paced.
    assert abs(elapsed - (len(frames) - 1) * 0.02) <= 0.02 * 2.0 + 0.005, elapsed
    assert abs(len(frames) * FRAME_SAMPLES / RATE - 2.0) <= 0.03  # resampling keeps the duration
    assert all(np.abs(f).max() > 4000 for f in frames[2:-1])  # real audio (after the codec's ramp-up)


async def test_an_idle_track_sends_one_silent_packet_per_idle_interval_like_opus_dtx(push: bool) -> None:
    track = PlaybackTrack()
    listener = Listener(track, push)
    started = time.monotonic()
    sent = [await listener.next() for _ in range(3)]
    elapsed = time.monotonic() - started
    assert 2 * IDLE_SECONDS - 0.01 <= elapsed <= 2 * IDLE_SECONDS + 0.1
    slots = [pts // FRAME_SAMPLES for pts, _ in sent]
    assert slots[0] == 0 and all(19 <= b - a <= 22 for a, b in itertools.pairwise(slots))
    assert all(pts % FRAME_SAMPLES == 0 for pts, _ in sent)  # on the 20 ms grid
    assert all(rms(pcm) <= QUIET_RMS for _, pcm in sent)


def test_an_idle_wake_up_a_moment_early_plays_the_keep_alive_slot() -> None:
    """uvloop fires a timer up to a millisecond or two before ``time.monotonic()`` says it
    is due (whole milliseconds, on a clock read once per loop iteration; more under load).
    An idle wake-up that early is on time: it goes on to the keep-alive's slot. It used to
    re-arm a sub-millisecond idle timer, again and again (measured in a gateway: 17 timer
    callbacks a second per silent bot instead of 5)."""
    track = PlaybackTrack()
    start = time.monotonic()
    due, idle = track._next_due(start)
    assert (due, idle) == (start, False)  # the first slot plays at once
    assert track._step() is not None
    for _ in range(DTX_HANGOVER + 1):  # the hangover's silent slots: DTX after them
        track._step()
    sent = track._last_packet
    due, idle = track._next_due(sent + 0.1)
    assert idle and due == pytest.approx(sent + IDLE_SECONDS)  # waits for the keep-alive
    due, idle = track._next_due(sent + IDLE_SECONDS - 0.001)  # the timer fired 1 ms early
    assert not idle and due <= sent + IDLE_SECONDS + 0.02  # the slot, not another idle wait


async def test_audio_after_idle_starts_on_the_next_slot_and_ends_with_a_silent_hangover(push: bool) -> None:
    track = PlaybackTrack()
    listener = Listener(track, push)
    await listener.next()  # idle packet at slot 0
    await asyncio.sleep(0.1)
    track.enqueue(tone(0.1, 16_000))
    queued_at = time.monotonic()
    pts, _ = await listener.next()
    assert time.monotonic() - queued_at <= 0.02 + 0.01  # no waiting for the idle interval
    assert 5 <= pts // FRAME_SAMPLES <= 7  # the grid went on while idle: a DTX gap, not a reset
    frames = await drain(track, listener)
    assert len(frames) == 4  # the rest of the 100 ms
    hangover = [await listener.next() for _ in range(DTX_HANGOVER)]
    assert [p // FRAME_SAMPLES for p, _ in hangover] == [pts // FRAME_SAMPLES + 5 + i for i in range(DTX_HANGOVER)]
    assert rms(hangover[-1][1]) <= QUIET_RMS


async def test_silence_inside_the_bots_audio_is_not_encoded_after_the_hangover(push: bool) -> None:
    track = PlaybackTrack()
    listener = Listener(track, push)
    quiet = (np.random.default_rng(1).integers(-SILENCE_PEAK, SILENCE_PEAK + 1, 16_000)).astype(np.int16)
    track.enqueue(tone(0.1, 16_000) + quiet.tobytes() + tone(0.1, 16_000))  # 100 ms, 1 s of "silence", 100 ms
    sent = []
    while track.playing:
        sent.append(await listener.next())
    slots = [pts // FRAME_SAMPLES for pts, _ in sent]
    # 5 tone packets, the 10-packet hangover, keep-alives every 400 ms, 5 tone packets;
    # the second tone is on its own slots (55 to 59): the gaps are DTX, not lost time.
    assert slots[: 5 + DTX_HANGOVER] == list(range(5 + DTX_HANGOVER))
    assert slots[-5:] == list(range(55, 60))
    keepalives = slots[5 + DTX_HANGOVER : -5]
    assert 1 <= len(keepalives) <= 3
    assert rms(sent[-2][1]) > 3000  # the tone after the silence is heard


async def test_idle_keep_alives_decode_to_exact_silence() -> None:
    """A silent bot's keep-alives cost no encode and decode to exact zeros (a browser
    counts the 1-2 LSB of encoded silence as audio energy); the bot's next words decode
    as before, and the silence after them is a keep-alive again."""
    track = PlaybackTrack()
    sent: asyncio.Queue[av.Packet[Any]] = asyncio.Queue()
    track.start(sent.put_nowait)
    decoder = opus.Decoder(RATE)
    idle = [bytes(await sent.get()) for _ in range(3)]  # 0.8 s: the idle track's keep-alives
    assert idle == [SILENT_PAYLOAD] * 3
    track.enqueue(tone(0.2, 16_000))
    spoken = [bytes(await sent.get()) for _ in range(10 + DTX_HANGOVER)]
    after = [bytes(await sent.get()) for _ in range(2)]
    assert after == [SILENT_PAYLOAD] * 2
    pcm = [decoder.decode(payload).copy() for payload in idle + spoken + after]
    assert all(len(frame) == FRAME_SAMPLES for frame in pcm)
    assert all(not frame.any() for frame in pcm[:3])  # exact zeros, from a fresh decoder
    assert min(rms(frame) for frame in pcm[5:12]) > 3000  # the tone is heard
    assert all(rms(frame) <= QUIET_RMS for frame in pcm[-2:])
    assert not decoder.decode(SILENT_PAYLOAD).any()  # and zeros again once settled
    track.stop()


async def test_clear_silences_within_one_frame_and_cancels_marks(push: bool) -> None:
    track = PlaybackTrack()
    listener = Listener(track, push)
    track.enqueue(tone(3.0, 16_000))
    first = track.mark("first")
    for _ in range(3):
        await listener.next()
    second = track.mark("second")
    cleared_at = time.monotonic()
    assert track.clear() == ["first", "second"]
    _, pcm = await listener.next()
    assert time.monotonic() - cleared_at <= 0.02 + 0.005
    _, pcm = await listener.next()  # the first may ring down the tone; the next is silent
    assert rms(pcm) <= QUIET_RMS
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


async def test_a_pushed_track_stops_delivering_when_stopped_and_recv_reports_the_end() -> None:
    track = PlaybackTrack()
    listener = Listener(track, push=True)
    track.enqueue(tone(1.0, 16_000))
    await listener.next()
    ended = asyncio.create_task(track.recv())  # in push mode: waits for the end
    await asyncio.sleep(0.05)
    assert not ended.done()
    track.stop()
    with pytest.raises(MediaStreamError):
        await ended
    assert listener.pushed is not None
    while not listener.pushed.empty():
        listener.pushed.get_nowait()
    await asyncio.sleep(0.1)
    assert listener.pushed.empty()  # the timer is gone
    with pytest.raises(RuntimeError):
        track.start(lambda packet: None)


class FlakyEncoder:
    """The track's real encoder, failing on the calls listed (a libopus error)."""

    def __init__(self, encoder: opus.Encoder, fail_on: set[int]) -> None:
        self.encoder = encoder
        self.fail_on = fail_on
        self.calls = 0

    def encode(self, pcm: np.ndarray) -> bytes:
        self.calls += 1
        if self.calls in self.fail_on:
            raise RuntimeError(f"encode {self.calls} failed")
        return self.encoder.encode(pcm)


class Count:
    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


async def test_a_failing_step_costs_one_slot_and_playback_goes_on(push: bool, caplog: pytest.LogCaptureFixture) -> None:
    """Bug: an exception in ``_step`` escaped the timer callback, the chain of timers
    ended and the bot went silent for the rest of the call (pulled: recv() raised and
    aiortc's sender stopped for good)."""
    failures = Count()
    track = PlaybackTrack(step_failures=failures)
    assert track._encoder is not None
    track._encoder = FlakyEncoder(track._encoder, {3, 4})  # type: ignore[assignment]
    listener = Listener(track, push)
    track.enqueue(tone(0.2, 16_000))  # 10 frames
    with caplog.at_level(logging.ERROR, logger="talkgate.media.playback"):
        slots: list[int] = []
        async with asyncio.timeout(2):
            while track.playing or len(slots) < 8:
                pts, _ = await listener.next()
                slots.append(pts // FRAME_SAMPLES)
    assert slots[:8] == [0, 1, 4, 5, 6, 7, 8, 9]  # slots 2 and 3 lost, nothing else
    assert track.step_failures.failed == failures.value == 2
    assert len(caplog.records) == 1 and caplog.records[0].exc_info is not None  # rate-limited
    more = await listener.next()  # still ticking (the DTX hangover)
    assert more[0] // FRAME_SAMPLES == 10
    track.stop()


async def test_a_failing_deliver_does_not_stop_the_timer() -> None:
    """Bug: a ``deliver`` that raised (the relay's) ended the pushed track's timer chain."""
    got: list[int] = []
    five = asyncio.Event()

    def deliver(packet: av.Packet[Any]) -> None:
        assert packet.pts is not None
        got.append(packet.pts // FRAME_SAMPLES)
        if len(got) == 5:
            five.set()
        if len(got) == 2:
            raise RuntimeError("relay exploded")

    track = PlaybackTrack()
    track.enqueue(tone(0.1, 16_000))
    track.start(deliver)
    await asyncio.wait_for(five.wait(), 2)
    assert got[:5] == [0, 1, 2, 3, 4] and track.step_failures.failed == 1
    track.stop()


async def test_pending_marks_are_bounded_and_the_oldest_is_dropped() -> None:
    """Bug: marks were unbounded; a bot sending 100 000 of them grew the gateway by 79 MB."""
    dropped: list[str] = []
    track = PlaybackTrack(max_marks=3, on_mark_dropped=dropped.append)
    track.enqueue(tone(1.0, 16_000))
    futures = [track.mark(f"m{i}") for i in range(5)]
    assert track.pending_marks == 3 and track.marks_dropped == 2
    assert dropped == ["m0", "m1"]
    assert [f.done() and f.result() for f in futures[:2]] == [False, False]  # as if cleared
    assert not any(f.done() for f in futures[2:])
    assert track.clear() == ["m2", "m3", "m4"]
    track.stop()


async def test_a_flood_of_marks_stays_within_the_default_bound() -> None:
    track = PlaybackTrack()
    track.enqueue(tone(0.1, 16_000))
    for i in range(100_000):
        track.mark(str(i))
    assert track.pending_marks == MAX_MARKS and track.marks_dropped == 100_000 - MAX_MARKS
    track.stop()


async def test_hold_silences_at_once_keeps_the_queue_and_resume_goes_on(push: bool) -> None:
    track = PlaybackTrack()
    listener = Listener(track, push)
    track.enqueue(tone(1.0, 16_000))
    done = track.mark("end")
    for _ in range(3):
        await listener.next()
    queued = track.queued_samples
    track.hold()
    assert not track.playing and track.held
    _, pcm = await listener.next()  # the next slot is already silence
    _, pcm = await listener.next()
    assert rms(pcm) <= QUIET_RMS
    assert track.queued_samples == queued and not done.done()  # nothing played, nothing lost
    assert track.heard_ms == 60
    track.resume()
    _, pcm = await listener.next()
    assert rms(pcm) > 3000  # the rest of the answer, from where it stopped
    assert track.queued_samples == queued - 320
    while track.playing:
        await listener.next()
    assert await done is True
    track.stop()


def opus_packets(seconds: float, frame_ms: int = 20, rate: int = 48_000) -> list[bytes]:
    """What a bot with an Opus TTS sends: the tone encoded by libopus, ``frame_ms`` per packet
    (libopus's own multi-frame packets for 40 and 60 ms)."""
    encoder = opus.Encoder(rate)
    pcm = np.frombuffer(tone(seconds, rate), dtype=np.int16)
    packets = [encoder.encode(pcm[i : i + encoder.samples]) for i in range(0, len(pcm), encoder.samples)]
    per = frame_ms // 20
    if per == 1:
        return packets
    # A code-3 packet of ``per`` 20 ms frames (RFC 6716 3.2.5), built from single-frame ones.
    out = []
    for i in range(0, len(packets) - per + 1, per):
        group = packets[i : i + per]
        frames = [p[1:] for p in group]  # each a code-0 packet: TOC + one frame
        body = bytes([group[0][0] | 3, 0x80 | per])  # VBR, frame count
        for frame in frames[:-1]:
            size = len(frame)
            body += (
                bytes([size]) if size < 252 else bytes([252 + (size - 252) % 4, (size - 252 - (size - 252) % 4) // 4])
            )
        out.append(body + b"".join(frames))
    return out


@pytest.mark.parametrize("frame_ms", [20, 40, 60])
async def test_opus_from_the_bot_is_sent_as_it_is_at_real_time_pace(frame_ms: int, push: bool) -> None:
    track = PlaybackTrack()
    assert track.set_passthrough() and track.passthrough
    packets = opus_packets(1.0, frame_ms)
    assert all(track.enqueue_opus(p) for p in packets)
    assert track.queued_seconds == pytest.approx(len(packets) * frame_ms / 1000)
    done = track.mark("end")
    listener = Listener(track, push)
    started = time.monotonic()
    sent: list[tuple[int, bytes]] = []
    while track.playing:
        packet = await (track.recv() if listener.pushed is None else listener.pushed.get())
        assert packet.pts is not None
        sent.append((packet.pts, bytes(packet)))
    elapsed = time.monotonic() - started
    assert [payload for _, payload in sent] == packets  # not one byte re-encoded
    step = FRAME_SAMPLES * frame_ms // 20
    assert [pts - sent[0][0] for pts, _ in sent] == [i * step for i in range(len(packets))]
    assert elapsed == pytest.approx((len(packets) - 1) * frame_ms / 1000, abs=0.15)  # the first at once
    assert await done is True
    assert track.heard_ms == len(packets) * frame_ms
    decoded = np.concatenate([Listener(track).decoder.decode(p).copy() for p in packets])
    assert rms(decoded) > 3000  # the tone, as the browser decodes it
    track.stop()


async def test_opus_passthrough_holds_clears_marks_and_falls_silent_like_pcm(push: bool) -> None:
    track = PlaybackTrack()
    track.set_passthrough()
    listener = Listener(track, push)
    packets = opus_packets(1.0)
    for p in packets:
        track.enqueue_opus(p)
    done = track.mark("end")
    for _ in range(3):
        await listener.next()
    queued = track.queued_samples
    track.hold()
    await listener.next()  # held: silent frames (the decoder rings down in the first)
    _, pcm = await listener.next()
    assert rms(pcm) <= QUIET_RMS and track.queued_samples == queued and track.heard_ms == 60
    track.resume()
    await listener.next()  # from where it stopped (the decoder comes back from silence)
    _, pcm = await listener.next()
    assert rms(pcm) > 1000 and track.queued_samples == queued - 2 * FRAME_SAMPLES  # the tone again
    assert track.clear() == ["end"] and await done is False
    assert not track.playing and track.queued_samples == 0
    # Run out: the hangover of silent frames, then keep-alives only.
    silent = [await listener.next() for _ in range(DTX_HANGOVER + 1)]
    assert all(rms(pcm) <= QUIET_RMS for _, pcm in silent[1:])
    slot = silent[-1][0]
    pts, _ = await asyncio.wait_for(listener.next(), IDLE_SECONDS + 0.2)
    assert pts - slot > FRAME_SAMPLES * 5  # DTX: the slots between were not sent
    track.stop()


async def test_opus_passthrough_refuses_what_it_cannot_play() -> None:
    track = PlaybackTrack(max_seconds=0.1)
    with pytest.raises(ValueError, match="takes PCM"):
        track.enqueue_opus(opus_packets(0.02)[0])  # PCM until the bot says otherwise
    assert track.set_passthrough()
    assert track.rate == RATE and track.capacity == RATE // 10
    for bad in (b"", b"\x03", bytes(2000)):
        with pytest.raises(ValueError, match="Opus packet"):
            track.enqueue_opus(bad)
    ten_ms = bytes([30 << 3]) + b"\xff\xfe"  # CELT FB 10 ms
    with pytest.raises(ValueError, match="20, 40"):
        track.enqueue_opus(ten_ms)
    with pytest.raises(ValueError, match="takes Opus"):
        track.enqueue(tone(0.02, 16_000))
    packets = opus_packets(0.2)
    assert [track.enqueue_opus(p) for p in packets] == [True] * 5 + [False] * 5  # 100 ms of room
    assert not track.set_rate(16_000)  # only while nothing is queued
    track.clear()
    assert track.set_rate(16_000) and not track.passthrough and track.rate == 16_000
    assert track.enqueue(tone(0.02, 16_000)) == 640
