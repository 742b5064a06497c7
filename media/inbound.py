"""Inbound Opus audio without aiortc's jitter buffer and decoder thread.

aiortc hands every received audio packet to a jitter buffer that holds four packets
(80 ms) before releasing any, then to a decoder *thread* per track, which decodes at
48 kHz stereo and passes each frame back to the event loop with
``call_soon_threadsafe``. At a hundred sessions those threads fight the event loop
for the GIL (a quarter of the gateway's samples were in ``Condition.wait/notify``
under py-spy) and the loop lags by hundreds of milliseconds.

``InboundAudio`` takes over one ``RTCRtpReceiver``'s packet handler. Each Opus
packet is put in order by a small ``ReorderBuffer`` (it waits for a missing packet
only while at most ``depth`` later ones have arrived: no delay at all when packets
come in order, as they do on a LAN) and handed *encoded*, as an ``av.Packet``
stamped with its stream time, to a callback: the relay, whose subscribers forward it
without re-encoding (to agents) or decode it at the rate they need (the voice
pipeline decodes at 16 kHz). The receiver's RTCP statistics are kept, so receiver
reports stay true. Codecs other than Opus (G.711 from a SIP-ish client) still take
aiortc's own path and arrive as decoded frames.

Below the receiver, each datagram took a long way: aioice tries to parse it as STUN
(an exception for every RTP packet), queues it, and a DTLS-transport task wakes up to
take it off the queue. Two more adapters cut that:

- ``install_demux()`` makes aioice demultiplex by the first byte, as RFC 7983 says
  (0-3 STUN, 20-63 DTLS, 128-191 RTP/RTCP), so media is never parsed as STUN;
- ``FastRtp``, once an ``InboundAudio`` has seen its stream's SSRC, takes that
  SSRC's packets straight from the ICE connection: SRTP unprotect, parse, handle,
  in the datagram callback. Everything else (DTLS, RTCP, video, unknown SSRCs) still
  goes through aiortc's queue. (The DTLS transport's own byte counters miss these
  packets; the receiver's RTCP statistics do not.)

These reach into private state of aiortc and aioice (the receiver's codec table and
statistics, the DTLS transport's SRTP session and extension map, the connection's
``data_received``); ``tests/media/test_inbound.py`` and every call test pin the
behaviour against the installed versions.
"""

from __future__ import annotations

import fractions
import math
import struct
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar

import av
import pylibsrtp
from aioice.ice import StunProtocol
from aiortc import RTCDtlsTransport, RTCRtpReceiver
from aiortc.codecs import is_rtx
from aiortc.rtcrtpreceiver import StreamStatistics
from aiortc.rtp import (
    RTCP_PSFB_APP,
    RTCP_PSFB_PLI,
    RTCP_RTPFB_NACK,
    RtcpPsfbPacket,
    RtcpRtpfbPacket,
    RtpPacket,
    is_rtcp,
    pack_remb_fci,
)

from .outbound import transmit
from .video import KEYFRAME, Bitrates, Gaps, VideoPacket

T = TypeVar("T")
TIME_BASE = fractions.Fraction(1, 48_000)  # Opus's RTP clock, whatever the audio's rate


