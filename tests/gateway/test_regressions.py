"""Regression tests for the bugs the core review found (issue 13), against a real gateway.

Each test's docstring names the bug it reproduces; the bot-side ones are in
tests/bot/test_regressions.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

import jwt
import pytest
from websockets.exceptions import InvalidStatus

from gateway import tokens
from gateway.config import Config
from gateway.server import GatewayServer
from tests.client import Client, get_json
from tests.conftest import SECRET, Party, make_token, start_audio


async def _until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll server state that has no event to wait on (counts kept by the gateway)."""
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def test_bug1_a_late_close_of_a_replaced_connection_does_not_hide_the_new_ones_media(
    party: Party, server: GatewayServer
) -> None:
    """Bug 1: after a reload with the old tab half-open, when the old connection finally
    closed, the agent was told the customer had no media although the new connection's
    audio flowed, and later ``joined`` messages left the customer out (``_evict`` left
    ``old.media`` set and ``close_media`` announced it)."""
    agent = await party("a1", "agent")
    agent.pc.addTransceiver("audio", direction="recvonly")
    await agent.negotiate()
    old = await party("u1")
    await start_audio(old, 440)
    await agent.wait_for("media", identity="u1", audio=True)
    # The old tab stops reading: it will not answer the close the gateway sends it.
    old.client.ws.transport.pause_reading()

    new = await party("u1")
    await start_audio(new, 660)
    await agent.wait_for("media", identity="u1", audio=True)
    heard = await agent.hears("audio")
    assert abs(heard.dominant_hz() - 660) < 30

    sessions = len(server.broker.sessions)
    old.client.ws.transport.resume_reading()  # the close handshake completes now
    await _until(lambda: len(server.broker.sessions) < sessions)
    with pytest.raises(TimeoutError):  # no "media: false" for u1
        await agent.wait_for("media", timeout=0.5, identity="u1", audio=False)
    # A later participant's joined lists u1 as sending audio.
    client = await Client.open(server.ws_url)
    await client.send({"type": "join", "token": make_token("a3", "agent", "call-room")})
    joined_msg = await client.expect("joined", conversation="call-room")
    assert {"identity": "u1", "audio": True, "video": False} in joined_msg["media"]
    await client.close()


@pytest.mark.parametrize("identity", ["bot", "system"])
async def test_bug3_reserved_identities_are_refused_in_tokens(server: GatewayServer, identity: str) -> None:
    """Bug 3: ``bot`` was not a reserved identity: a customer token with ``sub: "bot"``
    overwrote the bot's participant entry and the customer stopped hearing the bot."""
    with pytest.raises(ValueError, match="reserved"):
        make_token(identity, "customer", "r1")
    # A token minted elsewhere (any JWT library) with the reserved identity is refused too.
    forged = jwt.encode({"sub": identity, "role": "customer", "room": "r1", "exp": 2**33}, SECRET)
    client = await Client.open(server.ws_url)
    await client.send({"type": "join", "token": forged})
    error = await client.error("unauthorized")
    assert "reserved" in error["message"]
    assert await client.closed() == 4401
    assert {"bot", "system"} <= tokens.RESERVED_IDENTITIES


async def test_bug3_reserved_identities_are_refused_in_dev_joins(dev_server: GatewayServer) -> None:
    """Bug 3, dev mode: a join by fields cannot name itself ``bot`` either."""
    client = await Client.open(dev_server.ws_url)
    await client.send({"type": "join", "room": "r1", "identity": "bot"})
    await client.error("forbidden")
    assert await client.closed() == 4403


async def test_bug5_the_connection_limit_holds_for_concurrent_handshakes(config: Config) -> None:
    """Bug 5: ``max_connections`` was checked in the handshake and counted later in the
    session; safe only while nothing awaited in between (latent: the old code passes this
    test too). Now admission counts at once, so handshakes arriving together cannot pass
    the check together whatever the handshake awaits."""
    async with GatewayServer(dataclasses.replace(config, max_connections=5)) as server:

        async def attempt() -> Client | None:
            try:
                return await Client.open(server.ws_url)
            except InvalidStatus as exc:
                if exc.response.status_code != 503:
                    raise
                return None

        clients = await asyncio.gather(*(attempt() for _ in range(30)))
        opened = [c for c in clients if c is not None]
        assert len(opened) == 5
        assert server.connections == 5
        for client in opened:
            await client.close()
        await _until(lambda: server.connections == 0)
        # Refused and closed handshakes left no count behind: the limit is whole again.
        again = [c for c in await asyncio.gather(*(attempt() for _ in range(5))) if c is not None]
        assert len(again) == 5
        for client in again:
            await client.close()
        health = await asyncio.to_thread(get_json, server.url + "/healthz")
        assert health["status"] == "ok"


async def test_bug5_admitted_handshakes_that_fail_release_their_count(config: Config) -> None:
    """Bug 5, the other half of counting at admission: a handshake admitted by the limit
    check that then fails (no Sec-WebSocket-Key) must not keep its place for ever."""
    async with GatewayServer(dataclasses.replace(config, max_connections=2)) as server:
        for _ in range(10):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(
                b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n"
            )
            status = await reader.readline()
            assert b" 400 " in status, status
            writer.close()
            await writer.wait_closed()
        await _until(lambda: server.connections == 0)
        clients = [await Client.open(server.ws_url) for _ in range(2)]
        for client in clients:
            await client.close()
