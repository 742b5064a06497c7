"""DirectAudio: Opus sent from the caller's stack reaches a real aiortc peer intact, with RTCP."""

from __future__ import annotations

import asyncio
import fractions
from typing import Any

import av
import numpy as np
import pytest
from aiortc import RTCPeerConnection, RTCRtpSender, RTCRtpTransceiver
from aiortc.clock import current_ntp_time
from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters, RTCRtpParameters
from aiortc.rtp import HeaderExtensionsMap, RtpPacket

from media import opus
from media.outbound import DirectAudio, ExtensionLayout, ntp_now
from media.relay import OutputTrack
from tests.conftest import until

TONE_HZ = 440


async def connect(offerer: RTCPeerConnection, answerer: RTCPeerConnection) -> None:
    await offerer.setLocalDescription(await offerer.createOffer())
    await answerer.setRemoteDescription(offerer.localDescription)
    await answerer.setLocalDescription(await answerer.createAnswer())
    await offerer.setRemoteDescription(answerer.localDescription)

    async def connected() -> bool:
        return offerer.connectionState == answerer.connectionState == "connected"

    await until(connected, 10)


def gateway_side(pc: RTCPeerConnection) -> tuple[RTCRtpTransceiver, OutputTrack, DirectAudio]:
    transceiver = pc.addTransceiver("audio", direction="sendonly")
    output = OutputTrack("audio")
    output.direct = DirectAudio(transceiver.sender)
    transceiver.sender.replaceTrack(output)
    return transceiver, output, output.direct


def tone_packets(count: int) -> list[av.Packet[Any]]:
    encoder = opus.Encoder(16_000)
    t = np.arange(count * 320) / 16_000
    pcm = (8000 * np.sin(2 * np.pi * TONE_HZ * t)).astype(np.int16)
    packets = []
    for i in range(count):
        packet = av.Packet(encoder.encode(pcm[i * 320 : (i + 1) * 320]))
        packet.pts = i * 960
        packet.time_base = fractions.Fraction(1, 48_000)
        packets.append(packet)
    return packets


async def stats_of(sender_or_receiver: Any, kind: str) -> Any:
    return next((s for s in (await sender_or_receiver.getStats()).values() if s.type == kind), None)


async def test_pushed_opus_packets_arrive_in_order_and_the_sender_reports_them() -> None:
    gateway, client = RTCPeerConnection(), RTCPeerConnection()
    try:
        _, output, direct = gateway_side(gateway)
        output.push(tone_packets(1)[0])  # before negotiation: nowhere to send, dropped, never queued
        assert direct.dropped == 1
        received: list[av.AudioFrame] = []
        track_ready: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        client.on("track", track_ready.set_result)
        await connect(gateway, client)
        assert direct.active and direct.codec is not None and direct.codec.mimeType == "audio/opus"
        track = await track_ready

        async def listen() -> None:
            while True:
                received.append(await track.recv())

        listener = asyncio.create_task(listen())
        packets = tone_packets(100)
        try:
            for packet in packets:
                output.push(packet)
                await asyncio.sleep(0.02)

            async def heard() -> bool:
                return sum(f.samples for f in received) >= 90 * 960

            await until(heard)
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)

        assert direct.packets == 100
        inbound = await stats_of(client.getReceivers()[0], "inbound-rtp")
        assert inbound.packetsReceived == 100 and inbound.packetsLost == 0  # sequence numbers are contiguous
        # What the client decoded is the tone (so payloads and timestamps are right).
        pcm = np.concatenate([f.to_ndarray().reshape(-1, 2)[:, 0] for f in received[20:80]]).astype(float)
        spectrum = np.abs(np.fft.rfft(pcm))
        peak_hz = np.argmax(spectrum) * 48_000 / len(pcm)
        assert abs(peak_hz - TONE_HZ) < 5
        sender: RTCRtpSender = gateway.getSenders()[0]
        outbound = await stats_of(sender, "outbound-rtp")
        assert outbound.packetsSent == 100 and outbound.bytesSent == sum(p.size for p in packets)

        # The sender's RTCP task reports the direct packets (a sender report every ~1 s).
        async def reported() -> Any:
            remote = await stats_of(client.getReceivers()[0], "remote-outbound-rtp")
            return remote if remote is not None and remote.packetsSent >= 100 else None

        assert (await until(reported)).packetsSent == 100
        assert output._frames == type(output._frames)(maxlen=output._frames.maxlen)  # nothing ever queued
    finally:
        await gateway.close()
        await client.close()


@pytest.mark.parametrize("codec", ["audio/opus", "audio/PCMU"])
async def test_decoded_frames_are_encoded_and_other_codecs_keep_aiortcs_path(codec: str) -> None:
    gateway, client = RTCPeerConnection(), RTCPeerConnection()
    try:
        _, output, direct = gateway_side(gateway)
        receiving = client.addTransceiver("audio", direction="recvonly")
        capabilities = RTCRtpSender.getCapabilities("audio").codecs
        receiving.setCodecPreferences([c for c in capabilities if c.mimeType == codec])
        await connect(client, gateway)
        assert direct.codec is not None and direct.codec.mimeType == codec
        assert direct.active is (codec == "audio/opus")
        for i in range(25):
            frame = av.AudioFrame.from_ndarray(np.full((1, 960), 3000, np.int16), format="s16", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = 48_000, i * 960, fractions.Fraction(1, 48_000)
            output.push(frame)
            await asyncio.sleep(0.02)

        async def received() -> Any:
            inbound = await stats_of(receiving.receiver, "inbound-rtp")
            return inbound if inbound is not None and inbound.packetsReceived >= 20 else None

        inbound = await until(received)
        assert direct.packets == (inbound.packetsReceived if direct.active else 0)
    finally:
        await gateway.close()
        await client.close()


@pytest.mark.parametrize(
    "extensions",
    [
        [("urn:ietf:params:rtp-hdrext:sdes:mid", 1), ("http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time", 2)],
        [("urn:ietf:params:rtp-hdrext:sdes:mid", 1)],
        [],
    ],
    ids=["mid+abs-send-time", "mid-only", "none"],
)
def test_the_extension_layout_matches_aiortcs_serialisation(extensions: list[tuple[str, int]]) -> None:
    """The precomputed block plus abs-send-time is byte for byte what RtpPacket.serialize writes."""
    extensions_map = HeaderExtensionsMap()
    extensions_map.configure(
        RTCRtpParameters(headerExtensions=[RTCRtpHeaderExtensionParameters(id=i, uri=uri) for uri, i in extensions])
    )
    layout = ExtensionLayout(extensions_map, "0")
    for abs_send_time in (0, 1, 0x123456, 0xFFFFFF):
        packet = RtpPacket(payload_type=111, marker=1, sequence_number=7, timestamp=960, ssrc=1234, payload=b"opus")
        packet.extensions.mid = "0"
        packet.extensions.abs_send_time = abs_send_time
        expected = packet.serialize(extensions_map)
        assert expected[0] == layout.first
        assert expected[12:-4] == layout.block(abs_send_time)


def test_ntp_now_agrees_with_aiortcs_clock() -> None:
    before, ours, after = current_ntp_time(), ntp_now(), current_ntp_time()
    assert before - 2**22 <= ours <= after + 2**22  # within a millisecond (2**32 per second)
