"""Churn without leaks: thousands of join/chat/leave cycles and hundreds of media sessions
(completed, hung up, and cut off mid-negotiation and mid-call), then the process's file
descriptors, asyncio tasks, peer connections, conversations and RSS are back near where
they started. ``TALKGATE_SOAK_SCALE=10`` runs ten times as many."""

from __future__ import annotations

import asyncio
import gc
import os
import resource
from dataclasses import dataclass

from gateway.server import GatewayServer
from tests.client import Client
from tests.conftest import make_token
from tests.rtc_client import RtcClient, ToneTrack

SCALE = float(os.environ.get("TALKGATE_SOAK_SCALE", "1"))
CHAT_CYCLES = int(2000 * SCALE)
MEDIA_SESSIONS = int(160 * SCALE)
#: RSS may grow this much over the warmed-up start (allocator arenas, caches); a leaked
#: peer connection per session would be several times more.
RSS_MARGIN_MB = 40


@dataclass(frozen=True)
class Footprint:
    fds: int
    tasks: int
    peer_connections: int
    conversations: int
    sessions: int
    rss_mb: float


def _rss_pages() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1])


async def footprint(server: GatewayServer) -> Footprint:
    gc.collect()
    pages = _rss_pages()
    return Footprint(
        fds=len(os.listdir("/proc/self/fd")),
        tasks=len(asyncio.all_tasks()),
        peer_connections=len(server.broker.router),
        conversations=await server.store.conversation_count(),
        sessions=len(server.broker.sessions),
        rss_mb=pages * resource.getpagesize() / 2**20,
    )


async def settled(server: GatewayServer, start: Footprint, timeout: float = 30.0) -> Footprint:
    """Wait for the churn to wind down (closing handshakes, aiortc's timers)."""
    async with asyncio.timeout(timeout):
        while True:
            now = await footprint(server)
            if (
                now.fds <= start.fds + 2
                and now.tasks <= start.tasks
                and now.peer_connections == now.conversations == now.sessions == 0
            ):
                return now
            await asyncio.sleep(0.25)


async def chat_cycle(server: GatewayServer, i: int) -> None:
    client = await Client.open(server.ws_url)
    room = f"soak-{i % 50}"
    await client.send({"type": "join", "token": make_token(f"c{i}", room=room)})
    await client.wait_for("joined")
    await client.send({"type": "chat", "text": f"message {i}"})
    await client.wait_for("chat", text=f"message {i}")
    if i % 3 == 0:
        await client.send({"type": "leave"})
        await client.wait_for("left")
    if i % 7 == 0:
        client.ws.transport.abort()  # vanished without a close frame
    else:
        await client.close()


async def media_session(server: GatewayServer, i: int) -> None:
    """One call, ended one of four ways."""
    rtc = RtcClient(await Client.open(server.ws_url))
    try:
        await rtc.client.send({"type": "join", "token": make_token(f"m{i}", room=f"media-{i}")})
        await rtc.wait_for("joined")
        rtc.pc.addTrack(ToneTrack(440))
        how = i % 4
        if how == 0:  # cut off mid-negotiation: the offer is sent, the socket dies
            await rtc.pc.setLocalDescription(await rtc.pc.createOffer())
            await rtc.client.send({"type": "offer", "sdp": rtc.pc.localDescription.sdp})
            rtc.client.ws.transport.abort()
            return
        await rtc.negotiate()
        connected = asyncio.Event()

        @rtc.pc.on("connectionstatechange")
        def changed() -> None:
            if rtc.pc.connectionState == "connected":
                connected.set()

        if rtc.pc.connectionState != "connected":
            await asyncio.wait_for(connected.wait(), 10)  # mid-call means the call is up: ICE and DTLS done
        if how == 1:  # hung up properly
            await rtc.client.send({"type": "hangup"})
        elif how == 2:  # cut off mid-call: media and socket die without a word
            await rtc.pc.close()
            rtc.client.ws.transport.abort()
        # how == 3: the client leaves the conversation (close below)
    finally:
        await rtc.close()


async def test_churn_leaves_no_leaks(server: GatewayServer) -> None:
    # Warm up: first imports, codec tables, allocator arenas.
    for i in range(20):
        await chat_cycle(server, -i - 1)
    await asyncio.gather(*(media_session(server, -i - 1) for i in range(8)))
    start = await settled(server, await footprint(server))

    for batch in range(0, CHAT_CYCLES, 20):
        await asyncio.gather(*(chat_cycle(server, i) for i in range(batch, min(batch + 20, CHAT_CYCLES))))
    for batch in range(0, MEDIA_SESSIONS, 8):
        await asyncio.gather(*(media_session(server, i) for i in range(batch, min(batch + 8, MEDIA_SESSIONS))))

    end = await settled(server, start)
    print(f"soak: {CHAT_CYCLES} chat cycles, {MEDIA_SESSIONS} media sessions; before {start}; after {end}")
    assert end.fds <= start.fds + 2
    assert end.tasks <= start.tasks
    assert end.peer_connections == end.conversations == end.sessions == 0
    assert end.rss_mb <= start.rss_mb + RSS_MARGIN_MB, (start, end)
