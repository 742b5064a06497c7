"""The baseline: the voice-bot job written the plain way, as aiortc's example server does it.

One ``RTCPeerConnection`` per client; a task per received track looping on
``track.recv()``; ``av.AudioResampler`` to 16 kHz mono; ``webrtcvad`` on 20 ms frames;
speech frames sent to the bot over a websocket (talkgate's native bot protocol, same
segmentation rules and defaults as talkgate: 60 ms start window, 200 ms preroll,
500 ms hangover); the bot's audio played back through an ``AudioStreamTrack``-style
track that sends silence when the bot is quiet. It speaks the signaling subset the
load test uses (``join`` → ``joined``, ``offer`` → ``answer``) with the same JWTs,
runs on uvloop like talkgate, and exposes the same event-loop lag histogram on
``/metrics``, so ``loadtest.py --target baseline`` measures both the same way.

With ``--no-playback`` it does the listening job alone: no reply track is added to the
peer connection (the answer is ``recvonly``: nothing is sent back, no 20 ms timer runs
for it) and bot audio is dropped, so ``loadtest.py --shape listen`` measures resample +
webrtcvad + the websocket to the bot, the plain-aiortc way.

It is a benchmark fixture, not a product: no chat, no agents, no reconnection.

    python benchmarks/baseline.py --port 0 --bot-url ws://127.0.0.1:8765/
    python benchmarks/baseline.py --port 0 --bot-url ws://127.0.0.1:8765/ --no-playback
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import fractions
import http
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import av
import jwt
import numpy as np
import uvloop
import webrtcvad
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

sys.path.insert(0, str(Path(__file__).parents[1]))

from gateway.metrics import LAG_BUCKETS, watch_loop_lag  # the same measurement as talkgate's
from media import ice

log = logging.getLogger("baseline")
FRAME = 640  # 20 ms of 16 kHz PCM16

registry = CollectorRegistry()
loop_lag = Histogram("talkgate_event_loop_lag_seconds", "Event-loop lag.", buckets=LAG_BUCKETS, registry=registry)


class BotAudioTrack(MediaStreamTrack):
    """Bot audio at 48 kHz, 20 ms per frame in real time; silence when there is none."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self.buffer = bytearray()
        self.resampler = av.AudioResampler(format="s16", layout="mono", rate=48_000)
        self._start: float | None = None
        self._pts = 0

    def play(self, pcm16k: bytes) -> None:
        frame = av.AudioFrame.from_ndarray(np.frombuffer(pcm16k, np.int16).reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = 16_000
        for out in self.resampler.resample(frame):
            self.buffer.extend(out.to_ndarray().tobytes())

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.time()
        else:
            wait = self._start + self._pts / 48_000 - time.time()
            await asyncio.sleep(wait)
        chunk = bytes(self.buffer[:1920]).ljust(1920, b"\0")
        del self.buffer[:1920]
        frame = av.AudioFrame.from_ndarray(np.frombuffer(chunk, np.int16).reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = 48_000, self._pts, fractions.Fraction(1, 48_000)
        self._pts += 960
        return frame


class Session:
    def __init__(self, ws: ServerConnection, args: argparse.Namespace) -> None:
        self.ws = ws
        self.args = args
        self.pc: RTCPeerConnection | None = None
        self.room = ""
        self.identity = ""
        self.bot: ClientConnection | None = None
        #: The reply track, unless ``--no-playback`` (then nothing is sent to the client).
        self.playback = BotAudioTrack() if args.playback else None
        self.tasks: list[asyncio.Task[None]] = []

    async def run(self) -> None:
        try:
            async for data in self.ws:
                message = json.loads(data)
                if message["type"] == "join":
                    claims = jwt.decode(message["token"], self.args.secret, algorithms=["HS256"])
                    self.room, self.identity = claims["room"], claims["sub"]
                    await self.ws.send(json.dumps({"type": "joined", "conversation": self.room}))
                elif message["type"] == "offer":
                    await self.offer(message["sdp"])
        except (ConnectionClosed, jwt.InvalidTokenError, KeyError, ValueError) as exc:
            log.info("session ended: %s", exc)
        finally:
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            if self.bot is not None:
                await self.bot.close()
            if self.pc is not None:
                await self.pc.close()

    async def offer(self, sdp: str) -> None:
        self.pc = pc = RTCPeerConnection()

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio":
                if self.playback is not None:
                    pc.addTrack(self.playback)
                self.tasks.append(asyncio.create_task(self.consume(track)))

        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        await self.ws.send(json.dumps({"type": "answer", "sdp": pc.localDescription.sdp}))

    async def connect_bot(self) -> ClientConnection:
        bot = await connect(self.args.bot_url, compression=None)
        start = {
            "type": "start",
            "conversation": self.room,
            "customer": {"identity": self.identity, "name": self.identity},
            "audio": {"encoding": "pcm_s16le", "sample_rate": 16_000, "channels": 1, "frame_ms": 20},
        }
        await bot.send(json.dumps(start))
        self.tasks.append(asyncio.create_task(self.read_bot(bot)))
        return bot

    async def read_bot(self, bot: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for data in bot:
                if isinstance(data, bytes) and self.playback is not None:
                    self.playback.play(data)

    async def consume(self, track: MediaStreamTrack) -> None:
        """Resample, cut into 20 ms frames, VAD, and stream speech segments to the bot."""
        self.bot = bot = await self.connect_bot()
        resampler = av.AudioResampler(format="s16", layout="mono", rate=16_000)
        vad = webrtcvad.Vad(3)
        pcm = bytearray()
        recent: collections.deque[tuple[int, bytes, bool]] = collections.deque(maxlen=14)
        speaking = False
        started = voiced_until = 0
        t = 0  # stream ms of the next 20 ms frame
        try:
            while True:
                frame = await track.recv()
                assert isinstance(frame, av.AudioFrame)
                for out in resampler.resample(frame):
                    pcm.extend(out.to_ndarray().tobytes())
                while len(pcm) >= FRAME:
                    chunk = bytes(pcm[:FRAME])
                    del pcm[:FRAME]
                    voiced = vad.is_speech(chunk, 16_000) and t >= 120  # the same warm-up as talkgate
                    if not speaking:
                        recent.append((t, chunk, voiced))
                        window = list(recent)[-3:]
                        if len(window) == 3 and sum(v for _, _, v in window) >= 3:
                            speaking = True
                            started = next(ft for ft, _, v in window if v)
                            voiced_until = t + 20
                            await bot.send(json.dumps({"type": "speech.started", "t": started}))
                            for ft, fpcm, _ in recent:
                                if ft >= started - 200:
                                    await bot.send(fpcm)
                            recent.clear()
                    else:
                        await bot.send(chunk)
                        if voiced:
                            voiced_until = t + 20
                        elif t + 20 - voiced_until >= 500:
                            speaking = False
                            duration = voiced_until - started
                            stopped = {"type": "speech.stopped", "t": voiced_until, "duration_ms": duration}
                            await bot.send(json.dumps(stopped))
                    t += 20
        except (MediaStreamError, ConnectionClosed):
            return


async def main(args: argparse.Namespace) -> None:
    ice.use_host_addresses([args.rtc_address])

    def routes(connection: ServerConnection, request: Request) -> Response | None:
        if request.path == "/metrics":
            body = generate_latest(registry)
            return Response(http.HTTPStatus.OK, "OK", Headers({"Content-Type": "text/plain"}), body)
        return None

    async def handle(ws: ServerConnection) -> None:
        await Session(ws, args).run()

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    lag = asyncio.create_task(watch_loop_lag(loop_lag))
    async with serve(handle, "127.0.0.1", args.port, process_request=routes, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        log.warning("baseline listening on http://127.0.0.1:%d", port)
        await stop.wait()
    lag.cancel()
    await asyncio.gather(lag, return_exceptions=True)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--bot-url", required=True)
    parser.add_argument("--secret", default=os.environ.get("TALKGATE_SECRET", ""))
    parser.add_argument("--rtc-address", default="127.0.0.1")
    parser.add_argument("--rtc-allow-network", default="", help="Accepted for the load test's command line.")
    parser.add_argument(
        "--no-playback",
        dest="playback",
        action="store_false",
        help="Add no reply track: listen only (the answer is recvonly; bot audio is dropped).",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    uvloop.run(main(args))


if __name__ == "__main__":
    cli()
