"""Load test: N voice-bot sessions against talkgate (or the plain-aiortc baseline).

Each simulated customer is an aiortc client that joins through the real signaling
protocol, negotiates audio and sends a real speech recording (espeak-ng utterances
with pauses, looped, each client starting at its own offset) as *pre-encoded* Opus
packets at real-time pace, so the generator spends nothing on encoding (and sends
them from one task for every customer, ``Pacer``, not through aiortc's sender). The target
dials a speech bot that runs in this process: a bot that counts and times what it
gets and, in the ``echo`` shape, echoes each segment back. What the client receives
is timed at the RTP level (received packets are decoded only to find where the echo
gets loud), so the generator stays cheap enough to drive a few hundred sessions from
one core.

Shapes (``--shape``):
  echo     the bot echoes each segment; the customer offers ``sendrecv`` (the default)
  listen   the bot never answers; the customer offers ``sendonly`` and declines (answers
           ``inactive``) any track the target offers later; the baseline runs with
           ``--no-playback``. Nothing is sent back: the listening job is measured
           (decode, resample, VAD, websocket to the bot). talkgate sets up a bot's voice
           whatever the bot does: it offers it in a second negotiation (declined) and
           its idle playback timer still ticks (a silent packet every 0.4 s, unsent)
  both     each of the above

``--bot-audio opus`` (echo): talkgate's bot answers in Opus packets (``audio.format``
``opus``), which talkgate sends on unencoded; the baseline's bot still answers in PCM.

The target runs in its own process, pinned to CPU 0 when the machine has two or more;
this process (generator and bot) is pinned to the others.

    python benchmarks/loadtest.py --sessions 100 --duration 20          # talkgate, then the baseline
    python benchmarks/loadtest.py --sessions 50 --target baseline --json
    python benchmarks/loadtest.py --shape both --sessions 50,100        # CPU per session, 8 runs
    python benchmarks/loadtest.py --target talkgate --sessions 100 --bot-audio opus

With several sessions counts or shapes, every (sessions, shape) cell runs each target
in turn, the order of the targets flipping from one cell to the next so that a noisy
neighbour hits each alike, and a last table gives CPU % per session side by side.

Figures (all measured in a window of ``--duration`` seconds after every session is up):
  setup        join sent → peer connection connected, median and p95
  cpu          target process CPU (utime+stime from /proc) in the window, % of one core, and per session
  rss          target resident memory above its idle size, per session
  loss         speech frames the bot should have got vs frames it got: for every segment the
               bot saw end in the window, the target's own segment times say how many 20 ms
               frames it spans (preroll + speech + hangover); missing frames are lost
  loop lag     the target's event-loop lag histogram (/metrics), p50 and p99 in the window
  speech end → speech.stopped   true end of an utterance as sent → the bot gets speech.stopped
  bot audio → client            the echo's first loud 20 ms is due → the client receives it
                                (echo only: None in the listen shape)
  client RTP   RTP packets the customers received, from setup to the window's end (all
               sessions; 0 when the target sends nothing back)
  audio path   (talkgate) RTP packet in → its PCM handed to the bot's socket, from /metrics
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fractions
import heapq
import itertools
import json
import os
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import numpy as np
import uvloop
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtp import RtpPacket
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

sys.path.insert(0, str(Path(__file__).parents[1]))  # the repository's tests/ helpers

from benchmarks.signaling import SECRET, pct
from gateway import tokens
from media import ice, opus
from media.outbound import DirectAudio
from media.playback import SILENCE_PEAK
from tests.gateway_process import RTC_LOOPBACK_ARGS, GatewayProcess, cpu_seconds
from tests.redis_server import RedisServer
from tests.speech import resample, utterances

TEXTS = ["I would like to book an appointment", "Tomorrow at nine please", "Yes that works for me"]
TIME_BASE = fractions.Fraction(1, 48_000)
#: The target's VAD settings (talkgate's defaults; the baseline uses the same).
PREROLL_MS, STOP_MS, FRAME_MS = 200, 500, 20
FRAME_BYTES = 16_000 * FRAME_MS // 1000 * 2  # PCM16 at the bot's 16 kHz
#: The CPUs this process may use when it starts: the target gets the first, the generator the rest.
ALL_CPUS = frozenset(os.sched_getaffinity(0))
LOOP_LAG = "talkgate_event_loop_lag_seconds"
#: ``--breakdown``: the sitecustomize put on the target's PYTHONPATH.
BREAKDOWN_DIR = Path(__file__).parent / "breakdown"
#: RMS (of the client's 48 kHz decode) at or above which a received packet is "loud".
LOUD = 300.0
#: Opus packets this small carry silence (or DTX); they are not decoded.
SILENT_PAYLOAD = 12
#: ``--shape``: the bot echoes each segment, or only listens (sends nothing back).
SHAPES = ("echo", "listen")


# -- the recording ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Recording:
    packets: list[bytes]  # Opus, 20 ms each, 48 kHz mono
    ends_ms: list[float]  # true end of each utterance within the loop
    loop_ms: int
    loud: list[bool]  # per packet: its 20 ms is loud (RMS >= LOUD)
    silent: list[bool]  # per packet: its 20 ms was digital silence before encoding

    @classmethod
    def build(cls) -> Recording:
        fixture = utterances(TEXTS, lead_s=1.0, gap_s=3.0, tail_s=3.0)
        pcm = resample(fixture.pcm, 16_000, 48_000)
        encoder = av.CodecContext.create("libopus", "w")
        assert isinstance(encoder, av.AudioCodecContext)
        encoder.sample_rate, encoder.layout, encoder.format = 48_000, "mono", "s16"
        encoder.bit_rate, encoder.time_base = 32_000, TIME_BASE
        encoder.options = {"application": "voip"}
        packets: list[bytes] = []
        for start in range(0, len(pcm) - 959, 960):
            frame = av.AudioFrame.from_ndarray(pcm[start : start + 960].reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = 48_000, start, TIME_BASE
            packets += [bytes(p) for p in encoder.encode(frame)]
        # Loud as a customer hears it: decoded as Customer._on_rtp decodes (the encoder's
        # onset may be quieter than the PCM it was given).
        decoder = opus.Decoder(48_000)
        loud = [is_loud(decoder, payload) for payload in packets]
        frames = pcm[: len(packets) * 960].reshape(-1, 960)
        silent = [bool(x) for x in np.abs(frames.astype(np.int32)).max(axis=1) <= SILENCE_PEAK]
        return cls(packets, [end for _, end in fixture.truth], len(packets) * FRAME_MS, loud, silent)


def is_loud(decoder: opus.Decoder, payload: bytes) -> bool:
    """Does this packet decode (at 48 kHz, libopus) to 20 ms whose RMS reaches ``LOUD``?"""
    samples = decoder.decode(payload)
    return len(samples) > 0 and float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))) >= LOUD


class ParkedTrack(MediaStreamTrack):
    """The customer's audio track as aiortc sees it: it negotiates the m-line, and the
    sender's task waits in ``recv`` for good; the ``Pacer`` sends the packets instead."""

    kind = "audio"

    async def recv(self) -> av.Packet[Any]:
        if self.readyState != "live":
            raise MediaStreamError
        await asyncio.get_running_loop().create_future()  # cancelled with the sender
        raise MediaStreamError


