"""Video forwarded through the gateway as RTP (media/video.py), with real aiortc peers.

Each client's wire is tapped below aiortc: what its video sender puts on the wire
(before SRTP) and what its video receiver gets (after SRTP), so the tests see the
packets themselves, not only decoded pictures.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable

import pytest
from aiortc import RTCDtlsTransport, RTCRtpReceiver, RTCRtpSender
from aiortc.codecs import is_rtx
from aiortc.rtp import RtpPacket, is_rtcp

from gateway.config import Config
from gateway.server import GatewayServer
from media.outbound import DirectVideo
from tests.client import Client
from tests.conftest import Party, make_token, until
from tests.rtc_client import PatternTrack, RtcClient


@dataclasses.dataclass
class Wire:
    """One client's video packets: sent (by its sender's SSRC) and received (RTX apart)."""

    sent: list[RtpPacket] = dataclasses.field(default_factory=list)
    received: list[RtpPacket] = dataclasses.field(default_factory=list)
    rtx: list[RtpPacket] = dataclasses.field(default_factory=list)
    #: Sequence numbers the receive side drops on purpose (first arrival only).
    drop_received: Callable[[RtpPacket], bool] = lambda packet: False
    #: Packets the send side drops on purpose (never reach the gateway).
    drop_sent: Callable[[RtpPacket], bool] = lambda packet: False
    dropped: set[int] = dataclasses.field(default_factory=set)

    def received_payloads(self) -> set[bytes]:
        return {p.payload for p in self.received}


async def tap_both(*clients: RtcClient) -> list[Wire]:
    """Tap each client, then forget what they received in the first 0.3 s: packets sent
    before the sender's tap was in place may still arrive after the receiver's."""
    wires = [tap(rtc) for rtc in clients]
    await asyncio.sleep(0.3)
    for wire in wires:
        wire.received.clear()
        wire.rtx.clear()
    return wires


def video_sender(rtc: RtcClient) -> RTCRtpSender | None:
    return next((t.sender for t in rtc.pc.getTransceivers() if t.kind == "video" and t.sender.track), None)


def tap(rtc: RtcClient) -> Wire:
    """Record (and optionally drop) the client's video RTP on both sides of its transport."""
    wire = Wire()
    dtls: RTCDtlsTransport = rtc.pc.getTransceivers()[0].sender.transport
    send_rtp = dtls._send_rtp

    async def sending(data: bytes) -> None:
        sender = video_sender(rtc)
        if sender is not None and not is_rtcp(data) and int.from_bytes(data[8:12], "big") == sender._ssrc:
            packet = RtpPacket.parse(data)
            wire.sent.append(packet)
            if wire.drop_sent(packet):
                wire.dropped.add(packet.sequence_number)
                return
        await send_rtp(data)

    dtls._send_rtp = sending  # type: ignore[method-assign]
    for transceiver in rtc.pc.getTransceivers():
        if transceiver.kind == "video":
            _tap_receiver(transceiver.receiver, wire)
    return wire


def _tap_receiver(receiver: RTCRtpReceiver, wire: Wire) -> None:
    handle = receiver._handle_rtp_packet
    codecs = receiver._RTCRtpReceiver__codecs  # type: ignore[attr-defined]

    async def handling(packet: RtpPacket, arrival_time_ms: int) -> None:
        codec = codecs.get(packet.payload_type)
        if codec is not None and is_rtx(codec):
            wire.rtx.append(packet)
        else:
            if packet.sequence_number not in wire.dropped and wire.drop_received(packet):
                wire.dropped.add(packet.sequence_number)
                return
            wire.received.append(packet)
        await handle(packet, arrival_time_ms)

    receiver._handle_rtp_packet = handling  # type: ignore[method-assign]


async def video_call(party: Party) -> tuple[RtcClient, RtcClient]:
    """Customer u1 and agent a1, each sending a moving picture and receiving the other's."""
    customer = await party("u1")
    agent = await party("a1", "agent")
    for rtc in (customer, agent):
        rtc.pc.addTrack(PatternTrack(320, 240))
        await rtc.negotiate()
    await customer.hears("video", frames=5, timeout=10)
    await agent.hears("video", frames=5, timeout=10)
    return customer, agent


