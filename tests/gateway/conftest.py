"""Fixtures for call tests: parties in a conversation with real aiortc peer connections."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiortc.mediastreams import MediaStreamTrack

from gateway.server import GatewayServer
from tests.client import Client
from tests.conftest import make_token
from tests.rtc_client import RtcClient, ToneTrack

Party = Callable[..., Awaitable[RtcClient]]


@pytest.fixture
async def party(server: GatewayServer) -> AsyncIterator[Party]:
    """Join as someone and return an RtcClient (closed at teardown)."""
    clients: list[RtcClient] = []

    async def join(identity: str, role: str = "customer", room: str = "call-room") -> RtcClient:
        client = await Client.open(server.ws_url)
        await client.send({"type": "join", "token": make_token(identity, role, room)})
        joined = await client.expect("joined")
        assert joined["ice_servers"] == []
        rtc = RtcClient(client)
        clients.append(rtc)
        return rtc

    yield join
    for rtc in clients:
        await rtc.close()


async def start_audio(rtc: RtcClient, frequency: float) -> MediaStreamTrack:
    track = ToneTrack(frequency)
    rtc.pc.addTrack(track)
    await rtc.negotiate()
    return track


async def two_way_call(party: Party) -> tuple[RtcClient, RtcClient]:
    """Customer u1 (440 Hz) and agent a1 (880 Hz) in a call, the agent already hearing audio."""
    customer = await party("u1")
    agent = await party("a1", "agent")
    await start_audio(customer, 440)
    await start_audio(agent, 880)
    await agent.hears("audio")
    return customer, agent