class Speech:
    """One customer's recording as a stream of packets, from ``offset`` on, each handed
    to ``send`` (the customer's ``DirectAudio.send``)."""

    def __init__(self, recording: Recording, offset: int, send: Callable[[av.Packet[Any]], None]) -> None:
        self.recording = recording
        self.offset = offset  # packet index the session starts at
        self.send = send
        self.sent = 0
        self.t0: float | None = None  # perf_counter() when packet 0 was due
        self.stopped = False

    def due(self) -> float:
        assert self.t0 is not None
        return self.t0 + self.sent * FRAME_MS / 1000

    def send_next(self) -> None:
        packets = self.recording.packets
        packet = av.Packet(packets[(self.offset + self.sent) % len(packets)])
        packet.pts = self.sent * 960  # 48 kHz RTP time (DirectAudio reads pts alone)
        self.send(packet)
        self.sent += 1


class Pacer:
    """Every customer's packets at real-time pace, sent from one task.

    Each customer's aiortc sender would wake its own task per 20 ms packet, await the
    track, build the packet and await four coroutines down to the socket: at 125
    sessions that was two thirds of the generator's CPU, and the generator, not the
    target, set the capacity found. Here one task wakes at most once a millisecond,
    sends every packet that is due (a late one goes out at once, as a late ``recv``
    would) through the gateway's own synchronous ``DirectAudio`` path (RTP header,
    negotiated extensions, SRTP, the ICE pair's socket), and sleeps until the next one
    is due. The target receives the same packets at the same pace.
    """

    #: The shortest sleep: uvloop counts timers in whole milliseconds.
    TICK = 0.001

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Speech]] = []
        self._count = itertools.count()
        self._added = asyncio.Event()

    def add(self, speech: Speech) -> None:
        """Start sending ``speech`` now (its customer is connected)."""
        speech.t0 = time.perf_counter()
        heapq.heappush(self._heap, (speech.t0, next(self._count), speech))
        self._added.set()

    async def run(self) -> None:
        heap = self._heap
        while True:
            if not heap:
                self._added.clear()
                await self._added.wait()
                continue
            now = time.perf_counter()
            while heap and heap[0][0] <= now:
                _, n, speech = heapq.heappop(heap)
                if speech.stopped:
                    continue
                speech.send_next()
                heapq.heappush(heap, (speech.due(), n, speech))
            if heap:
                await asyncio.sleep(max(heap[0][0] - now, self.TICK))


# -- the bot ------------------------------------------------------------------------------------


@dataclass
class Segment:
    started_t: int
    frames: int = 0
    stopped_t: int = 0
    stopped_at: float = 0.0  # perf_counter() when speech.stopped arrived


@dataclass
class BotConversation:
    segments: list[Segment] = field(default_factory=list)
    #: perf_counter() at which each echo's first loud 20 ms was due to play.
    loud_due: list[float] = field(default_factory=list)


