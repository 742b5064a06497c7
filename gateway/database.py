"""The records' database: its URL, the engine, and the schema's migrations."""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from .errors import ConfigError

log = logging.getLogger("talkgate.records")


def database_url(url: str) -> str:
    """The async driver for a database URL: ``sqlite:///x.db`` and ``postgresql://…`` as
    users write them become ``sqlite+aiosqlite`` and ``postgresql+asyncpg``."""
    try:
        parsed = make_url(url)
    except sa.exc.ArgumentError as exc:
        raise ConfigError(f"not a database URL: {url!r}") from exc
    drivers = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg", "postgres": "postgresql+asyncpg"}
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql", "postgres"):
        raise ConfigError(f"the database must be SQLite or PostgreSQL, not {backend!r}")
    if parsed.drivername in drivers:
        parsed = parsed.set(drivername=drivers[parsed.drivername])
    return parsed.render_as_string(hide_password=False)


def create_engine(url: str) -> AsyncEngine:
    engine = create_async_engine(url, pool_pre_ping=make_url(url).get_backend_name() == "postgresql")
    if engine.dialect.name == "sqlite":

        @sa.event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_connection: Any, _: Any) -> None:
            cursor = dbapi_connection.cursor()
            # WAL: readers do not block the writer; NORMAL: a commit survives a killed
            # process (the WAL is in the OS's cache), not a power cut (FULL would).
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=5000")
            # What retention and erasure delete is overwritten, not left in free pages.
            cursor.execute("PRAGMA secure_delete=ON")
            cursor.close()

    return engine


async def migrate(engine: AsyncEngine, revision: str = "head") -> None:
    """Bring the database to the current schema (or to ``revision``, for tests) with the
    Alembic migrations, in one transaction.

    SQLite: the transaction is begun explicitly (the driver would commit each DDL
    statement on its own: a failed migration would leave half-copied tables), and
    foreign keys are off while it runs (which only works outside a transaction): a
    migration that changes a column copies its table (``batch_alter_table``) and drops
    the original, which others refer to. They are checked before the commit.
    PostgreSQL: processes migrating at once take turns (a transaction's advisory lock)."""
    from alembic import command
    from alembic.config import Config as AlembicConfig

    sqlite = engine.dialect.name == "sqlite"

    def upgrade(connection: sa.Connection) -> None:
        config = AlembicConfig()
        config.set_main_option("script_location", "gateway:migrations")
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
        if sqlite and (broken := connection.exec_driver_sql("PRAGMA foreign_key_check").all()):
            raise RuntimeError(f"the migration left {len(broken)} rows without the row they refer to: {broken[:5]}")

    async with engine.connect() as conn:
        if sqlite:
            await conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
            await conn.commit()
        try:
            async with conn.begin():
                if sqlite:
                    await conn.exec_driver_sql("BEGIN")
                elif engine.dialect.name == "postgresql":
                    # Several gateway processes starting at once (--workers) migrate one
                    # at a time: the next finds the schema current. Released at commit.
                    await conn.exec_driver_sql("SELECT pg_advisory_xact_lock(hashtext('talkgate migrations'))")
                await conn.run_sync(upgrade)
        finally:
            if sqlite:  # the connection goes back to the pool: as create_engine made it
                await conn.exec_driver_sql("PRAGMA foreign_keys=ON")
                await conn.commit()


class Lock:
    """A lock several gateway processes sharing one database agree on (who sends one
    endpoint's webhooks): on PostgreSQL a session advisory lock, held by a connection of
    its own until ``release`` or until that connection dies (a killed process frees it);
    on SQLite, held at once (one process writes a SQLite file)."""

    #: ``held`` asks the database at most this often (seconds).
    CHECK_SECONDS = 1.0

    def __init__(self, conn: AsyncConnection | None) -> None:
        self._conn = conn
        self._checked = time.monotonic()

    async def held(self) -> bool:
        """Whether it is still held (PostgreSQL: its connection still answered within
        ``CHECK_SECONDS``)."""
        if self._conn is None:
            return True
        if time.monotonic() - self._checked < self.CHECK_SECONDS:
            return True
        self._checked = time.monotonic()
        try:
            await self._conn.exec_driver_sql("SELECT 1")
        except Exception:
            log.warning("a database lock's connection broke: the lock is lost", exc_info=True)
            return False
        return True

    async def release(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                await conn.close()  # ends the session: the lock goes with it
            except Exception:
                await conn.invalidate()


def locks_engine(engine: AsyncEngine) -> AsyncEngine:
    """Where ``try_lock`` takes connections: on PostgreSQL an engine without a pool (a held
    lock holds its connection for as long as it is held, which must not starve the
    records' pool); on SQLite the engine itself (its locks hold nothing)."""
    if engine.dialect.name != "postgresql":
        return engine
    return create_async_engine(engine.url, poolclass=NullPool)


async def try_lock(engine: AsyncEngine, name: str) -> Lock | None:
    """Take the lock called ``name`` if no other process holds it (None if one does)."""
    if engine.dialect.name != "postgresql":
        return Lock(None)
    key = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)
    conn = await engine.connect()
    try:
        taken = (await conn.execute(sa.select(sa.func.pg_try_advisory_lock(key)))).scalar()
        await conn.commit()  # the lock is the session's, not the transaction's
    except BaseException:
        await conn.close()
        raise
    if not taken:
        await conn.close()
        return None
    return Lock(conn)
