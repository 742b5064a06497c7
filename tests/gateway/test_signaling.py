"""The client protocol end to end: a real gateway on a free port, real websocket clients."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest

from gateway.config import Config
from gateway.redis_store import RedisStore
from gateway.server import GatewayServer
from tests.client import Client
from tests.conftest import SECRET, Connect, Join, make_token
from tests.redis_server import RedisServer


@pytest.fixture(params=["memory", "redis"])
async def server(request: pytest.FixtureRequest, config: Config) -> AsyncIterator[GatewayServer]:
    """The protocol runs the same on the in-memory store and on Redis (RedisStore): this
    module's gateway is one of each."""
    store = None
    if request.param == "redis":
        redis: RedisServer = request.getfixturevalue("redis_server")
        store = RedisStore(
            redis.url(),
            prefix=f"test-{uuid.uuid4().hex[:8]}:",
            history_limit=config.history_limit,
            retention_seconds=config.history_retention_seconds,
            retained_limit=config.max_conversations,
        )
    try:
        async with GatewayServer(config, store=store) as srv:
            yield srv
    finally:
        if store is not None:
            await store.close()


async def test_join_returns_conversation_and_participants(join: Join) -> None:
    _, joined = await join("u1", room="r1", name="Ann")
    assert joined["conversation"] == "r1"
    assert joined["participants"] == [{"identity": "u1", "role": "customer", "name": "Ann"}]
    assert joined["history"] == []


async def test_chat_fans_out_with_echo_to_the_sender(join: Join) -> None:
    ann, _ = await join("u1", room="r1", name="Ann")
    bob, joined = await join("a1", role="agent", room="r1", name="Bob")
    assert {p["identity"] for p in joined["participants"]} == {"u1", "a1"}
    assert (await ann.expect("participant.joined", identity="a1"))["role"] == "agent"

    before = int(time.time() * 1000)
    await ann.send({"type": "chat", "text": "my router blinks red"})
    echo = await ann.expect("chat", text="my router blinks red")
    delivered = await bob.expect("chat", text="my router blinks red")
    assert echo == delivered
    assert echo["from"] == {"identity": "u1", "role": "customer", "name": "Ann"}
    assert before <= echo["ts"] <= int(time.time() * 1000)
    assert isinstance(echo["id"], str) and echo["id"]

    await bob.send({"type": "chat", "text": "let me check"})
    assert (await ann.expect("chat"))["from"]["identity"] == "a1"
    assert (await bob.expect("chat"))["text"] == "let me check"


async def test_leave_notifies_the_others_and_answers_left(join: Join) -> None:
    ann, _ = await join("u1", room="r1")
    bob, _ = await join("a1", role="agent", room="r1")
    await ann.expect("participant.joined")
    await bob.send({"type": "leave"})
    await bob.expect("left", conversation="r1")
    left = await ann.expect("participant.left", identity="a1", role="agent", conversation="r1")
    assert left["name"] == "a1"
    # Nothing more reaches the agent who left.
    await ann.send({"type": "chat", "text": "hello?"})
    await ann.expect("chat")
    await bob.quiet()


async def test_disconnect_counts_as_leaving(join: Join) -> None:
    ann, _ = await join("u1", room="r1")
    bob, _ = await join("u2", room="r1")
    await ann.expect("participant.joined", identity="u2")
    await bob.close()
    await ann.expect("participant.left", identity="u2")