async def test_video_is_forwarded_byte_for_byte_both_ways(party: Party, server: GatewayServer) -> None:
    customer, agent = await video_call(party)
    customer_wire, agent_wire = await tap_both(customer, agent)
    wires = {"customer": customer_wire, "agent": agent_wire}
    await until(lambda: all(len(w.received) >= 60 for w in wires.values()), timeout=10)
    for receiver, sender in (("customer", "agent"), ("agent", "customer")):
        sent = {p.payload for p in wires[sender].sent}
        received = wires[receiver].received
        # Every packet the receiver got carries a payload its peer sent, byte for byte:
        # forwarded, not decoded and encoded again.
        assert all(p.payload in sent for p in received), receiver
        # One continuous stream: the gateway's own SSRC and consecutive sequence numbers.
        assert len({p.ssrc for p in received}) == 1
        assert {p.ssrc for p in received}.isdisjoint({p.ssrc for p in wires[sender].sent})
    assert (await customer.hears("video", frames=30, timeout=5)).frames >= 30  # and it decodes
    forwarded = [s.output.direct for p in server.broker.calls.peers("call-room") for s in p.slots if s.kind == "video"]
    assert forwarded and all(isinstance(d, DirectVideo) and d.packets > 0 for d in forwarded)


async def test_a_new_source_carries_on_the_receivers_stream(party: Party, server: GatewayServer) -> None:
    """A second agent takes over: the customer's stream goes on from the next sequence
    number, its timestamps keep rising, and a new picture decodes within a second."""
    customer, agent = await video_call(party)
    wire = tap(customer)
    await until(lambda: len(wire.received) >= 30)
    await agent.client.send({"type": "hangup"})
    await customer.wait_for("media", identity="a1", video=False)
    before = list(wire.received)
    second = await party("a2", "agent")
    second.pc.addTrack(PatternTrack(320, 240))
    second_wire = tap(second)
    frames = customer.received_video_frames()
    await second.negotiate()
    await until(lambda: len(wire.received) >= len(before) + 30, timeout=5)
    sent_by_second = {p.payload for p in second_wire.sent}
    after = wire.received[len(before) :]
    assert all(p.payload in sent_by_second for p in after)  # the new source only
    # The first packet of the new source follows the last of the old one.
    assert after[0].sequence_number == (before[-1].sequence_number + 1) & 0xFFFF
    assert after[0].ssrc == before[-1].ssrc
    assert 0 < (after[0].timestamp - before[-1].timestamp) & 0xFFFFFFFF < 0x80000000
    await until(lambda: customer.received_video_frames() > frames, timeout=1.0)


async def test_a_receivers_picture_loss_reaches_the_sender(party: Party) -> None:
    customer, agent = await video_call(party)
    sender = video_sender(agent)
    assert sender is not None
    requests: list[float] = []
    original = sender._send_keyframe

    def keyframe() -> None:
        requests.append(asyncio.get_running_loop().time())
        original()

    sender._send_keyframe = keyframe  # type: ignore[method-assign]
    receiver = next(t.receiver for t in customer.pc.getTransceivers() if t.kind == "video")
    streams = receiver._RTCRtpReceiver__remote_streams  # type: ignore[attr-defined]
    await asyncio.sleep(0.5)  # past the rate limit of the keyframes the call started with
    for ssrc in list(streams):
        await receiver._send_rtcp_pli(ssrc)
    await until(lambda: requests, timeout=2)


async def test_loss_toward_a_receiver_is_repaired_from_the_gateways_history(
    party: Party, server: GatewayServer
) -> None:
    customer, _ = await video_call(party)
    wire = tap(customer)
    wire.drop_received = lambda packet: packet.sequence_number % 7 == 0
    await until(lambda: len(wire.dropped) >= 10, timeout=10)
    wire.drop_received = lambda packet: False
    dropped = set(list(wire.dropped)[:10])
    repaired = await until(lambda: dropped <= {int.from_bytes(p.payload[:2], "big") for p in wire.rtx}, timeout=5)
    assert repaired
    direct = next(
        s.output.direct
        for p in server.broker.calls.peers("call-room")
        if p.identity == "u1"
        for s in p.slots
        if s.kind == "video"
    )
    assert isinstance(direct, DirectVideo) and direct.retransmitted >= 10


