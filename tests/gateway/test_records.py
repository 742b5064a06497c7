"""The durable records against real databases: SQLite and PostgreSQL (each test runs on both).

A real gateway writes the records from its domain events; the tests read them back
through ``SqlRecords`` and through what clients see after a restart or a crash.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from gateway import events as ev
from gateway import tokens, writer
from gateway.config import Config
from gateway.conversation import MAX_REASON_CHARS
from gateway.events import now_ms
from gateway.messages import Participant
from gateway.records import SqlRecords, create_engine, migrate
from gateway.schema import metadata
from gateway.server import GatewayServer
from gateway.store import InMemoryStore
from tests.client import Client
from tests.conftest import SECRET, make_token
from tests.gateway_process import GatewayProcess


@pytest.fixture
async def recorded(config: Config, database_url: str) -> AsyncIterator[GatewayServer]:
    async with GatewayServer(dataclasses.replace(config, database=database_url)) as server:
        yield server


def records(server: GatewayServer) -> SqlRecords:
    assert isinstance(server.records, SqlRecords)
    return server.records


async def joined(
    server: GatewayServer, identity: str, role: str = "customer", room: str | None = "r1", **kw: Any
) -> Client:
    client = await Client.open(server.ws_url)
    await client.send({"type": "join", "token": make_token(identity, role, room, **kw)})
    await client.expect("joined")
    if role == "agent":
        await client.expect("queue")
    return client


async def _until_closed(rec: SqlRecords, room: str) -> None:
    """The writer commits the last leave after the client saw ``left``: wait for it."""
    async with asyncio.timeout(5):
        while True:
            found = await rec.conversations_of(room)
            if found and found[-1]["closed"] is not None:
                return
            await asyncio.sleep(0.02)


async def test_a_conversation_is_recorded_from_its_events(recorded: GatewayServer) -> None:
    profile = {"email": "ann@example.com", "plan": "pro", "crm": "C-1042"}
    ann = await joined(recorded, "u1", name="Ann", profile=profile)
    await ann.send({"type": "chat", "text": "my router blinks red"})
    await ann.expect("chat")
    await ann.send({"type": "escalate", "reason": "billing"})
    await ann.wait_for("queued")
    bob = await joined(recorded, "a1", "agent", None, name="Bob")
    await bob.send({"type": "accept", "conversation": "r1"})
    await bob.wait_for("joined", conversation="r1")
    await bob.send({"type": "chat", "text": "let me look"})
    await bob.wait_for("chat", text="let me look")
    await bob.close()
    await ann.wait_for("participant.left", identity="a1")
    await ann.send({"type": "leave"})
    await ann.wait_for("left")
    await ann.close()

    rec = records(recorded)
    await rec.write([])  # nothing: returns at once
    await _until_closed(rec, "r1")
    [conversation] = await rec.conversations_of("r1")
    assert conversation["customer"] == "u1" and conversation["agents"] == ["a1"]
    assert conversation["ended"] == "left" and conversation["channels"] == ["chat"]
    timeline = await rec.timeline(conversation["id"])
    kinds = [e["type"] for e in timeline]
    assert kinds == [
        "participant.joined",
        "chat",
        "chat",  # the system notice
        "queue.entered",
        "queue.left",
        "participant.joined",
        "queue.accepted",
        "chat",
        "participant.left",
        "participant.left",
    ]
    assert [e["body"]["text"] for e in timeline if e["type"] == "chat"][0::2] == ["my router blinks red", "let me look"]
    assert timeline[3]["body"] == {"reason": "billing"}
    customer = await rec.customer("u1")
    assert customer is not None and customer.profile == profile and customer.name == "Ann"


async def test_history_comes_back_after_a_restart(config: Config, database_url: str) -> None:
    settings = dataclasses.replace(config, database=database_url)
    async with GatewayServer(settings) as server:
        ann = await joined(server, "u1")
        for i in range(3):
            await ann.send({"type": "chat", "text": f"message {i}"})
            await ann.expect("chat")
        # No leave: the gateway goes away with the conversation open.
    async with GatewayServer(settings) as server:
        client = await Client.open(server.ws_url)
        await client.send({"type": "join", "token": make_token("u1", "customer", "r1")})
        history = (await client.expect("joined"))["history"]
        assert [m["text"] for m in history] == ["message 0", "message 1", "message 2"]
        assert all(m["conversation"] == "r1" and m["from"]["identity"] == "u1" for m in history)
        await client.close()


@pytest.mark.parametrize("profile", [{"notes": "x" * 5000}, ["not", "an", "object"], "text"])
async def test_a_bad_profile_claim_is_refused_and_nobody_else_notices(server: GatewayServer, profile: object) -> None:
    """The profile is stored per customer: over 4 KiB or not a JSON object, the token is
    refused (``unauthorized``, close 4401), whoever minted it; others are not disturbed."""
    with pytest.raises(ValueError, match="profile"):
        make_token("u1", "customer", "r1", profile=profile)
    other = await joined(server, "u2")
    forged = jwt.encode({"sub": "u1", "role": "customer", "room": "r1", "exp": 2**33, "profile": profile}, SECRET)
    client = await Client.open(server.ws_url)
    await client.send({"type": "join", "token": forged})
    error = await client.error("unauthorized")
    assert "profile" in error["message"]
    assert await client.closed() == 4401
    await other.send({"type": "chat", "text": "still here"})
    await other.expect("chat")
    await other.close()


async def test_the_migrations_make_exactly_the_schema(database_url: str) -> None:
    """The Alembic migrations and ``records.metadata`` describe the same schema, and
    upgrading a database already at the head changes nothing."""
    engine = create_engine(database_url)
    try:
        await migrate(engine)
        await migrate(engine)  # again: a no-op

        def differences(connection: sa.Connection) -> list[Any]:
            return list(compare_metadata(MigrationContext.configure(connection), metadata))

        async with engine.connect() as conn:
            assert await conn.run_sync(differences) == []
            version = (await conn.execute(sa.text("SELECT version_num FROM alembic_version"))).scalar_one()
            assert version == "0003"
    finally:
        await engine.dispose()


async def test_a_killed_gateway_loses_no_echoed_message(database_url: str) -> None:
    """SIGKILL in the middle of a burst of chats from several clients: restarted on the same
    database, every message any client got an echo for is in the history, in order, once."""
    url = database_url.replace("+aiosqlite", "").replace("+asyncpg", "")  # as a user writes it
    args = ["serve", "--port", "0", "--database", url, "--history-limit", "5000", "--rate", "1000", "--burst", "1000"]
    env = {"TALKGATE_SECRET": SECRET}
    gateway = GatewayProcess(*args, env=env, drain=True)
    echoed: dict[str, list[str]] = {}

    async def chatter(identity: str) -> None:
        client = await Client.open(gateway.ws_url)
        await client.send({"type": "join", "token": make_token(identity, "customer", "crash-room")})
        await client.expect("joined")
        echoed[identity] = []
        try:
            for i in range(10_000):
                text = f"{identity}-{i}"
                await client.send({"type": "chat", "text": text})
                while True:
                    message = await client.recv(timeout=5)
                    if message["type"] == "chat" and message["from"]["identity"] == identity:
                        echoed[identity].append(message["text"])
                        break
        except Exception:
            return

    tasks = [asyncio.create_task(chatter(f"c{i}")) for i in range(4)]
    while sum(len(v) for v in echoed.values()) < 200:  # noqa: ASYNC110 (counting echoes as they come)
        await asyncio.sleep(0.01)
    gateway.proc.send_signal(signal.SIGKILL)
    await asyncio.gather(*tasks)
    gateway.proc.wait(timeout=10)
    assert sum(len(v) for v in echoed.values()) >= 200

    again = GatewayProcess(*args, env=env, drain=True)
    try:
        client = await Client.open(again.ws_url)
        await client.send({"type": "join", "token": make_token("checker", "customer", "crash-room")})
        history = [m["text"] for m in (await client.expect("joined", timeout=10))["history"]]
        await client.close()
    finally:
        again.stop()
    assert len(history) == len(set(history))  # exactly once
    for identity, texts in echoed.items():
        mine = [t for t in history if t.startswith(f"{identity}-")]
        assert mine[: len(texts)] == texts, identity  # every echoed one, in order
        assert len(mine) <= len(texts) + 1  # at most the one in flight when it died
    print(json.dumps({k: len(v) for k, v in echoed.items()}))


async def test_a_returning_customer_is_known_to_the_agent(recorded: GatewayServer) -> None:
    """The customer comes back in a new conversation: the queue entry and the agent's
    ``joined`` carry the profile and the earlier conversation with its last message, and
    the agent pages through that conversation with ``history``."""
    ann = await joined(recorded, "u1", room="monday", name="Ann", profile={"plan": "pro"})
    said = ["hello", "it is the router", "the light is orange", "now it is off", "my router blinks red"]
    for text in said:
        await ann.send({"type": "chat", "text": text})
        await ann.expect("chat")
    await ann.send({"type": "leave"})
    await ann.wait_for("left")
    await _until_closed(records(recorded), "monday")

    bob = await joined(recorded, "a1", "agent", None, name="Bob")
    await ann.send({"type": "join", "token": make_token("u1", "customer", "tuesday", name="Ann")})
    await ann.expect("joined", conversation="tuesday")
    await ann.send({"type": "escalate"})
    queue = await bob.wait_for("queue")
    [entry] = queue["waiting"]
    customer = entry["customer"]
    assert customer["identity"] == "u1" and customer["role"] == "customer" and customer["profile"] == {"plan": "pro"}
    [earlier] = customer["previous"]
    assert earlier["room"] == "monday" and earlier["last_message"] == "my router blinks red"
    assert earlier["closed"] is not None and earlier["channels"] == ["chat"]

    await bob.send({"type": "accept", "conversation": "tuesday"})
    card = (await bob.wait_for("joined", conversation="tuesday"))["customer"]
    assert card["profile"] == {"plan": "pro"} and [p["room"] for p in card["previous"]] == ["monday"]

    # The agent opens the earlier conversation: newest page first, each page oldest first.
    pages = await page_through(bob, earlier["conversation"], limit=2)
    assert [len(p["events"]) for p in pages] == [2, 2, 2, 1]  # joined, 5 chats, left: 7 events
    assert [p["more"] for p in pages] == [True, True, True, False]
    assert all(p["conversation"] == p["record"] == earlier["conversation"] and p["room"] == "monday" for p in pages)
    timeline = [e for p in reversed(pages) for e in p["events"]]
    assert [e["type"] for e in timeline] == ["participant.joined", *["chat"] * 5, "participant.left"]
    assert [e["text"] for e in timeline if e["type"] == "chat"] == said
    ids = [e["id"] for e in timeline]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    ann_card = {"identity": "u1", "role": "customer", "name": "Ann"}
    first, chat, last = timeline[0], timeline[1], timeline[-1]
    assert first == {"id": ids[0], "ts": first["ts"], "type": "participant.joined", "from": ann_card}
    assert chat["from"] == ann_card and isinstance(chat["ref"], str) and chat["ts"] >= first["ts"]
    assert last["from"] == ann_card and last["reason"] == "left"  # the name from where she joined


async def page_through(client: Client, conversation: str, limit: int) -> list[dict[str, Any]]:
    """Every ``history`` page of a conversation, newest first."""
    pages: list[dict[str, Any]] = []
    before = None
    while not pages or pages[-1]["more"]:
        await client.send({"type": "history", "conversation": conversation, "before": before, "limit": limit})
        pages.append(await client.wait_for("history", before=before))  # the request's, echoed
        before = pages[-1]["events"][0]["id"]
    return pages


async def test_history_is_read_only_by_those_serving_the_customer(recorded: GatewayServer) -> None:
    """Who may read a recorded conversation: the customer whose it is; an agent serving that
    customer (in a conversation with them, or with them in the queue); whoever is in it now.
    Others get ``forbidden``; an unknown id ``not_found``; bad fields ``bad_request``."""
    ann = await joined(recorded, "u1", room="first", name="Ann")
    await ann.send({"type": "chat", "text": "first words"})
    await ann.expect("chat")
    await ann.send({"type": "leave"})
    await ann.wait_for("left")
    await _until_closed(records(recorded), "first")
    [record] = await records(recorded).conversations_of("first")
    earlier = record["id"]

    async def read(client: Client, conversation: str, **fields: Any) -> dict[str, Any]:
        await client.send({"type": "history", "conversation": conversation, **fields})
        return await client.wait_for("history")

    async def refused(client: Client, conversation: Any, code: str = "forbidden", **fields: Any) -> None:
        await client.send({"type": "history", "conversation": conversation, **fields})
        error = await client.wait_for("error")
        assert error["code"] == code, error
        assert error["request"] == (None if code == "bad_request" else "history"), error  # None: did not validate

    # The customer reads her own earlier conversation (from her next one), another customer may not.
    await ann.send({"type": "join", "token": make_token("u1", "customer", "second", name="Ann")})
    await ann.expect("joined", conversation="second")
    mine = await read(ann, earlier)
    assert [e["text"] for e in mine["events"] if e["type"] == "chat"] == ["first words"] and not mine["more"]
    dan = await joined(recorded, "u2", room="elsewhere", name="Dan")
    await refused(dan, earlier)
    await refused(dan, "first")  # a room id names its latest record: the same
    await refused(dan, "no-such-conversation", "not_found")
    own = await read(dan, "elsewhere")  # the one he is in (a room id: its current record)
    assert own["conversation"] == "elsewhere" and own["record"].startswith("elsewhere~")

    # An agent in the lobby serves nobody yet; a customer in the queue is served by all agents.
    bob = await joined(recorded, "a1", "agent", None, name="Bob")
    cid = await joined(recorded, "a2", "agent", None, name="Cid")
    await refused(bob, earlier)
    await ann.send({"type": "escalate"})
    await bob.wait_for("queue")
    await cid.wait_for("queue")
    assert len((await read(cid, earlier))["events"]) == 3
    await bob.send({"type": "accept", "conversation": "second"})
    await bob.wait_for("joined", conversation="second")
    await cid.wait_for("queue", waiting=[])
    await refused(cid, earlier)  # Bob serves Ann now, not Cid
    await refused(cid, "second")
    page = await read(bob, earlier, limit=1)
    assert page["more"] and [e["type"] for e in page["events"]] == ["participant.left"]
    older = await read(bob, earlier, before=page["events"][0]["id"], limit=200)
    assert [e["type"] for e in older["events"]] == ["participant.joined", "chat"] and not older["more"]
    live = await read(bob, "second")  # the conversation he is in, by its room id
    assert live["record"] != earlier and "participant.joined" in [e["type"] for e in live["events"]]
    await ann.send({"type": "leave"})
    await bob.wait_for("participant.left", identity="u1")
    assert (await read(bob, earlier))["events"]  # wrapping up after she left: still her agent

    for bad in ({"limit": 0}, {"limit": 201}, {"limit": "10"}, {"before": "x"}, {"before": 0}):
        await refused(bob, earlier, "bad_request", **bad)
    await refused(bob, 5, "bad_request")
    for client in (ann, dan, bob, cid):
        await client.close()


async def test_the_longest_room_identities_and_names_are_recorded(recorded: GatewayServer) -> None:
    """Regression: a record id (ROOM~12 hex digits) had 64 characters, so on PostgreSQL every
    write into a room of more than 51 characters failed and its clients got ``unavailable``.
    Rooms, identities and names may have ``tokens.MAX_FIELD_CHARS`` (128) characters."""
    longest = tokens.MAX_FIELD_CHARS
    room, customer, agent = ("room-" * 26)[:longest], ("u" * longest), ("a" * longest)
    ann = await joined(recorded, customer, room=room, name="A" * longest, profile={"plan": "pro"})
    await ann.send({"type": "chat", "text": "my router blinks red"})
    await ann.expect("chat")
    await ann.send({"type": "escalate", "reason": "r" * MAX_REASON_CHARS})
    await ann.wait_for("queued")
    bob = await joined(recorded, agent, "agent", None, name="B" * longest)
    await bob.send({"type": "accept", "conversation": room})
    await bob.wait_for("joined", conversation=room)
    await bob.send({"type": "chat", "text": "let me look"})
    await bob.wait_for("chat", text="let me look")
    await ann.wait_for("chat", text="let me look")

    await ann.send({"type": "history", "conversation": room})
    page = await ann.wait_for("history")
    chats = [(e["from"]["identity"], e["text"]) for e in page["events"] if e["type"] == "chat"]
    assert chats[0] == (customer, "my router blinks red") and chats[-1] == (agent, "let me look")
    assert chats[1][0] == "system" and len(chats) == 3  # between them: queued for an agent
    [record] = await records(recorded).conversations_of(room)
    assert len(record["id"]) == longest + 13 and page["record"] == record["id"]
    assert record["customer"] == customer and record["agents"] == [agent]
    await bob.close()
    await ann.close()


async def test_history_without_records_is_unavailable(server: GatewayServer) -> None:
    """``--database none``: nothing is recorded, and ``history`` says so."""
    ann = await joined(server, "u1")
    await ann.send({"type": "history", "conversation": "r1"})
    error = await ann.error("unavailable")
    assert "--database none" in error["message"] and error["request"] == "history"
    await ann.close()


async def test_joined_comes_first_even_while_others_join(recorded: GatewayServer) -> None:
    """Building ``joined`` awaits the records: what the room says meanwhile (others joining)
    is held and delivered after it, never before it and never lost."""

    async def join(i: int) -> tuple[dict[str, Any], Client]:
        client = await Client.open(recorded.ws_url)
        await client.send({"type": "join", "token": make_token(f"u{i}", "customer", "busy")})
        return await client.recv(), client

    results = await asyncio.gather(*(join(i) for i in range(8)))
    assert [first["type"] for first, _ in results] == ["joined"] * 8
    for first, client in results:
        # Everyone who joined later than this one's snapshot is announced to it.
        listed = {p["identity"] for p in first["participants"]}
        announced: set[str] = set()
        while len(listed | announced) < 8:
            message = await client.recv()
            if message["type"] == "participant.joined":
                announced.add(message["identity"])
        await client.close()


async def test_a_chat_waits_out_another_writer_and_fails_cleanly_past_the_limit(
    config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite: the writer never blocks the loop on a lock. While another connection holds
    the write lock (an erasure, retention), chats are retried and echoed once it is free;
    held past the limit, the sender gets ``unavailable`` and the gateway goes on."""
    path = tmp_path / "talkgate.db"
    async with GatewayServer(dataclasses.replace(config, database=f"sqlite:///{path}")) as server:
        ann = await joined(server, "u1")
        await ann.send({"type": "chat", "text": "before"})
        await ann.wait_for("chat", text="before")
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # the write lock
        await ann.send({"type": "chat", "text": "while locked"})
        with pytest.raises(TimeoutError):
            await ann.wait_for("chat", text="while locked", timeout=0.3)  # not echoed: not stored
        await ann.send({"type": "ping"})
        await ann.expect("pong")  # the loop is not blocked meanwhile
        other.execute("COMMIT")
        await ann.wait_for("chat", text="while locked")

        monkeypatch.setattr(writer, "BUSY_RETRY_SECONDS", 0.2)
        other.execute("BEGIN IMMEDIATE")
        await ann.send({"type": "chat", "text": "never stored"})
        error = await ann.wait_for("error")
        assert (error["code"], error["request"]) == ("unavailable", "chat")
        other.execute("COMMIT")
        other.close()
        await ann.send({"type": "chat", "text": "after"})
        await ann.wait_for("chat", text="after")
        rec = records(server)
        (conversation,) = await rec.conversations_of("r1")
        texts = [e["body"]["text"] for e in await rec.timeline(conversation["id"]) if e["type"] == "chat"]
        assert texts == ["before", "while locked", "after"]


