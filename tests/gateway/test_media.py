"""Voice and video through the gateway, with real aiortc peers as clients."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable

import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription

from gateway.config import Config
from gateway.server import GatewayServer
from tests.client import Client
from tests.conftest import Party, make_token, start_audio, two_way_call
from tests.rtc_client import PatternTrack, ToneTrack


async def test_customer_and_agent_hear_each_other(party: Party) -> None:
    customer, agent = await two_way_call(party)
    heard_by_agent = await agent.hears("audio")
    heard_by_customer = await customer.hears("audio")
    assert heard_by_agent.energy > 1000 and heard_by_customer.energy > 1000
    # Each hears the other one, not itself.
    assert abs(heard_by_agent.dominant_hz() - 440) < 30
    assert abs(heard_by_customer.dominant_hz() - 880) < 30
    media = await customer.wait_for("media", identity="a1")
    assert media == {"type": "media", "conversation": "call-room", "identity": "a1", "audio": True, "video": False}


async def test_agent_joining_mid_call_gets_the_customer_audio(party: Party, server: GatewayServer) -> None:
    customer = await party("u1")
    await start_audio(customer, 440)
    await customer.wait_for("media", identity="u1", audio=True)
    agent = await party("a1", "agent")
    # The agent has no audio of its own: it offers to receive only.
    agent.pc.addTransceiver("audio", direction="recvonly")
    await agent.negotiate()
    heard = await agent.hears("audio")
    assert abs(heard.dominant_hz() - 440) < 30
    assert len(server.broker.router) == 2


async def test_video_upgrade_with_consent_and_renegotiation(party: Party) -> None:
    customer, agent = await two_way_call(party)

    await agent.client.send({"type": "upgrade", "media": "video"})
    request = await customer.wait_for("upgrade.request", media="video")
    assert request["from"]["identity"] == "a1"
    echo = await agent.wait_for("upgrade.request")
    assert echo["id"] == request["id"]
    await customer.client.send({"type": "upgrade.reply", "id": request["id"], "accept": True})
    reply = await agent.wait_for("upgrade.reply", id=request["id"])
    assert reply["accept"] is True and reply["from"]["identity"] == "u1"

    # Consent given: the customer's camera goes on. The agent had no video, so the
    # gateway adds a transceiver and sends the agent an offer of its own.
    customer.pc.addTrack(PatternTrack())
    await customer.negotiate()
    assert (await agent.hears("video", frames=10, timeout=5)).frames >= 10
    # The agent's camera then reuses that transceiver (no m-line added).
    agent.pc.addTrack(PatternTrack())
    await agent.negotiate()
    assert (await customer.hears("video", frames=10, timeout=5)).frames >= 10
    await agent.wait_for("media", identity="u1", video=True)
    # Audio still flows after the renegotiations.
    audio = await customer.hears("audio", frames=100, timeout=5)
    assert audio.energy > 1000


async def test_bad_sdp_is_a_bad_request_and_a_later_offer_works(party: Party) -> None:
    customer = await party("u1")
    agent = await party("a1", "agent")
    data_only = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n"
    for sdp in ("garbage", "v=0\r\n", "x" * 10_000, data_only):
        await customer.client.send({"type": "offer", "sdp": sdp})
        error = await customer.wait_for("error")
        assert error["code"] == "bad_request" and "offer" in error["message"], error
        assert error["request"] == "offer"
    await start_audio(customer, 440)
    await start_audio(agent, 880)
    assert (await agent.hears("audio")).energy > 1000


async def test_an_offer_that_applies_but_cannot_be_answered_ends_only_that_call(
    party: Party, server: GatewayServer
) -> None:
    """Fuzzing found SDP aiortc accepts and then fails to answer (no direction attribute):
    a clear bad_request, the half-negotiated call is ended, a fresh offer works."""
    customer = await party("u1")
    agent = await party("a1", "agent")
    probe = RTCPeerConnection()
    probe.addTransceiver("audio")
    await probe.setLocalDescription(await probe.createOffer())
    no_direction = probe.localDescription.sdp.replace("a=sendrecv\r\n", "")
    await probe.close()
    await customer.client.send({"type": "offer", "sdp": no_direction})
    error = await customer.wait_for("error")
    assert error["code"] == "bad_request" and "call was ended" in error["message"], error
    assert len(server.broker.router) == 0
    await agent.client.send({"type": "ping"})
    await agent.wait_for("pong")  # nobody else noticed
    await start_audio(customer, 440)
    await start_audio(agent, 880)
    assert (await agent.hears("audio")).energy > 1000


@pytest.mark.parametrize(
    ("message", "says"),
    [
        ({"type": "answer", "sdp": "v=0"}, "offer first"),
        ({"type": "candidate", "candidate": "candidate:1 1 udp 1 127.0.0.1 9 typ host", "sdpMid": "0"}, "offer first"),
        ({"type": "hangup"}, "offer first"),
        ({"type": "upgrade", "media": "smell"}, "media"),
        ({"type": "upgrade.reply", "id": "nope", "accept": True}, "no such"),
    ],
)
async def test_media_messages_out_of_place(party: Party, message: dict[str, object], says: str) -> None:
    customer = await party("u1")
    await party("a1", "agent")
    await customer.client.send(message)
    error = await customer.wait_for("error")
    assert says in error["message"], error


async def test_candidate_and_answer_checks_after_an_offer(party: Party) -> None:
    customer = await party("u1")
    await start_audio(customer, 440)
    await customer.client.send(
        {"type": "candidate", "candidate": "candidate:1 1 udp 1 127.0.0.1 9 typ host", "sdpMid": "7"}
    )
    assert "mid" in (await customer.wait_for("error", code="bad_request"))["message"]
    await customer.client.send({"type": "candidate", "candidate": "not a candidate", "sdpMid": "0"})
    assert "candidate" in (await customer.wait_for("error", code="bad_request"))["message"]
    await customer.client.send({"type": "answer", "sdp": customer.pc.localDescription.sdp})
    assert "no offer" in (await customer.wait_for("error", code="bad_request"))["message"]
    # An allowed trickled candidate is accepted silently, and so is end-of-candidates.
    await customer.client.send(
        {"type": "candidate", "candidate": "candidate:1 1 udp 1 127.0.0.1 9 typ host", "sdpMid": "0"}
    )
    await customer.client.send({"type": "candidate", "candidate": "", "sdpMid": "0"})
    await customer.client.send({"type": "ping"})
    await customer.wait_for("pong")
    assert customer.events.empty()


async def test_upgrade_reply_rules(party: Party) -> None:
    customer = await party("u1")
    agent = await party("a1", "agent")
    await customer.client.send({"type": "upgrade", "media": "audio"})
    request = await agent.wait_for("upgrade.request", media="audio")
    await customer.client.send({"type": "upgrade.reply", "id": request["id"], "accept": True})
    assert (await customer.wait_for("error"))["code"] == "forbidden"  # not your own request
    await agent.client.send({"type": "upgrade.reply", "id": request["id"], "accept": False})
    reply = await customer.wait_for("upgrade.reply")
    assert reply["accept"] is False
    await agent.client.send({"type": "upgrade.reply", "id": request["id"], "accept": True})
    assert (await agent.wait_for("error"))["code"] == "not_found"  # answered by everyone: gone


async def test_offer_colliding_with_the_gateway_offer_is_a_conflict(party: Party, server: GatewayServer) -> None:
    customer = await party("u1")
    agent = await Client.open(server.ws_url)
    await agent.send({"type": "join", "token": make_token("a1", "agent", "call-room")})
    await agent.wait_for("joined")
    pc = RTCPeerConnection()
    try:
        # The agent starts with video only, so the customer's audio will need a new
        # transceiver toward the agent: the gateway has to offer.
        pc.addTrack(PatternTrack())
        await pc.setLocalDescription(await pc.createOffer())
        await agent.send({"type": "offer", "sdp": pc.localDescription.sdp})
        await pc.setRemoteDescription(RTCSessionDescription((await agent.wait_for("answer"))["sdp"], "answer"))
        await start_audio(customer, 440)
        gateway_offer = await agent.wait_for("offer")

        # The agent offers while the gateway's offer is pending: the gateway keeps its own.
        pc.addTrack(ToneTrack(880))
        await agent.send({"type": "offer", "sdp": (await pc.createOffer()).sdp})
        error = await agent.wait_for("error")
        assert error["code"] == "conflict" and error["request"] == "offer"

        # Polite side: answer the gateway, then offer again.
        await pc.setRemoteDescription(RTCSessionDescription(gateway_offer["sdp"], "offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        await agent.send({"type": "answer", "sdp": pc.localDescription.sdp})
        await pc.setLocalDescription(await pc.createOffer())
        await agent.send({"type": "offer", "sdp": pc.localDescription.sdp})
        await pc.setRemoteDescription(RTCSessionDescription((await agent.wait_for("answer"))["sdp"], "answer"))
        heard = await customer.hears("audio")
        assert abs(heard.dominant_hz() - 880) < 30
    finally:
        await pc.close()
        await agent.close()


async def test_upgrade_alone_is_not_found(party: Party) -> None:
    customer = await party("u1")
    await customer.client.send({"type": "upgrade", "media": "video"})
    assert (await customer.wait_for("error"))["code"] == "not_found"


async def test_leaving_closes_the_peer_connection_and_its_tasks(party: Party, server: GatewayServer) -> None:
    before = len(asyncio.all_tasks())
    customer, agent = await two_way_call(party)
    assert len(server.broker.router) == 2
    await agent.client.send({"type": "hangup"})
    assert (await customer.wait_for("media", identity="a1", audio=False)) == {
        "type": "media",
        "conversation": "call-room",
        "identity": "a1",
        "audio": False,
        "video": False,
    }
    assert len(server.broker.router) == 1
    await customer.client.send({"type": "leave"})
    await customer.wait_for("left")
    assert len(server.broker.router) == 0
    for rtc in (customer, agent):
        await rtc.close()
    await asyncio.sleep(0.5)  # aiortc finishes its own transport tasks
    assert len(asyncio.all_tasks()) <= before + 1, [t.get_name() for t in asyncio.all_tasks()]
    assert (await server.health())["peer_connections"] == 0


async def test_a_replaced_connection_loses_its_peer_connection(party: Party, server: GatewayServer) -> None:
    _, agent = await two_way_call(party)
    assert len(server.broker.router) == 2
    reloaded = await party("u1")  # the customer reloads the page
    assert (await agent.wait_for("media", identity="u1", audio=False))["video"] is False
    assert len(server.broker.router) == 1
    await start_audio(reloaded, 660)
    await agent.hears_tone(660)  # the agent now hears the new connection
    assert len(server.broker.router) == 2


async def test_ice_servers_reach_clients_in_joined(connect: Callable[..., Awaitable[Client]], config: Config) -> None:
    settings = dataclasses.replace(
        config,
        stun_urls=("stun:stun.example.test:3478",),
        turn_urls=("turn:turn.example.test:3478?transport=udp",),
        turn_username="u",
        turn_password="p",
    )
    async with GatewayServer(settings) as srv:
        client = await connect(srv.ws_url)
        await client.send({"type": "join", "token": make_token("u1", "customer", "r1")})
        joined = await client.expect("joined")
        assert joined["ice_servers"] == [
            {"urls": ["stun:stun.example.test:3478"]},
            {"urls": ["turn:turn.example.test:3478?transport=udp"], "username": "u", "credential": "p"},
        ]
        assert [s.urls for s in srv.broker.rtc.ice_servers] == [
            ["stun:stun.example.test:3478"],
            ["turn:turn.example.test:3478?transport=udp"],
        ]
