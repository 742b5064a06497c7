"""Outbound audio without the sender task: RTP sent from the stack that produced the packet.

aiortc's ``RTCRtpSender`` runs one task per sender that awaits ``track.recv()``,
builds the RTP packet and awaits four nested coroutines down to the UDP socket. For
audio that is already Opus (the customer's packets forwarded to an agent, the bot's
voice encoded by ``PlaybackTrack``) that costs a task wake-up, an ``Event`` and five
coroutine frames per 20 ms packet, about as much Python as the rest of the send path.
``DirectAudio`` takes over an audio sender once it is started with Opus: the
``OutputTrack`` hands each packet to ``send``, which numbers it, adds the negotiated
header extensions (laid out once by aiortc's ``HeaderExtensionsMap``; only the
abs-send-time bytes change), protects it with the DTLS
transport's SRTP session and writes it to the nominated ICE pair's socket, all
synchronously. The sender's own task stays parked in ``recv()`` (the output never
queues audio for it) and its RTCP task keeps sending reports: ``send`` keeps the
counters those reports are made of.

Not kept: aiortc's RTP history for NACK retransmissions (browsers do not NACK Opus)
and the DTLS transport's byte counters. Depends on aiortc 1.16's and aioice's
internals (the sender's private counters, ``_tx_srtp``, ``_nominated``); the tests
pin them with real peer connections.
"""

from __future__ import annotations

import logging
import random
import struct
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Protocol

from aiortc import RTCDtlsTransport, RTCRtpCodecParameters, RTCRtpSender
from aiortc.codecs import get_encoder, is_rtx
from aiortc.codecs.base import Encoder
from aiortc.rtcdtlstransport import State
from aiortc.rtcrtpparameters import RTCRtpSendParameters
from aiortc.rtp import (
    RTCP_PSFB_APP,
    RTCP_PSFB_FIR,
    RTCP_PSFB_PLI,
    RTCP_RTPFB_NACK,
    AnyRtcpPacket,
    HeaderExtensions,
    HeaderExtensionsMap,
    RtcpPsfbPacket,
    RtcpRtpfbPacket,
    unpack_remb_fci,
)
from av.frame import Frame
from av.packet import Packet

from .video import KEYFRAME, Rewriter, VideoPacket

log = logging.getLogger("talkgate.media.outbound")

_HEADER = struct.Struct("!BBHII")
_NTP_EPOCH_OFFSET = 2_208_988_800  # seconds from 1900-01-01 (NTP) to 1970-01-01 (Unix)