async def test_a_customer_back_in_the_same_room_a_day_later_starts_a_new_conversation(
    recorded: GatewayServer,
) -> None:
    """Clock injected: the room's conversation closed a day ago is past resuming, so the
    customer's return opens a new record, and the agent's card lists the earlier one."""
    day = 86_400_000
    offset = 0

    def clock() -> int:
        return now_ms() + offset

    recorded.broker.conversations._clock = clock  # what the events are stamped with
    records(recorded)._clock = clock  # what the records compare with
    store = recorded.store
    assert isinstance(store, InMemoryStore)
    store._clock = lambda: time.monotonic() + offset / 1000  # when the live history expires
    ann = await joined(recorded, "u1", room="support-u1", name="Ann")
    await ann.send({"type": "chat", "text": "yesterday's question"})
    await ann.expect("chat")
    await ann.send({"type": "leave"})
    await ann.wait_for("left")
    await _until_closed(records(recorded), "support-u1")

    offset = day  # a day later
    await ann.send({"type": "join", "token": make_token("u1", "customer", "support-u1", name="Ann")})
    back = await ann.expect("joined", conversation="support-u1")
    assert back["history"] == []  # a new conversation: yesterday's is not resumed
    async with asyncio.timeout(5):  # joined goes out before the join's commit
        while True:
            found = await records(recorded).conversations_of("support-u1")
            if len(found) == 2:
                break
            await asyncio.sleep(0.02)
    earlier, today = found
    assert today["opened"] - earlier["closed"] >= day and today["closed"] is None
    bob = await Client.open(recorded.ws_url)
    await bob.send({"type": "join", "token": make_token("a1", "agent", "support-u1", name="Bob")})
    [previous] = (await bob.expect("joined", conversation="support-u1"))["customer"]["previous"]
    assert previous["conversation"] == earlier["id"] and previous["last_message"] == "yesterday's question"


