"""Video forwarded as RTP, never decoded: the sans-I/O parts of the gateway's SFU path.

The gateway used to decode every received video stream and encode it again for each
receiver (about half a core per two-way 640x480 call). Now a received VP8 or H.264
packet goes to each receiver with its payload untouched, as a selective forwarding
unit does (mediasoup, LiveKit). What changes per receiver is the RTP header:

- ``Rewriter`` maps whichever source feeds an output onto one continuous outgoing
  stream: after a source switch (another agent takes over, a camera is renegotiated)
  the receiver sees sequence numbers and timestamps carry on, and the new source is
  only forwarded from the first packet of a keyframe, which a decoder can start from.
- ``vp8_keyframe`` / ``h264_keyframe`` say whether a packet begins a keyframe
  (RFC 7741 §4.2-4.3, RFC 6184 §5.6-5.8), from the first bytes of the payload.
- ``Gaps`` finds the packets a sender's stream is missing (what the gateway NACKs).
- ``Bitrates`` turns the bitrate each receiver can take (its REMB) into the one the
  sender is asked to keep: the lowest, sent when it drops or once a second.

The I/O around these (``media.inbound.InboundVideo``, ``media.outbound.DirectVideo``)
takes packets from and to aiortc's SRTP sessions and ICE sockets.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Hashable

#: Newest-first window over which sequence numbers compare (RFC 3550 arithmetic).
_HALF = 0x8000


def _newer(a: int, b: int) -> bool:
    """Is 16-bit sequence number ``a`` after ``b``?"""
    return a != b and ((a - b) & 0xFFFF) < _HALF


class VideoPacket:
    """One received video RTP packet, as forwarded: the payload and what the rewriter needs."""

    __slots__ = ("keyframe", "marker", "mime", "payload", "sequence", "source", "ssrc", "timestamp")

    def __init__(
        self,
        payload: bytes,
        *,
        sequence: int,
        timestamp: int,
        marker: bool,
        keyframe: bool,
        mime: str,
        ssrc: int,
        source: object = None,
    ) -> None:
        self.payload = payload
        self.sequence = sequence
        self.timestamp = timestamp
        #: The last packet of a picture (RTP marker bit).
        self.marker = marker
        #: The first packet of a keyframe: a decoder can start here.
        self.keyframe = keyframe
        #: "video/vp8" or "video/h264".
        self.mime = mime
        self.ssrc = ssrc
        #: What sent it (the ``InboundVideo``): a receiver's keyframe requests go there.
        self.source = source


def vp8_keyframe(payload: bytes) -> bool:
    """Does this VP8 RTP payload begin a keyframe? (descriptor RFC 7741 §4.2, header §4.3)."""
    if len(payload) < 1:
        return False
    first = payload[0]
    if not first & 0x10 or first & 0x07:  # S: start of a partition; PID 0: the first one
        return False
    i = 1
    if first & 0x80:  # X: the extension byte follows
        if len(payload) < 2:
            return False
        ext = payload[1]
        i = 2
        if ext & 0x80:  # I: picture id, 7 or 15 bits
            if len(payload) <= i:
                return False
            i += 2 if payload[i] & 0x80 else 1
        if ext & 0x40:  # L: TL0PICIDX
            i += 1
        if ext & 0x30:  # T or K: TID/Y/KEYIDX
            i += 1
    # The VP8 payload header: P (inverse keyframe flag) is the lowest bit of its first byte.
    return len(payload) > i and not payload[i] & 0x01


#: H.264 NAL unit types that begin a picture a decoder can start from: IDR slice, SPS.
_H264_START = (5, 7)


def h264_keyframe(payload: bytes) -> bool:
    """Does this H.264 RTP payload begin a keyframe (an SPS or IDR slice first)?"""
    if len(payload) < 2:
        return False
    kind = payload[0] & 0x1F
    if kind == 24:  # STAP-A: 16-bit sizes, each followed by a NAL unit
        i = 1
        while i + 2 < len(payload):
            size = int.from_bytes(payload[i : i + 2], "big")
            if size and payload[i + 2] & 0x1F in _H264_START:
                return True
            i += 2 + size
        return False
    if kind == 28:  # FU-A: the start fragment carries the NAL type
        return bool(payload[1] & 0x80) and payload[1] & 0x1F in _H264_START
    return kind in _H264_START


#: What says "this packet begins a keyframe", per forwardable codec.
KEYFRAME: dict[str, Callable[[bytes], bool]] = {"video/vp8": vp8_keyframe, "video/h264": h264_keyframe}


#: Packets after a switch's keyframe during which older ones of that stream are dropped.
BASE_WINDOW = 0x1000


class Rewriter:
    """One output's outgoing sequence numbers and timestamps across source switches (sans-I/O).

    A source stream is anything hashable (the gateway passes (source, SSRC)). The first
    packet of a new stream is forwarded only if it begins a keyframe; from it on,
    ``out = in + delta`` for both fields, so reordering and loss in the source stay
    visible to the receiver (it NACKs what is missing and the gateway can answer).
    Packets of the new stream from before that keyframe, and any of the old stream,
    are dropped.
    """

    def __init__(self, clock_rate: int = 90_000) -> None:
        self.clock_rate = clock_rate
        self._stream: Hashable | None = None
        self._synced = False
        self._seq_delta = 0
        self._ts_delta = 0
        #: The first source sequence number of the current stream that was forwarded
        #: (None once the stream is well past it).
        self._base: int | None = None
        #: The next outgoing sequence number and the newest outgoing timestamp and when.
        self.next_sequence = random.randrange(0x10000)
        self.last_timestamp = random.randrange(0x100000000)
        self._last_time = -math.inf
        #: Packets dropped while waiting for a keyframe.
        self.waiting = 0

    def rewrite(
        self, stream: Hashable, sequence: int, timestamp: int, keyframe: bool, now: float
    ) -> tuple[int, int] | None:
        """(outgoing sequence number, outgoing timestamp), or None: drop this packet."""
        if stream != self._stream:
            self._stream = stream
            self._synced = False
        if not self._synced:
            if not keyframe:
                self.waiting += 1
                return None
            # Carry on from the last packet sent: one sequence number on, and the
            # timestamp by the wall-clock time since (at least one tick).
            elapsed = 0 if self._last_time == -math.inf else max(1, int((now - self._last_time) * self.clock_rate))
            self._seq_delta = (self.next_sequence - sequence) & 0xFFFF
            self._ts_delta = (self.last_timestamp + elapsed - timestamp) & 0xFFFFFFFF
            self._base = sequence
            self._synced = True
        elif self._base is not None:
            if _newer(self._base, sequence):
                return None  # from before the keyframe this output started at
            if (sequence - self._base) & 0xFFFF > BASE_WINDOW:
                self._base = None  # nothing that old can still arrive; and the numbers will wrap
        out_seq = (sequence + self._seq_delta) & 0xFFFF
        out_ts = (timestamp + self._ts_delta) & 0xFFFFFFFF
        if not _newer(self.next_sequence, out_seq):  # the newest so far
            self.next_sequence = (out_seq + 1) & 0xFFFF
            self.last_timestamp = out_ts
            self._last_time = now
        return out_seq, out_ts


class Gaps:
    """Sequence numbers missing from one received stream (sans-I/O; what to NACK).

    As aiortc's ``NackGenerator``, bounded: gaps older than ``window`` packets are
    forgotten, and a jump of more than ``window`` (a sender restarting its numbering)
    is a new start, not thousands of losses.
    """

    def __init__(self, window: int = 256) -> None:
        self.window = window
        self.newest: int | None = None
        self.missing: set[int] = set()

    def add(self, sequence: int) -> bool:
        """Note a received packet; True if it revealed new gaps (a NACK is due)."""
        newest = self.newest
        if newest is None:
            self.newest = sequence
            return False
        ahead = (sequence - newest) & 0xFFFF
        if ahead == 0:
            return False
        if ahead >= _HALF:  # older: a late or retransmitted packet fills its gap
            self.missing.discard(sequence)
            return False
        self.newest = sequence
        if ahead > self.window:
            self.missing.clear()
            return False
        for lost in range(1, ahead):
            self.missing.add((newest + lost) & 0xFFFF)
        if self.missing:
            self.missing = {s for s in self.missing if (sequence - s) & 0xFFFF <= self.window}
        return ahead > 1


class Bitrates:
    """The bitrate a forwarded stream's sender should keep: the lowest its receivers take.

    Each receiver's REMB is noted with ``report``; it returns the value to send to the
    sender, or None when nothing needs saying (no drop of 10 % or more, and the last
    was sent under ``interval`` seconds ago). Reports older than ``stale`` seconds no
    longer count (a receiver that stopped reporting, or left without ``forget``).
    """

    def __init__(self, *, interval: float = 1.0, stale: float = 5.0) -> None:
        self.interval = interval
        self.stale = stale
        self._latest: dict[Hashable, tuple[int, float]] = {}
        self._sent = 0
        self._sent_at = -math.inf

    def report(self, receiver: Hashable, bitrate: int, now: float) -> int | None:
        self._latest[receiver] = (bitrate, now)
        fresh = [b for b, at in self._latest.values() if now - at < self.stale]
        target = min(fresh)
        if now - self._sent_at >= self.interval or target < 0.9 * self._sent:
            self._sent, self._sent_at = target, now
            return target
        return None

    def forget(self, receiver: Hashable) -> None:
        self._latest.pop(receiver, None)
