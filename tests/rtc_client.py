"""A real aiortc client for tests: joins over signaling, sends tones or pictures, measures what it gets."""

from __future__ import annotations

import asyncio
import fractions
import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError, MediaStreamTrack, VideoStreamTrack
from av import AudioFrame, VideoFrame

from tests.client import TIMEOUT, Client

RATE = 48_000
#: RMS above which a received frame counts as sound (for latency measurements).
LOUD = 300.0


class PacedAudioTrack(AudioStreamTrack):
    """20 ms mono s16 frames in real time, paced from the track's own sample count."""

    def __init__(self, rate: int) -> None:
        super().__init__()
        self.rate = rate
        self.samples = rate // 50
        self._n = 0
        self._t0: float | None = None
        self._started = asyncio.Event()

    async def started(self) -> float:
        """time.monotonic() at which the first frame was sent (sample k goes at t0 + k/rate)."""
        await self._started.wait()
        assert self._t0 is not None
        return self._t0

    def next_samples(self, n: int, count: int) -> np.ndarray:
        """The int16 samples n .. n+count-1."""
        raise NotImplementedError

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        now = time.monotonic()
        if self._t0 is None:
            self._t0 = now
            self._started.set()
        else:
            await asyncio.sleep(self._t0 + self._n / self.rate - now)
        samples = self.next_samples(self._n, self.samples)
        frame = AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self.rate
        frame.pts = self._n
        frame.time_base = fractions.Fraction(1, self.rate)
        self._n += self.samples
        return frame


class ToneTrack(PacedAudioTrack):
    """A sine tone."""

    def __init__(self, frequency: float, amplitude: int = 8000) -> None:
        super().__init__(RATE)
        self.frequency = frequency
        self.amplitude = amplitude

    def next_samples(self, n: int, count: int) -> np.ndarray:
        t = (np.arange(count) + n) / self.rate
        return (self.amplitude * np.sin(2 * np.pi * self.frequency * t)).astype(np.int16)


class SpeechTrack(PacedAudioTrack):
    """Plays a 16 kHz int16 recording once, then silence."""

    def __init__(self, pcm: np.ndarray, rate: int = 16_000) -> None:
        super().__init__(rate)
        self.pcm = pcm

    def next_samples(self, n: int, count: int) -> np.ndarray:
        chunk = self.pcm[n : n + count]
        if len(chunk) < count:
            chunk = np.concatenate([chunk, np.zeros(count - len(chunk), np.int16)])
        return chunk


class PatternTrack(VideoStreamTrack):
    """A small moving test picture (cheap to encode)."""

    def __init__(self, width: int = 160, height: int = 120) -> None:
        super().__init__()
        self.width, self.height = width, height
        self._i = 0

    async def recv(self) -> VideoFrame:
        pts, time_base = await self.next_timestamp()
        image = np.zeros((self.height, self.width, 3), dtype=np.uint8)
        image[:, (self._i * 4) % self.width :] = (40, 160, 220)
        self._i += 1
        frame = VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts, frame.time_base = pts, time_base
        return frame


@dataclass
class Received:
    """What arrived on one remote track."""

    kind: str
    frames: int = 0
    energy: float = 0.0  # RMS of the latest audio frames
    samples: list[np.ndarray[Any, Any]] = field(default_factory=list)
    first: asyncio.Event = field(default_factory=asyncio.Event)
    #: perf_counter() of each frame whose RMS rose above LOUD after a quiet frame,
    #: and of each that fell below it after a loud one.
    loud_onsets: list[float] = field(default_factory=list)
    quiet_onsets: list[float] = field(default_factory=list)
    #: Set whenever an onset is recorded (cleared by whoever waits on it).
    onset: asyncio.Event = field(default_factory=asyncio.Event)

    def dominant_hz(self) -> float:
        data = np.concatenate(self.samples[-25:]).astype(np.float64)
        spectrum = np.abs(np.fft.rfft(data * np.hanning(len(data))))
        return float(np.fft.rfftfreq(len(data), 1 / RATE)[int(np.argmax(spectrum))])