async def test_a_call_is_recorded_with_its_length_and_media_and_meta_events_with_their_kind(database_url: str) -> None:
    """From the events as the gateway emits them: ``call.ended`` carries how long the call
    lasted and what the caller sent; ``meta`` events keep their kind and body."""
    rec = SqlRecords(database_url)
    await rec.start()
    try:
        ann = Participant("u1", "customer", "Ann")
        t = 1_700_000_000_000
        await rec.write(
            [
                ev.ConversationOpened(conversation="r1", ts=t),
                ev.ParticipantJoined(conversation="r1", ts=t, participant=ann, profile=None),
                ev.CallStarted(conversation="r1", ts=t + 1_000, participant=ann),
                ev.MediaChanged(conversation="r1", ts=t + 1_100, identity="u1", audio=True, video=False),
                ev.MediaChanged(conversation="r1", ts=t + 30_000, identity="u1", audio=True, video=True),
                ev.MediaChanged(conversation="r1", ts=t + 60_000, identity="u1", audio=False, video=False),
                ev.CallEnded(conversation="r1", ts=t + 96_000, participant=ann, reason="hangup"),
                ev.MetaRecorded(conversation="r1", ts=t + 97_000, kind="reminder", body={"at": t + 86_400_000}),
            ]
        )
        (conversation,) = await rec.conversations_of("r1")
        assert conversation["channels"] == ["chat", "video", "voice"]
        timeline = {e["type"]: e for e in await rec.timeline(conversation["id"])}
        ended = timeline["call.ended"]
        assert ended["actor"] == "u1"
        assert ended["body"] == {"reason": "hangup", "duration_ms": 95_000, "audio": True, "video": True}
        meta = timeline["meta"]
        assert meta["actor"] is None and meta["body"] == {"kind": "reminder", "at": t + 86_400_000}
    finally:
        await rec.close()


