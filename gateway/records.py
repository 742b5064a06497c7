"""Durable records: customers, conversations and their timeline, in a real database.

The records are written from the domain events (``events.py``) by one writer task
that batches what concurrent conversations submit into one transaction (group
commit). ``Records.write`` returns once its events are committed: the broker awaits
it before a chat message's echo (the delivery receipt) goes out, so nothing any
client saw acknowledged is lost to a crash. Events from synchronous producers (calls,
speaking, transcripts) are ``submit``-ted in the same FIFO, so the timeline keeps the
order in which things happened.

SQLAlchemy 2 (Core, async) over SQLite (``sqlite+aiosqlite``, the embedded default: WAL,
``synchronous=NORMAL``: a killed process loses nothing committed) or PostgreSQL
(``postgresql+asyncpg``, for several processes). The schema changes only through the
Alembic migrations in ``gateway/migrations`` (applied at start, or ``talkgate db
upgrade``). The live state (who is connected, the queue) stays behind ``Store``.

Conversation ids in the records are the room and the time it was opened: a room is
one conversation while it is open; one that emptied less than
``--history-retention-seconds`` ago is resumed by its next join (a browser restart
finds its chat again), and an open one survives a gateway restart (the crash never
closed it).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from . import events as ev
from .errors import ConfigError
from .events import now_ms
from .messages import ChatMessage, Participant, Role

log = logging.getLogger("talkgate.records")

# -- the schema (the migrations in gateway/migrations create exactly this) ---------------

metadata = sa.MetaData()
#: Event ids: 64-bit on PostgreSQL; SQLite's INTEGER PRIMARY KEY is already 64-bit.
EventId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

customers = sa.Table(
    "customers",
    metadata,
    sa.Column("identity", sa.String(128), primary_key=True),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("profile", sa.JSON(), nullable=True),
    sa.Column("first_seen", sa.BigInteger(), nullable=False),
    sa.Column("last_seen", sa.BigInteger(), nullable=False),
)

conversations = sa.Table(
    "conversations",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("room", sa.String(128), nullable=False),
    sa.Column("customer", sa.String(128), nullable=True),
    sa.Column("opened", sa.BigInteger(), nullable=False),
    sa.Column("closed", sa.BigInteger(), nullable=True),
    #: How it ended: the last participant's leaving reason (left, disconnected, ...).
    sa.Column("ended", sa.String(32), nullable=True),
    #: Channels used, of "chat", "voice", "video".
    sa.Column("channels", sa.JSON(), nullable=False),
    sa.Column("bot", sa.String(128), nullable=True),
    sa.Column("agents", sa.JSON(), nullable=False),
    sa.Index("ix_conversations_room_opened", "room", "opened"),
    sa.Index("ix_conversations_customer_opened", "customer", "opened"),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", EventId, primary_key=True, autoincrement=True),
    sa.Column("conversation", sa.String(64), sa.ForeignKey("conversations.id"), nullable=False),
    sa.Column("ts", sa.BigInteger(), nullable=False),
    sa.Column("actor", sa.String(128), nullable=True),
    sa.Column("actor_role", sa.String(16), nullable=True),
    sa.Column("type", sa.String(32), nullable=False),
    sa.Column("body", sa.JSON(), nullable=False),
    sa.Index("ix_events_conversation_id", "conversation", "id"),
)

#: Events queued for the writer at most; beyond it ``submit`` drops (and counts) the
#: newest, ``write`` waits. Sized for seconds of a busy gateway, not for a stuck database.
QUEUE_LIMIT = 100_000
#: Rows one transaction takes at most (the rest go in the next).
BATCH_LIMIT = 2_000


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


def recorded(event: ev.Event) -> bool:
    """Whether an event belongs in the record: speaking and partial transcripts are live
    signals only (they never reach the writer's queue)."""
    if isinstance(event, ev.SpeakingChanged):
        return False
    return not (isinstance(event, ev.TranscriptPosted) and not event.final)


@dataclass(frozen=True, slots=True)
class Customer:
    identity: str
    name: str
    profile: dict[str, Any] | None
    first_seen: int
    last_seen: int


class Records(abc.ABC):
    """The durable record, behind a small interface (scales apart from the live ``Store``)."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Open the database (migrating it to the current schema) and start the writer."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Write what is queued, stop the writer, close the database."""

    @abc.abstractmethod
    def submit(self, batch: Sequence[ev.Event]) -> None:
        """Queue events for the writer without waiting (synchronous producers)."""

    @abc.abstractmethod
    async def write(self, batch: Sequence[ev.Event]) -> None:
        """Queue events and return once they (and everything before them) are committed."""

    @abc.abstractmethod
    async def history(self, room: str, limit: int) -> list[ChatMessage] | None:
        """The room's recent chat (oldest first) if it is open or was closed within the
        retention time; None if the records have nothing to say about it."""

    @abc.abstractmethod
    async def customer(self, identity: str) -> Customer | None: ...

    @abc.abstractmethod
    async def previous(self, identity: str, room: str, limit: int = 10) -> list[dict[str, Any]]:
        """The customer's earlier conversations (not the room's current one), newest first:
        ``{"conversation", "room", "opened", "closed", "channels", "last_message"}``."""

    @abc.abstractmethod
    def describe(self) -> str:
        """Where the records are, for the start-up lines (no password)."""


@dataclass(eq=False)
class _Item:
    batch: Sequence[ev.Event]
    done: asyncio.Future[None] | None = None


@dataclass
class _Open:
    """A conversation record being written (cached per room while it is open)."""

    id: str
    channels: set[str] = field(default_factory=lambda: {"chat"})
    agents: list[str] = field(default_factory=list)
    #: Why the last participant to leave left: how the conversation ended.
    last_reason: str | None = None


class SqlRecords(Records):
    def __init__(
        self,
        url: str,
        *,
        retention_seconds: float = 600.0,
        clock: Callable[[], int] = now_ms,
        on_dropped: Callable[[int], None] | None = None,
    ) -> None:
        self.url = database_url(url)
        self.dialect = make_url(self.url).get_backend_name()
        self.retention_ms = int(retention_seconds * 1000)
        self._clock = clock
        self._on_dropped = on_dropped
        self.engine: AsyncEngine | None = None
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(QUEUE_LIMIT)
        self._task: asyncio.Task[None] | None = None
        #: room -> its open conversation record
        self._open: dict[str, _Open] = {}

    def describe(self) -> str:
        """Where the records are, for the start-up lines (no password)."""
        url = make_url(self.url)
        if self.dialect == "sqlite":
            return f"SQLite file {Path(url.database or '').resolve()}"
        return f"PostgreSQL {url.render_as_string(hide_password=True)}"

    async def start(self) -> None:
        self.engine = create_engine(self.url)
        await migrate(self.engine)
        self._task = asyncio.create_task(self._run(), name="talkgate-records-writer")

    async def close(self) -> None:
        if self._task is not None:
            await self._queue.join()  # the writer finishes what is queued first
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.engine is not None:
            await self.engine.dispose()
            self.engine = None

    def submit(self, batch: Sequence[ev.Event]) -> None:
        batch = [e for e in batch if recorded(e)]
        if not batch:
            return
        try:
            self._queue.put_nowait(_Item(batch))
        except asyncio.QueueFull:
            if self._on_dropped is not None:
                self._on_dropped(len(batch))
            log.error("the records writer is %d events behind: %d events not recorded", QUEUE_LIMIT, len(batch))

    async def write(self, batch: Sequence[ev.Event]) -> None:
        batch = [e for e in batch if recorded(e)]
        if not batch:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Item(batch, done))
        await done

    # -- reading ----------------------------------------------------------------------

    async def history(self, room: str, limit: int) -> list[ChatMessage] | None:
        assert self.engine is not None
        async with self.engine.connect() as conn:
            record = await _latest(conn, room)
            if record is None:
                return None
            if record.closed is not None and record.closed < self._clock() - self.retention_ms:
                return None
            rows = (
                await conn.execute(
                    sa.select(events)
                    .where(events.c.conversation == record.id, events.c.type == "chat")
                    .order_by(events.c.id.desc())
                    .limit(limit)
                )
            ).all()
        return [_chat(row) for row in reversed(rows)]

    async def customer(self, identity: str) -> Customer | None:
        assert self.engine is not None
        async with self.engine.connect() as conn:
            row = (await conn.execute(sa.select(customers).where(customers.c.identity == identity))).first()
        if row is None:
            return None
        return Customer(row.identity, row.name, row.profile, row.first_seen, row.last_seen)

    async def previous(self, identity: str, room: str, limit: int = 10) -> list[dict[str, Any]]:
        assert self.engine is not None
        # Each conversation's last chat or transcript, in the same query (not one per row).
        last_message = (
            sa.select(events.c.body)
            .where(events.c.conversation == conversations.c.id, events.c.type.in_(("chat", "transcript")))
            .order_by(events.c.id.desc())
            .limit(1)
            .correlate(conversations)
            .scalar_subquery()
        )
        query = sa.select(conversations, last_message.label("last")).where(conversations.c.customer == identity)
        current = self._open.get(room)
        if current is not None:
            query = query.where(conversations.c.id != current.id)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query.order_by(conversations.c.opened.desc()).limit(limit))).all()
        return [
            {
                "conversation": row.id,
                "room": row.room,
                "opened": row.opened,
                "closed": row.closed,
                "channels": row.channels,
                "last_message": None if row.last is None else row.last.get("text"),
            }
            for row in rows
        ]

    async def timeline(self, conversation: str) -> list[dict[str, Any]]:
        """Every event of a conversation record, oldest first (tests, tools)."""
        assert self.engine is not None
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(sa.select(events).where(events.c.conversation == conversation).order_by(events.c.id))
            ).all()
        return [dict(row._mapping) for row in rows]

    async def conversations_of(self, room: str) -> list[dict[str, Any]]:
        assert self.engine is not None
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    sa.select(conversations).where(conversations.c.room == room).order_by(conversations.c.opened)
                )
            ).all()
        return [dict(row._mapping) for row in rows]

    # -- the writer -------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            first = await self._queue.get()
            items = [first]
            count = len(first.batch)
            while count < BATCH_LIMIT and not self._queue.empty():
                item = self._queue.get_nowait()
                items.append(item)
                count += len(item.batch)
            try:
                await self._commit([e for item in items for e in item.batch])
            except Exception:
                log.exception("the records writer could not commit %d events", count)
                for item in items:
                    if item.done is not None and not item.done.done():
                        item.done.set_exception(RecordsError("the event could not be recorded"))
                        item.done.exception()  # retrieved: a waiter that was cancelled does not warn
                self._open.clear()  # the cache may be ahead of the database now
            else:
                for item in items:
                    if item.done is not None and not item.done.done():
                        item.done.set_result(None)
            finally:
                for _ in items:
                    self._queue.task_done()

    async def _commit(self, batch: list[ev.Event]) -> None:
        if not batch:
            return
        assert self.engine is not None
        async with self.engine.begin() as conn:
            rows: list[dict[str, Any]] = []
            for event in batch:
                await self._apply(conn, event, rows)
            if rows:
                await conn.execute(events.insert(), rows)

    async def _apply(self, conn: AsyncConnection, event: ev.Event, rows: list[dict[str, Any]]) -> None:
        """Turn one event into timeline rows (appended) and conversation/customer updates."""
        room = event.conversation
        if isinstance(event, ev.ConversationOpened):
            await self._open_record(conn, room, event.ts)
            return
        record = await self._open_record(conn, room, event.ts)

        def row(kind: str, actor: Participant | None, body: dict[str, Any]) -> None:
            rows.append(
                {
                    "conversation": record.id,
                    "ts": event.ts,
                    "actor": actor.identity if actor else None,
                    "actor_role": actor.role if actor else None,
                    "type": kind,
                    "body": body,
                }
            )

        match event:
            case ev.ParticipantJoined(participant=who):
                await self._joined(conn, record, who, event)
                row("participant.joined", who, {"name": who.name})
            case ev.ParticipantLeft(participant=who, reason=reason):
                row("participant.left", who, {"reason": reason})
                record.last_reason = reason
            case ev.ParticipantAway(participant=who, grace_seconds=grace):
                row("participant.away", who, {"grace_seconds": grace})
            case ev.ParticipantReturned(participant=who):
                row("participant.returned", who, {})
            case ev.ChatPosted(message=message):
                row("chat", message.sender, {"id": message.id, "text": message.text, "name": message.sender.name})
            case ev.TranscriptPosted(sender=sender, text=text, final=True, speaker=speaker):
                row("transcript", speaker, {"text": text, "name": speaker.name, "via": sender.identity})
            case ev.QueueEntered(entry=entry):
                row("queue.entered", entry.customer, {"reason": entry.reason})
            case ev.QueueLeft(reason=reason):
                row("queue.left", None, {"reason": reason})
            case ev.AgentAccepted(agent=agent):
                row("queue.accepted", agent, {"name": agent.name})
            case ev.CallStarted(participant=who):
                row("call.started", who, {})
            case ev.CallEnded(participant=who, reason=reason):
                row("call.ended", who, {"reason": reason})
            case ev.MediaChanged(identity=identity, audio=audio, video=video):
                used = {"voice"} if audio else set()
                used |= {"video"} if video else set()
                if not used <= record.channels:
                    record.channels |= used
                    await conn.execute(
                        conversations.update()
                        .where(conversations.c.id == record.id)
                        .values(channels=sorted(record.channels))
                    )
                row("media", None, {"identity": identity, "audio": audio, "video": video})
            case ev.UpgradeRequested(id=rid, media=media, sender=sender):
                row("upgrade.requested", sender, {"id": rid, "media": media})
            case ev.UpgradeAnswered(id=rid, media=media, replier=replier, accept=accept):
                row("upgrade.answered", replier, {"id": rid, "media": media, "accept": accept})
            case ev.ConversationClosed():
                await conn.execute(
                    conversations.update()
                    .where(conversations.c.id == record.id)
                    .values(closed=event.ts, ended=record.last_reason)
                )
                self._open.pop(room, None)
            case _:
                pass  # nothing else reaches the writer (see ``recorded``)

    async def _open_record(self, conn: AsyncConnection, room: str, ts: int) -> _Open:
        """The room's conversation record: the open one, one closed within the retention
        time (reopened), or a new one."""
        cached = self._open.get(room)
        if cached is not None:
            return cached
        latest = await _latest(conn, room)
        if latest is not None and (latest.closed is None or latest.closed >= ts - self.retention_ms):
            record = _Open(latest.id, set(latest.channels or ["chat"]), list(latest.agents or []))
            if latest.closed is not None:
                await conn.execute(
                    conversations.update().where(conversations.c.id == latest.id).values(closed=None, ended=None)
                )
        else:
            record = _Open(f"{room}~{uuid.uuid4().hex[:12]}")
            await conn.execute(
                conversations.insert().values(
                    id=record.id, room=room, opened=ts, channels=["chat"], agents=[], customer=None, bot=None
                )
            )
        self._open[room] = record
        return record

    async def _joined(self, conn: AsyncConnection, record: _Open, who: Participant, event: ev.Event) -> None:
        if who.role == Role.CUSTOMER:
            profile = event.profile if isinstance(event, ev.ParticipantJoined) else None
            await _upsert_customer(conn, self.dialect, who, profile, event.ts)
            await conn.execute(
                conversations.update()
                .where(conversations.c.id == record.id, conversations.c.customer.is_(None))
                .values(customer=who.identity)
            )
        elif who.role == Role.AGENT and who.identity not in record.agents:
            record.agents.append(who.identity)
            await conn.execute(
                conversations.update().where(conversations.c.id == record.id).values(agents=list(record.agents))
            )
        elif who.role == Role.BOT:
            await conn.execute(conversations.update().where(conversations.c.id == record.id).values(bot=who.name))