class LoadBot:
    """A bot that records, per conversation, segments and echo timing; ``answer=False``
    never sends audio back (the listen shape), counting and timing the same.

    ``opus`` (``--bot-audio opus``): the bot answers as one with an Opus TTS would, one
    Opus packet per message (``audio.format`` ``opus``), passed through by talkgate. It
    has no CPU to spare for encoding, so each 20 ms of the segment is answered like for
    like from the customers' pre-encoded recording: a loud packet where the segment is
    loud, a quiet one where it is quiet, DTX (the TOC byte alone) where it is silence
    that talkgate's encoder would leave out. Same packets sent, same loud onsets."""

    def __init__(self, answer: bool = True, opus: Recording | None = None) -> None:
        self.answer = answer
        self.opus = opus
        if opus is not None:
            pools: tuple[list[bytes], list[bytes]] = ([], [])  # quiet, loud
            for packet, loud, silent in zip(opus.packets, opus.loud, opus.silent, strict=True):
                if not silent:
                    pools[loud].append(packet)
            self._pools = (itertools.cycle(pools[0]), itertools.cycle(pools[1]))
            self._dtx = bytes([opus.packets[0][0] & 0xFC])
        self.conversations: dict[str, BotConversation] = {}

    async def handle(self, ws: ServerConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self._serve(ws)

    async def _serve(self, ws: ServerConnection) -> None:
        conv: BotConversation | None = None
        segment: Segment | None = None
        audio: list[bytes] = []
        async for data in ws:
            if isinstance(data, bytes):
                if segment is not None:
                    segment.frames += len(data) // FRAME_BYTES  # one or more 20 ms frames (--bot-frame-ms)
                    if self.answer:
                        audio.append(data)
                continue
            message = json.loads(data)
            kind = message["type"]
            if kind == "start":
                conv = self.conversations.setdefault(message["conversation"], BotConversation())
                audio_format = {"encoding": "opus"} if self.opus else {"sample_rate": 16_000}
                await ws.send(json.dumps({"type": "audio.format", **audio_format}))
            elif kind == "speech.started" and conv is not None:
                segment, audio = Segment(message["t"]), []
            elif kind == "speech.stopped" and conv is not None and segment is not None:
                segment.stopped_t, segment.stopped_at = message["t"], time.perf_counter()
                conv.segments.append(segment)
                segment = None
                if not self.answer:
                    continue
                pcm = b"".join(audio)
                frames = np.frombuffer(pcm, dtype="<i2")[: len(pcm) // 640 * 320].reshape(-1, 320)
                loud = np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1)) >= LOUD
                if loud.any():
                    conv.loud_due.append(time.perf_counter() + int(np.argmax(loud)) * FRAME_MS / 1000)
                if self.opus is not None:
                    silent = np.abs(frames.astype(np.int32)).max(axis=1, initial=0) <= SILENCE_PEAK
                    for is_loud, is_silent in zip(loud, silent, strict=True):
                        await ws.send(self._dtx if is_silent else next(self._pools[int(is_loud)]))
                    continue
                for i in range(0, len(pcm), 3200):
                    await ws.send(pcm[i : i + 3200])
            elif kind == "stop":
                return


# -- a simulated customer ---------------------------------------------------------------------


