"""The records' migrations (``gateway/migrations``) against real databases: SQLite and
PostgreSQL (each database test runs on both). ``test_records.py`` checks that the head
is exactly ``gateway.schema``; these check the way there from older databases."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway import tokens
from gateway.messages import Role
from gateway.records import SqlRecords, create_engine, migrate
from gateway.schema import conversations, customers, events, metadata, webhook_outbox

#: A record id as the gateway makes them for the longest room: ROOM~12 hex digits.
LONGEST_ID = "r" * tokens.MAX_FIELD_CHARS + "~0123456789ab"


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url)
    yield engine
    await engine.dispose()


async def version(conn: AsyncConnection) -> str:
    return str((await conn.execute(sa.text("SELECT version_num FROM alembic_version"))).scalar_one())


async def everything(conn: AsyncConnection) -> dict[str, list[Any]]:
    return {
        table.name: [tuple(row) for row in (await conn.execute(sa.select(table).order_by(*table.primary_key)))]
        for table in (customers, conversations, events)
    }


def event(conversation: str, ts: int, kind: str, body: dict[str, Any], customer: str | None = None) -> dict[str, Any]:
    """An ``events`` row as the writer makes it (a customer's, or the gateway's)."""
    role = customer and "customer"
    return {"conversation": conversation, "ts": ts, "type": kind, "body": body, "actor": customer, "actor_role": role}


async def test_a_database_of_the_first_migration_upgrades_with_its_rows(engine: AsyncEngine, database_url: str) -> None:
    """0002 widens ``conversations.id`` and ``events.conversation`` (on SQLite by copying
    both tables, with foreign keys off): every row stays, the foreign key between them
    stays enforced, the schema is the head's, and the gateway reads the old chat."""
    await migrate(engine, "0001")
    async with engine.begin() as conn:
        await conn.execute(
            customers.insert().values(identity="u1", name="Ann", profile={"plan": "pro"}, first_seen=1, last_seen=2)
        )
        for cid, closed in (("old~0123456789ab", 5), ("r1~0123456789ab", None)):
            await conn.execute(
                conversations.insert().values(
                    id=cid,
                    room=cid.split("~")[0],
                    customer="u1",
                    opened=1,
                    closed=closed,
                    ended=closed and "left",
                    channels=["chat", "voice"],
                    bot=None,
                    agents=["a1"],
                )
            )
        await conn.execute(
            events.insert(),
            [
                event("r1~0123456789ab", 1, "participant.joined", {"name": "Ann"}, "u1"),
                event("r1~0123456789ab", 2, "chat", {"id": "m1", "text": "hi", "name": "Ann"}, "u1"),
                event("r1~0123456789ab", 3, "media", {"identity": "u1", "audio": True, "video": False}),
                event("old~0123456789ab", 4, "chat", {"id": "m0", "text": "before", "name": "Ann"}, "u1"),
            ],
        )
        before = await everything(conn)

    await migrate(engine)

    async with engine.connect() as conn:
        assert await version(conn) == "0003"  # the head: 0003 adds the (empty) webhook outbox
        assert await everything(conn) == before
        assert (await conn.execute(sa.select(sa.func.count()).select_from(webhook_outbox))).scalar_one() == 0

        def differences(connection: sa.Connection) -> list[Any]:
            return list(compare_metadata(MigrationContext.configure(connection), metadata))

        assert await conn.run_sync(differences) == []  # the foreign key and the indexes too
    async with engine.begin() as conn:
        await conn.execute(
            conversations.insert().values(
                id=LONGEST_ID, room=LONGEST_ID.split("~")[0], opened=9, channels=["chat"], agents=[]
            )
        )
        await conn.execute(events.insert().values(conversation=LONGEST_ID, ts=9, type="chat", body={}))
    with pytest.raises(sa.exc.IntegrityError):
        async with engine.begin() as conn:
            await conn.execute(events.insert().values(conversation="nowhere~0123456789ab", ts=9, type="chat", body={}))

    records = SqlRecords(database_url)
    await records.start()
    try:
        history = await records.history("r1", 10)
        assert history is not None and [(m.id, m.text, m.sender.name) for m in history] == [("m1", "hi", "Ann")]
    finally:
        await records.close()


