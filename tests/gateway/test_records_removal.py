"""Retention (``--retention-days``) and erasure (``talkgate customer erase``) against real
databases: SQLite and PostgreSQL (each test runs on both).

The records are seeded through ``SqlRecords.write``, with the domain events a gateway
would write, dated in the past; each test compares everything in the database before
and after, so "removes exactly this and nothing else" is checked row by row.
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
import uuid
from collections.abc import Set
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from gateway import events as ev
from gateway import records as records_module
from gateway.config import Config
from gateway.errors import ConfigError
from gateway.events import now_ms
from gateway.messages import ChatMessage, Participant
from gateway.records import DAY_MS, OpenConversation, Removed, SqlRecords, conversations, customers, events
from gateway.server import GatewayServer
from tests.client import Client
from tests.conftest import SECRET, make_token
from tests.gateway_process import GatewayProcess

HOUR_MS = 3_600_000
NOW = now_ms()


def customer(identity: str) -> Participant:
    return Participant(identity=identity, role="customer", name=identity.upper())


AGENT = Participant(identity="a1", role="agent", name="Bob")


def conversation(
    room: str,
    who: Participant,
    opened: int,
    closed: int | None = None,
    *,
    others: tuple[Participant, ...] = (),
) -> list[ev.Event]:
    """A conversation's events as a gateway writes them: everyone joins and chats; the
    customer turns on the microphone; closed: everyone leaves and it closes."""
    batch: list[ev.Event] = [ev.ConversationOpened(conversation=room, ts=opened)]
    for person in (who, *others):
        profile = {"plan": "pro"} if person.role == "customer" else None
        batch.append(ev.ParticipantJoined(conversation=room, ts=opened, participant=person, profile=profile))
        message = ChatMessage(id=uuid.uuid4().hex, sender=person, text=f"{person.identity} in {room}", ts=opened)
        batch.append(ev.ChatPosted(conversation=room, ts=opened, message=message))
        if person.role == "customer":
            batch.append(
                ev.MediaChanged(conversation=room, ts=opened, identity=person.identity, audio=True, video=False)
            )
    if closed is not None:
        for person in (who, *others):
            batch.append(ev.ParticipantLeft(conversation=room, ts=closed, participant=person, reason="left"))
        batch.append(ev.ConversationClosed(conversation=room, ts=closed))
    return batch


async def seed(url: str, *batches: list[ev.Event]) -> None:
    rec = SqlRecords(url)
    await rec.start()
    try:
        for batch in batches:
            await rec.write(batch)
    finally:
        await rec.close()


@dataclasses.dataclass(frozen=True)
class Contents:
    """Everything in the records: customers (identity, name, profile), conversations by
    room (customer, closed or not, opened, closed), events in order (room, actor, type, body)."""

    customers: set[tuple[Any, ...]]
    conversations: dict[str, tuple[Any, ...]]
    events: list[tuple[Any, ...]]

    def without(self, rooms: Set[str] = frozenset(), customers: Set[str] = frozenset()) -> Contents:
        return Contents(
            {c for c in self.customers if c[0] not in customers},
            {room: c for room, c in self.conversations.items() if room not in rooms},
            [e for e in self.events if e[0] not in rooms],
        )


async def contents(url: str) -> Contents:
    engine = records_module.create_engine(records_module.database_url(url))
    try:
        async with engine.connect() as conn:
            people = {(row.identity, row.name, repr(row.profile)) for row in await conn.execute(sa.select(customers))}
            records = {row.id: row for row in await conn.execute(sa.select(conversations))}
            rooms = {
                row.room: (row.customer, row.closed is not None, row.opened, row.closed) for row in records.values()
            }
            assert len(rooms) == len(records), "one record per room in these tests"
            timeline = [
                (records[row.conversation].room, row.actor, row.type, repr(row.body))
                for row in await conn.execute(sa.select(events).order_by(events.c.id))
            ]
    finally:
        await engine.dispose()
    return Contents(people, rooms, timeline)


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Deletes of at most 3 rows per transaction: the batch loops run many times."""
    monkeypatch.setattr(records_module, "PURGE_BATCH", 3)


# -- retention ------------------------------------------------------------------------


