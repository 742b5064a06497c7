"""The records' database: its URL, the engine, and the schema's migrations."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from .errors import ConfigError


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
    the original, which others refer to. They are checked before the commit."""
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
                await conn.run_sync(upgrade)
        finally:
            if sqlite:  # the connection goes back to the pool: as create_engine made it
                await conn.exec_driver_sql("PRAGMA foreign_keys=ON")
                await conn.commit()