class Customer:
    """Joins, offers audio, sends the recording; times the loud onsets of what it receives.

    ``receive=False`` (the listen shape): offers ``sendonly`` and answers any later
    offer of the target's with its new tracks ``inactive``, so the target is told
    that nothing it could send would be heard, rather than sending it unheard.
    """

    def __init__(
        self, index: int, url: str, recording: Recording, offset: int, pacer: Pacer, receive: bool = True
    ) -> None:
        self.index = index
        self.room = f"load-{index}"
        self.url = url
        self.receive = receive
        self.pc = RTCPeerConnection()
        self.pacer = pacer
        self.recording, self.offset = recording, offset
        self.speech: Speech | None = None
        self.ws: ClientConnection | None = None
        self.setup_s: float | None = None
        self.error: str | None = None
        self.packets_in = 0
        self.loud_onsets: list[float] = []
        self._last_loud = 0.0
        self._decoder = opus.Decoder(48_000)
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        t0 = time.perf_counter()
        try:
            self.ws = await connect(self.url, compression=None, open_timeout=30)
            token = tokens.issue(SECRET, identity=f"c{self.index}", role="customer", room=self.room, ttl=3600)
            await self.ws.send(json.dumps({"type": "join", "token": token}))
            await self._expect("joined")
            transceiver = self.pc.addTransceiver(ParkedTrack(), direction="sendrecv" if self.receive else "sendonly")
            self.speech = Speech(self.recording, self.offset, DirectAudio(transceiver.sender).send)
            self.pc.on("connectionstatechange", self._state)
            await self.pc.setLocalDescription(await self.pc.createOffer())
            await self.ws.send(json.dumps({"type": "offer", "sdp": self.pc.localDescription.sdp}))
            answer = await self._expect("answer")
            await self.pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
            self._count_rtp()
            async with asyncio.timeout(30):
                await self._connected.wait()
            self.setup_s = time.perf_counter() - t0
            self.pacer.add(self.speech)
            self._task = asyncio.create_task(self._drain())
        except (OSError, TimeoutError, ConnectionClosed, AssertionError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    async def _expect(self, mtype: str) -> dict[str, Any]:
        assert self.ws is not None
        async with asyncio.timeout(30):
            while True:
                message = json.loads(await self.ws.recv())
                if message["type"] == mtype:
                    return dict(message)
                if message["type"] == "error":
                    raise AssertionError(str(message))

    def _count_rtp(self) -> None:
        for transceiver in self.pc.getTransceivers():
            # Time packets as they arrive instead of jitter-buffering and decoding them all.
            transceiver.receiver._handle_rtp_packet = self._on_rtp  # type: ignore[method-assign]

    async def _drain(self) -> None:
        """Read signaling so the gateway never sees a slow consumer; answer its offers."""
        assert self.ws is not None
        with contextlib.suppress(ConnectionClosed):
            async for data in self.ws:
                message = json.loads(data)
                if message["type"] == "offer":
                    await self._answer(message["sdp"])

    async def _answer(self, sdp: str) -> None:
        """The target offers more (talkgate: the bot's voice on a track of its own, when
        the first answer could not carry it): receive it, or decline it when listening."""
        assert self.ws is not None
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp, "offer"))
        for transceiver in self.pc.getTransceivers():
            if transceiver.sender.track is None:  # one the target added
                transceiver.direction = "recvonly" if self.receive else "inactive"
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        self._count_rtp()
        await self.ws.send(json.dumps({"type": "answer", "sdp": self.pc.localDescription.sdp}))

    def _state(self) -> None:
        if self.pc.connectionState == "connected":
            self._connected.set()

    async def _on_rtp(self, packet: RtpPacket, arrival_time_ms: int) -> None:
        now = time.perf_counter()
        self.packets_in += 1
        if len(packet.payload) <= SILENT_PAYLOAD:
            return
        if is_loud(self._decoder, packet.payload):
            if now - self._last_loud > 0.1:
                self.loud_onsets.append(now)
            self._last_loud = now

    async def close(self) -> None:
        if self.speech is not None:
            self.speech.stopped = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.pc.close()
        if self.ws is not None:
            await self.ws.close()


# -- the target process ----------------------------------------------------------------------


class Target:
    """talkgate serve, or benchmarks/baseline.py, with the bot at ``bot_url``.

    Kinds: ``talkgate`` (one process, in-memory state), ``talkgate-redis`` (one cluster
    node, its live state in a throwaway Redis of its own), ``talkgate-wN`` (``serve
    --workers N`` on a Redis, ``--database none``: N nodes on one port), ``baseline``.
    One process is pinned to CPU 0; N workers may use every CPU (the generator keeps
    its own pinning: the kernel shares its core with them). In the listen shape the
    baseline runs with ``--no-playback`` (talkgate has no such switch: it is measured as
    it serves a bot that never speaks).
    """

    def __init__(self, kind: str, bot_url: str, shape: str = "echo", breakdown: str | None = None) -> None:
        self.kind = kind
        common = ["--port", "0", "--bot-url", bot_url, *RTC_LOOPBACK_ARGS]
        env = {"TALKGATE_SECRET": SECRET, "TALKGATE_LOG_LEVEL": "INFO"}
        if breakdown is not None:  # benchmarks/breakdown/sitecustomize.py times the packet path
            paths = [str(BREAKDOWN_DIR), *filter(None, [os.environ.get("PYTHONPATH")])]
            env |= {"PYTHONPATH": os.pathsep.join(paths), "TALKGATE_BREAKDOWN_FILE": breakdown}
        workers = re.fullmatch(r"talkgate-w(\d+)", kind)
        self.workers = int(workers.group(1)) if workers else 0
        self.redis = RedisServer.start() if kind == "talkgate-redis" or self.workers else None
        if self.redis is not None:
            common += ["--redis", self.redis.url()]
        if self.workers:
            common += ["--workers", str(self.workers), "--database", "none", "--node-id", "bench"]
        if kind.startswith("talkgate"):
            self.process = GatewayProcess("serve", "--rate", "1000", "--burst", "1000", *common, env=env, drain=True)
        else:
            baseline = str(Path(__file__).with_name("baseline.py"))
            if shape == "listen":
                common.append("--no-playback")
            self.process = GatewayProcess(*common, env=env, command=[sys.executable, baseline], drain=True)
        self.pid = self.process.proc.pid
        #: Each process's own /metrics: the target's URL, or each worker's node URL.
        self.metrics_urls = {"": self.process.url}
        self.node_pids: dict[str, int] = {}
        if self.workers > 1:
            self.metrics_urls = self._node_urls()
            self.node_pids = self._node_pids()
            for pid in self.pids():  # they inherited the generator's pinning
                os.sched_setaffinity(pid, ALL_CPUS)
        elif len(ALL_CPUS) >= 2:
            os.sched_setaffinity(self.pid, {min(ALL_CPUS)})

    def _node_urls(self) -> dict[str, str]:
        """Each worker's own /metrics, from ``talkgate cluster status --json``."""
        assert self.redis is not None
        deadline = time.monotonic() + 10
        while True:
            out = subprocess.run(
                [sys.executable, "-m", "gateway", "cluster", "status", "--json", "--redis", self.redis.url()],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            nodes = {n["id"]: n["node_url"] for n in map(json.loads, out.splitlines())}
            if len(nodes) == self.workers or time.monotonic() > deadline:
                return nodes
            time.sleep(0.2)

    def _node_pids(self) -> dict[str, int]:
        """Each worker's pid, from the supervisor's "N workers: w1 pid P, …" line."""
        deadline = time.monotonic() + 10
        while True:
            found = re.findall(r"(w\d+) pid (\d+)", "".join(self.process.log_tail))
            if len(found) == self.workers or time.monotonic() > deadline:
                return {f"bench-{name}": int(pid) for name, pid in found}
            time.sleep(0.1)

    def cpu_by_node(self) -> dict[str, float]:
        """Each worker's CPU seconds so far (empty for one process)."""
        return {node: cpu_seconds(pid) for node, pid in self.node_pids.items()} if self.workers > 1 else {}

    def pids(self) -> list[int]:
        """The target's processes: the supervisor and its workers, or the one process."""
        with open(f"/proc/{self.pid}/task/{self.pid}/children") as f:
            return [self.pid, *map(int, f.read().split())]

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids()) if self.workers > 1 else self.process.cpu_seconds()

    def rss_bytes(self) -> int:
        total = 0
        for pid in self.pids() if self.workers > 1 else [self.pid]:
            with open(f"/proc/{pid}/status") as f:
                match = re.search(r"VmRSS:\s+(\d+) kB", f.read())
            total += int(match.group(1)) * 1024 if match else 0
        return total

    def metrics(self) -> dict[str, dict[str, float]]:
        """Every sample of each process's /metrics, keyed by name{labels}, per node ("": the one)."""
        return {node: read_metrics(url) for node, url in self.metrics_urls.items()}

    def stop(self) -> None:
        self.process.stop(timeout=60)
        if self.redis is not None:
            self.redis.stop()