class ReorderBuffer(Generic[T]):
    """Puts items keyed by 16-bit RTP sequence numbers back in order (sans-I/O).

    In-order items come straight out. An item after a gap is held until the gap is
    filled or more than ``depth`` items wait; then the missing ones count as lost.
    Late items (older than what was already released) and duplicates are dropped.
    """

    def __init__(self, depth: int = 3) -> None:
        self.depth = depth
        self._next: int | None = None
        self._held: dict[int, T] = {}
        self.lost = 0
        self.late = 0

    def add(self, seq: int, item: T) -> list[T]:
        if self._next is None:
            self._next = seq
        ahead = (seq - self._next) & 0xFFFF
        if ahead >= 0x8000 or seq in self._held:
            self.late += 1
            return []
        if ahead == 0 and not self._held:
            self._next = (seq + 1) & 0xFFFF
            return [item]
        self._held[seq] = item
        out: list[T] = []
        self._release(out)
        if len(self._held) > self.depth:
            # Give up on the gap: skip to the oldest held item.
            oldest = min(self._held, key=lambda s: (s - self._next) & 0xFFFF)  # type: ignore[operator]
            self.lost += (oldest - self._next) & 0xFFFF
            self._next = oldest
            self._release(out)
        return out

    def take_in_order(self, seq: int) -> bool:
        """The usual case, without a list: ``seq`` is the next one and nothing is held, so
        it is taken (True, the caller uses its item at once). False: call ``add``."""
        if seq == self._next and not self._held:
            self._next = (seq + 1) & 0xFFFF
            return True
        return False

    def _release(self, out: list[T]) -> None:
        assert self._next is not None
        while self._next in self._held:
            out.append(self._held.pop(self._next))
            self._next = (self._next + 1) & 0xFFFF


def install_demux() -> None:
    """Make aioice pass non-STUN datagrams on without trying to parse them as STUN."""
    original = StunProtocol.datagram_received
    if getattr(original, "talkgate_demux", False):
        return

    def datagram_received(self: StunProtocol, data: bytes | str, addr: tuple[Any, ...]) -> None:
        if data and isinstance(data, bytes) and data[0] > 3:
            self.receiver.data_received(data, self.local_candidate.component)
        else:
            original(self, data, addr)

    datagram_received.talkgate_demux = True  # type: ignore[attr-defined]
    StunProtocol.datagram_received = datagram_received  # type: ignore[method-assign]


_HEADER = struct.Struct("!BBHII")


class RtpView:
    """The fields of an RTP packet the audio path reads, parsed without aiortc's
    header-extension decoding (RtpPacket.parse was 4 % of the gateway's CPU)."""

    __slots__ = ("marker", "payload", "payload_type", "sequence_number", "ssrc", "timestamp")

    def __init__(
        self, payload_type: int, sequence_number: int, timestamp: int, ssrc: int, payload: bytes, marker: int = 0
    ) -> None:
        self.marker = marker
        self.payload_type = payload_type
        self.sequence_number = sequence_number
        self.timestamp = timestamp
        self.ssrc = ssrc
        self.payload = payload


def parse_rtp(data: bytes) -> RtpView | None:
    """RFC 3550 §5.1: fixed header, CSRCs, one extension block, padding; None if malformed."""
    if len(data) < 12:
        return None
    first, second, seq, timestamp, ssrc = _HEADER.unpack_from(data)
    if first >> 6 != 2:
        return None
    start = 12 + (first & 0x0F) * 4
    if first & 0x10:
        if len(data) < start + 4:
            return None
        start += 4 + int.from_bytes(data[start + 2 : start + 4], "big") * 4
    end = len(data) - (data[-1] if first & 0x20 else 0)
    if start > end:
        return None
    return RtpView(second & 0x7F, seq, timestamp, ssrc, data[start:end], second >> 7)


class Unprotect:
    """SRTP unprotect of one session for the per-packet path: libsrtp called on the
    session's own buffer. pylibsrtp's ``Session.unprotect`` allocates an ``int *`` and
    checks its argument on every call (1.8 µs a packet against 1.0 measured hot), and
    raises ``ValueError`` for a datagram over its 1500-byte buffer, which went up through
    the datagram callback to the event loop's exception handler: a logged traceback per
    such packet, as many as a sender cared to send. Here every refusal is a
    ``pylibsrtp.Error`` (the packet is dropped). Should pylibsrtp's internals change, the
    session's own method is used."""

    def __init__(self, session: pylibsrtp.Session) -> None:
        self.session = session
        self._call: Any = None
        self._capacity = 1500  # pylibsrtp's buffer: what its own method refuses beyond
        try:
            from pylibsrtp._binding import ffi, lib  # type: ignore[import-not-found]

            self._buffer: Any = session._buffer
            self._cdata = session._cdata
            self._srtp = session._srtp[0]
            self._length = ffi.new("int *")
            self._capacity = len(self._buffer)
            self._call = lib.srtp_unprotect
        except (AttributeError, ImportError, TypeError):  # pragma: no cover - another pylibsrtp
            self._call = None

    def __call__(self, data: bytes) -> bytes:
        n = len(data)
        if n > self._capacity:
            raise pylibsrtp.Error("packet is too long")
        if self._call is None:
            return self.session.unprotect(data)
        self._length[0] = n
        self._buffer[0:n] = data
        status = self._call(self._srtp, self._cdata, self._length)
        if status:
            raise pylibsrtp.Error(f"srtp_unprotect failed ({status})")
        return self._buffer[0 : self._length[0]]  # type: ignore[no-any-return]