def ntp_now() -> int:
    """aiortc's ``current_ntp_time`` (64-bit NTP) from ``time.time_ns`` instead of datetimes."""
    seconds, nanoseconds = divmod(time.time_ns(), 1_000_000_000)
    return ((seconds + _NTP_EPOCH_OFFSET) << 32) | ((nanoseconds << 32) // 1_000_000_000)


class ExtensionLayout:
    """The header-extension block of this sender's packets, laid out once by aiortc.

    Only abs-send-time changes from packet to packet (the mid is fixed), so the block
    is aiortc's serialisation with a hole where those three bytes go.
    """

    def __init__(self, extensions_map: HeaderExtensionsMap, mid: str | None) -> None:
        blocks = []
        for probe in (0, 0xFFFFFF):
            values = HeaderExtensions()
            values.mid = mid
            values.abs_send_time = probe
            profile, value = extensions_map.set(values)
            blocks.append(struct.pack("!HH", profile, len(value) >> 2) + value if value else b"")
        zeros, ones = blocks
        #: The RTP header's first byte: version 2, and the X bit if there is a block.
        self.first = 0x90 if zeros else 0x80
        changed = [i for i, (a, b) in enumerate(zip(zeros, ones, strict=True)) if a != b]
        #: Byte offset of abs-send-time in the block (None: not negotiated).
        self.hole: int | None = changed[0] if changed else None
        self._before = zeros[: self.hole] if changed else zeros
        self._after = zeros[self.hole + 3 :] if self.hole is not None else b""

    def block(self, abs_send_time: int) -> bytes:
        if self.hole is None:
            return self._before
        return self._before + abs_send_time.to_bytes(3, "big") + self._after


def transmit(dtls: RTCDtlsTransport, plain: bytes, *, rtcp: bool = False) -> bool:
    """Protect one RTP (or RTCP) packet with the transport's SRTP session and send it to
    the nominated ICE pair, synchronously; False if the transport is not connected."""
    pair = dtls.transport._connection._nominated.get(1)
    if dtls._state is not State.CONNECTED or pair is None:
        return False
    srtp = dtls._tx_srtp
    data = srtp.protect_rtcp(plain) if rtcp else srtp.protect(plain)
    pair.protocol.transport.sendto(data, pair.remote_addr)  # StunProtocol.send_data, without the coroutine
    return True


class DirectSender:
    """What the direct audio and video paths share: the negotiated codec (learnt when
    aiortc starts the sender), the header-extension layout, and the sender-report
    counters kept as aiortc's own send loop keeps them."""

    #: The mime types this path sends (lower case); any other codec leaves the sender to aiortc.
    MIMES: tuple[str, ...] = ()

    def __init__(self, sender: RTCRtpSender) -> None:
        self.sender = sender
        #: The negotiated codec, once the sender has started (None: not yet).
        self.codec: RTCRtpCodecParameters | None = None
        #: Its RTX payload type, if RTX was negotiated for it.
        self.rtx_payload_type: int | None = None
        #: Does this path carry the sender's media? False: aiortc's task does (another codec).
        #: Decided once, when the codec is known (push() asks for every packet).
        self.active = True
        self._layout: ExtensionLayout | None = None
        #: Packets sent, and packets dropped because the sender or its transport was not ready.
        self.packets = 0
        self.dropped = 0
        original: Callable[[RTCRtpSendParameters], Awaitable[None]] = sender.send

        async def send(parameters: RTCRtpSendParameters) -> None:
            if self.codec is None and parameters.codecs:
                self.codec = codec = parameters.codecs[0]
                self.active = codec.mimeType.lower() in self.MIMES
                self.rtx_payload_type = next(
                    (
                        c.payloadType
                        for c in parameters.codecs
                        if is_rtx(c) and c.parameters.get("apt") == codec.payloadType
                    ),
                    None,
                )
            await original(parameters)

        sender.send = send  # type: ignore[method-assign]

    def ready(self) -> bool:
        """Can a packet go out (codec known, sender enabled)? Whether the transport is
        connected, ``transmit`` finds out when it sends (False: dropped)."""
        codec = self.codec
        return codec is not None and codec.payloadType is not None and self.sender._enabled

    def layout(self) -> ExtensionLayout:
        layout = self._layout
        if layout is None:
            sender = self.sender
            layout = self._layout = ExtensionLayout(
                sender._RTCRtpSender__rtp_header_extensions_map,  # type: ignore[attr-defined]
                sender._RTCRtpSender__mid,  # type: ignore[attr-defined]
            )
        return layout

    def _write(
        self, second: int, sequence: int, timestamp: int, ssrc: int, payload: bytes, *, counted: bool = True
    ) -> None:
        """Send one RTP packet with this sender's extensions; ``counted``: a media packet
        (not a retransmission), which the sender reports count."""
        layout = self._layout or self.layout()
        sender = self.sender
        ntp = ntp_now()
        header = _HEADER.pack(layout.first, second, sequence, timestamp, ssrc)
        if not transmit(sender.transport, header + layout.block((ntp >> 14) & 0x00FFFFFF) + payload):
            self.dropped += 1
            return
        if counted:
            self.packets += 1
            # What the sender's RTCP task builds its sender reports from.
            sender._RTCRtpSender__ntp_timestamp = ntp  # type: ignore[attr-defined]
            sender._RTCRtpSender__rtp_timestamp = timestamp  # type: ignore[attr-defined]
            sender._RTCRtpSender__octet_count += len(payload)  # type: ignore[attr-defined]
            sender._RTCRtpSender__packet_count += 1  # type: ignore[attr-defined]


class DirectAudio(DirectSender):
    """One audio sender's RTP, sent from the caller's stack once it runs Opus."""

    MIMES = ("audio/opus",)

    def __init__(self, sender: RTCRtpSender) -> None:
        super().__init__(sender)
        self._sequence = random.randrange(0x10000)
        self._origin = random.randrange(0x100000000)
        self._encoder: Encoder | None = None

    def send(self, frame: Packet[Any] | Frame) -> None:
        """Send one Opus packet (or encode a decoded frame first); drop it if nothing is connected yet."""
        if not self.ready():
            self.dropped += 1
            return
        codec = self.codec
        assert codec is not None and codec.payloadType is not None
        if isinstance(frame, Frame):
            # Decoded audio (a source that did not send Opus): encode as aiortc's task would.
            if self._encoder is None:
                self._encoder = get_encoder(codec)
            payloads, timestamp = self._encoder.encode(frame)
        else:
            payloads, timestamp = [bytes(frame)], _to_clock(frame)
        second = 0x80 | codec.payloadType  # marker set, as aiortc's sender sets it on audio
        timestamp = (self._origin + timestamp) & 0xFFFFFFFF
        ssrc = self.sender._ssrc
        for payload in payloads:
            self._write(second, self._sequence, timestamp, ssrc, payload)
            self._sequence = (self._sequence + 1) & 0xFFFF


#: Sent video packets kept per output for retransmission (NACK): about a second of
#: 640x480 video at 1 Mbit/s; a browser NACKs within a round trip or two.
HISTORY = 512


class DirectVideo(DirectSender):
    """One video sender's RTP: forwarded packets, payloads untouched (see ``media.video``).

    Takes over the sender's RTCP handling for what forwarding changes: a NACK is
    answered from this output's history (as RTX when negotiated), a PLI or FIR asks
    the current source for a keyframe, a REMB is passed to the source (the lowest of
    its receivers' goes to the sender). Receiver reports still reach aiortc's handler.
    """

    MIMES = tuple(KEYFRAME)

    def __init__(self, sender: RTCRtpSender) -> None:
        super().__init__(sender)
        self.rewriter = Rewriter()
        #: The source feeding this output now (its keyframe requests and bitrate reports).
        self.source: VideoSource | None = None
        self._history: list[tuple[int, int, bool, bytes] | None] = [None] * HISTORY
        self._rtx_sequence = random.randrange(0x10000)
        #: Packets not forwarded because they are not this output's codec (or decoded
        #: pictures); those dropped while waiting for a keyframe are ``rewriter.waiting``.
        self.mismatched = 0
        self.retransmitted = 0
        original: Callable[[AnyRtcpPacket], Awaitable[None]] = sender._handle_rtcp_packet

        async def handle_rtcp(packet: AnyRtcpPacket) -> None:
            if isinstance(packet, RtcpRtpfbPacket) and packet.fmt == RTCP_RTPFB_NACK:
                self.retransmit(packet.lost)
            elif isinstance(packet, RtcpPsfbPacket) and packet.fmt in (RTCP_PSFB_PLI, RTCP_PSFB_FIR):
                self.picture_lost()
            elif isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_APP:
                self._remb(packet.fci)
            else:
                await original(packet)

        sender._handle_rtcp_packet = handle_rtcp  # type: ignore[method-assign]

    def send(self, frame: object) -> None:
        """Forward one received packet (a ``VideoPacket``) to this receiver."""
        if not isinstance(frame, VideoPacket):
            self.mismatched += 1  # a decoded picture: not for the forwarding path
            return
        if not self.ready():
            self.dropped += 1
            return
        codec = self.codec
        assert codec is not None and codec.payloadType is not None
        if frame.mime != codec.mimeType.lower():
            self.mismatched += 1
            return
        source = frame.source
        if source is not self.source:
            if self.source is not None:
                self.source.forget(self)
            self.source = source  # type: ignore[assignment]
        mapped = self.rewriter.rewrite(
            (source, frame.ssrc), frame.sequence, frame.timestamp, frame.keyframe, time.monotonic()
        )
        if mapped is None:
            self._want_keyframe()
            return
        sequence, timestamp = mapped
        self._history[sequence % HISTORY] = (sequence, timestamp, frame.marker, frame.payload)
        self._write((frame.marker << 7) | codec.payloadType, sequence, timestamp, self.sender._ssrc, frame.payload)

    def retransmit(self, lost: list[int]) -> None:
        """Send again what the receiver reported lost, if still held (RFC 4588 RTX when negotiated)."""
        if not self.ready():
            return
        codec = self.codec
        assert codec is not None and codec.payloadType is not None
        # Once each, however often one NACK names it: a hostile receiver's list of the same
        # number thousands of times costs one resend, not thousands.
        for sequence in dict.fromkeys(lost):
            held = self._history[sequence % HISTORY]
            if held is None or held[0] != sequence:
                continue  # too old, or never sent (lost before the gateway: it NACKed the sender)
            _, timestamp, marker, payload = held
            if self.rtx_payload_type is not None:
                second = (marker << 7) | self.rtx_payload_type
                self._write(
                    second,
                    self._rtx_sequence,
                    timestamp,
                    self.sender._rtx_ssrc,
                    sequence.to_bytes(2, "big") + payload,
                    counted=False,
                )
                self._rtx_sequence = (self._rtx_sequence + 1) & 0xFFFF
            else:
                self._write(
                    (marker << 7) | codec.payloadType, sequence, timestamp, self.sender._ssrc, payload, counted=False
                )
            self.retransmitted += 1

    def picture_lost(self) -> None:
        """The receiver cannot decode (PLI/FIR): ask the source for a keyframe."""
        self._want_keyframe()

    def _want_keyframe(self) -> None:
        if self.source is not None:
            self.source.request_keyframe()

    def _remb(self, fci: bytes) -> None:
        try:
            bitrate, ssrcs = unpack_remb_fci(fci)
        except ValueError:
            return
        if self.sender._ssrc in ssrcs and self.source is not None:
            self.source.report_bitrate(self, bitrate)


class VideoSource(Protocol):
    """What an output asks of the source it forwards (``media.inbound.InboundVideo``)."""

    def request_keyframe(self) -> None: ...

    def report_bitrate(self, receiver: Hashable, bitrate: int) -> None: ...

    def forget(self, receiver: Hashable) -> None: ...


def _to_clock(packet: Packet[Any]) -> int:
    """An audio packet's RTP time: relayed audio packets are stamped in 48 kHz stream time
    (``InboundAudio``, ``PlaybackTrack``); reading ``time_base`` made a Fraction per packet."""
    return packet.pts or 0
