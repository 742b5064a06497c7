"""Fixtures: a real gateway on a free loopback port, and real websocket clients."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiortc.mediastreams import MediaStreamTrack

from gateway import tokens
from gateway.config import Config
from gateway.server import GatewayServer
from media import ice
from tests.client import Client
from tests.databases import PostgresCluster, PostgresUnavailable
from tests.redis_server import RedisServer, RedisUnavailable
from tests.rtc_client import RtcClient, ToneTrack

SECRET = "test-secret-0123456789abcdef-0123456789"


def make_token(identity: str, role: str = "customer", room: str | None = None, **kwargs: Any) -> str:
    return tokens.issue(SECRET, identity=identity, role=role, room=room, **kwargs)


#: WebRTC in tests stays on loopback: advertise 127.0.0.1, accept only loopback candidates.
RTC_LOOPBACK = {"rtc_addresses": ("127.0.0.1",), "rtc_allowed_networks": ("127.0.0.0/8",)}


@pytest.fixture(autouse=True, scope="session")
def _loopback_ice() -> None:
    """The aiortc clients in this process advertise loopback only, like the gateway."""
    ice.use_host_addresses(["127.0.0.1"])


@pytest.fixture
def config() -> Config:
    """Most tests want a lost connection to leave at once; the reconnect grace has its own
    tests (tests/gateway/test_signaling.py), and the browser tests run the default."""
    return Config(
        host="127.0.0.1",
        port=0,
        secret=SECRET,
        reconnect_grace_seconds=0,
        **RTC_LOOPBACK,  # type: ignore[arg-type]
    )


@pytest.fixture
async def server(config: Config) -> AsyncIterator[GatewayServer]:
    async with GatewayServer(config) as srv:
        yield srv


@pytest.fixture
async def dev_server(config: Config) -> AsyncIterator[GatewayServer]:
    async with GatewayServer(dataclasses.replace(config, dev=True)) as srv:
        yield srv


Connect = Callable[..., Awaitable[Client]]


@pytest.fixture
async def connect(server: GatewayServer) -> AsyncIterator[Connect]:
    """Open clients to the server; all are closed at teardown."""
    clients: list[Client] = []

    async def open_client(url: str | None = None) -> Client:
        client = await Client.open(url or server.ws_url)
        clients.append(client)
        return client

    yield open_client
    for client in clients:
        await client.close()


Join = Callable[..., Awaitable[tuple[Client, dict[str, Any]]]]


@pytest.fixture
def join(connect: Connect) -> Join:
    """Connect and join with a fresh token; returns (client, joined message)."""

    async def do_join(
        identity: str, role: str = "customer", room: str | None = None, **kwargs: Any
    ) -> tuple[Client, dict[str, Any]]:
        client = await connect()
        await client.send({"type": "join", "token": make_token(identity, role, room, **kwargs)})
        joined = await client.expect("joined", identity=identity, role=role)
        if role == "agent":
            await client.expect("queue")
        return client, joined

    return do_join


# -- calls: parties with real aiortc peer connections ------------------------------------

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


async def listen_only(rtc: RtcClient) -> None:
    """Offer to receive audio and send none (a tone would count as speech: barge-in)."""
    rtc.pc.addTransceiver("audio", direction="recvonly")
    await rtc.negotiate()


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


async def until(check: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Poll ``check`` (a function or a coroutine function) every 20 ms until it returns
    something truthy, and return that: for what has no event to wait on (statistics,
    commits that land just after what clients see, a background refresh)."""
    async with asyncio.timeout(timeout):
        while True:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return result
            await asyncio.sleep(0.02)


# -- databases: SQLite, and a real PostgreSQL cluster started for the session -------------


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """One throwaway PostgreSQL cluster per test session (tests/databases.py), started only
    when a test asks for it, stopped at the end. Where it cannot start, tests that need it
    fail under CI (a CI run must test PostgreSQL) and are skipped elsewhere."""
    try:
        cluster = PostgresCluster.start()
    except PostgresUnavailable as exc:
        problem = f"PostgreSQL unavailable: {exc}"
    else:
        with cluster:
            yield cluster
        return
    # Outside the except block: the message alone, not a chain of tracebacks.
    if os.environ.get("CI"):
        pytest.fail(problem, pytrace=False)
    pytest.skip(problem)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One throwaway Redis server per test session (tests/redis_server.py), started only
    when a test asks for it. Where it cannot start, tests that need it fail under CI and
    are skipped elsewhere. Tests share it: each uses a key prefix of its own."""
    try:
        server = RedisServer.start()
    except RedisUnavailable as exc:
        problem = f"Redis unavailable: {exc}"
    else:
        with server:
            yield server
        return
    if os.environ.get("CI"):
        pytest.fail(problem, pytrace=False)
    pytest.skip(problem)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database for this test alone, as a SQLAlchemy async URL: a SQLite file
    in tmp_path, or a new database in the session's PostgreSQL cluster (dropped after)."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'talkgate.db'}"
        return
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    name = cluster.create_database()
    yield cluster.url(name)
    cluster.drop_database(name)
