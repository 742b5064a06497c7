"""The database fixtures: a fresh SQLite file or PostgreSQL database per test, really used."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from tests.databases import PostgresCluster, find_bin_dir

metadata = sa.MetaData()
notes = sa.Table(
    "notes",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("body", sa.Text, nullable=False),
)


async def test_round_trip(database_url: str) -> None:
    engine = create_async_engine(database_url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
            await conn.execute(sa.insert(notes), [{"body": "héllo"}, {"body": "wörld"}])
        async with engine.connect() as conn:
            rows = (await conn.execute(sa.select(notes.c.body).order_by(notes.c.id))).scalars().all()
        assert rows == ["héllo", "wörld"]
    finally:
        await engine.dispose()


@pytest.mark.parametrize("run", [1, 2])
async def test_each_test_gets_an_empty_database(database_url: str, run: int) -> None:
    """Both runs write the same table: had they shared a database, the second would see it."""
    engine = create_async_engine(database_url)
    try:
        async with engine.begin() as conn:
            tables = await conn.run_sync(lambda sync: sa.inspect(sync).get_table_names())
            assert tables == []
            await conn.run_sync(metadata.create_all)
            await conn.execute(sa.insert(notes), [{"body": f"run {run}"}])
    finally:
        await engine.dispose()


async def test_session_cluster(postgres: PostgresCluster) -> None:
    """The session's cluster: its own database, loopback only, tuned for tests, UTF-8."""
    assert postgres.url() == f"postgresql+asyncpg://postgres@127.0.0.1:{postgres.port}/talkgate"
    engine = create_async_engine(postgres.url())
    try:
        async with engine.connect() as conn:
            settings = {
                name: (await conn.execute(sa.text(f"SHOW {name}"))).scalar_one()
                for name in ("listen_addresses", "fsync", "server_encoding", "timezone")
            }
    finally:
        await engine.dispose()
    assert settings == {"listen_addresses": "127.0.0.1", "fsync": "off", "server_encoding": "UTF8", "timezone": "UTC"}
    first, second = postgres.create_database(), postgres.create_database()
    assert first != second
    listed = postgres.psql("SELECT datname FROM pg_database ORDER BY datname").split()
    assert {"talkgate", first, second} <= set(listed)
    for name in (first, second):
        postgres.drop_database(name)
    assert first not in postgres.psql("SELECT datname FROM pg_database").split()


def process_gone(pid: int) -> bool:
    """No such process, or only its zombie (PID 1 here reaps orphans lazily)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


def test_stop_leaves_nothing(postgres: PostgresCluster) -> None:
    """A second cluster of our own (the session's one must stay up): stop kills the server
    and removes its directory."""
    with PostgresCluster.start(postgres.bin_dir) as cluster:
        pid = int((cluster.directory / "data" / "postmaster.pid").read_text().split()[0])
        assert not process_gone(pid)
        assert cluster.port != postgres.port
    assert process_gone(pid)
    assert not cluster.directory.exists()


def test_no_binaries_means_no_bin_dir(tmp_path: Path) -> None:
    (tmp_path / "15" / "bin").mkdir(parents=True)  # a client-only install has no initdb
    assert find_bin_dir(tmp_path) is None
    if os.environ.get("CI"):  # CI installs the server (tests/run): it must be found
        assert find_bin_dir() is not None
