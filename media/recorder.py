"""Call recording: each received track written to a file as it was sent, never transcoded.

A ``TrackRecorder`` is one more subscriber of a source's relay, as an agent's output
is. ``push`` only appends the packet to a bounded queue (the call never waits for the
disk: a full queue drops its oldest packet, counted); the owner's task hands the queue
to a worker thread every ``FLUSH_SECONDS``, where PyAV muxes it:

- Opus audio into Ogg (``.ogg``): the packets as received, stamped in 48 kHz stream
  time, so a DTX gap is a gap in the file's timeline, not lost time;
- VP8 video into WebM (``.webm``): RTP payloads without their VP8 descriptors,
  reassembled into frames (``Vp8Frames``), stamped from the RTP timestamps; a frame
  with a missing packet is not written, nor anything after it until the next keyframe.
  H.264 is not recorded (WebM cannot hold it; counted in ``skipped``).

Each file starts at its first written sample; its wall-clock start (the arrival of the
track's first packet, moved on by the RTP time to the first sample written: a video
file waits for a keyframe) is in the name and in the timeline entry, which is how
separate tracks line up (as Twilio's track recordings do). A track is routed before
its first packet arrives (after ICE and DTLS), so the routing time would not do.
Muxing is done with the container's own libraries (libavformat), nothing is decoded
or encoded.
"""

from __future__ import annotations

import collections
import fractions
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
from aiortc.codecs.vpx import vp8_depayload

from .video import VideoPacket

log = logging.getLogger("talkgate.media.recorder")

#: How often queued packets are handed to the writer thread.
FLUSH_SECONDS = 0.5
#: Packets a recorder queues at most between flushes (drop-oldest): 20 s of audio,
#: about 10 s of 1 Mbit/s video. A disk slower than that loses packets, not the call.
QUEUE_PACKETS = 1000
OPUS_BASE = fractions.Fraction(1, 48_000)
VIDEO_BASE = fractions.Fraction(1, 90_000)


@dataclass(frozen=True, slots=True)
class Saved:
    """What a finished recording holds."""

    path: Path
    kind: str
    #: Wall-clock time of the file's first sample, Unix ms.
    started: int
    #: From its first packet to the end of its last, milliseconds.
    duration_ms: int
    size: int
    packets: int
    #: Packets lost to a full queue or a damaged frame (video).
    dropped: int


class Vp8Frames:
    """RTP payloads of one VP8 stream → whole frames (sans-I/O).

    ``add`` returns a finished frame (bytes, RTP timestamp, keyframe) at each marker
    bit. A gap in the sequence numbers spoils the frame it is in; after a spoiled
    frame, only a keyframe restarts the output (a decoder needs one).
    """

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._timestamp: int | None = None
        self._next: int | None = None
        self._keyframe = False
        self._broken = False
        self._waiting = True  # for a keyframe: at the start, and after a damaged frame
        self.damaged = 0

    def add(self, packet: VideoPacket) -> tuple[bytes, int, bool] | None:
        if self._next is not None and packet.sequence != self._next:
            self._broken = True
        self._next = (packet.sequence + 1) & 0xFFFF
        if packet.timestamp != self._timestamp:
            if self._parts:
                self._broken = True  # the previous frame never saw its marker
            self._parts, self._timestamp, self._keyframe = [], packet.timestamp, packet.keyframe
            self._broken = self._broken and not packet.keyframe
        try:
            self._parts.append(vp8_depayload(packet.payload))
        except ValueError:
            self._broken = True
        if not packet.marker:
            return None
        parts, self._parts = self._parts, []
        broken, self._broken = self._broken, False
        if broken:
            self.damaged += 1
            self._waiting = True
            return None
        if self._waiting and not self._keyframe:
            return None
        self._waiting = False
        return b"".join(parts), packet.timestamp, self._keyframe


def vp8_size(frame: bytes) -> tuple[int, int] | None:
    """A VP8 keyframe's width and height (RFC 6386 §9.1), None if it is not one."""
    if len(frame) < 10 or frame[0] & 0x01 or frame[3:6] != b"\x9d\x01\x2a":
        return None
    return int.from_bytes(frame[6:8], "little") & 0x3FFF, int.from_bytes(frame[8:10], "little") & 0x3FFF


def wall_ms() -> int:
    return int(time.time() * 1000)