class RecordsError(Exception):
    """The database refused a write (the caller's operation fails; the writer goes on)."""


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
            cursor.close()

    return engine


async def migrate(engine: AsyncEngine) -> None:
    """Bring the database to the current schema with the Alembic migrations."""
    from alembic import command
    from alembic.config import Config as AlembicConfig

    def upgrade(connection: sa.Connection) -> None:
        config = AlembicConfig()
        config.set_main_option("script_location", "gateway:migrations")
        config.attributes["connection"] = connection
        command.upgrade(config, "head")

    async with engine.begin() as conn:
        await conn.run_sync(upgrade)


async def _latest(conn: AsyncConnection, room: str) -> Any:
    return (
        await conn.execute(
            sa.select(conversations)
            .where(conversations.c.room == room)
            .order_by(conversations.c.opened.desc())
            .limit(1)
        )
    ).first()


async def _upsert_customer(
    conn: AsyncConnection, dialect: str, who: Participant, profile: dict[str, Any] | None, ts: int
) -> None:
    values: dict[str, Any] = {"identity": who.identity, "name": who.name, "first_seen": ts, "last_seen": ts}
    update: dict[str, Any] = {"name": who.name, "last_seen": ts}
    if profile is not None:
        values["profile"] = profile
        update["profile"] = profile
    insert: Any
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    statement = insert(customers).values(**values)
    await conn.execute(statement.on_conflict_do_update(index_elements=["identity"], set_=update))


def _chat(row: Any) -> ChatMessage:
    body = row.body
    sender = Participant(row.actor or "system", row.actor_role or Role.SYSTEM.value, body.get("name") or row.actor)
    return ChatMessage(id=body["id"], sender=sender, text=body["text"], ts=row.ts)