class RtcClient:
    """Owns the signaling socket: answers gateway offers; everything else goes to ``events``."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.pc = RTCPeerConnection()
        self.received: list[Received] = []
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._answer: asyncio.Future[str] | None = None
        #: perf_counter() when the last offer was sent and its answer applied.
        self.offer_sent_at = 0.0
        self.answered_at = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self.pc.on("track", self._on_track)
        self._tasks.append(asyncio.create_task(self._pump()))

    async def _pump(self) -> None:
        while True:
            message = json.loads(await self.client.ws.recv())
            if message["type"] == "answer" and self._answer is not None and not self._answer.done():
                self._answer.set_result(message["sdp"])
            elif message["type"] == "offer":
                await self.pc.setRemoteDescription(RTCSessionDescription(message["sdp"], "offer"))
                await self.pc.setLocalDescription(await self.pc.createAnswer())
                await self.client.send({"type": "answer", "sdp": self.pc.localDescription.sdp})
            else:
                await self.events.put(message)

    def _on_track(self, track: MediaStreamTrack) -> None:
        received = Received(track.kind)
        self.received.append(received)
        self._tasks.append(asyncio.create_task(self._consume(track, received)))

    async def _consume(self, track: MediaStreamTrack, received: Received) -> None:
        try:
            while True:
                frame = await track.recv()
                received.frames += 1
                if isinstance(frame, AudioFrame):
                    samples = frame.to_ndarray().reshape(-1)[::2]  # left channel of interleaved s16
                    was_quiet = received.energy < LOUD
                    received.energy = float(np.sqrt(np.mean(samples.astype(np.float64) ** 2)))
                    if was_quiet and received.energy >= LOUD:
                        received.loud_onsets.append(time.perf_counter())
                        received.onset.set()
                    elif not was_quiet and received.energy < LOUD:
                        received.quiet_onsets.append(time.perf_counter())
                        received.onset.set()
                    received.samples.append(samples)
                    del received.samples[:-50]
                received.first.set()
        except MediaStreamError:
            return

    async def negotiate(self, conversation: str | None = None) -> None:
        """Offer what the peer connection now has and apply the gateway's answer."""
        self._answer = asyncio.get_running_loop().create_future()
        await self.pc.setLocalDescription(await self.pc.createOffer())
        offer: dict[str, Any] = {"type": "offer", "sdp": self.pc.localDescription.sdp}
        if conversation is not None:
            offer["conversation"] = conversation
        await self.client.send(offer)
        self.offer_sent_at = time.perf_counter()
        sdp = await asyncio.wait_for(self._answer, TIMEOUT)
        self.answered_at = time.perf_counter()
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp, "answer"))

    async def wait_for(self, mtype: str, timeout: float = TIMEOUT, **fields: Any) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                message = await self.events.get()
                if message["type"] == mtype and all(message.get(k) == v for k, v in fields.items()):
                    return message

    async def hears(self, kind: str = "audio", frames: int = 25, timeout: float = 3.0) -> Received:
        """Wait until a remote track of this kind has delivered ``frames`` frames."""
        async with asyncio.timeout(timeout):
            while True:
                for received in self.received:
                    if received.kind == kind and received.frames >= frames:
                        return received
                await asyncio.sleep(0.05)

    def received_video_frames(self) -> int:
        """Pictures decoded so far, over every remote video track."""
        return sum(r.frames for r in self.received if r.kind == "video")

    async def hears_tone(self, hz: float, timeout: float = 5.0) -> Received:
        """Wait until some remote audio track's recent sound is dominated by ``hz``."""
        async with asyncio.timeout(timeout):
            while True:
                for received in self.received:
                    if (
                        received.kind == "audio"
                        and len(received.samples) >= 25
                        and abs(received.dominant_hz() - hz) < 30
                    ):
                        return received
                await asyncio.sleep(0.05)

    async def renew(self) -> None:
        """A fresh peer connection for the next call (after a hangup); signaling goes on."""
        await self.pc.close()
        self.pc = RTCPeerConnection()
        self.pc.on("track", self._on_track)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.pc.close()
        await self.client.close()