class TrackRecorder:
    """One track into one file: a relay subscriber (``push`` queues) and a writer (``flush``
    and ``close`` run on a worker thread, called by the owner: ``gateway.recording``).

    ``name`` turns the file's wall-clock start (Unix ms) into its path; it is known when
    the first sample is written."""

    def __init__(self, name: Callable[[int], Path], kind: str, *, clock: Callable[[], int] = wall_ms) -> None:
        self._name = name
        self._clock = clock
        self.kind = kind
        self.path: Path | None = None
        self.started: int | None = None
        #: When the first packet was pushed (Unix ms) and its RTP timestamp.
        self._anchor: tuple[int, int] | None = None
        #: The relay feeding it (the Subscriber interface).
        self.relay: Any = None
        self._queue: collections.deque[Any] = collections.deque(maxlen=QUEUE_PACKETS)
        self.dropped = 0
        self.packets = 0
        self.skipped = 0
        self._container: Any = None
        self._stream: Any = None
        self._first: int | None = None
        self._last_end = 0
        self._frames = Vp8Frames()
        self._unwrap = _Unwrap()

    # -- the relay subscriber (on the event loop; never blocks) -------------------------

    def push(self, frame: Any) -> None:
        if self._anchor is None:
            stamp = frame.timestamp if isinstance(frame, VideoPacket) else getattr(frame, "pts", None)
            self._anchor = (self._clock(), stamp or 0)
        if len(self._queue) == QUEUE_PACKETS:
            self.dropped += 1
        self._queue.append(frame)

    def clear(self) -> None:
        pass  # a recording keeps what was said; barge-in clears only what is still to play

    def take(self) -> list[Any]:
        """What is queued (on the loop), for ``write`` on the worker thread."""
        batch = list(self._queue)
        self._queue.clear()
        return batch

    # -- the writer (on a worker thread) -------------------------------------------------

    def write(self, batch: list[Any]) -> None:
        for item in batch:
            if isinstance(item, VideoPacket):
                self._video(item)
            elif isinstance(item, av.Packet):
                self._audio(item)
            else:
                self.skipped += 1  # decoded audio (a G.711 caller): not recorded

    def close(self) -> Saved | None:
        """Finish the file; None if nothing was ever written (no file is left behind)."""
        if self._container is None or self.path is None or self.started is None:
            return None
        self._container.close()
        self._container = None
        first = self._first or 0
        base = OPUS_BASE if self.kind == "audio" else VIDEO_BASE
        duration_ms = int((self._last_end - first) * base * 1000)
        size = self.path.stat().st_size
        return Saved(self.path, self.kind, self.started, duration_ms, size, self.packets, self.dropped)

    def _open(self, timestamp: int, codec: str, **settings: Any) -> None:
        """Name the file from its first sample's RTP ``timestamp`` and open it."""
        rate = 48_000 if self.kind == "audio" else 90_000
        arrived, anchor = self._anchor or (self._clock(), timestamp)
        later = (timestamp - anchor) & 0xFFFFFFFF
        if later >= 0x80000000:  # a packet reordered before the first one pushed
            later -= 0x100000000
        self.started = arrived + later * 1000 // rate
        self.path = self._name(self.started)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(str(self.path), "w", format="ogg" if self.kind == "audio" else "webm")
        if codec == "libopus":
            stream = self._container.add_stream(codec, rate=48_000)
            stream.codec_context.layout = "mono"
        else:
            stream = self._container.add_stream(codec, rate=30)
            stream.width, stream.height = settings["width"], settings["height"]
            stream.time_base = VIDEO_BASE
        self._stream = stream

    def _audio(self, packet: av.Packet[Any]) -> None:
        pts = packet.pts or 0
        if self._container is None:
            self._open(pts, "libopus")
        if self._first is None:
            self._first = pts
        out = av.Packet(bytes(packet))
        out.pts = out.dts = pts - self._first
        out.time_base = OPUS_BASE
        out.stream = self._stream
        self._container.mux(out)
        self.packets += 1
        self._last_end = pts + 960

    def _video(self, packet: VideoPacket) -> None:
        if packet.mime != "video/vp8":
            self.skipped += 1
            return
        done = self._frames.add(packet)
        if done is None:
            return
        frame, timestamp, keyframe = done
        if self._container is None:
            size = vp8_size(frame)
            if size is None:
                return
            self._open(timestamp, "libvpx", width=size[0], height=size[1])
        ts = self._unwrap(timestamp)
        if self._first is None:
            self._first = ts
        out = av.Packet(frame)
        out.pts = out.dts = ts - self._first
        out.time_base = VIDEO_BASE
        out.is_keyframe = keyframe
        out.stream = self._stream
        self._container.mux(out)
        self.packets += 1
        self._last_end = ts + 3000  # one frame at 30 fps: the last picture is shown that long


class _Unwrap:
    """32-bit RTP timestamps → a monotonic count (a wrap every 13 hours at 90 kHz)."""

    def __init__(self) -> None:
        self._last: int | None = None
        self._offset = 0

    def __call__(self, timestamp: int) -> int:
        if self._last is not None and timestamp < self._last and self._last - timestamp > 0x80000000:
            self._offset += 0x100000000
        self._last = timestamp
        return timestamp + self._offset