async def test_a_lost_connection_keeps_its_place_for_the_grace_time(config: Config) -> None:
    """A reload or a network switch closes the websocket before the new one joins: within
    --reconnect-grace-seconds the participant never left, nobody sees a thing, and the
    agent's console takes its conversations back. Past it, the participant leaves."""
    async with GatewayServer(dataclasses.replace(config, reconnect_grace_seconds=0.6)) as server:
        ann = await Client.open(server.ws_url)
        await ann.send({"type": "join", "token": make_token("u1", "customer", "r1")})
        await ann.expect("joined")
        bob = await Client.open(server.ws_url)
        await bob.send({"type": "join", "token": make_token("a1", "agent", "r1")})
        await bob.expect("joined", conversation="r1")
        await ann.expect("participant.joined", identity="a1")
        await ann.send({"type": "chat", "text": "my router blinks"})
        await ann.expect("chat")
        await bob.close()  # the console reloads: its socket closes first
        again = await Client.open(server.ws_url)
        await again.send({"type": "join", "token": make_token("a1", "agent")})  # no room in this token
        joined = await again.expect("joined", conversation="r1")
        assert joined["history"][-1]["text"] == "my router blinks"
        await again.expect("queue")
        await ann.quiet(0.8)  # past the grace time: no participant.left, no participant.joined
        await again.send({"type": "chat", "text": "still with you"})
        assert (await ann.expect("chat"))["text"] == "still with you"

        await again.close()  # this time for good
        await ann.quiet(0.3)  # within the grace time nothing yet
        await ann.expect("participant.left", identity="a1", timeout=2)
        await ann.close()


async def test_history_on_join_is_bounded_and_ordered(connect: Connect, config: Config) -> None:
    async with GatewayServer(dataclasses.replace(config, history_limit=5)) as small:
        ann = await connect(small.ws_url)
        await ann.send({"type": "join", "token": make_token("u1", room="r1")})
        await ann.expect("joined")
        for i in range(8):
            await ann.send({"type": "chat", "text": f"message {i}"})
            await ann.expect("chat")
        bob = await connect(small.ws_url)
        await bob.send({"type": "join", "token": make_token("a1", "agent", room="r1")})
        joined = await bob.expect("joined")
        assert [m["text"] for m in joined["history"]] == [f"message {i}" for i in range(3, 8)]
        assert all(m["type"] == "chat" and m["from"]["identity"] == "u1" for m in joined["history"])


async def test_escalate_queue_accept_flow(join: Join) -> None:
    agent1, joined = await join("a1", role="agent", name="Bob")
    assert joined["conversation"] is None
    agent2, _ = await join("a2", role="agent")
    ann, _ = await join("u1", room="r1", name="Ann")
    await ann.send({"type": "chat", "text": "I need help with my bill"})
    await ann.expect("chat")

    await ann.send({"type": "escalate"})
    system = await ann.expect("chat")
    assert system["from"]["role"] == "system"
    await ann.expect("queued", conversation="r1", reason="customer_request")
    for agent in (agent1, agent2):
        queue = await agent.expect("queue")
        [entry] = queue["waiting"]
        assert entry["conversation"] == "r1"
        # Without records (--database none) the card knows no profile and no earlier conversations.
        assert entry["customer"] == {
            "identity": "u1",
            "role": "customer",
            "name": "Ann",
            "profile": None,
            "previous": [],
        }
        assert entry["reason"] == "customer_request"
        assert abs(entry["since"] - time.time() * 1000) < 5000

    await agent1.send({"type": "accept", "conversation": "r1"})
    joined = await agent1.expect("joined", conversation="r1")
    assert {p["identity"] for p in joined["participants"]} == {"u1", "a1"}
    assert joined["history"][0]["text"] == "I need help with my bill"
    assert joined["history"][-1] == system
    await ann.expect("participant.joined", identity="a1", name="Bob")
    assert (await agent1.expect("queue"))["waiting"] == []
    assert (await agent2.expect("queue"))["waiting"] == []

    await agent1.send({"type": "chat", "text": "Hi Ann, Bob here"})
    assert (await ann.expect("chat"))["text"] == "Hi Ann, Bob here"
    assert (await agent1.expect("chat"))["text"] == "Hi Ann, Bob here"
    await ann.send({"type": "chat", "text": "thanks"})
    assert (await agent1.expect("chat"))["text"] == "thanks"
    await agent2.quiet()


async def test_escalate_twice_is_acknowledged_once_queued(join: Join) -> None:
    agent, _ = await join("a1", role="agent")
    ann, _ = await join("u1", room="r1")
    await ann.send({"type": "escalate", "reason": "billing"})
    await ann.wait_for("queued", reason="billing")
    await ann.send({"type": "escalate"})
    await ann.expect("queued", reason="customer_request")
    assert len((await agent.expect("queue"))["waiting"]) == 1
    await agent.quiet()