async def test_a_failed_migration_changes_nothing(engine: AsyncEngine) -> None:
    """Regression: on SQLite each DDL statement committed on its own (the driver begins a
    transaction only before DML), so a migration that failed half-way left a half-copied
    table (``_alembic_tmp_conversations``) and every later start failed on it."""
    await migrate(engine, "0001")
    async with engine.begin() as conn:
        # In the way of 0002's second table copy (SQLite), or its second ALTER (PostgreSQL).
        await conn.execute(sa.text("CREATE TABLE _alembic_tmp_events (x INTEGER)"))
        await conn.execute(sa.text("CREATE VIEW event_ids AS SELECT conversation FROM events"))

    with pytest.raises(sa.exc.SQLAlchemyError):
        await migrate(engine)

    async with engine.connect() as conn:
        assert await version(conn) == "0001"
        tables = await conn.run_sync(lambda c: set(sa.inspect(c).get_table_names()))
        assert tables == {"alembic_version", "customers", "conversations", "events", "_alembic_tmp_events"}
        columns = await conn.run_sync(
            lambda c: {col["name"]: col for col in sa.inspect(c).get_columns("conversations")}
        )
        assert str(columns["id"]["type"]) == "VARCHAR(64)"
        if engine.dialect.name == "sqlite":
            assert (await conn.execute(sa.text("PRAGMA foreign_keys"))).scalar_one() == 1  # on again


async def test_retention_finds_its_rows_through_an_index(engine: AsyncEngine) -> None:
    """Retention looks for the conversations closed before its cut-off without reading the
    whole table. (Erasure reads the events table once on purpose: see ``schema.py``.)"""
    await migrate(engine)
    queries = {
        # As ``SqlRecords.expire`` selects them.
        "retention": sa.select(conversations.c.id).where(
            conversations.c.closed.is_not(None), conversations.c.closed < 5
        ),
    }
    async with engine.begin() as conn:
        postgresql = engine.dialect.name == "postgresql"
        if postgresql:
            await conn.execute(sa.text("SET LOCAL enable_seqscan = off"))  # a scan only where no index serves
        for name, query in queries.items():
            sql = str(query.compile(conn.sync_connection, compile_kwargs={"literal_binds": True}))
            explain = "EXPLAIN " if postgresql else "EXPLAIN QUERY PLAN "
            plan = [row[-1] for row in await conn.execute(sa.text(explain + sql))]
            scans = [line for line in plan if "Seq Scan" in line or line.startswith("SCAN")]
            assert not scans, f"{name}: {plan}"


def test_the_columns_hold_what_the_gateway_writes() -> None:
    """Regression: record ids (ROOM~12 hex digits) had 64 characters, so on PostgreSQL every
    write into a room of more than 51 characters failed. SQLite does not enforce a width:
    this checks the widths against the limits they must hold, on any database."""
    width = {
        f"{table.name}.{column.name}": column.type.length or 0
        for table in metadata.tables.values()
        for column in table.columns
        if isinstance(column.type, sa.String)
    }
    for name in (
        "customers.identity",
        "customers.name",
        "conversations.room",
        "conversations.customer",
        "conversations.bot",
        "events.actor",
    ):
        assert width[name] >= tokens.MAX_FIELD_CHARS, name
    assert width["conversations.id"] == width["events.conversation"] >= len(LONGEST_ID)
    assert width["events.actor_role"] >= max(len(role) for role in Role)


async def test_the_outbox_migration_goes_down_and_up_again(engine: AsyncEngine) -> None:
    """0003 only adds ``webhook_outbox`` (and its indexes): down to 0002 removes it, up again
    restores exactly the head's schema."""
    await migrate(engine)
    async with engine.begin() as conn:
        await conn.run_sync(lambda c: _downgrade(c, "0002"))
    async with engine.connect() as conn:
        assert await version(conn) == "0002"
        assert "webhook_outbox" not in await conn.run_sync(lambda c: sa.inspect(c).get_table_names())
    await migrate(engine)
    async with engine.connect() as conn:
        assert await version(conn) == "0003"

        def differences(connection: sa.Connection) -> list[Any]:
            return list(compare_metadata(MigrationContext.configure(connection), metadata))

        assert await conn.run_sync(differences) == []


def _downgrade(connection: sa.Connection, revision: str) -> None:
    from alembic import command
    from alembic.config import Config as AlembicConfig

    config = AlembicConfig()
    config.set_main_option("script_location", "gateway:migrations")
    config.attributes["connection"] = connection
    command.downgrade(config, revision)


async def test_processes_starting_at_once_migrate_one_at_a_time(engine: AsyncEngine, database_url: str) -> None:
    """``--workers`` starts several gateways on one fresh PostgreSQL database: they take
    turns migrating, none fails (SQLite is one process's: --workers refuses it)."""
    if database_url.startswith("sqlite"):
        pytest.skip("one process writes a SQLite file")
    engines = [create_engine(database_url) for _ in range(3)]
    try:
        await asyncio.gather(*(migrate(e) for e in engines))
    finally:
        for e in engines:
            await e.dispose()
    async with engine.connect() as conn:
        assert await version(conn) == (await conn.run_sync(_head))


def _head(_: sa.Connection) -> str:
    from alembic.config import Config as AlembicConfig
    from alembic.script import ScriptDirectory

    config = AlembicConfig()
    config.set_main_option("script_location", "gateway:migrations")
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head
