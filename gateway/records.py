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

Retention and erasure delete from the records, in batches of at most ``PURGE_BATCH``
rows per transaction so the writer is never held up for long: with ``--retention-days``
a task owned by ``SqlRecords`` removes, at start and then hourly, conversations closed
longer ago (with their events) and the customers left with no conversation and not
seen for as long; ``erase_customer`` (``talkgate customer erase``) removes one
customer's profile, their conversations and every event they authored elsewhere.
Open conversations are never removed (docs/records.md says why and what that means
for a customer who is still connected).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from media.tasks import cancel_and_wait

from . import events as ev
from . import outbox, removal
from .database import create_engine as create_engine
from .database import database_url as database_url
from .database import migrate as migrate
from .errors import ConfigError
from .events import now_ms
from .messages import ChatMessage, Participant, Role
from .removal import DAY_MS as DAY_MS
from .removal import PURGE_BATCH as PURGE_BATCH
from .removal import RETENTION_INTERVAL as RETENTION_INTERVAL
from .removal import OpenConversation as OpenConversation
from .removal import Removed as Removed
from .removal import authored as authored
from .removal import utc
from .schema import conversations as conversations
from .schema import customers as customers
from .schema import events as events
from .schema import metadata as metadata
from .writer import LATEST, Then, Writer
from .writer import RecordsError as RecordsError

log = logging.getLogger("talkgate.records")
#: How long ``/healthz`` waits for the database to answer (seconds).
PING_SECONDS = 3.0
_T = TypeVar("_T")

# The schema lives in schema.py; its tables are re-exported here for readers of the records.


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


@dataclass(frozen=True, slots=True)
class Recorded:
    """A conversation record, as the reader sees it (whose it is, when it was open)."""

    id: str
    room: str
    customer: str | None
    opened: int
    closed: int | None


@dataclass(frozen=True, slots=True)
class TimelineEvent:
    """One event of a conversation's timeline: ``actor`` is who did it (None: the gateway)."""

    id: int
    ts: int
    type: str
    actor: Participant | None
    body: dict[str, Any]


class Records(abc.ABC):
    """The durable record, behind a small interface (scales apart from the live ``Store``)."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Open the database (migrating it to the current schema) and start the writer."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Write what is queued, stop the writer, close the database."""

    @abc.abstractmethod
    def submit(self, batch: Sequence[ev.Event], then: Then | None = None) -> bool:
        """Queue events for the writer without waiting (synchronous producers). ``then`` is
        called once they are committed (with None) or could not be (with the error), in the
        order of submission; False: the writer is too far behind, they were dropped."""

    @abc.abstractmethod
    async def write(self, batch: Sequence[ev.Event]) -> None:
        """Queue events and return once they (and everything before them) are committed."""

    @abc.abstractmethod
    async def history(self, room: str, limit: int) -> list[ChatMessage] | None:
        """The room's recent chat and spoken turns (final transcripts, as ``spoken`` chat
        from whoever spoke), oldest first, if it is open or was closed within the retention
        time; None if the records have nothing to say about it."""

    @abc.abstractmethod
    async def record(self, conversation: str) -> Recorded | None:
        """A conversation record by its id, else a room's current (or latest) one."""

    @abc.abstractmethod
    async def page(self, conversation: str, before: int | None, limit: int) -> tuple[list[TimelineEvent], bool]:
        """The newest ``limit`` events of a conversation record with an id below ``before``
        (None: the newest), oldest first, and whether older ones exist."""

    @abc.abstractmethod
    async def customer(self, identity: str) -> Customer | None: ...

    @abc.abstractmethod
    async def previous(self, identity: str, room: str, limit: int = 10) -> list[dict[str, Any]]:
        """The customer's earlier conversations (not the room's current one), newest first:
        ``{"conversation", "room", "opened", "closed", "channels", "last_message"}``."""

    @abc.abstractmethod
    async def erase_customer(self, identity: str, *, force: bool = False) -> Removed:
        """Delete a customer's profile, their conversations with every event in them, and
        the events they authored in other conversations (privacy requests). Refuses with
        ``OpenConversation`` while one of their conversations is open, unless ``force``."""

    @abc.abstractmethod
    def describe(self) -> str:
        """Where the records are, for the start-up lines (no password)."""

    async def ping(self) -> bool:
        """Whether the database answers (``/healthz``)."""
        return True

    def closed_elsewhere(self, room: str) -> None:  # noqa: B027 (nothing to drop by default)
        """Another gateway node closed the room's conversation: what this one remembers of
        its record is stale (the room's next event here looks it up again)."""

    # The server API's reads (gateway/api.py) and its one write outside the writer.

    @abc.abstractmethod
    async def conversation(self, conversation: str) -> dict[str, Any] | None:
        """A conversation record's row (``conversations`` columns) by its id, else a room's
        current (or latest) one; None if there is none."""

    @abc.abstractmethod
    async def list_conversations(
        self,
        *,
        customer: str | None,
        open_: bool | None,
        since: int | None,
        after: tuple[int, str] | None,
        limit: int,
    ) -> tuple[list[dict[str, Any]], bool]:
        """Conversation rows, newest opened first, after the (opened, id) ``after`` of the
        previous page; and whether more follow."""

    @abc.abstractmethod
    async def events_after(self, conversation: str, after: int | None, limit: int) -> tuple[list[TimelineEvent], bool]:
        """The oldest ``limit`` events of a record with an id above ``after``, oldest first,
        and whether more follow."""

    @abc.abstractmethod
    async def set_profile(self, identity: str, profile: dict[str, Any], name: str | None = None) -> Customer:
        """Replace a customer's profile (a customer not seen yet is created)."""


