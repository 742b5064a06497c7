"""The node registry and a gateway on Redis (gateway/cluster.py, --redis): real Redis,
real gateway processes, a real SIGKILL."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from click.testing import CliRunner

from gateway.cli import main
from gateway.cluster import NodeInfo, Registry, live_nodes, read_status
from gateway.redis_store import connect
from tests.client import Client
from tests.conftest import SECRET, make_token, start_audio, until
from tests.databases import PostgresCluster, free_port
from tests.gateway_process import RTC_LOOPBACK_ARGS, GatewayProcess
from tests.redis_server import RedisServer
from tests.rtc_client import RtcClient

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


async def test_a_killed_nodes_clients_carry_on_through_another_node(
    redis_server: RedisServer, postgres: PostgresCluster
) -> None:
    """Two gateway processes on one Redis and one PostgreSQL; SIGKILL the one two waiting
    customers are connected to. One reconnects through the other node within the grace
    time: its conversation, its history and its place in the queue are intact, and an
    agent takes it. The other never comes back: it leaves with reason ``node_lost`` once
    the dead node has been noticed and the grace time is over, and its queue entry goes.
    Redis keeps nothing of the dead node."""
    url = redis_server.url(next(_databases))
    name = postgres.create_database()
    database = postgres.url(name)
    env = {"TALKGATE_SECRET": SECRET}
    common = ["serve", "--port", "0", "--redis", url, "--database", database, "--reconnect-grace-seconds", "2"]
    first = GatewayProcess(*common, "--node-id", "first", env=env)
    second = GatewayProcess(*common, "--node-id", "second", env=env)
    clients: list[Client] = []
    try:
        agent, _ = await join(second.ws_url, "a1", "agent", None, clients.append)
        await agent.expect("queue")
        for identity, room in (("u1", "r1"), ("u2", "r2")):
            customer, _ = await join(first.ws_url, identity, "customer", room, clients.append)
            await customer.send({"type": "chat", "text": f"{identity} here"})
            await customer.expect("chat")
            await customer.send({"type": "escalate"})
            await customer.wait_for("queued")
        while len((await agent.wait_for("queue"))["waiting"]) < 2:
            pass
        # u3 (on the live node) talks to a3, whose console is on the node about to die.
        cid, _ = await join(second.ws_url, "u3", "customer", "r3", clients.append)
        await join(first.ws_url, "a3", "agent", "r3", clients.append)
        await cid.wait_for("participant.joined", identity="a3")
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait()
        killed = time.monotonic()

        # u1 reconnects at once (as the SDK does) through the live node.
        ann, joined = await join(second.ws_url, "u1", "customer", "r1", clients.append)
        assert [m["text"] for m in joined["history"]][:1] == ["u1 here"]

        # u2 and a3 never come back: u2's entry goes, r3 goes back to the queue (agent_lost).
        waiting: dict[str, str] = {}
        while sorted(waiting) != ["r1", "r3"]:
            message = await agent.wait_for("queue", timeout=15)
            waiting = {w["conversation"]: w["reason"] for w in message["waiting"]}
        assert waiting["r3"] == "agent_lost"
        assert (await cid.wait_for("participant.left", identity="a3"))["identity"] == "a3"
        assert "agent was disconnected" in (await cid.wait_for("chat"))["text"]
        gone = time.monotonic() - killed
        assert gone < 5 + 1.5 + 2 + 1.5  # the entry's expiry, a refresh, the grace time, slack
        await agent.send({"type": "accept", "conversation": "r1"})
        await agent.wait_for("joined", conversation="r1")
        await agent.send({"type": "chat", "conversation": "r1", "text": "hello u1"})
        assert (await ann.wait_for("chat"))["text"] == "hello u1"

        status = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "gateway", "cluster", "status", "--redis", url, "--json"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert [json.loads(line)["id"] for line in status.stdout.splitlines()] == ["second"]
        redis = connect(url)
        try:
            assert not await redis.exists("talkgate:node:first", "talkgate:np:first")
            assert await redis.smembers("talkgate:nodes") == {b"second"}
        finally:
            await redis.aclose()
    finally:
        for client in clients:
            await client.close()
        if first.proc.poll() is None:
            first.stop()
        log = second.stop()
    assert "node first stopped refreshing: reaping what it held" in log
    rows = postgres.psql(
        "SELECT type || ' ' || actor || ' ' || coalesce(body::json->>'reason', '-') FROM events "
        "WHERE type LIKE 'participant.%' AND actor LIKE 'u%' ORDER BY id",
        database=name,
    ).splitlines()
    # u1: back through the live node before the dead one was noticed (then it left as the
    # test ended); u2: away on the node that adopted it, then gone.
    assert [r for r in rows if " u1 " in r][:2] == ["participant.joined u1 -", "participant.returned u1 -"]
    assert [r for r in rows if " u2 " in r] == [
        "participant.joined u2 -",
        "participant.away u2 -",
        "participant.left u2 node_lost",
    ]


async def test_a_node_id_that_is_live_is_refused(redis_server: RedisServer) -> None:
    url = redis_server.url(next(_databases))
    env = {"TALKGATE_SECRET": SECRET}
    first = GatewayProcess("serve", "--port", "0", "--redis", url, "--node-id", "one", env=env)
    try:
        args = ["serve", "--port", "0", "--redis", url, "--database", "none", "--node-id", "one"]
        second = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "gateway", *args],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, **env},
        )
        assert second.returncode == 2
        assert "another gateway node with the id 'one' is live on this Redis" in second.stderr
    finally:
        first.stop()


async def join(
    url: str, identity: str, role: str, room: str | None, keep: Callable[[Client], None]
) -> tuple[Client, dict[str, Any]]:
    """Open a client to ``url`` (``keep``: the test's list of clients to close) and join;
    the client and its ``joined``."""
    client = await Client.open(url)
    keep(client)
    await client.send({"type": "join", "token": make_token(identity, role, room)})
    return client, await client.expect("joined")


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


async def test_two_workers_on_one_port_are_one_gateway(redis_server: RedisServer, postgres: PostgresCluster) -> None:
    """``--workers 2``: one port, two processes. 25 customers and 25 agents connect
    (the kernel spreads them over both), pair up in 25 conversations and every chat
    arrives both ways. A worker killed with SIGKILL is replaced by a new node; SIGTERM
    stops the supervisor and its workers cleanly."""
    url = redis_server.url(next(_databases))
    database = postgres.url(postgres.create_database())
    gateway = GatewayProcess(
        "serve", "--port", "0", "--redis", url, "--database", database, "--workers", "2",
        "--node-id", "gw", env={"TALKGATE_SECRET": SECRET}, drain=True,
    )  # fmt: skip
    clients: list[Client] = []
    try:
        pairs = []
        for i in range(25):
            customer, _ = await join(gateway.ws_url, f"u{i}", "customer", f"r{i}", clients.append)
            agent, _ = await join(gateway.ws_url, f"a{i}", "agent", f"r{i}", clients.append)
            pairs.append((customer, agent))

        async def both_serve() -> dict[str, int] | None:
            nodes = await read_status(url, "talkgate:")
            sessions = {node.id: node.sessions for node in nodes}
            return sessions if sum(sessions.values()) == 50 else None

        sessions = await until(both_serve, timeout=10)
        assert sorted(sessions) == ["gw-w1", "gw-w2"]
        assert all(count > 0 for count in sessions.values()), sessions  # both took clients
        # Each worker's own /healthz and /metrics, as the registry lists them (the shared
        # port answers from whichever worker the kernel picks).
        own = {node.id: node.node_url for node in await read_status(url, "talkgate:")}
        assert len(set(own.values())) == 2 and gateway.url not in own.values(), own
        async with aiohttp.ClientSession() as http:
            for node, node_url in own.items():
                async with http.get(node_url + "/healthz") as response:
                    health = await response.json()
                assert (health["node"], health["sessions"]) == (node, sessions[node])
                async with http.get(node_url + "/metrics") as response:
                    assert f"talkgate_sessions {sessions[node]}.0" in await response.text()
                async with http.get(node_url + "/ws") as response:
                    assert response.status == 404  # websockets are on the shared port
        for i, (customer, agent) in enumerate(pairs):
            await customer.send({"type": "chat", "text": f"from u{i}"})
            await agent.send({"type": "chat", "text": f"from a{i}"})
        for i, (customer, agent) in enumerate(pairs):
            for client in (customer, agent):
                texts = {(await client.wait_for("chat"))["text"] for _ in range(2)}
                assert texts == {f"from u{i}", f"from a{i}"}

        pids = dict(re.findall(r"(w\d) pid (\d+)", "".join(gateway.log_tail)))
        os.kill(int(pids["w1"]), signal.SIGKILL)

        async def replaced() -> list[str] | None:
            ids = sorted(node.id for node in await read_status(url, "talkgate:"))
            return ids if ids == ["gw-w1-r1", "gw-w2"] else None

        await until(replaced, timeout=15)
    finally:
        for client in clients:
            await client.close()
        log = gateway.stop()
    assert "worker w1 (pid" in log and "exited with -9: starting a new one" in log
    assert "workers exited: w1 0, w2 0" in log


async def test_a_draining_node_exits_once_its_conversations_moved(
    redis_server: RedisServer, postgres: PostgresCluster
) -> None:
    """SIGTERM on the node a customer is connected to: it says it drains (the registry),
    tells the customer to reconnect; the customer does, through the other node, and the
    conversation goes on there with nothing lost; the drained node exits 0 well within
    its drain time."""
    url = redis_server.url(next(_databases))
    name = postgres.create_database()
    env = {"TALKGATE_SECRET": SECRET}
    common = ["serve", "--port", "0", "--redis", url, "--database", postgres.url(name), "--drain-seconds", "20"]
    leaving = GatewayProcess(*common, "--node-id", "leaving", env=env)
    staying = GatewayProcess(*common, "--node-id", "staying", env=env)
    clients: list[Client] = []
    try:
        ann, _ = await join(leaving.ws_url, "u1", "customer", "r1", clients.append)
        bob, _ = await join(staying.ws_url, "a1", "agent", "r1", clients.append)
        await ann.wait_for("participant.joined")
        await ann.send({"type": "chat", "text": "before"})
        await bob.wait_for("chat", text="before")
        leaving.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert (await ann.wait_for("shutdown"))["retry_after_ms"] > 0

        async def draining() -> bool:
            return [n.draining for n in await read_status(url, "talkgate:") if n.id == "leaving"] == [True]

        await until(draining)
        await ann.close()  # as the SDK does on shutdown: reconnect (here, to the other node)
        ann, joined = await join(staying.ws_url, "u1", "customer", "r1", clients.append)
        assert [m["text"] for m in joined["history"]] == ["before"]
        code = await asyncio.to_thread(leaving.proc.wait, 20)
        assert code == 0
        assert time.monotonic() - signalled < 10  # it left when the conversation moved, not at 20 s
        await ann.send({"type": "chat", "text": "after"})
        assert (await bob.wait_for("chat", text="after"))["text"] == "after"
        assert [p["identity"] for p in joined["participants"]] == ["u1", "a1"]
        assert not [m for m in bob.skipped if m["type"] == "participant.left"]  # u1 never left
    finally:
        for client in clients:
            await client.close()
        if leaving.proc.poll() is None:
            leaving.stop()
        staying.stop()


async def test_three_processes_are_one_gateway_and_survive_their_home_node_dying(
    redis_server: RedisServer, postgres: PostgresCluster
) -> None:
    """Three gateway processes on one Redis and one PostgreSQL. A customer on n1 (the
    conversation's home: it joined there first) asks for a person; agents on n2 and n3
    both see it, both accept at once, one wins; chat flows both ways and each hears the
    other's tone (the agent's call relayed to n1). Then n1 is killed: the customer
    reconnects through n3 with its history, both offer again, the conversation gets a
    new home at once (n1's channel has no subscriber) and they hear each other again;
    once n1's entry has expired, Redis holds nothing of it."""
    url = redis_server.url(next(_databases))
    env = {"TALKGATE_SECRET": SECRET}
    common = ["serve", "--port", "0", "--redis", url, "--database", postgres.url(postgres.create_database())]
    n1, n2, n3 = (GatewayProcess(*common, *RTC_LOOPBACK_ARGS, "--node-id", f"n{i}", env=env) for i in (1, 2, 3))
    opened: list[Client | RtcClient] = []
    try:
        agents = {
            "a2": (await join(n2.ws_url, "a2", "agent", None, opened.append))[0],
            "a3": (await join(n3.ws_url, "a3", "agent", None, opened.append))[0],
        }
        for lobby in agents.values():
            assert (await lobby.expect("queue"))["waiting"] == []
        customer = RtcClient((await join(n1.ws_url, "u1", "customer", "r1", opened.append))[0])
        opened.append(customer)
        await customer.client.send({"type": "chat", "text": "my router is broken"})
        await customer.client.send({"type": "escalate"})
        for lobby in agents.values():
            while [w["conversation"] for w in (await lobby.wait_for("queue"))["waiting"]] != ["r1"]:
                pass
        await asyncio.gather(*(a.send({"type": "accept", "conversation": "r1"}) for a in agents.values()))
        outcomes = {}
        for name, lobby in agents.items():
            message = await lobby.recv()
            while message["type"] not in ("joined", "error"):
                message = await lobby.recv()
            outcomes[name] = message.get("code", message["type"])
        assert sorted(outcomes.values()) == ["conflict", "joined"]
        winner_name = next(name for name, outcome in outcomes.items() if outcome == "joined")
        winner_node = n2 if winner_name == "a2" else n3
        agent = RtcClient(agents[winner_name])
        opened.append(agent)
        await agent.client.send({"type": "chat", "conversation": "r1", "text": "let me see"})
        assert (await customer.wait_for("chat", text="let me see"))["text"] == "let me see"
        await start_audio(customer, 440)
        await start_audio(agent, 880)
        await customer.hears_tone(880)
        await agent.hears_tone(440)

        n1.proc.send_signal(signal.SIGKILL)
        n1.proc.wait()
        killed = time.monotonic()
        customer = RtcClient((await join(n3.ws_url, "u1", "customer", "r1", opened.append))[0])
        opened.append(customer)
        await start_audio(customer, 440)  # a new home: n3
        await agent.renew()
        await start_audio(agent, 880)
        await customer.hears_tone(880, timeout=10)
        await agent.hears_tone(440, timeout=10)
        restored = time.monotonic() - killed
        assert restored < 10
        redis = connect(url)
        try:
            assert await redis.hget("talkgate:home", "r1") == b"n3"
            history = await redis.lrange("talkgate:h:r1", 0, -1)
            assert [json.loads(m)["text"] for m in history][:2] == [
                "my router is broken",
                "u1 asked to talk to a person. An agent will join shortly.",
            ]

            async def forgotten() -> bool:
                gone = not await redis.exists("talkgate:node:n1", "talkgate:np:n1")
                return gone and await redis.smembers("talkgate:nodes") == {b"n2", b"n3"}

            await until(forgotten, timeout=10)  # the entry's expiry, then a refresh reaps it
        finally:
            await redis.aclose()
        print(f"home node killed -> audio both ways again in {restored:.1f} s (the agent on {winner_node.url})")
    finally:
        for client in opened:
            await client.close()
        for node in (n1, n2, n3):
            if node.proc.poll() is None:
                node.stop()