def retention_scene() -> list[list[ev.Event]]:
    return [
        # Closed three days ago: removed, and its customer (not seen since) with it.
        conversation("old-closed", customer("u-old"), NOW - 4 * DAY_MS, NOW - 3 * DAY_MS, others=(AGENT,)),
        # Opened five days ago and never closed: stays, and so does its customer.
        conversation("old-open", customer("u-stuck"), NOW - 5 * DAY_MS),
        # Closed an hour ago: stays; its customer, not seen for two days, too (a conversation is left).
        conversation("recent", customer("u-recent"), NOW - 2 * DAY_MS, NOW - HOUR_MS),
        # A returning customer: the old conversation goes, the new one and the customer stay.
        conversation("back-old", customer("u-back"), NOW - 10 * DAY_MS, NOW - 10 * DAY_MS + HOUR_MS),
        conversation("back-new", customer("u-back"), NOW - 3 * HOUR_MS, NOW - 2 * HOUR_MS),
    ]


@pytest.mark.usefixtures("small_batches")
async def test_retention_removes_old_closed_conversations_and_stale_customers_only(database_url: str) -> None:
    await seed(database_url, *retention_scene())
    before = await contents(database_url)
    gone = {"old-closed", "back-old"}
    rec = SqlRecords(database_url)
    await rec.start()
    try:
        removed = await rec.expire(NOW - DAY_MS)
        assert removed == Removed(customers=1, conversations=2, events=sum(1 for e in before.events if e[0] in gone))
        assert await contents(database_url) == before.without(gone, {"u-old"})
        assert not await rec.expire(NOW - DAY_MS)  # again: nothing left to remove
    finally:
        await rec.close()


async def test_retention_runs_at_start_and_then_periodically_on_the_records_clock(database_url: str) -> None:
    """The task owned by SqlRecords: a pass at start, then one per interval, each against
    the injected clock; close cancels and awaits it."""
    clock = [NOW]
    passes: list[Removed] = []
    await seed(database_url, conversation("recent", customer("u1"), NOW - 2 * HOUR_MS, NOW - HOUR_MS))
    rec = SqlRecords(
        database_url, retention_days=1, retention_interval=0.05, clock=lambda: clock[0], on_expired=passes.append
    )
    await rec.start()
    try:
        await rec.write(conversation("open", customer("u2"), NOW - 2 * HOUR_MS))
        async with asyncio.timeout(10):
            while len(passes) < 3:  # noqa: ASYNC110 (passes are counted by the callback)
                await asyncio.sleep(0.01)
        assert not any(passes)  # an hour old: kept
        before = await contents(database_url)
        clock[0] += 2 * DAY_MS
        async with asyncio.timeout(10):
            while not any(passes):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        recent = sum(1 for e in before.events if e[0] == "recent")
        assert [p for p in passes if p] == [Removed(customers=1, conversations=1, events=recent)]
        assert await contents(database_url) == before.without({"recent"}, {"u1"})
    finally:
        await rec.close()
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "talkgate-records-retention"]