async def test_agents_get_the_queue_right_after_joined(join: Join, connect: Connect) -> None:
    ann, _ = await join("u1", room="r1")
    await ann.send({"type": "escalate"})
    await ann.wait_for("queued")
    agent = await connect()
    await agent.send({"type": "join", "token": make_token("a1", "agent")})
    await agent.expect("joined", conversation=None)
    assert [e["conversation"] for e in (await agent.expect("queue"))["waiting"]] == ["r1"]


async def test_two_agents_accepting_at_once_exactly_one_wins(join: Join) -> None:
    agents = [(await join(f"a{i}", role="agent"))[0] for i in range(2)]
    ann, _ = await join("u1", room="r1")
    await ann.send({"type": "escalate"})
    for agent in agents:
        await agent.expect("queue")
    await asyncio.gather(*(a.send({"type": "accept", "conversation": "r1"}) for a in agents))
    outcomes = []
    for agent in agents:
        while (message := await agent.recv())["type"] == "queue":
            pass  # the winner's accept empties the queue for every agent
        outcomes.append(message["type"] if message["type"] != "error" else message["code"])
    assert sorted(outcomes) == ["conflict", "joined"]
    await ann.wait_for("participant.joined")
    participants = [m for m in ann.skipped if m["type"] == "participant.joined"]
    assert participants == []  # exactly one agent joined


async def test_customer_leaving_removes_its_queue_entry(join: Join, server: GatewayServer) -> None:
    agent, _ = await join("a1", role="agent")
    ann, _ = await join("u1", room="r1")
    await ann.send({"type": "escalate"})
    assert len((await agent.expect("queue"))["waiting"]) == 1
    await ann.close()
    assert (await agent.expect("queue"))["waiting"] == []
    assert (await server.health())["conversations"] == 0
    await agent.send({"type": "accept", "conversation": "r1"})
    await agent.error("not_found")


async def test_conversation_is_removed_with_its_last_participant_and_its_chat_is_kept(
    join: Join, server: GatewayServer
) -> None:
    ann, _ = await join("u1", room="r1")
    await ann.send({"type": "chat", "text": "remember me?"})
    await ann.expect("chat")
    assert (await server.health())["conversations"] == 1
    await ann.send({"type": "leave"})
    await ann.expect("left")
    health = await server.health()
    if isinstance(server.store, RedisStore):  # the node says who it is, and whether Redis answers
        assert (health.pop("node"), health.pop("redis")) == (server.store.node, True)
    assert health | {"version": None} == {
        "status": "ok",
        "conversations": 0,
        "sessions": 0,
        "peer_connections": 0,
        "version": None,
        "dev": False,
    }
    # Rejoining within --history-retention-seconds (a browser restart) finds the chat again.
    _, joined = await join("u1", room="r1")
    assert [m["text"] for m in joined["history"]] == ["remember me?"]


async def test_without_retention_a_new_conversation_under_the_same_id_starts_empty(
    connect: Connect, config: Config
) -> None:
    async with GatewayServer(dataclasses.replace(config, history_retention_seconds=0)) as forgetful:
        ann = await connect(forgetful.ws_url)
        await ann.send({"type": "join", "token": make_token("u1", room="r1")})
        await ann.expect("joined")
        await ann.send({"type": "chat", "text": "forget me"})
        await ann.expect("chat")
        await ann.send({"type": "leave"})
        await ann.expect("left")
        again = await connect(forgetful.ws_url)
        await again.send({"type": "join", "token": make_token("u1", room="r1")})
        assert (await again.expect("joined"))["history"] == []


async def test_customer_can_join_again_after_leaving(join: Join) -> None:
    ann, _ = await join("u1", room="r1")
    await ann.send({"type": "leave"})
    await ann.expect("left")
    await ann.send({"type": "chat", "text": "still there?"})
    await ann.error("unauthorized")
    await ann.send({"type": "join", "token": make_token("u1", room="r1")})
    await ann.expect("joined", conversation="r1")