def delete_recordings(directory: Path | None, files: tuple[str, ...]) -> int:
    """Delete the recording files removed records listed, under ``directory`` (the
    ``--record`` one; None: this process records nothing, the files are not its to
    find). A name that would lead outside the directory is ignored. Returns how many."""
    if directory is None:
        return 0
    root = directory.resolve()
    deleted = 0
    for name in files:
        path = (root / name).resolve()
        if not path.is_relative_to(root):
            log.warning("records: a recording outside %s was not deleted: %r", root, name)
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            deleted += 1
    return deleted


class SqlRecords(Records):
    def __init__(
        self,
        url: str,
        *,
        retention_seconds: float = 600.0,
        clock: Callable[[], int] = now_ms,
        on_dropped: Callable[[int], None] | None = None,
        retention_days: float | None = None,
        retention_interval: float = RETENTION_INTERVAL,
        on_expired: Callable[[Removed], None] | None = None,
        commit_interval: float = 0.0,
        webhook_endpoints: Sequence[str] = (),
        on_outbox: Callable[[], None] | None = None,
        recordings: Path | None = None,
    ) -> None:
        #: The ``--record`` directory: retention and erasure delete the recordings they list there.
        self.recordings = recordings
        #: Webhook endpoints the writer adds outbox rows for; ``on_outbox`` is called after a
        #: commit that added some (``webhook_delivery.WebhookDelivery.committed``).
        self.webhook_endpoints = tuple(webhook_endpoints)
        self._on_outbox = on_outbox
        self.url = database_url(url)
        self.dialect = make_url(self.url).get_backend_name()
        #: How long a closed conversation can still be resumed (``--history-retention-seconds``).
        self.retention_ms = int(retention_seconds * 1000)
        #: ``--retention-days``: how long the records keep a closed conversation (None: for ever).
        self.retention_days = retention_days
        if retention_days is not None and not retention_days * DAY_MS > self.retention_ms:
            # A conversation that can still be resumed is never being deleted.
            raise ConfigError("retention_days must be positive and longer than history_retention_seconds")
        self._retention_interval = retention_interval
        self._on_expired = on_expired
        self._retention: asyncio.Task[None] | None = None
        self._clock = clock
        self._on_dropped = on_dropped
        self._commit_interval = commit_interval
        self.engine: AsyncEngine | None = None
        self._writer: Writer | None = None

    def closed_elsewhere(self, room: str) -> None:
        if self._writer is not None:
            self._writer.forget(room)

    async def ping(self) -> bool:
        if self.engine is None:
            return False
        try:
            async with asyncio.timeout(PING_SECONDS), self.engine.connect() as conn:
                await conn.exec_driver_sql("SELECT 1")
        except Exception:  # unreachable, refused, timed out: all mean "not healthy"
            log.warning("the database did not answer a health check", exc_info=True)
            return False
        return True

    def describe(self) -> str:
        """Where the records are, for the start-up lines (no password)."""
        url = make_url(self.url)
        if self.dialect == "sqlite":
            return f"SQLite file {Path(url.database or '').resolve()}"
        return f"PostgreSQL {url.render_as_string(hide_password=True)}"

    async def start(self) -> None:
        self.engine = create_engine(self.url)
        await migrate(self.engine)
        self._writer = Writer(
            self.engine,
            retention_ms=self.retention_ms,
            on_dropped=self._on_dropped,
            commit_interval=self._commit_interval,
            webhook_endpoints=self.webhook_endpoints,
            on_outbox=self._on_outbox,
        )
        await self._writer.start()
        if self.retention_days is not None:
            self._retention = asyncio.create_task(self._retain(), name="talkgate-records-retention")

    async def close(self) -> None:
        await cancel_and_wait([self._retention], log, "records retention")
        self._retention = None
        if self._writer is not None:
            await self._writer.close()  # it commits what is queued first
            self._writer = None
        if self.engine is not None:
            await self.engine.dispose()
            self.engine = None

    def submit(self, batch: Sequence[ev.Event], then: Then | None = None) -> bool:
        batch = [e for e in batch if recorded(e)]
        assert self._writer is not None, "start the records first"
        if not batch and then is None:
            return True
        return self._writer.submit(batch, then)  # an empty one too: ``then`` keeps its place

    async def write(self, batch: Sequence[ev.Event]) -> None:
        batch = [e for e in batch if recorded(e)]
        if batch:
            assert self._writer is not None, "start the records first"
            await self._writer.write(batch)

    # -- reading ----------------------------------------------------------------------

    async def history(self, room: str, limit: int) -> list[ChatMessage] | None:
        cutoff = self._clock() - self.retention_ms

        def read(conn: sa.Connection) -> list[ChatMessage] | None:
            record = conn.execute(LATEST, {"room": room}).first()
            if record is None or (record.closed is not None and record.closed < cutoff):
                return None
            if record.closed is not None and record.ended == ev.CLOSED_BY_APP:
                return []  # the app closed it: the next join starts a new one
            rows = conn.execute(_RECENT_SAID, {"rid": record.id, "limit": limit}).all()
            return [_chat(row) for row in reversed(rows)]

        return await self._read(read)

    # -- the webhook outbox (gateway/outbox.py) ----------------------------------------

    async def deliveries(
        self, status: str | None = None, after: int | None = None, limit: int = 100
    ) -> tuple[list[outbox.Delivery], bool]:
        """Webhook deliveries (of one status of ``outbox.STATUSES``, or all), by id above
        ``after`` (the previous page's last id); and whether more follow."""
        return await self._read(functools.partial(outbox.listing, status=status, after=after, limit=limit))

    async def retry_delivery(self, delivery: int) -> outbox.Delivery | None:
        """Make a delivery (a failed one, usually) pending and due now, its attempts kept:
        the worker tries it once more, and it fails again at once if that try fails after
        its retry window. None: no such delivery."""
        return await self.change(functools.partial(outbox.retry, row_id=delivery, now=self._clock()))

    async def change(self, change: Callable[[sa.Connection], _T]) -> _T:
        """Run a small write outside the writer's queue (the webhook worker's, the API's
        retry) and commit it. SQLite: on the writer's connection between its transactions
        (no second writer to wait for the lock); PostgreSQL: on a pooled connection."""
        assert self.engine is not None and self._writer is not None
        if self._writer.sqlite:
            return self._writer.change(change)
        async with self.engine.begin() as conn:
            return await conn.run_sync(change)

    async def _read(self, read: Callable[[sa.Connection], _T]) -> _T:
        """Run a small read (what a join needs). SQLite: on the writer's connection, at once
        (an indexed read costs less than the thread hand-offs of the async driver, and sees
        every commit); PostgreSQL: on a pooled connection."""
        assert self.engine is not None and self._writer is not None
        if self._writer.sqlite:
            return self._writer.read(read)
        async with self.engine.connect() as conn:
            return await conn.run_sync(read)

    async def record(self, conversation: str) -> Recorded | None:
        row = await self.conversation(conversation)
        if row is None:
            return None
        return Recorded(row["id"], row["room"], row["customer"], row["opened"], row["closed"])

    async def page(self, conversation: str, before: int | None, limit: int) -> tuple[list[TimelineEvent], bool]:
        assert self.engine is not None
        query = sa.select(events).where(events.c.conversation == conversation)
        if before is not None:
            query = query.where(events.c.id < before)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query.order_by(events.c.id.desc()).limit(limit + 1))).all()
            more = len(rows) > limit
            rows = rows[:limit][::-1]
            names: dict[str, str] = {}
            if any(row.actor and not (row.body or {}).get("name") for row in rows):
                # Leaving, calls and the like name only the actor: its name is where it joined.
                joins = await conn.execute(
                    sa.select(events.c.actor, events.c.body).where(
                        events.c.conversation == conversation, events.c.type == "participant.joined"
                    )
                )
                names = {actor: body.get("name") for actor, body in joins if actor and body.get("name")}
        return [_event(row, names) for row in rows], more

    async def customer(self, identity: str) -> Customer | None:
        row = await self._read(lambda conn: conn.execute(_CUSTOMER, {"identity": identity}).first())
        if row is None:
            return None
        return Customer(row.identity, row.name, row.profile, row.first_seen, row.last_seen)

    async def previous(self, identity: str, room: str, limit: int = 10) -> list[dict[str, Any]]:
        current = self._writer.current(room) if self._writer is not None else None
        # Not the room's current record ("" matches none).
        parameters = {"identity": identity, "current": current or "", "limit": limit}
        rows = await self._read(lambda conn: conn.execute(_PREVIOUS, parameters).all())
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

    async def conversation(self, conversation: str) -> dict[str, Any] | None:
        assert self.engine is not None
        async with self.engine.connect() as conn:
            row = (await conn.execute(sa.select(conversations).where(conversations.c.id == conversation))).first()
            if row is None:
                row = await _latest(conn, conversation)
        return None if row is None else dict(row._mapping)

    async def list_conversations(
        self,
        *,
        customer: str | None,
        open_: bool | None,
        since: int | None,
        after: tuple[int, str] | None,
        limit: int,
    ) -> tuple[list[dict[str, Any]], bool]:
        assert self.engine is not None
        c = conversations.c
        query = sa.select(conversations)
        if customer is not None:
            query = query.where(c.customer == customer)
        if open_ is not None:
            query = query.where(c.closed.is_(None) if open_ else c.closed.is_not(None))
        if since is not None:
            query = query.where(c.opened >= since)
        if after is not None:
            query = query.where(sa.or_(c.opened < after[0], sa.and_(c.opened == after[0], c.id < after[1])))
        query = query.order_by(c.opened.desc(), c.id.desc()).limit(limit + 1)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [dict(row._mapping) for row in rows[:limit]], len(rows) > limit

    async def events_after(self, conversation: str, after: int | None, limit: int) -> tuple[list[TimelineEvent], bool]:
        parameters = {"rid": conversation, "after": -1 if after is None else after, "limit": limit + 1}

        def read(conn: sa.Connection) -> tuple[list[TimelineEvent], bool]:
            rows = conn.execute(_EVENTS_AFTER, parameters).all()
            names = _names(conn, conversation, rows[:limit])
            return [_event(row, names) for row in rows[:limit]], len(rows) > limit

        return await self._read(read)

    async def set_profile(self, identity: str, profile: dict[str, Any], name: str | None = None) -> Customer:
        """One short transaction through ``change`` (SQLite: on the writer's connection)."""
        now = self._clock()

        def replace(conn: sa.Connection) -> Any:
            changes: dict[str, Any] = {"profile": profile, **({"name": name} if name else {})}
            done = conn.execute(sa.update(customers).where(customers.c.identity == identity).values(changes))
            if not done.rowcount:
                # PostgreSQL: a race with the writer's first upsert of the same customer fails
                # one of the two; the API answers 409 to an IntegrityError (try again).
                values = {"identity": identity, "name": name or identity, "first_seen": now, "last_seen": now}
                conn.execute(sa.insert(customers).values(profile=profile, **values))
            return conn.execute(_CUSTOMER, {"identity": identity}).one()

        row = await self.change(replace)
        return Customer(row.identity, row.name, row.profile, row.first_seen, row.last_seen)

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

    # -- retention and erasure --------------------------------------------------------

    async def expire(self, before: int) -> Removed:
        """One retention pass (``removal.expire``), and the recordings it listed."""
        assert self.engine is not None
        removed = await removal.expire(self.engine, before)
        await asyncio.to_thread(delete_recordings, self.recordings, removed.recordings)
        return removed

    async def erase_customer(self, identity: str, *, force: bool = False) -> Removed:
        assert self.engine is not None
        removed = await removal.erase_customer(self.engine, self._writer, identity, force=force)
        await asyncio.to_thread(delete_recordings, self.recordings, removed.recordings)
        return removed

    async def _retain(self) -> None:
        """The retention task: a pass at start, then one every interval, until cancelled."""
        assert self.retention_days is not None
        while True:
            before = self._clock() - int(self.retention_days * DAY_MS)
            try:
                removed = await self.expire(before)
            except Exception:
                log.exception("records retention: the pass failed (the next one tries again)")
            else:
                if removed:
                    log.info(
                        "records retention (%g days): removed %d conversations closed before %s with their %d "
                        "events, and %d customers",
                        self.retention_days,
                        removed.conversations,
                        utc(before),
                        removed.events,
                        removed.customers,
                    )
                if self._on_expired is not None:
                    self._on_expired(removed)
            await asyncio.sleep(self._retention_interval)