async def test_a_gateway_applies_retention_at_start(config: Config, database_url: str) -> None:
    """A real GatewayServer with --retention-days 1 on records with old rows: at start it
    removes what closed days ago (counted in the metrics), keeps the rest, and the old
    open conversation goes on where it was."""
    await seed(database_url, *retention_scene())
    before = await contents(database_url)
    gone = {"old-closed", "back-old"}
    settings = dataclasses.replace(config, database=database_url, retention_days=1)
    async with GatewayServer(settings) as server:

        def expired(kind: str) -> float | None:
            return server.metrics.registry.get_sample_value("talkgate_records_expired_total", {"kind": kind})

        async with asyncio.timeout(10):
            while not expired("customers"):  # noqa: ASYNC110 (counted at the end of the pass)
                await asyncio.sleep(0.02)
        assert await contents(database_url) == before.without(gone, {"u-old"})
        assert expired("conversations") == 2 and expired("customers") == 1
        assert expired("events") == sum(1 for e in before.events if e[0] in gone)

        client = await Client.open(server.ws_url)
        await client.send({"type": "join", "token": make_token("u-stuck", "customer", "old-open")})
        history = (await client.expect("joined"))["history"]
        assert [m["text"] for m in history] == ["u-stuck in old-open"]
        await client.close()


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"retention_days": 0}, "positive"),
        ({"retention_days": -1}, "positive"),
        ({"retention_days": 0.001, "history_retention_seconds": 600}, "history_retention_seconds"),
        ({"retention_days": 30, "database": ""}, "needs a database"),
    ],
)
def test_retention_days_is_checked(settings: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        Config(**{"dev": True, "database": "sqlite:///x.db", **settings})


# -- erasure --------------------------------------------------------------------------


def erasure_scene() -> list[list[ev.Event]]:
    return [
        conversation("a", customer("u1"), NOW - 3 * DAY_MS, NOW - 3 * DAY_MS + HOUR_MS, others=(AGENT,)),
        conversation("b", customer("u1"), NOW - DAY_MS, NOW - DAY_MS + HOUR_MS),
        # u2's conversation, which u1 joined too: u1's events go, u2's and the agent's stay.
        conversation("c", customer("u2"), NOW - 2 * DAY_MS, NOW - 2 * DAY_MS + HOUR_MS, others=(customer("u1"), AGENT)),
        conversation("d", customer("u3"), NOW - HOUR_MS),  # open
    ]


def authored_by_u1(entry: tuple[Any, ...]) -> bool:
    return entry[0] == "c" and (entry[1] == "u1" or "'identity': 'u1'" in entry[3])


@pytest.mark.usefixtures("small_batches")
async def test_erasure_removes_the_customer_and_everything_they_said_and_nothing_else(database_url: str) -> None:
    await seed(database_url, *erasure_scene())
    before = await contents(database_url)
    elsewhere = [e for e in before.events if authored_by_u1(e)]
    assert [e[2] for e in elsewhere] == ["participant.joined", "chat", "media", "participant.left"]
    rec = SqlRecords(database_url)
    await rec.start()
    try:
        removed = await rec.erase_customer("u1")
        assert removed == Removed(
            customers=1,
            conversations=2,
            events=sum(1 for e in before.events if e[0] in {"a", "b"}),
            events_elsewhere=len(elsewhere),
        )
        expected = before.without({"a", "b"}, {"u1"})
        expected = dataclasses.replace(expected, events=[e for e in expected.events if not authored_by_u1(e)])
        assert await contents(database_url) == expected
        assert not await rec.erase_customer("u1")  # again: nothing found
        assert await rec.customer("u2") is not None
    finally:
        await rec.close()
    if database_url.startswith("sqlite"):  # closed: the WAL is checkpointed into the file and removed
        database = await asyncio.to_thread(Path(database_url.split("///", 1)[1]).read_bytes)
        assert b"u1 in a" not in database and b"u1 in c" not in database  # overwritten (secure_delete)
        assert b"u2 in c" in database


async def test_erasure_is_refused_while_a_conversation_is_open_unless_forced(database_url: str) -> None:
    await seed(database_url, *erasure_scene())
    before = await contents(database_url)
    rec = SqlRecords(database_url)
    await rec.start()
    try:
        with pytest.raises(OpenConversation) as refused:
            await rec.erase_customer("u3")
        assert [c.split("~")[0] for c in refused.value.conversations] == ["d"]
        assert await contents(database_url) == before
        removed = await rec.erase_customer("u3", force=True)
        assert removed == Removed(customers=1, conversations=1, events=sum(1 for e in before.events if e[0] == "d"))
        assert await contents(database_url) == before.without({"d"}, {"u3"})
    finally:
        await rec.close()


async def test_a_forced_erasure_in_the_gateway_lets_a_connected_customer_go_on(
    config: Config, database_url: str
) -> None:
    """In the gateway's own process (what a server API will call): refused while the
    customer is connected; forced, the writer forgets the erased record, so the customer's
    next chat is stored (in a new record of the room, with no customer: that comes with
    their next join) instead of failing."""
    async with GatewayServer(dataclasses.replace(config, database=database_url)) as server:
        assert isinstance(server.records, SqlRecords)
        rec = server.records
        ann = await Client.open(server.ws_url)
        await ann.send({"type": "join", "token": make_token("u1", "customer", "r1", profile={"plan": "pro"})})
        await ann.expect("joined")
        await ann.send({"type": "chat", "text": "before"})
        await ann.expect("chat")
        with pytest.raises(OpenConversation):
            await rec.erase_customer("u1")
        removed = await rec.erase_customer("u1", force=True)
        assert (removed.customers, removed.conversations, removed.events_elsewhere) == (1, 1, 0)
        await ann.send({"type": "chat", "text": "after"})
        await ann.expect("chat", text="after")
        [record] = await rec.conversations_of("r1")
        assert record["customer"] is None and await rec.customer("u1") is None
        assert [e["body"]["text"] for e in await rec.timeline(record["id"]) if e["type"] == "chat"] == ["after"]
        await ann.close()


# -- talkgate customer erase, as a real subprocess -------------------------------------


async def talkgate(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def as_written(url: str) -> str:
    """The URL as a user writes it (the gateway picks the async driver)."""
    return url.replace("+aiosqlite", "").replace("+asyncpg", "")


async def test_the_erase_command_prints_what_it_removed(database_url: str) -> None:
    await seed(database_url, *erasure_scene())
    before = await contents(database_url)
    in_a_b = sum(1 for e in before.events if e[0] in {"a", "b"})
    url = as_written(database_url)

    code, out, err = await talkgate("customer", "erase", "u1", "--database", url)
    assert code == 0, err
    assert out == (
        f"u1: erased profile 1, conversations 2 (events {in_a_b}), events in other conversations 4, call recordings 0\n"
    )
    code, out, err = await talkgate("customer", "erase", "u1", "--database", url)
    assert code == 0, err
    assert out.startswith("u1: nothing to erase: no profile, conversation or event of theirs in ")

    code, out, err = await talkgate("customer", "erase", "u3", "--database", url)
    assert code == 1 and out == ""
    assert "open conversation" in err and "not connected" in err and "--force" in err
    code, out, err = await talkgate("customer", "erase", "u3", "--database", url, "--force")
    assert code == 0 and out.startswith("u3: erased profile 1, conversations 1"), err


async def test_the_erase_command_works_beside_a_running_gateway(database_url: str) -> None:
    """The gateway serves the same database: the customer who left is erased, the one still
    connected is refused (and the gateway goes on recording them), unless forced."""
    url = as_written(database_url)
    args = ["serve", "--port", "0", "--database", url, "--drain-seconds", "1"]
    gateway = GatewayProcess(*args, env={"TALKGATE_SECRET": SECRET}, drain=True)
    try:
        gone = await Client.open(gateway.ws_url)
        await gone.send({"type": "join", "token": make_token("u1", "customer", "gone")})
        await gone.expect("joined")
        await gone.send({"type": "chat", "text": "please forget me"})
        await gone.expect("chat")
        await gone.send({"type": "leave"})
        await gone.wait_for("left")
        await gone.close()
        stays = await Client.open(gateway.ws_url)
        await stays.send({"type": "join", "token": make_token("u2", "customer", "stays")})
        await stays.expect("joined")

        async with asyncio.timeout(10):
            while True:  # the gateway commits the leave after the client saw ``left``
                code, out, err = await talkgate("customer", "erase", "u1", "--database", url)
                if code == 0:
                    break
                assert "open conversation" in err
        assert (
            out
            == "u1: erased profile 1, conversations 1 (events 3), events in other conversations 0, call recordings 0\n"
        )
        code, out, err = await talkgate("customer", "erase", "u2", "--database", url)
        assert code == 1 and "open conversation" in err
        await stays.send({"type": "chat", "text": "still recorded"})
        await stays.expect("chat")

        # Forced while u2 is connected (docs/records.md): the gateway's next write into the
        # record it holds fails once, then it starts a new record of the room.
        code, out, err = await talkgate("customer", "erase", "u2", "--database", url, "--force")
        assert (
            code == 0
            and out
            == "u2: erased profile 1, conversations 1 (events 2), events in other conversations 0, call recordings 0\n"
        )
        await stays.send({"type": "chat", "text": "after the erase"})
        await stays.error("unavailable")
        await stays.send({"type": "chat", "text": "after the erase"})
        await stays.expect("chat", text="after the erase")
        await stays.send({"type": "leave"})
        await stays.wait_for("left")
        await stays.close()
    finally:
        gateway.stop()
    after = await contents(database_url)
    assert after.customers == set() and after.conversations["stays"][:2] == (None, True)
    assert [e[1:3] for e in after.events] == [("u2", "chat"), ("u2", "participant.left")]


@pytest.mark.parametrize(
    ("url", "code", "message"),
    [
        ("mysql://u@h/db", 2, "SQLite or PostgreSQL"),
        ("not a url", 2, "not a database URL"),
        ("sqlite:///{tmp}/missing.db", 1, "no such SQLite file"),
        ("sqlite:///{tmp}/empty.db", 1, "no talkgate records in SQLite file"),
        ("postgresql://talkgate:secret-word@127.0.0.1:1/talkgate", 1, "cannot use the records in PostgreSQL"),
    ],
)
def test_the_erase_command_explains_a_bad_database(tmp_path: Path, url: str, code: int, message: str) -> None:
    (tmp_path / "empty.db").write_bytes(b"")
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "customer", "erase", "u1", "--database", url.format(tmp=tmp_path)],
        capture_output=True,
        text=True,
    )
    assert (result.returncode, result.stdout) == (code, ""), result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert "secret-word" not in result.stderr
    assert not (tmp_path / "missing.db").exists()