async def test_two_gateways_writing_one_room_at_once_keep_one_record(database_url: str) -> None:
    """A cluster: the customer joins through one node, the agent through another, at the
    same moment; each node's writer meets the room for the first time. They take turns
    looking the room's record up, so the second finds the first's instead of opening a
    second record for one conversation (it did, now and then: an empty history)."""
    if database_url.startswith("sqlite"):
        pytest.skip("one process writes a SQLite file")
    one, two = SqlRecords(database_url), SqlRecords(database_url)
    await one.start()
    await two.start()
    try:
        ann, bob = Participant("u1", "customer", "Ann"), Participant("a1", "agent", "Bob")
        t = now_ms()
        rooms = [f"race-{i}" for i in range(20)]
        await asyncio.gather(
            *(
                one.write(
                    [
                        ev.ConversationOpened(conversation=r, ts=t),
                        ev.ParticipantJoined(conversation=r, ts=t, participant=ann),
                    ]
                )
                for r in rooms
            ),
            *(two.write([ev.ParticipantJoined(conversation=r, ts=t + 1, participant=bob)]) for r in rooms),
        )
        for room in rooms:
            (record,) = await one.conversations_of(room)
            actors = {e.actor.identity for e in (await one.page(record["id"], None, 10))[0] if e.actor is not None}
            assert actors == {"u1", "a1"}
    finally:
        await one.close()
        await two.close()
