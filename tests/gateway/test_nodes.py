"""Several gateway nodes on one Redis behave as one (gateway/bus.py): real servers on
free ports, real Redis, real websockets. The nodes here share this test's event loop
(a node is a ``GatewayServer`` with its own store, bus and registry); the tests with
real processes, SIGKILL and ``--workers`` are in test_cluster.py."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from gateway import events as ev
from gateway.access import CLOSE_REPLACED
from gateway.cluster import live_nodes
from gateway.config import Config
from gateway.errors import Unavailable
from gateway.records import SqlRecords
from gateway.redis_store import RedisStore
from gateway.server import GatewayServer
from tests.bot_server import TestBot, running_bot, send_audio
from tests.client import Client
from tests.conftest import listen_only, make_token, start_audio, until
from tests.databases import PostgresCluster
from tests.redis_server import RedisServer
from tests.rtc_client import PatternTrack, RtcClient

Nodes = Callable[..., Awaitable[list[GatewayServer]]]
Entered = Callable[..., Awaitable[tuple[Client, dict[str, Any]]]]


@pytest.fixture
async def bot() -> AsyncIterator[TestBot]:
    async with running_bot() as test_bot:
        yield test_bot


@pytest.fixture
def redis(request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    """The Redis the nodes use: the session's, or (parametrized "own") one of this test's
    own, for a test that restarts it."""
    if getattr(request, "param", None) != "own":
        yield request.getfixturevalue("redis_server")
        return
    with RedisServer.start() as server:
        yield server


@pytest.fixture
async def nodes(config: Config, redis: RedisServer) -> AsyncIterator[Nodes]:
    """``await nodes(3)``: that many nodes on one Redis (a key prefix of this test's own)."""
    redis_server = redis
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    async with contextlib.AsyncExitStack() as stack:

        async def start(count: int, **changes: Any) -> list[GatewayServer]:
            started = []
            for i in range(count):
                store = RedisStore(
                    redis_server.url(),
                    prefix=prefix,
                    node=f"n{i + 1}",
                    history_limit=config.history_limit,
                    retention_seconds=config.history_retention_seconds,
                    retained_limit=config.max_conversations,
                )
                stack.push_async_callback(store.close)
                node_config = dataclasses.replace(config, **changes)
                started.append(await stack.enter_async_context(GatewayServer(node_config, store=store)))
            return started

        yield start


@pytest.fixture
async def entered() -> AsyncIterator[Entered]:
    """``await entered(node, identity, role, room)``: a client joined through that node,
    and the ``joined`` it got."""
    opened: list[Client] = []

    async def join(
        node: GatewayServer, identity: str, role: str = "customer", room: str | None = None
    ) -> tuple[Client, dict[str, Any]]:
        client = await Client.open(node.ws_url)
        opened.append(client)
        await client.send({"type": "join", "token": make_token(identity, role, room)})
        return client, await client.expect("joined", identity=identity)

    yield join
    for client in opened:
        await client.close()


@pytest.fixture
def clients(entered: Entered) -> Callable[[GatewayServer, str, str, str | None], Awaitable[Client]]:
    """``await join(node, identity, role, room)``: a client joined through that node."""

    async def join(node: GatewayServer, identity: str, role: str = "customer", room: str | None = None) -> Client:
        return (await entered(node, identity, role, room))[0]

    return join


async def test_chat_and_presence_cross_nodes(nodes: Nodes, clients: Any) -> None:
    n1, n2 = await nodes(2)
    ann = await clients(n1, "u1", "customer", "r1")
    bob = await clients(n2, "a1", "agent", "r1")
    await bob.expect("queue")
    assert (await ann.expect("participant.joined"))["identity"] == "a1"  # from n2, over the bus
    await ann.send({"type": "chat", "text": "hello from n1"})
    assert (await ann.expect("chat"))["text"] == "hello from n1"  # the echo, local
    assert (await bob.wait_for("chat"))["text"] == "hello from n1"
    await bob.send({"type": "chat", "text": "hello from n2"})
    assert (await ann.expect("chat"))["text"] == "hello from n2"
    assert (await bob.expect("chat"))["text"] == "hello from n2"
    # Each node learned where the other's participant is from the steps: no lookup per chat.
    for node in (n1, n2):
        assert node.bus is not None
        assert node.bus.placement.get("r1") is not None
        assert node.bus.placement.others("r1") == frozenset({"n1", "n2"} - {node.bus.node})
    await bob.send({"type": "leave"})
    await bob.expect("left")
    left = await ann.expect("participant.left")
    assert left["identity"] == "a1"


async def test_the_queue_reaches_agents_on_every_node_and_one_accept_wins(nodes: Nodes, clients: Any) -> None:
    n1, n2, n3 = await nodes(3)
    agents = [await clients(node, f"a{i}", "agent") for i, node in ((2, n2), (3, n3))]
    for agent in agents:
        assert (await agent.expect("queue"))["waiting"] == []
    ann = await clients(n1, "u1", "customer", "r1")
    await ann.send({"type": "escalate", "reason": "billing"})
    await ann.wait_for("queued")
    for agent in agents:
        queue = await agent.wait_for("queue")
        assert [(w["conversation"], w["reason"]) for w in queue["waiting"]] == [("r1", "billing")]
    await asyncio.gather(*(agent.send({"type": "accept", "conversation": "r1"}) for agent in agents))
    outcomes = []
    for agent in agents:
        message = await agent.recv()
        while message["type"] not in ("joined", "error"):
            message = await agent.recv()
        outcomes.append(message["type"] if message["type"] == "joined" else message["code"])
    assert sorted(outcomes) == ["conflict", "joined"]
    winner = agents[outcomes.index("joined")]
    for agent in agents:
        assert (await agent.wait_for("queue"))["waiting"] == []  # the accept emptied it, everywhere
    assert (await ann.wait_for("participant.joined"))["role"] == "agent"
    await winner.send({"type": "chat", "text": "how can I help?"})
    assert (await ann.wait_for("chat"))["text"] == "how can I help?"


async def test_a_queue_snapshot_never_goes_back(nodes: Nodes, clients: Any) -> None:
    """Many customers escalate through two nodes at once: each node publishes its snapshot,
    and an agent's last queue is the full one (an older snapshot arriving late is dropped)."""
    n1, n2, n3 = await nodes(3)
    agent = await clients(n3, "a1", "agent")
    await agent.expect("queue")
    customers = [await clients((n1, n2)[i % 2], f"u{i}", "customer", f"r{i}") for i in range(12)]
    await asyncio.gather(*(c.send({"type": "escalate"}) for c in customers))
    for c in customers:
        await c.wait_for("queued")

    lengths: list[int] = []

    async def full() -> bool:
        with contextlib.suppress(TimeoutError):
            while True:
                lengths.append(len((await agent.recv(timeout=0.3))["waiting"]))
        return bool(lengths) and lengths[-1] == 12

    assert await until(full)
    assert lengths == sorted(lengths)  # versions only grow


async def test_reconnecting_through_another_node_within_the_grace_time(nodes: Nodes, clients: Any) -> None:
    """The customer's connection to n1 drops; it rejoins through n2 within the grace time:
    nobody sees it leave, and n1's grace time ending does not remove it."""
    n1, n2 = await nodes(2, reconnect_grace_seconds=0.6)
    ann = await clients(n1, "u1", "customer", "r1")
    bob = await clients(n2, "a1", "agent", "r1")
    await bob.expect("queue")
    await ann.expect("participant.joined")
    await ann.close()
    await asyncio.sleep(0.1)
    ann = await clients(n2, "u1", "customer", "r1")
    await asyncio.sleep(1.0)  # n1's grace time is over
    await bob.send({"type": "chat", "text": "still there?"})
    assert (await ann.wait_for("chat"))["text"] == "still there?"
    await bob.wait_for("chat", text="still there?")
    assert [m["type"] for m in bob.skipped] == []  # no participant.left, no participant.joined
    assert n1.store is not n2.store
    assert [p.identity for p in await n1.store.participants("r1") or []] == ["u1", "a1"]


async def test_a_call_between_three_nodes_lives_on_the_home_node(nodes: Nodes, clients: Any) -> None:
    """The conversation's home is n3 (the customer joined there first, then reconnected
    through n1); the agent is on n2. Both offer through their own node; the home node's
    peer connections answer them, and each hears the other's tone."""
    n1, n2, n3 = await nodes(3, reconnect_grace_seconds=5)
    first = await clients(n3, "u1", "customer", "r1")
    await first.close()
    customer = RtcClient(await clients(n1, "u1", "customer", "r1"))
    agent = RtcClient(await clients(n2, "a1", "agent", "r1"))
    try:
        assert await n1.store.home("r1") == "n3"
        await start_audio(customer, 440)
        await start_audio(agent, 880)
        await customer.hears_tone(880)
        await agent.hears_tone(440)
        assert (len(n1.broker.calls), len(n2.broker.calls), len(n3.broker.calls)) == (0, 0, 2)
        assert {p.identity for p in n3.broker.calls.peers("r1")} == {"u1", "a1"}
        # Hanging up through n2 ends the agent's call at home.
        await agent.client.send({"type": "hangup"})
        await until(lambda: len(n3.broker.calls) == 1)
        await customer.wait_for("media", identity="a1", audio=False)  # told through n1
    finally:
        await customer.close()
        await agent.close()
    await until(lambda: len(n3.broker.calls) == 0)  # the customer's connection closed: its call ended at home


async def homed_on_n3_back_through_n1(
    nodes: Nodes, clients: Any, bot: TestBot
) -> tuple[GatewayServer, GatewayServer, RtcClient]:
    """Three nodes; customer u1 joins r1 on n3 (its home: the bot is dialled from there),
    leaves and comes back through n1 within the grace. Returns n1, n3 and the customer."""
    n1, _, n3 = await nodes(3, reconnect_grace_seconds=5, bot_url=bot.url, bot_connect_seconds=1.0)
    first = await clients(n3, "u1", "customer", "r1")
    await bot.wait_for("start")
    await first.close()
    return n1, n3, RtcClient(await clients(n1, "u1", "customer", "r1"))


async def test_the_bot_of_a_conversation_homed_elsewhere_hears_the_customer(
    nodes: Nodes, clients: Any, bot: TestBot
) -> None:
    """The bot is dialled from the home node (n3, where the customer joined first); the
    customer, reconnected through n1, calls: its audio reaches the bot through n3."""
    n1, n3, customer = await homed_on_n3_back_through_n1(nodes, clients, bot)
    try:
        await start_audio(customer, 440)
        await bot.wait_for("call.started")
        await bot.wait_for("speech.started")  # a steady tone is voiced
        assert n3.broker.bots.get("r1") is not None and n1.broker.bots.get("r1") is None
        assert len(bot.connections) == 1  # one link, from the home node
    finally:
        await customer.close()


@pytest.mark.parametrize("encoding", ["pcm_s16le", "opus"])
async def test_the_bot_of_a_conversation_homed_elsewhere_is_heard_through_another_node(
    nodes: Nodes, clients: Any, bot: TestBot, encoding: str
) -> None:
    """The bot's voice, PCM that the home node encodes or the bot's own Opus packets that
    it sends on, reaches a customer whose signaling goes through another node: the call,
    the bot's link and its playback are the home node's (n3)."""
    n1, n3, customer = await homed_on_n3_back_through_n1(nodes, clients, bot)
    try:
        await listen_only(customer)
        await bot.wait_for("call.started")
        await bot.send({"type": "audio.format", "encoding": encoding})
        await send_audio(bot, 3.0, encoding)
        await bot.send({"type": "mark", "name": "said"})
        await customer.hears_tone(660)
        assert (await bot.wait_for("mark", timeout=8))["name"] == "said"  # played to the end, at home
        link = n3.broker.bots.get("r1")
        assert link is not None and link.playback.passthrough is (encoding == "opus") and link.bad_messages == 0
        assert n1.broker.bots.get("r1") is None
    finally:
        await customer.close()


@pytest.mark.parametrize("redis", ["own"], indirect=True)
async def test_a_redis_restart_is_survived(nodes: Nodes, clients: Any, redis: RedisServer) -> None:
    """Redis stops while a conversation between two nodes is live: a chat meanwhile is
    ``unavailable`` (nothing crashes, nobody is disconnected). It comes back empty: each
    node notices at its next refresh, registers again and puts back the participants it
    holds; chats sent after that arrive, across nodes."""
    n1, n2 = await nodes(2)
    ann = await clients(n1, "u1", "customer", "r1")
    bob = await clients(n2, "a1", "agent", "r1")
    await bob.expect("queue")
    await ann.expect("participant.joined")
    redis.down()
    await ann.send({"type": "chat", "text": "anyone?"})
    assert (await ann.expect("error"))["code"] == "unavailable"
    health = await n1.health()
    assert (health["status"], health["conversations"], health["redis"]) == ("degraded", None, False)
    redis.up()  # empty

    async def rebuilt() -> bool:
        participants = await n1.store.participants("r1")
        nodes_alive = await live_nodes(n1.store.redis, n1.store.prefix)  # type: ignore[attr-defined]
        return participants is not None and len(participants) == 2 and len(nodes_alive) == 2

    await until(rebuilt, timeout=10)
    await ann.send({"type": "chat", "text": "back again"})
    assert (await ann.expect("chat"))["text"] == "back again"
    assert (await bob.wait_for("chat"))["text"] == "back again"
    await bob.send({"type": "chat", "text": "welcome back"})
    assert (await ann.wait_for("chat"))["text"] == "welcome back"
    await bob.wait_for("chat", text="welcome back")  # its echo
    await ann.ping()
    await bob.ping()


@pytest.mark.parametrize("redis", ["own"], indirect=True)
async def test_after_a_redis_restart_nodes_trust_the_new_versions(
    nodes: Nodes, clients: Any, redis: RedisServer
) -> None:
    """Placements and the queue are versioned by Redis counters, and each node keeps the
    newest version it heard of. An empty Redis must not start them again: a node would
    ignore everything newer for a while, e.g. not send a conversation's chat to a node that
    joined it after the restart, nor show its agents the customers who wait from then on."""
    n1, n2, n3 = await nodes(3)
    for i in range(10):  # the counters go up: r1's first version and the queue's with them
        other = await clients(n2, f"x{i}", "customer", f"busy{i}")
        await other.send({"type": "escalate"})
        await other.wait_for("queued")
        await other.send({"type": "leave"})
        await other.wait_for("left")
    ann = await clients(n1, "u1", "customer", "r1")
    bob = await clients(n2, "a1", "agent", "r1")
    await bob.expect("queue")
    await ann.send({"type": "chat", "text": "before"})
    await bob.wait_for("chat", text="before")
    redis.down()
    redis.up()  # empty

    async def rebuilt() -> bool:
        with contextlib.suppress(Unavailable):  # the first command after the restart
            participants = await n1.store.participants("r1")
            return participants is not None and len(participants) == 2
        return False

    await until(rebuilt, timeout=10)
    cat = await clients(n3, "a2", "agent", "r1")  # after the restart, through a third node
    await ann.wait_for("participant.joined", identity="a2")
    await ann.send({"type": "chat", "text": "after"})
    assert (await cat.wait_for("chat"))["text"] == "after"
    dan = await clients(n1, "u2", "customer", "r2")
    await dan.send({"type": "escalate"})
    await dan.wait_for("queued")
    for agent in (bob, cat):  # on n2 and n3
        while [w["conversation"] for w in (await agent.wait_for("queue"))["waiting"]] != ["r2"]:
            pass


async def test_every_node_forgets_a_conversation_another_node_closed(
    nodes: Nodes, clients: Any, postgres: PostgresCluster
) -> None:
    """The customer (n1) leaves first, then the agent (n2) ends the conversation: n1 holds
    nobody in it any more, yet it must hear of the end too (its records writer still has
    the room's record in mind; its calls and relays may have state)."""
    n1, n2 = await nodes(2, database=postgres.url(postgres.create_database()))
    ann = await clients(n1, "u1", "customer", "r1")
    bob = await clients(n2, "a1", "agent", "r1")
    await bob.expect("queue")
    await ann.send({"type": "chat", "text": "bye"})
    await bob.wait_for("chat", text="bye")
    assert isinstance(n1.records, SqlRecords) and n1.records._writer is not None
    assert n1.records._writer.current("r1") is not None
    await ann.send({"type": "leave"})
    await bob.wait_for("participant.left", identity="u1")
    await bob.send({"type": "leave"})
    await bob.expect("left")
    await until(lambda: n1.records._writer.current("r1") is None)  # type: ignore[union-attr]


async def test_bad_call_signaling_through_another_node_is_an_error_to_its_sender(nodes: Nodes, clients: Any) -> None:
    """Broken SDP from a participant on n2, for a conversation whose calls are on n1: the
    home node refuses it and the error comes back to that participant, naming the request;
    nobody else hears of it, and a good offer after it works (as on one node)."""
    n1, n2 = await nodes(2)
    ann = await clients(n1, "u1", "customer", "r1")
    bob = await clients(n2, "a1", "agent", "r1")
    await bob.expect("queue")
    await ann.expect("participant.joined")
    await bob.send({"type": "offer", "sdp": "v=0 this is not SDP"})
    error = await bob.expect("error")
    assert (error["code"], error["request"]) == ("bad_request", "offer")
    await ann.quiet()
    await ann.ping()
    agent = RtcClient(bob)
    try:
        await listen_only(agent)  # answered by n1 through n2
        assert {p.identity for p in n1.broker.calls.peers("r1")} == {"a1"} and len(n2.broker.calls) == 0
    finally:
        await agent.close()


async def test_joined_lists_who_sends_media_through_every_node(nodes: Nodes, clients: Any, entered: Entered) -> None:
    """Regression (issue 17): ``joined``'s ``media`` was the home node's knowledge, so a
    participant joining through another node read an empty list while the customer was
    sending audio. Every node reads what the home recorded; a hangup clears it."""
    n1, n2 = await nodes(2)
    customer = RtcClient(await clients(n1, "u1", "customer", "r1"))  # r1's home: n1
    try:
        await start_audio(customer, 440)
        await customer.wait_for("media", identity="u1", audio=True)
        sending = [{"identity": "u1", "audio": True, "video": False}]
        _, at_home = await entered(n1, "a1", "agent", "r1")
        assert at_home["media"] == sending
        bob, elsewhere = await entered(n2, "a2", "agent", "r1")
        assert elsewhere["media"] == sending
        await customer.client.send({"type": "hangup"})
        await bob.wait_for("media", identity="u1", audio=False)
        _, after = await entered(n2, "a3", "agent", "r1")
        assert after["media"] == []
    finally:
        await customer.close()


async def test_a_customers_connection_through_another_node_replaces_the_older_one(
    nodes: Nodes, clients: Any, entered: Entered
) -> None:
    """Regression (issue 17): a customer's new connection through n2 left its older one on
    n1 connected. As on one node, the older one gets ``conflict`` and 4409, its call (at
    home, n1) ends with reason ``replaced``, and the agent sees no leave or join."""
    n1, n2 = await nodes(2)
    ended: list[ev.CallEnded] = []
    n1.broker.consumers.append(lambda e: ended.append(e) if isinstance(e, ev.CallEnded) else None)
    old = RtcClient(await clients(n1, "u1", "customer", "r1"))
    try:
        bob = await clients(n2, "a1", "agent", "r1")
        await bob.expect("queue")
        await start_audio(old, 440)
        await bob.wait_for("media", identity="u1", audio=True)
        new, joined = await entered(n2, "u1", "customer", "r1")
        assert {p["identity"] for p in joined["participants"]} == {"u1", "a1"}
        assert (await old.wait_for("error"))["code"] == "conflict"
        await until(lambda: old.client.ws.close_code == CLOSE_REPLACED)
        await bob.wait_for("media", identity="u1", audio=False)  # the old connection's call ended
        assert [(e.participant.identity, e.reason) for e in ended] == [("u1", "replaced")]
        assert len(n1.broker.calls) == 0
        await bob.send({"type": "chat", "text": "still there?"})
        assert (await new.wait_for("chat"))["text"] == "still there?"
        await bob.wait_for("chat", text="still there?")
        assert not [m for m in bob.skipped if m["type"].startswith("participant.")]
    finally:
        await old.close()


async def test_a_stale_replacement_does_not_close_a_newer_connection(nodes: Nodes, clients: Any) -> None:
    """u1 connects through n1, then n2 (which replaces n1's), then n1 again (which replaces
    n2's). n2's notice to n1, were it to arrive now (late), names an older connection than
    n1's newest one: nothing is closed."""
    n1, n2 = await nodes(2)
    first = await clients(n1, "u1", "customer", "r1")
    second = await clients(n2, "u1", "customer", "r1")
    assert await first.closed() == CLOSE_REPLACED
    seconds = n2.broker.delivery.local("r1", "u1")
    assert seconds is not None
    third = await clients(n1, "u1", "customer", "r1")
    assert await second.closed() == CLOSE_REPLACED
    assert n2.bus is not None
    n2.bus.replaced("u1", seconds.version, conversation="r1", node="n1")  # the late notice
    await asyncio.sleep(0.3)
    await third.ping()
    assert n1.broker.delivery.local("r1", "u1") is not None


async def test_an_agents_connection_through_another_node_replaces_the_older_one(nodes: Nodes, clients: Any) -> None:
    """Regression (issue 17): an agent's console reopened through n2 left the one on n1
    connected. The older one is closed (4409) wherever it is, in a conversation or in the
    lobby; the new one takes the conversation over and the customer sees no leave."""
    n1, n2 = await nodes(2)
    ann = await clients(n1, "u1", "customer", "r1")
    old = await clients(n1, "a1", "agent", "r1")
    await old.expect("queue")
    await ann.expect("participant.joined", identity="a1")
    new = await clients(n2, "a1", "agent")  # a lobby token: its conversations follow it
    await new.expect("queue")
    assert (await old.wait_for("error"))["code"] == "conflict"
    assert await old.closed() == CLOSE_REPLACED
    await ann.send({"type": "chat", "text": "hello?"})
    assert (await new.wait_for("chat"))["text"] == "hello?"
    await ann.expect("chat")
    await ann.quiet()  # no participant.left, no participant.joined
    # In the lobby (in no conversation: the store holds nothing of it) just the same.
    lobby = await clients(n1, "a2", "agent")
    await lobby.expect("queue")
    again = await clients(n2, "a2", "agent")
    await again.expect("queue")
    assert await lobby.closed() == CLOSE_REPLACED
    await again.ping()


@pytest.mark.parametrize("redis", ["own"], indirect=True)
async def test_after_a_redis_restart_the_home_records_its_calls_again(
    nodes: Nodes, clients: Any, entered: Entered, redis: RedisServer
) -> None:
    """Redis comes back empty during a call: the home node puts back its participants and
    says again what its calls send, so a join through another node lists it."""
    n1, n2 = await nodes(2)
    customer = RtcClient(await clients(n1, "u1", "customer", "r1"))  # r1's home: n1
    try:
        await start_audio(customer, 440)
        await customer.wait_for("media", identity="u1", audio=True)
        redis.down()
        redis.up()  # empty

        async def recorded() -> bool:
            with contextlib.suppress(Unavailable):
                return bool(await n2.store.media("r1"))
            return False

        await until(recorded, timeout=10)
        _, joined = await entered(n2, "a1", "agent", "r1")
        assert joined["media"] == [{"identity": "u1", "audio": True, "video": False}]
    finally:
        await customer.close()


async def test_a_recorded_video_call_across_nodes(nodes: Nodes, clients: Any, entered: Entered, tmp_path: Any) -> None:
    """Video forwarded and the call recorded on the home node (n1), while the agent's
    signaling is on n2: the agent sees the customer's camera, n2's clients are told the
    call is recorded (``recording``, and ``joined`` through n2), and the files are n1's."""
    n1, n2 = await nodes(2, record_dir=str(tmp_path))
    customer = RtcClient(await clients(n1, "u1", "customer", "r1"))
    agent = RtcClient(await clients(n2, "a1", "agent", "r1"))
    try:
        customer.pc.addTrack(PatternTrack(320, 240))
        await start_audio(customer, 440)
        assert (await agent.wait_for("recording"))["active"] is True  # through n2
        await listen_only(agent)
        await agent.hears("video", frames=10, timeout=10)
        _, joined = await entered(n2, "a2", "agent", "r1")
        assert joined["recording"] is True
        peers = {p.identity: p for p in n1.broker.calls.peers("r1")}
        assert n1.broker.calls.recordings is not None and n1.broker.calls.recordings.active("r1")
        assert n2.broker.calls.recordings is not None and not n2.broker.calls.recordings.active("r1")
        assert set(peers) == {"u1", "a1"}
        await customer.client.send({"type": "hangup"})
        assert (await agent.wait_for("recording"))["active"] is False
        await until(lambda: n1.broker.calls.recordings.saved == 2, timeout=5)  # type: ignore[union-attr]
    finally:
        await customer.close()
        await agent.close()
    assert sorted(p.suffix for p in tmp_path.rglob("*.*")) == [".ogg", ".webm"]
