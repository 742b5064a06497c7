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
from collections.abc import Awaitable, Callable
from typing import Any

from aiortc import RTCRtpCodecParameters, RTCRtpSender
from aiortc.codecs import get_encoder
from aiortc.codecs.base import Encoder
from aiortc.rtcdtlstransport import State
from aiortc.rtcrtpparameters import RTCRtpSendParameters
from aiortc.rtp import HeaderExtensions, HeaderExtensionsMap
from av.frame import Frame
from av.packet import Packet

log = logging.getLogger("talkgate.media.outbound")

#: Opus's RTP clock, whatever the audio's rate.
CLOCK = 48_000
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


class DirectAudio:
    """One audio sender's RTP, sent from the caller's stack once it runs Opus."""

    def __init__(self, sender: RTCRtpSender) -> None:
        self.sender = sender
        #: The negotiated codec, once the sender has started (None: not yet).
        self.codec: RTCRtpCodecParameters | None = None
        #: Does this path carry the sender's audio? False: aiortc's task does (not Opus).
        #: Decided once, when the codec is known (push() asks for every packet).
        self.active = True
        self._sequence = random.randrange(0x10000)
        self._origin = random.randrange(0x100000000)
        self._encoder: Encoder | None = None
        self._layout: ExtensionLayout | None = None
        #: Packets sent, and packets dropped because the sender or its transport was not ready.
        self.packets = 0
        self.dropped = 0
        original: Callable[[RTCRtpSendParameters], Awaitable[None]] = sender.send

        async def send(parameters: RTCRtpSendParameters) -> None:
            if self.codec is None and parameters.codecs:
                self.codec = parameters.codecs[0]
                self.active = self.codec.mimeType.lower() == "audio/opus"
            await original(parameters)

        sender.send = send  # type: ignore[method-assign]

    def send(self, frame: Packet[Any] | Frame) -> None:
        """Send one Opus packet (or encode a decoded frame first); drop it if nothing is connected yet."""
        codec = self.codec
        sender = self.sender
        dtls = sender.transport
        pair = dtls.transport._connection._nominated.get(1)
        if codec is None or codec.payloadType is None or not sender._enabled:
            self.dropped += 1
            return
        if dtls._state is not State.CONNECTED or pair is None:
            self.dropped += 1
            return
        if isinstance(frame, Frame):
            # Decoded audio (a source that did not send Opus): encode as aiortc's task would.
            if self._encoder is None:
                self._encoder = get_encoder(codec)
            payloads, timestamp = self._encoder.encode(frame)
        else:
            payloads, timestamp = [bytes(frame)], _to_clock(frame)
        layout = self._layout
        if layout is None:
            layout = self._layout = ExtensionLayout(
                sender._RTCRtpSender__rtp_header_extensions_map,  # type: ignore[attr-defined]
                sender._RTCRtpSender__mid,  # type: ignore[attr-defined]
            )
        second = 0x80 | codec.payloadType  # marker set, as aiortc's sender sets it on audio
        timestamp = (self._origin + timestamp) & 0xFFFFFFFF
        for payload in payloads:
            ntp = ntp_now()
            header = _HEADER.pack(layout.first, second, self._sequence, timestamp, sender._ssrc)
            data = dtls._tx_srtp.protect(header + layout.block((ntp >> 14) & 0x00FFFFFF) + payload)
            pair.protocol.transport.sendto(data, pair.remote_addr)  # StunProtocol.send_data, without the coroutine
            self._sequence = (self._sequence + 1) & 0xFFFF
            self.packets += 1
            # What the sender's RTCP task builds its sender reports from.
            sender._RTCRtpSender__ntp_timestamp = ntp  # type: ignore[attr-defined]
            sender._RTCRtpSender__rtp_timestamp = timestamp  # type: ignore[attr-defined]
            sender._RTCRtpSender__octet_count += len(payload)  # type: ignore[attr-defined]
            sender._RTCRtpSender__packet_count += 1  # type: ignore[attr-defined]


def _to_clock(packet: Packet[Any]) -> int:
    pts = packet.pts or 0
    base = packet.time_base
    if base is None or (base.numerator == 1 and base.denominator == CLOCK):  # what our sources stamp
        return pts
    return int(pts * base * CLOCK)