Handler = Callable[["RtpPacket | RtpView", float], None]
#: SSRCs one transport routes past aiortc, at most: a peer sends a few audio streams,
#: a hostile one could send a new SSRC per packet. The oldest route goes first (its
#: packets take aiortc's path again, which re-adds it if it is still in use).
MAX_ROUTES = 16


class FastRtp:
    """Known SSRCs' RTP from one ICE connection straight to their handlers (see above)."""

    def __init__(self, dtls: RTCDtlsTransport) -> None:
        self.dtls = dtls
        self.routes: dict[int, Handler] = {}
        connection = dtls.transport._connection
        self._queue = connection.data_received
        connection.data_received = self.data_received  # type: ignore[method-assign]
        self.packets = 0
        self._unprotect: Unprotect | None = None

    @classmethod
    def of(cls, dtls: RTCDtlsTransport) -> FastRtp:
        fast: FastRtp | None = getattr(dtls, "_talkgate_fast_rtp", None)
        if fast is None:
            fast = cls(dtls)
            dtls._talkgate_fast_rtp = fast  # type: ignore[attr-defined]
        return fast

    def add_route(self, ssrc: int, handler: Handler) -> None:
        routes = self.routes
        if ssrc not in routes and len(routes) >= MAX_ROUTES:
            del routes[next(iter(routes))]
        routes[ssrc] = handler

    def data_received(self, data: bytes, component: int) -> None:
        if 127 < data[0] < 192 and len(data) >= 12 and not is_rtcp(data):
            handler = self.routes.get(int.from_bytes(data[8:12], "big"))
            srtp = self.dtls._rx_srtp
            if handler is not None and srtp is not None:
                arrived = time.perf_counter()
                unprotect = self._unprotect
                if unprotect is None or unprotect.session is not srtp:
                    unprotect = self._unprotect = Unprotect(srtp)
                try:
                    packet = parse_rtp(unprotect(data))
                except pylibsrtp.Error:
                    return  # what aiortc does with a packet it cannot unprotect
                if packet is None:
                    return
                self.packets += 1
                handler(packet, arrived)
                return
        self._queue(data, component)


def receiver_codecs(receiver: RTCRtpReceiver) -> dict[int, Any]:
    """The receiver's negotiated codecs by payload type (aiortc keeps them private)."""
    codecs: dict[int, Any] = receiver._RTCRtpReceiver__codecs  # type: ignore[attr-defined]
    return codecs


def count_received(receiver: RTCRtpReceiver, packet: RtpPacket | RtpView, clock_rate: int) -> None:
    """Add a packet to the receiver's statistics: what its RTCP receiver reports are made of."""
    streams: dict[int, StreamStatistics] = receiver._RTCRtpReceiver__remote_streams  # type: ignore[attr-defined]
    stats = streams.get(packet.ssrc)
    if stats is None:
        stats = streams[packet.ssrc] = StreamStatistics(clock_rate)
    stats.add(packet)  # type: ignore[arg-type]