def read_metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def histogram_quantiles(before: dict[str, float], after: dict[str, float], name: str) -> dict[str, float] | None:
    """p50 and p99 (ms) of a Prometheus histogram over a window, as histogram_quantile() does."""
    buckets = []
    for key, value in after.items():
        match = re.fullmatch(rf'{name}_bucket\{{le="([^"]+)"\}}', key)
        if match:
            buckets.append((float(match.group(1)), value - before.get(key, 0.0)))
    buckets.sort()
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]

    def quantile(q: float) -> float:
        rank = q * total
        lower, below = 0.0, 0.0
        for bound, count in buckets:
            if count >= rank:
                if bound == float("inf"):
                    return lower
                inside = count - below
                return lower + (bound - lower) * ((rank - below) / inside if inside else 0)
            lower, below = bound, count
        return lower

    return {"p50_ms": round(quantile(0.5) * 1000, 3), "p99_ms": round(quantile(0.99) * 1000, 3), "count": total}


def worst(
    before: dict[str, dict[str, float]], after: dict[str, dict[str, float]], name: str
) -> dict[str, float] | None:
    """The quantiles of the process whose p99 is highest."""
    found = [q for node in after if (q := histogram_quantiles(before[node], after[node], name)) is not None]
    return max(found, key=lambda q: q["p99_ms"], default=None)


# -- one run -------------------------------------------------------------------------------------


