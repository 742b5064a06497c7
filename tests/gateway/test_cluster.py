"""The node registry and a gateway on Redis (gateway/cluster.py, --redis): real Redis,
real gateway processes, a real SIGKILL."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator

import aiohttp
import pytest
import redis.asyncio as aioredis
from click.testing import CliRunner

from gateway.cli import main
from gateway.cluster import NodeInfo, Registry, live_nodes
from gateway.redis_store import connect
from tests.client import Client
from tests.conftest import SECRET, make_token, until
from tests.databases import free_port
from tests.gateway_process import GatewayProcess
from tests.redis_server import RedisServer

#: A Redis database of its own per test that runs gateways (they use the default prefix).
_databases = itertools.count(1)


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    redis = connect(redis_server.url())
    yield redis
    await redis.aclose()


def registry(redis: aioredis.Redis, prefix: str, node: str, dead: list[str]) -> Registry:
    async def describe() -> NodeInfo:
        return NodeInfo(id=node, url=f"http://{node}", conversations=3)

    async def on_dead(gone: str) -> None:
        dead.append(gone)

    return Registry(redis, prefix, describe, on_dead, ttl=0.5, refresh_seconds=0.1)


async def test_a_node_that_stops_refreshing_is_reaped_once(client: aioredis.Redis) -> None:
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    reaped: list[str] = []
    nodes = [registry(client, prefix, name, reaped) for name in ("n1", "n2", "n3")]
    for node in nodes:
        await node.start()
    listed = await live_nodes(client, prefix)
    assert [(n.id, n.url, n.conversations, n.draining) for n in listed] == [
        (f"n{i}", f"http://n{i}", 3, False) for i in (1, 2, 3)
    ]
    assert all(time.time() * 1000 - n.seen < 1000 for n in listed)
    await nodes[0]._owner.close()  # killed: it stops refreshing, its entry stays until it expires
    await until(lambda: reaped)
    await asyncio.sleep(0.3)  # both survivors refreshed again meanwhile
    assert reaped == ["n1"]  # by one of the two, once
    assert [n.id for n in await live_nodes(client, prefix)] == ["n2", "n3"]
    for node in nodes[1:]:
        await node.close()  # a clean stop removes its entry at once
    assert await live_nodes(client, prefix) == []
    assert await client.smembers(prefix + "nodes") == set()


async def test_a_killed_node_is_reaped_by_its_successor(redis_server: RedisServer) -> None:
    """SIGKILL a gateway on Redis with a customer waiting in the queue: the next gateway
    waits the dead node's entry out, reaps its participants (the records close the
    conversation, the queue empties), and the customer joins again."""
    url = redis_server.url(next(_databases))
    env = {"TALKGATE_SECRET": SECRET}
    first = GatewayProcess("serve", "--port", "0", "--redis", url, "--node-id", "first", env=env)
    try:
        ann = await Client.open(first.ws_url)
        await ann.send({"type": "join", "token": make_token("u1", "customer", "r1")})
        await ann.expect("joined")
        await ann.send({"type": "chat", "text": "still there?"})
        await ann.expect("chat")
        await ann.send({"type": "escalate"})
        await ann.wait_for("queued")
    finally:
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait()
    killed = time.monotonic()
    database = ["--database", f"sqlite:///{first.data.name}/talkgate.db"]  # the same records
    second = GatewayProcess("serve", "--port", "0", "--redis", url, "--node-id", "second", *database, env=env)
    try:
        started = time.monotonic() - killed
        assert started < 8  # the dead node's entry expires within 5 s

        async def reaped() -> dict[str, object] | None:  # by the first refresh, after the start-up lines
            health = await http_json(second.url + "/healthz")
            return health if health["conversations"] == 0 else None

        health = await until(reaped)
        assert (health["node"], health["redis"], health["conversations"]) == ("second", True, 0)
        agent = await Client.open(second.ws_url)
        await agent.send({"type": "join", "token": make_token("a1", "agent")})
        await agent.expect("joined")
        assert (await agent.expect("queue"))["waiting"] == []  # the dead node's customer left it
        ann = await Client.open(second.ws_url)
        await ann.send({"type": "join", "token": make_token("u1", "customer", "r1")})
        joined = await ann.expect("joined")
        assert [p["identity"] for p in joined["participants"]] == ["u1"]
        status = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "gateway", "cluster", "status", "--redis", url, "--json"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert [json.loads(line)["id"] for line in status.stdout.splitlines()] == ["second"]
        await ann.close()
        await agent.close()
    finally:
        log = second.stop()
    assert "node first stopped refreshing: reaping what it held" in log
    # The records have the customer's leave from the dead node, then the new join.
    with sqlite3.connect(f"{first.data.name}/talkgate.db") as db:
        rows = db.execute(
            "SELECT type, actor, json_extract(body, '$.reason') FROM events WHERE type LIKE 'participant.%' ORDER BY id"
        ).fetchall()
    assert rows[:3] == [
        ("participant.joined", "u1", None),
        ("participant.left", "u1", "node_lost"),
        ("participant.joined", "u1", None),
    ]


async def test_a_second_live_node_on_one_redis_is_refused(redis_server: RedisServer) -> None:
    url = redis_server.url(next(_databases))
    env = {"TALKGATE_SECRET": SECRET}
    first = GatewayProcess("serve", "--port", "0", "--redis", url, "--node-id", "one", env=env)
    try:
        second = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "gateway", "serve", "--port", "0", "--redis", url, "--database", "none"],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, **env},
        )
        assert second.returncode == 2
        assert "another gateway node is live on this Redis (one)" in second.stderr
    finally:
        first.stop()


async def http_json(url: str) -> dict[str, object]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        data: dict[str, object] = await response.json()
        return data


def test_an_unreachable_registry_is_an_error_without_the_password() -> None:
    url = f"redis://:hunter2-secret@127.0.0.1:{free_port()}/0"
    result = CliRunner().invoke(main, ["cluster", "status", "--redis", url])
    assert result.exit_code == 1
    assert f"could not read the registry at redis://:***@127.0.0.1:{url.rsplit(':', 1)[1]}" in result.output
    assert "hunter2" not in result.output