class InboundAudio:
    """Owns one audio receiver's packet path: in order, stamped, to ``deliver``."""

    def __init__(
        self, receiver: RTCRtpReceiver, deliver: Callable[[av.Packet[Any], float], None], depth: int = 3
    ) -> None:
        self.receiver = receiver
        self.deliver = deliver
        self.reorder: ReorderBuffer[RtpPacket | RtpView] = ReorderBuffer(depth)
        self._aiortc_handler: Callable[[RtpPacket, int], Awaitable[None]] = receiver._handle_rtp_packet
        self._opus: Any = None  # the receiver's Opus codec, once a packet has shown it
        self._origin: int | None = None  # RTP timestamp of the first packet (stream time 0)
        self._last = 0
        self._wraps = 0
        self.packets = 0
        receiver._handle_rtp_packet = self._handle  # type: ignore[method-assign]

    def _codec(self, payload_type: int) -> Any:
        return receiver_codecs(self.receiver).get(payload_type)

    async def _handle(self, packet: RtpPacket, arrival_time_ms: int) -> None:
        """aiortc's path: the first packets, until the SSRC is known to ``FastRtp``."""
        codec = self._codec(packet.payload_type)
        if codec is None or codec.mimeType.lower() != "audio/opus":
            await self._aiortc_handler(packet, arrival_time_ms)
            return
        FastRtp.of(self.receiver.transport).add_route(packet.ssrc, self.handle)
        self.handle(packet, time.perf_counter())

    def handle(self, packet: RtpPacket | RtpView, arrived: float) -> None:
        """One packet, per 20 ms per stream: kept lean (each call and object here is paid
        5,000 times a second at a hundred sessions; benchmarks/pipeline.py measures it)."""
        receiver = self.receiver
        if not receiver._enabled:
            return
        codec = self._codec(packet.payload_type)
        if codec is not self._opus:
            if codec is None or codec.mimeType.lower() != "audio/opus":
                # The stream changed codec: from the next packet on, aiortc's path decides.
                FastRtp.of(receiver.transport).routes.pop(packet.ssrc, None)
                return
            self._opus = codec  # the codec object checked last: most packets skip the check
        count_received(receiver, packet, codec.clockRate)
        if self.reorder.take_in_order(packet.sequence_number):
            self._deliver(packet, arrived)
            return
        for ordered in self.reorder.add(packet.sequence_number, packet):
            self._deliver(ordered, arrived)

    def _deliver(self, packet: RtpPacket | RtpView, arrived: float) -> None:
        self.packets += 1
        encoded = av.Packet(packet.payload)
        encoded.pts = self._stream_time(packet.timestamp)
        encoded.time_base = TIME_BASE
        self.deliver(encoded, arrived)

    def _stream_time(self, timestamp: int) -> int:
        """RTP timestamp → samples since the first packet (48 kHz), across 32-bit wraps."""
        if self._origin is None:
            self._origin = self._last = timestamp
        elif timestamp < self._last and self._last - timestamp > 0x80000000:
            self._wraps += 1
        elif timestamp > self._last and timestamp - self._last > 0x80000000:
            return timestamp - self._origin + (self._wraps - 1) * 0x100000000  # a late one from before the wrap
        self._last = timestamp
        return timestamp - self._origin + self._wraps * 0x100000000


#: Keyframe requests (PLI) to one sender, at most one per this many seconds: a new
#: receiver, a switch and each receiver's own PLI all ask, and one keyframe answers all.
KEYFRAME_INTERVAL = 0.3