# The reads a join makes, built once (building a statement per call cost more than running it).

_SAID = ("chat", "transcript")
#: The newest ``:limit`` chats and spoken turns of the record ``:rid``, newest first.
_RECENT_SAID = (
    sa.select(events)
    .where(events.c.conversation == sa.bindparam("rid"), events.c.type.in_(_SAID))
    .order_by(events.c.id.desc())
    .limit(sa.bindparam("limit"))
)
_CUSTOMER = sa.select(customers).where(customers.c.identity == sa.bindparam("identity"))
#: The API's timeline page: the oldest ``:limit`` events of ``:rid`` after the id ``:after``.
_EVENTS_AFTER = (
    sa.select(events)
    .where(events.c.conversation == sa.bindparam("rid"), events.c.id > sa.bindparam("after"))
    .order_by(events.c.id)
    .limit(sa.bindparam("limit"))
)
#: A customer's conversations but ``:current``, newest first, each with its last chat or
#: spoken turn (a correlated subquery: one query, not one per conversation).
_PREVIOUS = (
    sa.select(
        conversations,
        sa.select(events.c.body)
        .where(events.c.conversation == conversations.c.id, events.c.type.in_(_SAID))
        .order_by(events.c.id.desc())
        .limit(1)
        .correlate(conversations)
        .scalar_subquery()
        .label("last"),
    )
    .where(conversations.c.customer == sa.bindparam("identity"), conversations.c.id != sa.bindparam("current"))
    .order_by(conversations.c.opened.desc())
    .limit(sa.bindparam("limit"))
)


