"""Outbound playback: PCM from a bot → a paced audio track toward the customer.

``PlaybackTrack`` is an aiortc ``MediaStreamTrack``. Bots send PCM16 mono at any
common rate (8, 16, 24 or 48 kHz), in pieces of any size and usually faster than real
time (TTS engines do); the track resamples it once to 48 kHz into a preallocated ring
buffer and plays it at real-time pace, 20 ms per frame, paced from its own pts (not
from how fast it is asked). With nothing queued it plays silence, so the customer's
stream never stalls.

- ``mark(name)`` returns a future that resolves True once everything queued before it
  has been played (Twilio's ``mark``), False if it was cleared first.
- ``clear()`` drops everything queued; the next frame is already silence (barge-in
  within one frame), and pending marks resolve False.
- The buffer is bounded (``max_seconds``); ``enqueue`` returns how much it accepted.
"""

from __future__ import annotations

import asyncio
import collections
import fractions
import time

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

RATE = 48_000
FRAME_SAMPLES = 960  # 20 ms
FRAME_SECONDS = FRAME_SAMPLES / RATE
INPUT_RATES = (8_000, 16_000, 24_000, 48_000)
TIME_BASE = fractions.Fraction(1, RATE)


class PlaybackTrack(MediaStreamTrack):
    kind = "audio"

    def __init__(self, max_seconds: float = 60.0) -> None:
        super().__init__()
        self.capacity = int(max_seconds * RATE)
        self._ring = np.zeros(self.capacity, dtype=np.int16)
        #: Absolute sample counts: what has been queued, and what has been played.
        self._written = 0
        self._played = 0
        self._marks: collections.deque[tuple[int, str, asyncio.Future[bool]]] = collections.deque()
        self._resamplers: dict[int, av.AudioResampler] = {}
        self._frame = np.zeros(FRAME_SAMPLES, dtype=np.int16)
        self._start: float | None = None
        self._pts = 0

    # -- control --------------------------------------------------------------------------

    @property
    def queued_samples(self) -> int:
        return self._written - self._played

    @property
    def queued_seconds(self) -> float:
        return self.queued_samples / RATE

    @property
    def playing(self) -> bool:
        """Is bot audio queued (what barge-in interrupts)?"""
        return self._written > self._played

    def enqueue(self, pcm: bytes, sample_rate: int = 16_000) -> int:
        """Queue PCM16 mono; returns how many input bytes were accepted (all, unless full)."""
        if sample_rate not in INPUT_RATES:
            raise ValueError(f"sample_rate must be one of {INPUT_RATES}")
        samples = np.frombuffer(pcm, dtype=np.int16, count=len(pcm) // 2)
        if sample_rate != RATE:
            samples = self._resample(samples, sample_rate)
        room = self.capacity - self.queued_samples
        if len(samples) > room:
            accepted_in = (room * sample_rate // RATE) * 2
            samples = samples[:room]
        else:
            accepted_in = len(pcm) - len(pcm) % 2
        self._write(samples)
        return accepted_in

    def mark(self, name: str) -> asyncio.Future[bool]:
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if not self.playing:
            future.set_result(True)
        else:
            self._marks.append((self._written, name, future))
        return future

    def clear(self) -> list[str]:
        """Drop all queued audio; returns the names of the marks that will not be reached."""
        self._played = self._written
        self._resamplers.clear()  # their buffered tails belong to the dropped audio
        cleared = []
        while self._marks:
            _, name, future = self._marks.popleft()
            cleared.append(name)
            if not future.done():
                future.set_result(False)
        return cleared

    # -- the track --------------------------------------------------------------------------

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        now = time.monotonic()
        if self._start is None:
            self._start = now
        else:
            due = self._start + self._pts / RATE
            if due > now:
                await asyncio.sleep(due - now)
        frame = av.AudioFrame(format="s16", layout="mono", samples=FRAME_SAMPLES)
        self._read_into(self._frame)
        frame.planes[0].update(self._frame.tobytes())
        frame.sample_rate = RATE
        frame.pts = self._pts
        frame.time_base = TIME_BASE
        self._pts += FRAME_SAMPLES
        self._resolve_marks()
        return frame

    def stop(self) -> None:
        self.clear()
        super().stop()

    # -- internals ------------------------------------------------------------------------

    def _resample(self, samples: np.ndarray, sample_rate: int) -> np.ndarray:
        resampler = self._resamplers.get(sample_rate)
        if resampler is None:
            resampler = self._resamplers[sample_rate] = av.AudioResampler(format="s16", layout="mono", rate=RATE)
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