async def test_same_identity_replaces_the_older_connection(join: Join) -> None:
    bob, _ = await join("a1", role="agent", room="r1")
    old, _ = await join("u1", room="r1")
    await bob.expect("participant.joined", identity="u1")
    await old.send({"type": "chat", "text": "before reload"})
    await old.expect("chat")
    await bob.expect("chat")

    new, joined = await join("u1", room="r1")
    assert [m["text"] for m in joined["history"]] == ["before reload"]
    await old.error("conflict")
    assert await old.closed() == 4409
    # The agent sees no leave/join churn from the reload, and chat reaches the new connection.
    await bob.send({"type": "chat", "text": "welcome back"})
    await bob.expect("chat")
    assert (await new.expect("chat"))["text"] == "welcome back"
    await bob.quiet()


async def test_agent_reload_keeps_the_conversation(join: Join) -> None:
    ann, _ = await join("u1", room="r1")
    await ann.send({"type": "escalate"})
    old, _ = await join("a1", role="agent")
    await old.send({"type": "accept", "conversation": "r1"})
    await old.wait_for("joined", conversation="r1")
    await ann.wait_for("participant.joined", identity="a1")

    new, rejoined = await join("a1", role="agent")
    assert rejoined["conversation"] == "r1"
    assert {p["identity"] for p in rejoined["participants"]} == {"u1", "a1"}
    assert await old.closed() == 4409
    await ann.send({"type": "chat", "text": "are you there?"})
    await ann.expect("chat")
    assert (await new.expect("chat"))["text"] == "are you there?"
    await ann.quiet()


# -- tokens -------------------------------------------------------------------------------


async def _refused(client: Client, message: dict[str, Any], code: str) -> dict[str, Any]:
    await client.send(message)
    error = await client.error(code)
    assert SECRET not in error["message"]
    assert await client.closed() == (4403 if code == "forbidden" else 4401)
    return error


async def test_join_without_token_is_refused(connect: Connect) -> None:
    error = await _refused(await connect(), {"type": "join"}, "unauthorized")
    assert "token" in error["message"]


async def test_dev_fields_are_refused_without_dev_mode(connect: Connect) -> None:
    await _refused(await connect(), {"type": "join", "room": "r1", "identity": "u1"}, "unauthorized")


async def test_expired_token_is_refused(connect: Connect) -> None:
    token = make_token("u1", room="r1", ttl=1, now=time.time() - 60)
    error = await _refused(await connect(), {"type": "join", "token": token}, "unauthorized")
    assert "expired" in error["message"]


async def test_wrong_signature_is_refused(connect: Connect) -> None:
    forged = jwt.encode({"sub": "u1", "role": "customer", "room": "r1", "exp": time.time() + 60}, "x" * 32)
    error = await _refused(await connect(), {"type": "join", "token": forged}, "unauthorized")
    assert "signature" in error["message"]


async def test_unsigned_token_is_refused(connect: Connect) -> None:
    unsigned = jwt.encode({"sub": "u1", "role": "agent", "exp": time.time() + 60}, "", algorithm="none")
    await _refused(await connect(), {"type": "join", "token": unsigned}, "unauthorized")


async def test_garbage_token_is_refused(connect: Connect) -> None:
    await _refused(await connect(), {"type": "join", "token": "not.a.jwt"}, "unauthorized")


async def test_customer_cannot_enter_another_room(connect: Connect) -> None:
    token = make_token("u1", room="r1")
    await _refused(await connect(), {"type": "join", "token": token, "room": "r2"}, "forbidden")


async def test_token_without_role_claim_is_refused(connect: Connect) -> None:
    token = jwt.encode({"sub": "u1", "room": "r1", "exp": time.time() + 60}, SECRET, algorithm="HS256")
    error = await _refused(await connect(), {"type": "join", "token": token}, "unauthorized")
    assert "role" in error["message"]


async def test_join_timeout_closes_a_silent_connection(connect: Connect, config: Config) -> None:
    async with GatewayServer(dataclasses.replace(config, join_timeout=0.3)) as quick:
        client = await connect(quick.ws_url)
        await client.ping()  # pings do not count as joining
        await client.error("unauthorized")
        assert await client.closed() == 4408


# -- errors never disturb anyone ------------------------------------------------------------