def ms(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    return {
        "p50_ms": round(statistics.median(values) * 1000, 1),
        "p95_ms": round(pct(values, 0.95) * 1000, 1),
        "p99_ms": round(pct(values, 0.99) * 1000, 1),
    }


def top_functions(path: str, n: int = 10) -> list[tuple[str, float]]:
    """The functions with the most self time in py-spy's collapsed stacks, as % of samples."""
    own: dict[str, int] = {}
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            leaf = stack.rsplit(";", 1)[-1]
            own[leaf] = own.get(leaf, 0) + int(count)
            total += int(count)
    ranked = sorted(own.items(), key=lambda item: -item[1])[:n]
    return [(name, round(100 * count / max(1, total), 1)) for name, count in ranked]


def start_profiler(pid: int, seconds: float, path: str) -> subprocess.Popen[bytes]:
    """py-spy (pip install 'talkgate[bench]') sampling the target for the window."""
    # The venv's py-spy when the venv is not on PATH (``.venv/bin/python benchmarks/…``).
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    command = [spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200"]
    command += ["--format", "raw", "--output", path, "--nonblocking"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def run(
    kind: str,
    sessions: int,
    duration: float,
    ramp: float,
    recording: Recording,
    profile: str | None = None,
    shape: str = "echo",
    breakdown: bool = False,
    bot_audio: str = "pcm",
) -> dict[str, Any]:
    """``bot_audio`` ``opus``: the bot answers in Opus packets (talkgate targets only)."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}")
    if bot_audio == "opus" and not kind.startswith("talkgate"):
        raise ValueError("the baseline plays PCM only")
    echo = shape == "echo"
    bot = LoadBot(answer=echo, opus=recording if bot_audio == "opus" else None)
    timings = None
    if breakdown and kind in ("talkgate", "talkgate-redis"):  # one process (workers would share the file)
        handle, timings = tempfile.mkstemp(prefix="talkgate-breakdown-", suffix=".json")
        os.close(handle)  # empty until the target writes it
    async with serve(bot.handle, "127.0.0.1", 0, compression=None, max_size=2**22) as bot_server:
        bot_url = f"ws://127.0.0.1:{bot_server.sockets[0].getsockname()[1]}/"
        target = Target(kind, bot_url, shape, timings)
        pacer = Pacer()
        pacing = asyncio.create_task(pacer.run())
        try:
            await asyncio.sleep(0.5)
            idle_rss = target.rss_bytes()
            rng = random.Random(sessions)
            customers = [
                Customer(
                    i, target.process.ws_url, recording, rng.randrange(len(recording.packets)), pacer, receive=echo
                )
                for i in range(sessions)
            ]
            starts = []
            for i, customer in enumerate(customers):
                starts.append(asyncio.create_task(customer.start()))
                await asyncio.sleep(ramp / sessions if i < sessions - 1 else 0)
            await asyncio.gather(*starts)
            up = [c for c in customers if c.setup_s is not None]
            await asyncio.sleep(2.0)  # settle: first segments, the ramp's DTLS work done
            prefix = f"{profile}.{kind}" if shape == "echo" else f"{profile}.{kind}.{shape}"
            prefix += ".opus" if bot_audio == "opus" else ""
            profiler = start_profiler(target.pid, duration, f"{prefix}.txt") if profile else None
            metrics0, nodes0 = target.metrics(), target.cpu_by_node()
            cpu0, w0 = target.cpu_seconds(), time.perf_counter()
            own0 = os.times()
            timed0 = read_timings(timings)
            await asyncio.sleep(duration)
            cpu1, w1 = target.cpu_seconds(), time.perf_counter()
            metrics1, nodes1 = target.metrics(), target.cpu_by_node()
            own1 = os.times()
            timed1 = read_timings(timings)
            rss = target.rss_bytes()
            result = summarize(kind, shape, customers, up, bot, recording, (w0, w1), cpu1 - cpu0, metrics0, metrics1)
            result["bot_audio"] = bot_audio
            if nodes1:
                result["workers"] = [
                    {
                        "node": node,
                        "peer_connections": int(metrics1[node].get("talkgate_peer_connections", 0)),
                        "cpu_percent": round(100 * (nodes1[node] - nodes0[node]) / (w1 - w0), 1),
                        "loop_lag": histogram_quantiles(metrics0[node], metrics1[node], LOOP_LAG),
                    }
                    for node in sorted(nodes1)
                ]
            result["rss_per_session_kb"] = round((rss - idle_rss) / max(1, len(up)) / 1024, 1)
            own = own1.user + own1.system - own0.user - own0.system
            result["generator_cpu_percent"] = round(100 * own / (w1 - w0), 1)
            if timed0 and timed1:
                result["breakdown"] = per_packet(timed0, timed1)
            if profiler is not None:
                await asyncio.to_thread(profiler.wait)
                result["profile_top"] = top_functions(f"{prefix}.txt")
            await asyncio.gather(*(c.close() for c in customers))
        finally:
            pacing.cancel()
            # In a thread: the target closes its bot links on the way out, and this loop answers them.
            await asyncio.to_thread(target.stop)
            if timings is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(timings)
            with contextlib.suppress(asyncio.CancelledError):
                await pacing  # a pacer that failed fails the run: its figures would be of a load not sent
    return result


def breakdown_line(b: dict[str, Any]) -> str:
    parts = [f"{name} {b[name]['us']} µs (×{b[name]['calls']})" for name in b if isinstance(b[name], dict)]
    return f"CPU {b['cpu_us']} µs per packet: " + ", ".join(parts) + f"; outside the packet path {b['outside_us']} µs"


def read_timings(path: str | None) -> dict[str, Any] | None:
    """The target's running totals (benchmarks/breakdown/sitecustomize.py), if it wrote any."""
    if path is None:
        return None
    try:
        with open(path) as f:
            return dict(json.load(f))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def per_packet(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """µs per received RTP packet (the fast path's calls) for each timed function, the calls
    per packet, and the process's CPU per packet; ``outside`` is CPU not in the packet path
    (receiving datagrams, timers, RTCP, ICE: the event loop's own work)."""
    packets = after["in_path"][1] - before["in_path"][1]
    if packets <= 0:
        return {}
    out: dict[str, Any] = {"packets": packets, "cpu_us": round((after["cpu"] - before["cpu"]) / packets * 1e6, 1)}
    for name in after:
        if name != "cpu":
            seconds, calls = after[name][0] - before[name][0], after[name][1] - before[name][1]
            out[name] = {"us": round(seconds / packets * 1e6, 1), "calls": round(calls / packets, 2)}
    out["outside_us"] = round(out["cpu_us"] - out["in_path"]["us"], 1)
    return out


def summarize(
    kind: str,
    shape: str,
    customers: list[Customer],
    up: list[Customer],
    bot: LoadBot,
    recording: Recording,
    window: tuple[float, float],
    cpu: float,
    metrics0: dict[str, dict[str, float]],
    metrics1: dict[str, dict[str, float]],
) -> dict[str, Any]:
    """The run's figures; the loop lag and the audio path are the worst process's.

    Those of the echo (bot audio → client) are None in the listen shape: there is none."""
    w0, w1 = window
    expected = received = segments = 0
    stop_latency: list[float] = []
    echo_latency: list[float] = []
    for customer in up:
        conv = bot.conversations.get(customer.room)
        if conv is None:
            continue
        assert customer.speech is not None
        offset_ms = customer.offset * FRAME_MS
        t0 = customer.speech.t0 or 0.0
        for seg in conv.segments:
            if not w0 <= seg.stopped_at <= w1:
                continue
            segments += 1
            # The target's segment: preroll before the start, the hangover after the stop.
            expected += (seg.stopped_t + STOP_MS - (seg.started_t - PREROLL_MS)) // FRAME_MS
            received += seg.frames
            # Which utterance ended there: the nearest true end in the loop.
            position = (offset_ms + seg.stopped_t) % recording.loop_ms
            half = recording.loop_ms / 2
            delta = min((((position - end) + half) % recording.loop_ms - half for end in recording.ends_ms), key=abs)
            true_end_stream_ms = seg.stopped_t - delta
            stop_latency.append(seg.stopped_at - (t0 + true_end_stream_ms / 1000))
        for due in conv.loud_due:
            if not w0 <= due <= w1 - 1:
                continue
            heard = next((t for t in customer.loud_onsets if t >= due - 0.02), None)
            if heard is not None and heard - due < 1.0:
                echo_latency.append(heard - due)
    setups = [c.setup_s for c in up if c.setup_s is not None]
    seconds = w1 - w0
    echo = shape == "echo"
    result: dict[str, Any] = {
        "target": kind,
        "shape": shape,
        "sessions": len(customers),
        "established": len(up),
        "errors": sorted({c.error for c in customers if c.error})[:3],
        "setup": ms(setups),
        "window_s": round(seconds, 1),
        "cpu_percent": round(100 * cpu / seconds, 1),
        "cpu_percent_per_session": round(100 * cpu / seconds / max(1, len(up)), 3),
        "segments": segments,
        "frames_expected": expected,
        "frames_received": received,
        "loss_percent": round(100 * (1 - received / expected), 2) if expected else None,
        "loop_lag": worst(metrics0, metrics1, LOOP_LAG),
        "speech_end_to_stopped": ms(stop_latency),
        "bot_audio_to_client": ms(echo_latency) if echo else None,
        "echoes_timed": len(echo_latency) if echo else None,
        "client_rtp_packets": sum(c.packets_in for c in up),
    }
    path = worst(metrics0, metrics1, "talkgate_audio_rtp_to_bot_seconds")
    if path is not None:
        result["rtp_to_bot"] = path
    return result


# -- output --------------------------------------------------------------------------------------


def fmt(value: Any) -> str:
    return "-" if value is None else str(value)


def pair(figure: dict[str, Any] | None, low: str = "p50_ms", high: str = "p99_ms") -> str:
    """``low / high`` of a latency figure, "-" where it does not exist (no echo, no histogram)."""
    return "-" if figure is None else f"{fmt(figure[low])} / {fmt(figure[high])}"


def table(results: list[dict[str, Any]]) -> str:
    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("sessions established", lambda r: f"{r['established']}/{r['sessions']}"),
        ("setup p50 / p95 ms", lambda r: pair(r["setup"], high="p95_ms")),
        ("CPU % of a core", lambda r: fmt(r["cpu_percent"])),
        ("CPU % per session", lambda r: fmt(r["cpu_percent_per_session"])),
        ("RSS per session KiB", lambda r: fmt(r["rss_per_session_kb"])),
        ("generator CPU % (its own core)", lambda r: fmt(r["generator_cpu_percent"])),
        ("frames expected / received", lambda r: f"{r['frames_expected']} / {r['frames_received']}"),
        ("loss %", lambda r: fmt(r["loss_percent"])),
        ("loop lag p50 / p99 ms", lambda r: pair(r["loop_lag"])),
        ("speech end → stopped p50 / p99 ms", lambda r: pair(r["speech_end_to_stopped"])),
        ("bot audio → client p50 / p99 ms", lambda r: pair(r["bot_audio_to_client"])),
        ("RTP packets to clients", lambda r: fmt(r["client_rtp_packets"])),
        ("RTP in → PCM to bot p50 / p99 ms", lambda r: pair(r.get("rtp_to_bot"))),
    ]
    width = max(len(name) for name, _ in rows) + 2
    lines = [
        "".ljust(width) + "".join(r["target"].rjust(18) for r in results),
        "".ljust(width) + "".join(f"{r['shape']}, N={r['sessions']}".rjust(18) for r in results),
    ]
    for name, get in rows:
        lines.append(name.ljust(width) + "".join(get(r).rjust(18) for r in results))
    return "\n".join(lines)


def plan(sessions: list[int], shapes: list[str], kinds: list[str]) -> list[tuple[int, str, str]]:
    """Every run as (sessions, shape, target): each target once per (sessions, shape) cell.

    The targets' order flips from one cell to the next and the shapes' order from one
    sessions count to the next, so each target goes first as often as the other within
    a shape too: a noisy neighbour (or a machine warming up) hits them alike.
    """
    runs = []
    flip = False
    for j, n in enumerate(sessions):
        for shape in shapes if j % 2 == 0 else shapes[::-1]:
            runs += [(n, shape, kind) for kind in (kinds[::-1] if flip else kinds)]
            flip = not flip
    return runs


def per_session(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """CPU % of one core per session, one row per (sessions, shape), a column per target,
    and talkgate / baseline where both ran: the cost of a session side by side."""
    rows: dict[tuple[int, str], dict[str, Any]] = {}
    for r in results:
        row = rows.setdefault((r["sessions"], r["shape"]), {"sessions": r["sessions"], "shape": r["shape"]})
        row[r["target"]] = r["cpu_percent_per_session"]
    for row in rows.values():
        if row.get("talkgate") and row.get("baseline"):
            row["talkgate_to_baseline"] = round(row["talkgate"] / row["baseline"], 2)
    return sorted(rows.values(), key=lambda row: (row["sessions"], SHAPES.index(row["shape"])))


def per_session_table(rows: list[dict[str, Any]]) -> str:
    ratio = "talkgate_to_baseline"
    kinds = list(dict.fromkeys(key for row in rows for key in row if key not in ("sessions", "shape", ratio)))
    columns = [(kind, kind) for kind in kinds] + (
        [("talkgate/baseline", ratio)] if any(ratio in r for r in rows) else []
    )
    lines = [
        "CPU % of one core per session (target process, measured window)",
        f"{'sessions':>8}  {'shape':<7}" + "".join(f"{title:>20}" for title, _ in columns),
    ]
    for row in rows:
        cells = "".join(f"{fmt(row.get(key)):>20}" for _, key in columns)
        lines.append(f"{row['sessions']:>8}  {row['shape']:<7}{cells}")
    return "\n".join(lines)


def pin_generator() -> None:
    """Keep the generator off CPU 0 (the target's), and allow enough sockets."""
    if len(ALL_CPUS) >= 2:
        os.sched_setaffinity(0, ALL_CPUS - {min(ALL_CPUS)})
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    ice.use_host_addresses(["127.0.0.1"])
    recording = Recording.build()
    kinds = ["talkgate", "baseline"] if args.target == "both" else [args.target]
    shapes = list(SHAPES) if args.shape == "both" else [args.shape]
    results = []
    for n, shape, kind in plan(args.sessions, shapes, kinds):
        ramp = n / 25 if args.ramp is None else args.ramp
        bot_audio = args.bot_audio if kind.startswith("talkgate") else "pcm"
        results.append(
            await run(kind, n, args.duration, ramp, recording, args.profile, shape, args.breakdown, bot_audio)
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sessions",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[50],
        help="Sessions per run, or several: 50,100.",
    )
    parser.add_argument("--duration", type=float, default=20.0, help="Seconds measured once all sessions are up.")
    parser.add_argument("--ramp", type=float, default=None, help="Seconds over which sessions start (N/25).")
    parser.add_argument(
        "--target",
        choices=["talkgate", "talkgate-redis", "baseline", "both"],
        default="both",
        help="talkgate-redis: talkgate as a cluster node, its live state in a Redis of its own",
    )
    parser.add_argument(
        "--shape", choices=[*SHAPES, "both"], default="echo", help="echo: the bot answers; listen: it never does."
    )
    parser.add_argument(
        "--bot-audio",
        choices=["pcm", "opus"],
        default="pcm",
        help="echo: the bot answers in PCM (encoded by the target), or in Opus packets that talkgate passes"
        " through (an Opus TTS; the baseline, which has no passthrough, still gets PCM)",
    )
    parser.add_argument("--json", action="store_true", help="Print one JSON object as the last line.")
    parser.add_argument(
        "--profile", metavar="PREFIX", help="py-spy the target in the window: PREFIX.<target>[.listen].txt"
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="talkgate (one process): time its packet path per packet in the window (SRTP, decode, VAD, bot write)",
    )
    args = parser.parse_args()
    pin_generator()
    results = uvloop.run(main_async(args))
    out = sys.stderr if args.json else sys.stdout
    print(table(results), file=out)
    rows = per_session(results)
    if len(results) > 1:
        print("\n" + per_session_table(rows), file=out)
    for result in results:
        if result.get("breakdown"):
            where = f"{result['target']} {result['shape']} N={result['sessions']}"
            print(f"{where}: {breakdown_line(result['breakdown'])}", file=out)
        for name, share in result.get("profile_top", []):
            print(f"{result['target']:>10} {result['shape']:>6} {share:5.1f}%  {name}", file=out)
    if args.json:
        print(json.dumps({"sessions": args.sessions, "shape": args.shape, "results": results, "per_session": rows}))


if __name__ == "__main__":
    main()