async def test_loss_from_a_sender_is_nacked_by_the_gateway(party: Party) -> None:
    """Packets the agent's first send lost reach the customer after the gateway's NACK."""
    customer, agent = await video_call(party)
    customer_wire, agent_wire = tap(customer), tap(agent)
    agent_wire.drop_sent = lambda packet: (
        packet.sequence_number % 9 == 0 and packet.sequence_number not in agent_wire.dropped
    )
    await until(lambda: len(agent_wire.dropped) >= 5, timeout=10)
    agent_wire.drop_sent = lambda packet: False
    lost = {p.payload for p in agent_wire.sent if p.sequence_number in agent_wire.dropped}

    def arrived() -> set[bytes]:
        return {p.payload for p in customer_wire.received} | {p.payload[2:] for p in customer_wire.rtx}

    await until(lambda: lost <= arrived(), timeout=5)


@pytest.fixture
async def transcoding(config: Config) -> AsyncIterator[GatewayServer]:
    async with GatewayServer(dataclasses.replace(config, video="transcode")) as srv:
        yield srv


async def test_transcode_mode_decodes_and_encodes_again(transcoding: GatewayServer) -> None:
    """``--video transcode``: the old path, kept to compare against."""
    clients: list[RtcClient] = []

    async def join(identity: str, role: str = "customer") -> RtcClient:
        client = await Client.open(transcoding.ws_url)
        await client.send({"type": "join", "token": make_token(identity, role, "call-room")})
        await client.expect("joined")
        clients.append(RtcClient(client))
        return clients[-1]

    try:
        customer, agent = await video_call(join)
        customer_wire, agent_wire = await tap_both(customer, agent)
        wires = {"customer": customer_wire, "agent": agent_wire}
        await until(lambda: len(wires["customer"].received) >= 30, timeout=10)
        sent = {p.payload for p in wires["agent"].sent}
        assert not any(p.payload in sent for p in wires["customer"].received[5:])
    finally:
        for rtc in clients:
            await rtc.close()


async def test_a_later_call_is_negotiated_to_the_codec_the_first_one_sends(party: Party, server: GatewayServer) -> None:
    """The customer's client prefers H.264, the agent's VP8 (a browser's default): the
    gateway answers the agent with H.264 first, so both send H.264 and each stream is
    forwarded, not lost for want of a common codec."""
    customer = await party("u1")
    agent = await party("a1", "agent")
    transceiver = customer.pc.addTransceiver(PatternTrack(320, 240), direction="sendrecv")
    codecs = RTCRtpSender.getCapabilities("video").codecs
    transceiver.setCodecPreferences(sorted(codecs, key=lambda c: c.mimeType != "video/H264"))
    await customer.negotiate()
    agent.pc.addTrack(PatternTrack(320, 240))
    await agent.negotiate()
    await customer.hears("video", frames=5, timeout=10)
    await agent.hears("video", frames=5, timeout=10)
    customer_wire, agent_wire = await tap_both(customer, agent)
    wires = {"customer": customer_wire, "agent": agent_wire}
    await until(lambda: all(len(w.received) >= 30 for w in wires.values()), timeout=10)
    for receiver, sender in (("customer", "agent"), ("agent", "customer")):
        sent = {p.payload for p in wires[sender].sent}
        assert all(p.payload in sent for p in wires[receiver].received), receiver
    for rtc in (customer, agent):
        video = next(t for t in rtc.pc.getTransceivers() if t.kind == "video")
        assert video._codecs[0].mimeType == "video/H264"


async def test_a_nack_naming_a_packet_many_times_resends_it_once(party: Party, server: GatewayServer) -> None:
    """A receiver's NACK is untrusted: a list with one number repeated is one resend."""
    customer, _ = await video_call(party)
    direct = next(
        s.output.direct
        for p in server.broker.calls.peers("call-room")
        if p.identity == "u1"
        for s in p.slots
        if s.kind == "video"
    )
    assert isinstance(direct, DirectVideo)
    wire = tap(customer)
    await until(lambda: len(wire.received) >= 5)
    newest = wire.received[-1].sequence_number
    before = direct.retransmitted
    direct.retransmit([newest] * 5000 + [(newest - 1) & 0xFFFF] * 5000)
    assert direct.retransmitted - before == 2
    await until(lambda: {newest, (newest - 1) & 0xFFFF} <= {int.from_bytes(p.payload[:2], "big") for p in wire.rtx})
    assert len(wire.rtx) <= 2 + 5  # and the peer saw two resends (give or take its own NACKs)