@pytest.fixture
async def pair(join: Join) -> tuple[Client, Client]:
    """A customer and an agent in one conversation, introductions consumed."""
    ann, _ = await join("u1", room="r1")
    bob, _ = await join("a1", role="agent", room="r1")
    await ann.expect("participant.joined")
    return ann, bob


async def _still_fine(ann: Client, bob: Client) -> None:
    await ann.ping()
    await bob.send({"type": "chat", "text": "still here"})
    assert (await ann.expect("chat"))["text"] == "still here"
    assert (await bob.expect("chat"))["text"] == "still here"


@pytest.mark.parametrize(
    ("frame", "code", "says"),
    [
        ("this is not json", "bad_request", "JSON"),
        ("[1, 2, 3]", "bad_request", "object"),
        ('"just a string"', "bad_request", "object"),
        ("{}", "bad_request", "type"),
        ('{"text": "no type"}', "bad_request", "type"),
        ('{"type": "teleport"}', "bad_request", "teleport"),
        ('{"type": 7}', "bad_request", "type"),
        ('{"type": "chat"}', "bad_request", "text"),
        ('{"type": "chat", "text": 42}', "bad_request", "text"),
        ('{"type": "chat", "text": "   "}', "bad_request", "empty"),
        ('{"type": "accept"}', "bad_request", "conversation"),
        ('{"type": "join"}', "bad_request", "already joined"),
        ('{"type": "chat", "text": "' + "x" * 4097 + '"}', "too_large", "4096"),
        ('{"type": "chat", "text": "' + "x" * 70_000 + '"}', "too_large", "limit"),
        (b'{"type": "chat", "text": "binary frame"}', None, None),
    ],
)
async def test_malformed_frames_get_an_error_and_the_session_lives_on(
    pair: tuple[Client, Client], frame: str | bytes, code: str | None, says: str | None
) -> None:
    ann, bob = pair
    await ann.send_raw(frame)
    if code is None:
        # A JSON object in a binary frame is served like a text frame.
        assert (await ann.expect("chat"))["text"] == "binary frame"
        await bob.expect("chat")
    else:
        error = await ann.error(code)
        assert says is not None and says.lower() in error["message"].lower(), error
    await bob.quiet(0.1)
    await _still_fine(ann, bob)


async def test_frame_over_the_transport_limit_closes_only_that_connection(pair: tuple[Client, Client]) -> None:
    ann, bob = pair
    await ann.send_raw("x" * (64 * 1024 * 16 + 1))
    assert await ann.closed() == 1009
    await bob.expect("participant.left", identity="u1")
    await bob.ping()


async def test_role_rules_are_forbidden_errors(pair: tuple[Client, Client]) -> None:
    ann, bob = pair
    await ann.send({"type": "accept", "conversation": "r1"})
    await ann.error("forbidden")
    await bob.send({"type": "escalate"})
    await bob.error("forbidden")
    await _still_fine(ann, bob)


async def test_escalate_with_an_agent_present_is_a_conflict(pair: tuple[Client, Client]) -> None:
    ann, bob = pair
    await ann.send({"type": "escalate"})
    await ann.error("conflict")
    await _still_fine(ann, bob)


async def test_accepting_an_unknown_conversation_is_not_found(join: Join) -> None:
    agent, _ = await join("a1", role="agent")
    await agent.send({"type": "accept", "conversation": "nope"})
    await agent.error("not_found")
    await agent.send({"type": "chat", "text": "lobby chat"})
    await agent.error("bad_request")
    await agent.send({"type": "leave"})
    await agent.error("bad_request")
    await agent.ping()


async def test_agent_in_a_conversation_cannot_accept_another(join: Join) -> None:
    agent, _ = await join("a1", role="agent")
    for room in ("r1", "r2"):
        customer, _ = await join(f"u-{room}", room=room)
        await customer.send({"type": "escalate"})
    await agent.send({"type": "accept", "conversation": "r1"})
    await agent.wait_for("joined", conversation="r1")
    await agent.send({"type": "accept", "conversation": "r2"})
    await agent.wait_for("error", code="conflict")
    await agent.send({"type": "accept", "conversation": "r1"})
    await agent.wait_for("error", code="conflict")