def _names(conn: sa.Connection, conversation: str, rows: Sequence[Any]) -> dict[str, str]:
    """Actors' names where they joined, for events that name only the actor (leaving, calls)."""
    if not any(row.actor and not (row.body or {}).get("name") for row in rows):
        return {}
    joins = conn.execute(
        sa.select(events.c.actor, events.c.body).where(
            events.c.conversation == conversation, events.c.type == "participant.joined"
        )
    )
    return {actor: body.get("name") for actor, body in joins if actor and body.get("name")}


async def _latest(conn: AsyncConnection, room: str) -> Any:
    return (await conn.execute(LATEST, {"room": room})).first()


def _chat(row: Any) -> ChatMessage:
    """A chat event as its message; a transcript as a spoken one (its id made from the event's)."""
    body = row.body
    sender = Participant(row.actor or "system", row.actor_role or Role.SYSTEM.value, body.get("name") or row.actor)
    if row.type == "transcript":
        return ChatMessage(id=f"spoken-{row.id}", sender=sender, text=body["text"], ts=row.ts, spoken=True)
    return ChatMessage(id=body["id"], sender=sender, text=body["text"], ts=row.ts)


def _event(row: Any, names: dict[str, str]) -> TimelineEvent:
    body = dict(row.body or {})
    actor = None
    if row.actor is not None:
        name = body.get("name") or names.get(row.actor) or row.actor
        actor = Participant(row.actor, row.actor_role or Role.SYSTEM.value, name)
    return TimelineEvent(row.id, row.ts, row.type, actor, body)
