"""Outbound playback: PCM from a bot → a paced, Opus-encoded audio track toward the customer.

``PlaybackTrack`` is an aiortc ``MediaStreamTrack``. Bots send PCM16 mono at any
common rate (8, 16, 24 or 48 kHz), in pieces of any size and usually faster than real
time (TTS engines do); the track keeps it at the bot's own rate (``set_rate``; other
rates are resampled once on arrival) in a preallocated ring buffer and plays it at
real-time pace, 20 ms per packet on a fixed grid. Encoding at the source rate
costs less than at 48 kHz and loses nothing: Opus carries any of these rates.

It yields *encoded* Opus packets (``media.opus``, in the event loop: aiortc would
encode every frame in its thread pool at complexity 10, the GIL hand-off costing
more than the work). Silence, whether the bot's audio ran out or it sent silence,
is handled as Opus DTX does it: ``DTX_HANGOVER`` silent packets (the receiver's
decoder rings down; a barge-in is heard as silence at once), then one packet every
``IDLE_SECONDS`` instead of fifty a second, so a quiet bot costs almost nothing and
silence in its speech is not encoded (encoding 20 ms of zeros costs libopus as much
as 2/3 of speech). Receivers treat the gaps as DTX. Sound after silence goes out on
the next 20 ms slot.

- ``mark(name)`` returns a future that resolves True once everything queued before it
  has been played (Twilio's ``mark``), False if it was cleared first.
- ``clear()`` drops everything queued; the next packet is already silence (barge-in
  within one frame), and pending marks resolve False.
- ``hold()`` silences the track at once but keeps what is queued (a barge-in being
  decided); ``resume()`` plays on from where it stopped. Marks wait meanwhile.
- The buffer is bounded (``max_seconds``); ``enqueue`` returns how much it accepted.
- Pending marks are bounded too (``max_marks``, the bot decides how many it sends):
  one more drops the oldest, whose future resolves False as if cleared, and
  ``on_mark_dropped`` is told its name.
- A step that raises (encoding, a ``deliver`` that fails) costs that one 20 ms slot:
  it is counted and logged (rate-limited) and the track keeps playing.

A bot whose speech is already Opus hands over packets instead (``set_passthrough``,
``enqueue_opus``): sent as they are on the same grid, nothing encoded; queue positions
then count 48 kHz samples, so marks, hold, clear and ``heard_ms`` work unchanged.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fractions
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from . import opus
from .tasks import FailureLog, Tally

log = logging.getLogger("talkgate.media.playback")

#: Opus's RTP clock: packet timestamps count 48 kHz samples whatever the audio's rate.
RATE = 48_000
FRAME_SAMPLES = 960  # 20 ms of the RTP clock
FRAME_SECONDS = FRAME_SAMPLES / RATE
INPUT_RATES = (8_000, 16_000, 24_000, 48_000)
TIME_BASE = fractions.Fraction(1, RATE)
#: After this many silent packets (200 ms) in a row, whether the bot's audio ran out
#: or it sent silence, only one packet per IDLE_SECONDS goes out (as libopus's DTX).
DTX_HANGOVER = 10
IDLE_SECONDS = 0.4
#: How early a loop timer may fire, as ``time.monotonic()`` sees it: uvloop counts its
#: timers in whole milliseconds on a clock read once per loop iteration. An idle wake-up
#: that early is on time (it used to re-arm a sub-millisecond timer, again and again:
#: eight extra ticks per keep-alive, 17 a second for every silent bot at 100 sessions).
TIMER_SLACK = 0.002
#: The bot counts as talking this long after its last audible frame (a bot streaming
#: in real time leaves the queue empty between its packets).
TALKING_GAP = 0.3
#: The idle keep-alive: one 20 ms CELT-only Opus frame (TOC 0xF8) whose range coder
#: starts with the silence flag, so it decodes to exact zeros. Silence through the
#: VoIP-mode encoder is SILK noise of 1-2 LSB, which a browser counts as audio energy,
#: and a constant costs no encode (~100 µs) 2.5 times a second per listening session.
SILENT_PAYLOAD = bytes.fromhex("f8fffe")
#: Samples this small (-66 dBFS) count as silence.
SILENCE_PEAK = 16
#: An Opus packet this short is silence (libopus's DTX sends the TOC byte alone; its
#: silent CELT frame is 3 bytes): what a bot's packets count as, not decoding them.
DTX_BYTES = 3
#: Marks waiting for their audio to play, at most (a bot could send millions: 100 000
#: pending marks held 79 MB). 1000 is a mark every 60 ms through a full 60 s buffer.
MAX_MARKS = 1000
#: A step that keeps failing is logged at most this often (it would fail every 20 ms).
FAILURE_LOG_SECONDS = 10.0


def opus_slots(packet: bytes) -> int:
    """How many 20 ms slots an Opus packet fills; ``ValueError`` if it is not an Opus
    packet of 20 to 120 ms in 20 ms steps (shorter frames do not fit the grid)."""
    try:
        samples = opus.packet_samples(packet)
    except opus.OpusError as exc:
        raise ValueError(str(exc)) from None
    if samples % FRAME_SAMPLES:
        raise ValueError(f"{samples / 48:g} ms: an Opus packet of 20, 40, 60, 80, 100 or 120 ms is needed")
    return samples // FRAME_SAMPLES


class PlaybackTrack(MediaStreamTrack):
    kind = "audio"

    def __init__(
        self,
        max_seconds: float = 60.0,
        *,
        rate: int = 16_000,
        complexity: int = 5,
        max_marks: int = MAX_MARKS,
        on_mark_dropped: Callable[[str], None] | None = None,
        step_failures: Tally | None = None,
    ) -> None:
        super().__init__()
        self.max_seconds = max_seconds
        self.complexity = complexity
        #: Pending marks at most; ``on_mark_dropped(name)`` hears of each oldest one dropped.
        self.max_marks = max_marks
        self._on_mark_dropped = on_mark_dropped
        #: Marks dropped because ``max_marks`` were pending.
        self.marks_dropped = 0
        #: Steps that raised (each cost one 20 ms slot); ``step_failures`` counts them too.
        self.step_failures = FailureLog(
            "playback step", logger=log, failures=step_failures, interval=FAILURE_LOG_SECONDS
        )
        self._setup(rate)
        self._queued = asyncio.Event()
        #: Packets sent.
        self.packets = 0
        self._marks: collections.deque[tuple[int, str, asyncio.Future[bool]]] = collections.deque()
        self._start: float | None = None
        #: The next 20 ms slot on the grid that starts at _start.
        self._slot = 0
        #: Silent packets sent since the last audio (the track starts idle), and when
        #: the last packet went out.
        self._silent_run = DTX_HANGOVER
        self._last_packet = -math.inf
        #: Push mode (``start``): where packets go, the pending timer, and whether it is
        #: only an idle keep-alive (audio arriving earlier moves it up).
        self._deliver: Callable[[av.Packet[Any]], None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._idle = False
        self._stopped = asyncio.Event()
        #: ``hold``: silent, the queue kept.
        self.held = False
        #: When the last audible frame was played (``talking``).
        self._last_audible = -math.inf

    # -- control --------------------------------------------------------------------------

    def _setup(self, rate: int, *, passthrough: bool = False) -> None:
        if rate not in INPUT_RATES:
            raise ValueError(f"rate must be one of {INPUT_RATES}")
        #: The bot sends Opus packets (``enqueue_opus``), played as they are; samples are
        #: then counted at 48 kHz (the RTP clock).
        self.passthrough = passthrough
        self.rate = RATE if passthrough else rate
        self._encoder = None if passthrough else opus.Encoder(rate, complexity=self.complexity)
        self.capacity = int(self.max_seconds * self.rate)
        self._ring = np.zeros(0 if passthrough else self.capacity, dtype=np.int16)
        #: Passthrough: the queued packets and their 20 ms slots.
        self._packets: collections.deque[tuple[bytes, int]] = collections.deque()
        #: Absolute sample counts: what has been queued, and what has been played.
        self._written = 0
        self._played = 0
        #: Where the current utterance began (``_played`` when audio last arrived while the
        #: bot was not talking): what ``heard_ms`` counts from.
        self._utterance = 0
        self._resamplers: dict[int, av.AudioResampler] = {}
        self._frame = np.zeros(rate // 50, dtype=np.int16)

    def set_rate(self, rate: int) -> bool:
        """Play (and encode) PCM at the bot's announced rate from now on; only while nothing is queued."""
        if rate == self.rate and not self.passthrough:
            return True
        if self.queued_samples:
            return False
        self._setup(rate)
        return True

    def set_passthrough(self) -> bool:
        """Take Opus packets (``enqueue_opus``) from now on; only while nothing is queued."""
        if self.passthrough:
            return True
        if self.queued_samples:
            return False
        self._setup(RATE, passthrough=True)
        return True

    @property
    def queued_samples(self) -> int:
        return self._written - self._played

    @property
    def queued_seconds(self) -> float:
        return self.queued_samples / self.rate

    @property
    def playing(self) -> bool:
        """Is bot audio being played (queued and not held): what barge-in interrupts?"""
        return self._written > self._played and not self.held

    @property
    def talking(self) -> bool:
        """Is the bot talking: being played, or audible less than ``TALKING_GAP`` ago? A bot
        that streams in real time has next to nothing queued between its packets."""
        return self.playing or time.monotonic() - self._last_audible < TALKING_GAP

    @property
    def heard_ms(self) -> int:
        """How much of the current utterance has been played (ms)."""
        return (self._played - self._utterance) * 1000 // self.rate

    def hold(self) -> None:
        """Silence from the next slot on, keeping the queue (and marks) as they are."""
        self.held = True

    def resume(self) -> None:
        """Play on from where ``hold`` stopped (from the next slot)."""
        if not self.held:
            return
        self.held = False
        if self.queued_samples and self._idle and self._timer is not None:
            self._timer.cancel()  # from the idle keep-alive back to the 20 ms grid
            self._schedule()

    def enqueue(self, pcm: bytes, sample_rate: int = 16_000) -> int:
        """Queue PCM16 mono; returns how many input bytes were accepted (all, unless full)."""
        if sample_rate not in INPUT_RATES:
            raise ValueError(f"sample_rate must be one of {INPUT_RATES}")
        if self.passthrough:
            raise ValueError("this track takes Opus packets (set_rate switches back to PCM)")
        samples = np.frombuffer(pcm, dtype=np.int16, count=len(pcm) // 2)
        if sample_rate != self.rate:
            samples = self._resample(samples, sample_rate)
        room = self.capacity - self.queued_samples
        if len(samples) > room:
            accepted_in = (room * sample_rate // self.rate) * 2
            samples = samples[:room]
        else:
            accepted_in = len(pcm) - len(pcm) % 2
        if not self.queued_samples and not self.talking:
            self._utterance = self._played  # a new utterance starts (not the next packet of a stream)
        self._write(samples)
        if len(samples):
            self._arrived()
        return accepted_in

    def enqueue_opus(self, packet: bytes) -> bool:
        """Queue one Opus packet of 20 to 120 ms (a multiple of 20) to be sent as it is:
        no encode, the bot's own bitrate and bandwidth. False if the buffer is full;
        ``ValueError`` for what ``opus_slots`` refuses."""
        if not self.passthrough:
            raise ValueError("this track takes PCM (set_passthrough switches to Opus packets)")
        slots = opus_slots(packet)
        if slots * FRAME_SAMPLES > self.capacity - self.queued_samples:
            return False
        if not self.queued_samples and not self.talking:
            self._utterance = self._played
        self._packets.append((packet, slots))
        self._written += slots * FRAME_SAMPLES
        self._arrived()
        return True

    def _arrived(self) -> None:
        self._queued.set()
        if self._idle and self._timer is not None:
            self._timer.cancel()  # play it from the next slot, not at the keep-alive
            self._schedule()

    def mark(self, name: str) -> asyncio.Future[bool]:
        """A future that resolves True once the audio queued so far has played (at once if
        none is), False if it is cleared first or dropped as the oldest of ``max_marks``."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if not self.queued_samples:
            future.set_result(True)
            return future
        if len(self._marks) >= self.max_marks:
            _, dropped, oldest = self._marks.popleft()
            self.marks_dropped += 1
            if not oldest.done():
                oldest.set_result(False)
            if self._on_mark_dropped is not None:
                self._on_mark_dropped(dropped)
        self._marks.append((self._written, name, future))
        return future

    @property
    def pending_marks(self) -> int:
        return len(self._marks)

    def clear(self) -> list[str]:
        """Drop all queued audio; returns the names of the marks that will not be reached."""
        self._played = self._written
        self._packets.clear()
        self._resamplers.clear()  # their buffered tails belong to the dropped audio
        cleared = []
        while self._marks:
            _, name, future = self._marks.popleft()
            cleared.append(name)
            if not future.done():
                future.set_result(False)
        return cleared

    # -- the track --------------------------------------------------------------------------

    def start(self, deliver: Callable[[av.Packet[Any]], None]) -> None:
        """Push each packet to ``deliver`` from a timer callback, on the same 20 ms grid.

        What the gateway does (the relay's ``deliver``): no task wakes up per packet,
        the loop's timer calls ``_tick`` directly. ``recv()`` then only waits for the
        track to stop, so a relay reading it notices the end.
        """
        if self._deliver is not None:
            raise RuntimeError("already started")
        self._deliver = deliver
        self._schedule()

    async def recv(self) -> av.Packet[Any]:
        if self._deliver is not None:
            await self._stopped.wait()
            raise MediaStreamError
        while True:
            if self.readyState != "live":
                raise MediaStreamError
            now = time.monotonic()
            due, idle = self._next_due(now)
            if idle:
                # Wait for audio, or until the next keep-alive packet is due.
                self._queued.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._queued.wait(), due - now)
                continue
            if due > now:
                await asyncio.sleep(due - now)
            packet = self._safe_step()
            if packet is not None:
                return packet

    def stop(self) -> None:
        self.clear()
        super().stop()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._queued.set()  # wake an idle recv() so it raises
        self._stopped.set()

    # -- pacing ---------------------------------------------------------------------------

    def _next_due(self, now: float) -> tuple[float, bool]:
        """When the next slot should be played, and whether that is only a keep-alive
        (True: idle, audio arriving earlier moves it up)."""
        if self._start is None:
            self._start = now
        dtx = self._silent_run >= DTX_HANGOVER
        if dtx and not self.playing:
            wake = self._last_packet + IDLE_SECONDS
            if wake > now + TIMER_SLACK:
                return wake, True
        if dtx:
            # Resume on the grid: the current slot if it began under 2 ms ago, else the next.
            self._slot = max(self._slot, math.ceil((now - self._start) * 50 - 0.1))
        return self._start + self._slot * FRAME_SECONDS, False

    def _step(self) -> av.Packet[Any] | None:
        """Play the current slot: its packet, or None where DTX sends nothing."""
        playing = self.playing
        slot = self._slot
        passed: bytes | None = None  # passthrough: the bot's packet for this slot
        if self.passthrough:
            slots = 1
            if playing:
                passed, slots = self._packets.popleft()  # a longer packet fills its slots
                self._played += slots * FRAME_SAMPLES
                self._resolve_marks()
            self._slot += slots
            audible = passed is not None and len(passed) > DTX_BYTES
        else:
            if self.held:
                self._frame[:] = 0  # silent; the queue and the marks wait
            else:
                self._read_into(self._frame)
                self._resolve_marks()
            self._slot += 1
            audible = playing and (self._frame.max() > SILENCE_PEAK or self._frame.min() < -SILENCE_PEAK)
        if audible:
            self._silent_run = 0
            self._last_audible = time.monotonic()
        else:
            self._silent_run += 1
            if self._silent_run > DTX_HANGOVER and time.monotonic() - self._last_packet < IDLE_SECONDS:
                return None  # DTX: nothing to send for this slot
        # Past the hangover this is an idle keep-alive (one per IDLE_SECONDS): no encode.
        if self._silent_run > DTX_HANGOVER:
            payload = SILENT_PAYLOAD
        elif passed is not None:
            payload = passed
        elif self._encoder is not None:
            payload = self._encoder.encode(self._frame)
        else:
            payload = SILENT_PAYLOAD  # passthrough, nothing to play (held or run out)
        packet = av.Packet(payload)
        packet.pts = slot * FRAME_SAMPLES
        packet.time_base = TIME_BASE
        self._last_packet = time.monotonic()
        self.packets += 1
        return packet

    def _safe_step(self) -> av.Packet[Any] | None:
        """``_step``, surviving a failure: counted, logged (rate-limited), that slot skipped."""
        slot = self._slot
        try:
            return self._step()
        except Exception as exc:
            self.step_failures.failure(exc)
            self._slot = max(self._slot, slot + 1)  # never retry the same slot: no busy loop
            return None

    def _schedule(self) -> None:
        now = time.monotonic()
        due, self._idle = self._next_due(now)
        self._timer = asyncio.get_running_loop().call_later(max(0.0, due - now), self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self.readyState != "live" or self._deliver is None:
            return
        # A timer callback that raises ends the chain for good (the bot would go silent):
        # whatever fails here costs one slot, and the next tick is always scheduled.
        if not self._idle:
            packet = self._safe_step()
            if packet is not None:
                try:
                    self._deliver(packet)
                except Exception as exc:
                    self.step_failures.failure(exc, "deliver")
        try:
            self._schedule()
        except Exception as exc:
            self.step_failures.failure(exc, "schedule")
            self._timer = asyncio.get_running_loop().call_later(FRAME_SECONDS, self._tick)

    # -- internals ------------------------------------------------------------------------

    def _resample(self, samples: np.ndarray, sample_rate: int) -> np.ndarray:
        resampler = self._resamplers.get(sample_rate)
        if resampler is None:
            resampler = self._resamplers[sample_rate] = av.AudioResampler(format="s16", layout="mono", rate=self.rate)
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = sample_rate
        out = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
        return np.concatenate(out) if len(out) != 1 else out[0]

    def _write(self, samples: np.ndarray) -> None:
        start = self._written % self.capacity
        first = min(len(samples), self.capacity - start)
        self._ring[start : start + first] = samples[:first]
        self._ring[: len(samples) - first] = samples[first:]
        self._written += len(samples)

    def _read_into(self, out: np.ndarray) -> None:
        n = min(len(out), self.queued_samples)
        start = self._played % self.capacity
        first = min(n, self.capacity - start)
        out[:first] = self._ring[start : start + first]
        out[first:n] = self._ring[: n - first]
        out[n:] = 0
        self._played += n

    def _resolve_marks(self) -> None:
        while self._marks and self._marks[0][0] <= self._played:
            _, _, future = self._marks.popleft()
            if not future.done():
                future.set_result(True)
