"""Several conversations per connection: an agent with --agent-capacity > 1, real sockets."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription

from gateway.config import Config
from gateway.server import GatewayServer
from tests.client import Client
from tests.conftest import make_token, start_audio
from tests.rtc_client import RtcClient


@pytest.fixture
async def server(config: Config) -> AsyncIterator[GatewayServer]:
    async with GatewayServer(dataclasses.replace(config, agent_capacity=2)) as srv:
        yield srv


async def customer(server: GatewayServer, identity: str, room: str) -> Client:
    client = await Client.open(server.ws_url)
    await client.send({"type": "join", "token": make_token(identity, "customer", room)})
    await client.expect("joined", conversation=room)
    await client.send({"type": "escalate"})
    await client.wait_for("queued", conversation=room)
    return client


async def agent_with_two(server: GatewayServer) -> tuple[Client, Client, Client]:
    ann = await customer(server, "u1", "r1")
    cid = await customer(server, "u2", "r2")
    agent = await Client.open(server.ws_url)
    await agent.send({"type": "join", "token": make_token("a1", "agent")})
    await agent.expect("joined", conversation=None)
    await agent.expect("queue")
    for room in ("r1", "r2"):
        await agent.send({"type": "accept", "conversation": room})
        await agent.wait_for("joined", conversation=room)
    await ann.wait_for("participant.joined", identity="a1", conversation="r1")
    await cid.wait_for("participant.joined", identity="a1", conversation="r2")
    return agent, ann, cid


async def test_an_agent_holds_up_to_its_capacity_and_every_message_names_its_conversation(
    server: GatewayServer,
) -> None:
    agent, ann, cid = await agent_with_two(server)
    await agent.send({"type": "chat", "text": "which one?"})
    error = await agent.wait_for("error", code="bad_request")
    assert "name one" in error["message"]

    await agent.send({"type": "chat", "text": "hello Cid", "conversation": "r2"})
    echo = await agent.wait_for("chat", conversation="r2")
    assert echo["text"] == "hello Cid"
    got = await cid.wait_for("chat")
    assert got["conversation"] == "r2" and got["text"] == "hello Cid"
    await ann.quiet(0.2)  # the other conversation hears nothing

    await ann.send({"type": "chat", "text": "hi"})  # customers send what they always sent
    assert (await agent.wait_for("chat", conversation="r1"))["text"] == "hi"

    # A third is over the capacity.
    await customer(server, "u3", "r3")
    await agent.send({"type": "accept", "conversation": "r3"})
    error = await agent.wait_for("error", code="conflict")
    assert "--agent-capacity" in error["message"]

    # Naming a conversation the connection is not in is not_found.
    await agent.send({"type": "chat", "text": "x", "conversation": "r3"})
    await agent.wait_for("error", code="not_found")

    # Leaving one keeps the other.
    await agent.send({"type": "leave", "conversation": "r1"})
    await agent.wait_for("left", conversation="r1")
    await ann.wait_for("participant.left", identity="a1", conversation="r1")
    await agent.send({"type": "chat", "text": "still here"})  # one left: no name needed
    assert (await cid.wait_for("chat"))["text"] == "still here"


async def test_an_agent_reload_takes_over_every_conversation(server: GatewayServer) -> None:
    agent, ann, cid = await agent_with_two(server)
    again = await Client.open(server.ws_url)
    await again.send({"type": "join", "token": make_token("a1", "agent")})
    first = await again.expect("joined")
    second = await again.expect("joined")
    assert {first["conversation"], second["conversation"]} == {"r1", "r2"}
    await again.expect("queue")
    assert await agent.closed() == 4409
    await again.send({"type": "chat", "text": "back", "conversation": "r1"})
    assert (await ann.wait_for("chat"))["text"] == "back"
    await cid.quiet(0.2)  # no participant.left/joined for the reload either


async def test_one_call_per_conversation(server: GatewayServer) -> None:
    """A connection in two conversations has a peer connection in each at once; offers and
    the gateway's answers name their conversation; hang-ups need the name."""
    agent_ws, ann_ws, cid_ws = await agent_with_two(server)
    ann, cid = RtcClient(ann_ws), RtcClient(cid_ws)
    await start_audio(ann, 440)
    await start_audio(cid, 660)
    agent = RtcClient(agent_ws)
    try:
        agent.pc.addTransceiver("audio", direction="recvonly")
        await agent.negotiate("r1")
        await agent.hears_tone(440)

        # A second peer connection on the same websocket, for r2.
        second = RTCPeerConnection()
        second.on("track", agent._on_track)
        second.addTransceiver("audio", direction="recvonly")
        await second.setLocalDescription(await second.createOffer())
        await agent.client.send({"type": "offer", "sdp": second.localDescription.sdp, "conversation": "r2"})
        answer = await agent.wait_for("answer", conversation="r2")
        await second.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
        await agent.hears_tone(660)
        assert len(server.broker.router) == 4  # Ann, Cid, and the agent once in each

        await agent.client.send({"type": "hangup"})
        assert "name one" in (await agent.wait_for("error", code="bad_request"))["message"]
        await agent.client.send({"type": "hangup", "conversation": "r2"})
        async with asyncio.timeout(3):
            while len(server.broker.router) != 3:  # noqa: ASYNC110 (a count without an event)
                await asyncio.sleep(0.02)
        await second.close()
        await agent.client.send({"type": "hangup", "conversation": "r2"})
        await agent.wait_for("error", code="bad_request")  # that call is over
    finally:
        for rtc in (agent, ann, cid):
            await rtc.close()