async def test_messages_before_join_are_unauthorized(connect: Connect) -> None:
    client = await connect()
    await client.send({"type": "chat", "text": "hi"})
    await client.error("unauthorized")
    await client.send({"type": "join", "token": make_token("u1", room="r1")})
    await client.expect("joined")


async def test_flooding_is_rate_limited_without_hurting_others(pair: tuple[Client, Client], config: Config) -> None:
    ann, bob = pair
    burst = config.rate_burst + 20
    await asyncio.gather(*(ann.send({"type": "ping"}) for _ in range(burst)))
    replies = [await ann.recv() for _ in range(burst)]
    pongs = sum(1 for r in replies if r["type"] == "pong")
    limited = [r for r in replies if r["type"] == "error"]
    assert pongs >= config.rate_burst - 1  # the join took one token
    assert limited and all(r["code"] == "rate_limited" for r in limited)
    await bob.ping()
    await asyncio.sleep(2 / config.rate_per_second)  # the bucket refills
    await ann.ping()


# -- dev mode -------------------------------------------------------------------------------


async def test_dev_mode_join_by_fields(dev_server: GatewayServer) -> None:
    customer = await Client.open(dev_server.ws_url)
    agent = await Client.open(dev_server.ws_url)
    try:
        await customer.send({"type": "join", "room": "r9", "identity": "u9", "name": "Zoe"})
        joined = await customer.expect("joined", conversation="r9", role="customer", name="Zoe")
        assert joined["participants"] == [{"identity": "u9", "role": "customer", "name": "Zoe"}]
        await agent.send({"type": "join", "identity": "a9", "role": "agent"})
        await agent.expect("joined", conversation=None, role="agent")
        await agent.expect("queue", waiting=[])
        await customer.send({"type": "join", "room": "r9", "identity": "u9"})
        await customer.error("bad_request")
    finally:
        await customer.close()
        await agent.close()


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"identity": "u1"}, "bad_request"),  # customer without room
        ({"room": "r1"}, "bad_request"),  # no identity
        ({"room": "r1", "identity": "u1", "role": "admin"}, "bad_request"),
        ({"room": "r1", "identity": "x" * 129}, "too_large"),
        ({"room": "r1", "identity": "u\n1"}, "bad_request"),
    ],
)
async def test_dev_mode_join_fields_are_validated(dev_server: GatewayServer, fields: dict[str, str], code: str) -> None:
    client = await Client.open(dev_server.ws_url)
    try:
        await client.send({"type": "join", **fields})
        await client.error(code)
        await client.send({"type": "join", "room": "r1", "identity": "u1"})
        await client.expect("joined")  # a bad join's fields leave the socket usable
    finally:
        await client.close()


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")  # the HS512 token is meant to fail
async def test_refused_tokens_leave_neither_the_secret_nor_the_token_in_the_logs(
    connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="talkgate")
    now = int(time.time())
    claims = {"sub": "u1", "role": "customer", "room": "r1"}
    bad = [
        jwt.encode({**claims, "exp": now + 60}, "k" * 32, algorithm="HS256"),  # someone else's key
        jwt.encode({**claims, "exp": now + 60}, SECRET, algorithm="HS512"),
        jwt.encode({**claims, "exp": now - 60}, SECRET, algorithm="HS256"),  # expired
        jwt.encode({**claims, "exp": now + 60}, "", algorithm="none"),
        make_token("u1", room="r1"),  # valid, but sent for another room
    ]
    for token in bad:
        client = await connect()
        room = "r2" if token == bad[-1] else None
        await client.send({"type": "join", "token": token, **({"room": room} if room else {})})
        error = await client.expect("error")
        assert error["code"] in ("unauthorized", "forbidden")
        assert token not in json.dumps(error) and SECRET not in json.dumps(error)
        assert await client.closed() in (4401, 4403)
    assert "join refused" in caplog.text  # refusals are logged...
    assert SECRET not in caplog.text  # ...without the secret
    assert not any(token in caplog.text or token.split(".")[1] in caplog.text for token in bad)  # or the claims