class InboundVideo:
    """Owns one video receiver's packet path: packets forwarded encoded, never decoded.

    Each VP8 or H.264 packet (RTX unwrapped) goes to ``deliver`` as a
    ``media.video.VideoPacket``; aiortc's jitter buffer and decoder thread get nothing.
    What a receiving endpoint would send the sender is sent from here: NACKs for gaps
    in the sequence numbers, PLIs when a receiver needs a keyframe (rate-limited), and
    the lowest bitrate the receivers reported (REMB). Receiver reports stay aiortc's,
    from the statistics kept here. Other video codecs are dropped (counted).
    """

    def __init__(self, receiver: RTCRtpReceiver, deliver: Callable[[VideoPacket, float], None]) -> None:
        self.receiver = receiver
        self.deliver = deliver
        self.gaps = Gaps()
        self.bitrates = Bitrates()
        self._media_ssrc = 0
        self._last_request = -math.inf
        #: Packets forwarded, and packets dropped: an unknown payload type, an RTX packet
        #: of an unknown stream, a codec that cannot be forwarded.
        self.packets = 0
        self.unsupported = 0
        receiver._handle_rtp_packet = self._handle  # type: ignore[method-assign]

    async def _handle(self, packet: RtpPacket, arrival_time_ms: int) -> None:
        """aiortc's path: each SSRC's first packet (media or RTX); the rest come from ``FastRtp``."""
        FastRtp.of(self.receiver.transport).add_route(packet.ssrc, self.handle)
        self.handle(packet, time.perf_counter())

    def handle(self, packet: RtpPacket | RtpView, arrived: float) -> None:
        receiver = self.receiver
        if not receiver._enabled:
            return
        codecs = receiver_codecs(receiver)
        codec = codecs.get(packet.payload_type)
        if codec is None:
            self.unsupported += 1
            return
        count_received(receiver, packet, codec.clockRate)
        ssrc, sequence, payload = packet.ssrc, packet.sequence_number, packet.payload
        if is_rtx(codec):
            rtx_ssrcs: dict[int, int] = receiver._RTCRtpReceiver__rtx_ssrc  # type: ignore[attr-defined]
            original = rtx_ssrcs.get(ssrc)
            codec = codecs.get(codec.parameters.get("apt"))
            if original is None or codec is None or len(payload) < 2:
                self.unsupported += 1
                return
            ssrc, sequence, payload = original, int.from_bytes(payload[:2], "big"), payload[2:]
        mime = codec.mimeType.lower()
        keyframe = KEYFRAME.get(mime)
        if keyframe is None:
            self.unsupported += 1
            return
        self._media_ssrc = ssrc
        if self.gaps.add(sequence):
            self._send_rtcp(
                RtcpRtpfbPacket(fmt=RTCP_RTPFB_NACK, ssrc=0, media_ssrc=ssrc, lost=sorted(self.gaps.missing))
            )
        self.packets += 1
        self.deliver(
            VideoPacket(
                payload,
                sequence=sequence,
                timestamp=packet.timestamp,
                marker=bool(packet.marker),
                keyframe=keyframe(payload),
                mime=mime,
                ssrc=ssrc,
                source=self,
            ),
            arrived,
        )

    def request_keyframe(self) -> None:
        """Ask the sender for a keyframe (PLI), at most once per ``KEYFRAME_INTERVAL``."""
        now = time.monotonic()
        if now - self._last_request < KEYFRAME_INTERVAL or not self._media_ssrc:
            return
        self._last_request = now
        self._send_rtcp(RtcpPsfbPacket(fmt=RTCP_PSFB_PLI, ssrc=0, media_ssrc=self._media_ssrc))

    def report_bitrate(self, receiver: Hashable, bitrate: int) -> None:
        """A receiver's REMB: the sender hears the lowest (see ``media.video.Bitrates``)."""
        target = self.bitrates.report(receiver, bitrate, time.monotonic())
        if target is not None and self._media_ssrc:
            fci = pack_remb_fci(target, [self._media_ssrc])
            self._send_rtcp(RtcpPsfbPacket(fmt=RTCP_PSFB_APP, ssrc=0, media_ssrc=0, fci=fci))

    def forget(self, receiver: Hashable) -> None:
        self.bitrates.forget(receiver)

    def _send_rtcp(self, packet: RtcpPsfbPacket | RtcpRtpfbPacket) -> None:
        ssrc = self.receiver._RTCRtpReceiver__rtcp_ssrc  # type: ignore[attr-defined]
        if ssrc is None:
            return
        packet.ssrc = ssrc
        transmit(self.receiver.transport, bytes(packet), rtcp=True)
