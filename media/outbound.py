"""Outbound audio without the sender task: RTP sent from the stack that produced the packet.

aiortc's ``RTCRtpSender`` runs one task per sender that awaits ``track.recv()``,
builds the RTP packet and awaits four nested coroutines down to the UDP socket. For
audio that is already Opus (the customer's packets forwarded to an agent, the bot's
voice encoded by ``PlaybackTrack``) that costs a task wake-up, an ``Event`` and five
coroutine frames per 20 ms packet, about as much Python as the rest of the send path.
``DirectAudio`` takes over an audio sender once it is started with Opus: the
``OutputTrack`` hands each packet to ``send``, which numbers it, adds the negotiated
header extensions (aiortc's ``RtpPacket.serialize``), protects it with the DTLS
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
from collections.abc import Awaitable, Callable
from typing import Any

from aiortc import RTCRtpCodecParameters, RTCRtpSender
from aiortc.clock import current_ntp_time
from aiortc.codecs import get_encoder
from aiortc.codecs.base import Encoder
from aiortc.rtcdtlstransport import State
from aiortc.rtcrtpparameters import RTCRtpSendParameters
from aiortc.rtp import RtpPacket
from av.frame import Frame
from av.packet import Packet

log = logging.getLogger("talkgate.media.outbound")

#: Opus's RTP clock, whatever the audio's rate.
CLOCK = 48_000


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
        for payload in payloads:
            packet = RtpPacket(
                payload_type=codec.payloadType,
                marker=1,
                sequence_number=self._sequence,
                timestamp=(self._origin + timestamp) & 0xFFFFFFFF,
                ssrc=sender._ssrc,
                payload=payload,
            )
            ntp = current_ntp_time()
            packet.extensions.abs_send_time = (ntp >> 14) & 0x00FFFFFF
            packet.extensions.mid = sender._RTCRtpSender__mid  # type: ignore[attr-defined]
            data = dtls._tx_srtp.protect(packet.serialize(sender._RTCRtpSender__rtp_header_extensions_map))  # type: ignore[attr-defined]
            pair.protocol.transport.sendto(data, pair.remote_addr)  # StunProtocol.send_data, without the coroutine
            self._sequence = (self._sequence + 1) & 0xFFFF
            self.packets += 1
            # What the sender's RTCP task builds its sender reports from.
            sender._RTCRtpSender__ntp_timestamp = ntp  # type: ignore[attr-defined]
            sender._RTCRtpSender__rtp_timestamp = packet.timestamp  # type: ignore[attr-defined]
            sender._RTCRtpSender__octet_count += len(payload)  # type: ignore[attr-defined]
            sender._RTCRtpSender__packet_count += 1  # type: ignore[attr-defined]


def _to_clock(packet: Packet[Any]) -> int:
    pts = packet.pts or 0
    base = packet.time_base
    if base is None or (base.numerator == 1 and base.denominator == CLOCK):  # what our sources stamp
        return pts
    return int(pts * base * CLOCK)
