"""The records' writer: one task turns domain events into rows, group-committed.

Producers queue batches of events (``submit``: no wait; ``write``: wait for the commit);
the task takes everything queued, turns it into rows and conversation/customer updates
and commits it in one transaction, in queue order. A chat at 1000 messages a second
arrives about one per transaction, so what a transaction costs beyond its rows is what
the records cost; it is kept small:

- **SQLite**: the writer's connection is a plain (synchronous) SQLAlchemy connection used
  on the event loop's thread. A commit in WAL mode with ``synchronous=NORMAL`` writes to
  the WAL file and does not fsync: tens of microseconds, cheaper than the two thread
  hand-offs per statement an async driver costs (measured: 25 µs against about 500 µs
  per one-chat transaction). What could block longer is kept off the loop: automatic
  checkpoints are off on this connection and a checkpoint task runs them on a thread
  (``PRAGMA wal_checkpoint(PASSIVE)`` does not block the writer), and the connection
  never waits for a lock (``busy_timeout=0``): when another connection (retention,
  ``talkgate customer erase``) holds the write lock the transaction is retried after an
  asynchronous back-off. Event rows go in with one ``executemany`` of a statement
  SQLAlchemy compiled once (the Core ``insert`` per batch costs twice as much).
- **PostgreSQL**: one held ``AsyncConnection`` (asyncpg); the same transaction code runs
  through ``run_sync``. A broken connection is replaced on the next batch.

The open conversation records are cached per room (``current``), so a chat costs no read.

With webhook endpoints (``--webhook-url``), every event that makes webhooks
(``webhooks.webhook_payloads``) also adds one ``webhook_outbox`` row per endpoint, in the
same transaction as its own rows (SQLite: one more ``executemany``; PostgreSQL's
rows-only path: a second ``unnest`` insert, both in one transaction); after the commit
the delivery worker is woken (``on_outbox``). Without endpoints nothing of it runs.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from media.tasks import cancel_and_wait

from . import events as ev
from . import outbox
from .messages import Participant, Role
from .schema import conversations, customers, events, webhook_outbox
from .webhooks import new_msg_id, webhook_body, webhook_payloads

log = logging.getLogger("talkgate.records")

#: Events queued for the writer at most; beyond it ``submit`` drops (and counts) the
#: newest, ``write`` waits. Sized for seconds of a busy gateway, not for a stuck database.
QUEUE_LIMIT = 100_000
#: Rows one transaction takes at most (the rest go in the next).
BATCH_LIMIT = 2_000
#: SQLite: how often the checkpoint task looks whether the WAL has new commits (seconds).
CHECKPOINT_INTERVAL = 1.0
#: SQLite: how long a transaction is retried while another connection holds the write lock.
BUSY_RETRY_SECONDS = 10.0

_T = TypeVar("_T")
#: Events that update a conversation or customer (not only add timeline rows).
_UPDATES = (ev.ConversationOpened, ev.ParticipantJoined, ev.MediaChanged, ev.ConversationClosed)
#: PostgreSQL: a batch of timeline rows as one statement (the columns as arrays).
_PG_INSERT = (
    "INSERT INTO events (conversation, ts, actor, actor_role, type, body) "
    "SELECT c, t, a, r, k, b::json FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], "
    "$6::text[]) AS u(c, t, a, r, k, b)"
)
_EVENT_COLUMNS = ("conversation", "ts", "actor", "actor_role", "type", "body")
_json = msgspec.json.Encoder()


class RecordsError(Exception):
    """The database refused a write (the caller's operation fails; the writer goes on)."""


#: Called once a batch is committed (None) or could not be (the error).
Then = Callable[[BaseException | None], None]


@dataclass(eq=False)
class _Item:
    batch: Sequence[ev.Event]
    done: asyncio.Future[None] | None = None
    then: Then | None = None


@dataclass
class _Open:
    """A conversation record being written (cached per room while it is open)."""

    id: str
    channels: set[str] = field(default_factory=lambda: {"chat"})
    agents: list[str] = field(default_factory=list)
    #: Why the last participant to leave left: how the conversation ended.
    last_reason: str | None = None
    #: identity -> when its call started (its duration goes in ``call.ended``)
    calls: dict[str, int] = field(default_factory=dict)
    #: identity -> what it sent during its current call, of "audio", "video"
    sent: dict[str, set[str]] = field(default_factory=dict)


#: Events that may come after their conversation closed, and go into its record then.
AFTERWORD_EVENTS = (ev.RecordingSaved, ev.RecordingChanged)


class _Busy(Exception):
    """SQLite: another connection holds the write lock (the batch is retried)."""


class Writer:
    """The queue, the commits and the open-record cache of one ``SqlRecords``.

    SQLite commits run as loop callbacks: the first batch queued in a loop iteration
    schedules one (``call_soon``), which commits everything queued by then; no task is
    woken per chat. PostgreSQL commits are awaited by a writer task.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        retention_ms: int,
        on_dropped: Callable[[int], None] | None = None,
        commit_interval: float = 0.0,
        webhook_endpoints: Sequence[str] = (),
        on_outbox: Callable[[], None] | None = None,
    ) -> None:
        #: Webhook endpoints (``--webhook-url``): every committed event that makes webhooks
        #: adds one outbox row per endpoint to its transaction; none costs nothing.
        self.webhook_endpoints = tuple(webhook_endpoints)
        #: Called after a commit that added outbox rows (wakes the delivery worker).
        self._on_outbox = on_outbox
        #: The outbox rows of the transaction being built (``outbox.COLUMNS``, payload a dict).
        self._hooks: list[tuple[Any, ...]] = []
        #: SQLite: the least time between two commits while they are frequent (seconds;
        #: ``--commit-interval-ms``): what arrives meanwhile shares the commit.
        self.commit_interval = commit_interval
        #: The records' async engine: PostgreSQL writes through it; SQLite checkpoints.
        self.engine = engine
        self.sqlite = engine.dialect.name == "sqlite"
        self.retention_ms = retention_ms
        self._on_dropped = on_dropped
        self._pending: collections.deque[_Item] = collections.deque()
        #: events in ``_pending`` (bounded by QUEUE_LIMIT)
        self._queued = 0
        #: a commit is scheduled or running (SQLite: a loop callback; PostgreSQL: the task's turn)
        self._scheduled = False
        self._wake = asyncio.Event()  # PostgreSQL: work for the writer task
        self._idle = asyncio.Event()  # nothing queued, nothing being committed
        self._idle.set()
        self._retry: asyncio.TimerHandle | None = None
        self._retry_delay = 0.0
        self._retry_deadline = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        #: room -> its open conversation record
        self._open: dict[str, _Open] = {}
        self._sync_engine: sa.Engine | None = None
        self._sync: sa.Connection | None = None  # SQLite: the writer's connection
        self._raw: Any = None  # SQLite: its driver (sqlite3) connection
        self._async: AsyncConnection | None = None  # PostgreSQL: the writer's connection
        self._insert_sql = ""
        self._outbox_sql = outbox.insert_sql("?")
        #: SQLite: commits since the last checkpoint
        self._commits = 0
        #: SQLite: loop time of the last commit
        self._last_commit = 0.0

    def current(self, room: str) -> str | None:
        """The id of the room's open conversation record, if the writer has one."""
        record = self._open.get(room)
        return None if record is None else record.id

    def forget(self, room: str | None = None) -> None:
        """Drop cached records (all of them without ``room``): the database changed under
        the writer (an erasure); the next event of the room reads it again."""
        if room is None:
            self._open.clear()
        else:
            self._open.pop(room, None)

    async def start(self) -> None:
        if self.sqlite:
            url = make_url(self.engine.url).set(drivername="sqlite+pysqlite")
            # One connection, held for the writer's lifetime (NullPool: nothing else is pooled).
            self._sync_engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
            sa.event.listen(self._sync_engine, "connect", _writer_pragmas)
            self._sync = self._sync_engine.connect()
            self._raw = self._sync.connection.driver_connection
            columns = ", ".join(_EVENT_COLUMNS)
            self._insert_sql = f"INSERT INTO events ({columns}) VALUES ({', '.join('?' * len(_EVENT_COLUMNS))})"
            self._tasks.append(asyncio.create_task(self._checkpoints(), name="talkgate-records-checkpoint"))
        else:
            self._tasks.append(asyncio.create_task(self._run(), name="talkgate-records-writer"))

    async def close(self) -> None:
        """Commit what is queued, then stop."""
        await self._idle.wait()
        await cancel_and_wait(self._tasks, log, "records writer")
        self._tasks = []
        if self._sync is not None:
            self._sync.close()
            self._sync = self._raw = None
            await asyncio.to_thread(self._checkpoint_now)  # a tidy file for a backup copy
        if self._sync_engine is not None:
            self._sync_engine.dispose()
            self._sync_engine = None
        if self._async is not None:
            await self._async.close()
            self._async = None

    def read(self, read: Callable[[sa.Connection], _T]) -> _T:
        """SQLite: run a read on the writer's connection now (between its transactions:
        it sees every commit, and ends its read transaction at once)."""
        conn = self._sync
        assert conn is not None
        try:
            return read(conn)
        finally:
            if conn.in_transaction():
                conn.rollback()

    def change(self, change: Callable[[sa.Connection], _T]) -> _T:
        """SQLite: run a small write on the writer's connection now, between its
        transactions, and commit it (the webhook worker's updates: no second connection
        competes for the write lock)."""
        conn = self._sync
        assert conn is not None
        try:
            with conn.begin():
                return change(conn)
        except (sa.exc.OperationalError, sqlite3.OperationalError) as exc:
            if _busy(exc):
                raise RecordsError("the database is busy (another connection writes)") from exc
            raise

    def submit(self, batch: Sequence[ev.Event], then: Then | None = None) -> bool:
        """Queue without waiting; ``then`` runs once the batch is committed (or failed).
        False: the queue is full and the batch was dropped (``then`` is not called)."""
        if self._queued >= QUEUE_LIMIT:
            if self._on_dropped is not None:
                self._on_dropped(len(batch))
            log.error("the records writer is %d events behind: %d events not recorded", QUEUE_LIMIT, len(batch))
            return False
        self._enqueue(_Item(batch, then=then))
        return True

    async def write(self, batch: Sequence[ev.Event]) -> None:
        """Queue and wait for the commit; RecordsError if it failed or the queue is full."""
        if self._queued >= QUEUE_LIMIT:
            raise RecordsError(f"the records writer is {QUEUE_LIMIT} events behind")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._enqueue(_Item(batch, done))
        await done

    def _enqueue(self, item: _Item) -> None:
        self._pending.append(item)
        self._queued += len(item.batch)
        self._idle.clear()
        if not self._scheduled:
            self._scheduled = True
            if self._sync is not None:
                self._schedule_flush()
            else:
                self._wake.set()

    def _schedule_flush(self) -> None:
        """SQLite: commit in this loop iteration, or at most every ``commit_interval`` while
        commits are frequent (what arrives meanwhile shares the commit: a busy gateway pays
        for fewer commits, an idle one waits for none)."""
        loop = asyncio.get_running_loop()
        delay = self._last_commit + self.commit_interval - loop.time()
        if delay > 0:
            self._retry = loop.call_later(delay, self._flush)
        else:
            loop.call_soon(self._flush)

    def _take(self) -> list[_Item]:
        """The next transaction's items: what is queued, up to BATCH_LIMIT events."""
        items: list[_Item] = []
        count = 0
        while self._pending and count < BATCH_LIMIT:
            item = self._pending.popleft()
            items.append(item)
            count += len(item.batch)
        self._queued -= count
        return items

    def _settle(self, items: list[_Item], error: BaseException | None) -> None:
        """Tell the producers, in queue order: what they publish keeps the order of the events."""
        if error is not None:
            count = sum(len(item.batch) for item in items)
            log.error("the records writer could not commit %d events", count, exc_info=error)
        failed = None if error is None else RecordsError("the event could not be recorded")
        for item in items:
            if item.done is not None and not item.done.done():
                if failed is None:
                    item.done.set_result(None)
                else:
                    item.done.set_exception(failed)
                    item.done.exception()  # retrieved: a waiter that was cancelled does not warn
            if item.then is not None:
                try:
                    item.then(failed)
                except Exception:
                    log.exception("a records commit callback failed")

    def _done_for_now(self) -> bool:
        """After a transaction: more to do (True), or idle."""
        if self._pending:
            return True
        self._scheduled = False
        self._idle.set()
        return False

    # -- SQLite: commits as loop callbacks --------------------------------------------

    def _flush(self) -> None:
        assert self._sync is not None
        self._retry = None
        items = self._take()
        try:
            self._sqlite_transaction([e for item in items for e in item.batch])
        except _Busy as exc:
            # Another connection writes (retention, an erasure): try again a little later,
            # first in line; a lock held past BUSY_RETRY_SECONDS fails the batch.
            self._open.clear()  # the cache may be ahead of the database now
            now = time.monotonic()
            if not self._retry_delay:
                self._retry_deadline = now + BUSY_RETRY_SECONDS
            if now < self._retry_deadline:
                self._pending.extendleft(reversed(items))
                self._queued += sum(len(item.batch) for item in items)
                self._retry_delay = min(max(self._retry_delay * 2, 0.001), 0.05)
                self._retry = asyncio.get_running_loop().call_later(self._retry_delay, self._flush)
                return
            self._settle(items, exc)
        except Exception as exc:
            self._open.clear()
            self._settle(items, exc)
        else:
            self._settle(items, None)
        self._retry_delay = 0.0
        self._last_commit = asyncio.get_running_loop().time()
        if self._done_for_now():
            self._schedule_flush()

    # -- PostgreSQL: the writer task ----------------------------------------------------

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                items = self._take()
                try:
                    await self._async_transaction([e for item in items for e in item.batch])
                except Exception as exc:
                    self._open.clear()
                    self._settle(items, exc)
                else:
                    self._settle(items, None)
                if not self._done_for_now():
                    break

    async def _async_transaction(self, batch: list[ev.Event]) -> None:
        if not batch:
            return
        if self._async is None:
            self._async = await self.engine.connect()
        self._hooks = []
        try:
            if all(type(e) not in _UPDATES and e.conversation in self._open for e in batch):
                # Only rows to add (chats, calls, queue steps of open conversations): one
                # statement, one round trip, atomic on its own.
                rows: list[tuple[Any, ...]] = []
                for event in batch:
                    self._apply(None, event, rows)
                if self._hooks:
                    # Webhooks: the outbox rows too, in one transaction with the events.
                    raw = (await self._async.get_raw_connection()).driver_connection
                    assert raw is not None
                    async with raw.transaction():
                        if rows:
                            await raw.execute(_PG_INSERT, *_pg_columns(rows))
                        await raw.execute(outbox.PG_INSERT, *_pg_columns(self._hooks))
                elif rows:
                    raw = (await self._async.get_raw_connection()).driver_connection
                    assert raw is not None
                    await raw.execute(_PG_INSERT, *_pg_columns(rows))
            else:
                async with self._async.begin():
                    await self._async.run_sync(self._transaction, batch)
        except Exception:
            self._hooks = []
            # The connection may be broken (a restarted server): a fresh one next time.
            connection, self._async = self._async, None
            try:
                await connection.invalidate()
            except Exception:  # pragma: no cover - best effort on a broken connection
                log.debug("invalidating the writer's connection failed", exc_info=True)
            raise
        self._outbox_written()

    def _sqlite_transaction(self, batch: list[ev.Event]) -> None:
        """One SQLite transaction. A batch of chats needs no SQLAlchemy transaction: the rows
        go in through the driver and it commits (about a third of the cost of a commit);
        SQLAlchemy begins one as soon as a conversation or customer is updated."""
        conn, raw = self._sync, self._raw
        assert conn is not None and raw is not None
        if not batch:
            return
        rows: list[tuple[Any, ...]] = []
        self._hooks = []
        try:
            for event in batch:
                self._apply(conn, event, rows)
            if rows:
                raw.executemany(self._insert_sql, rows)
            if self._hooks:
                raw.executemany(self._outbox_sql, [(*h[:5], _json.encode(h[5]).decode(), *h[6:]) for h in self._hooks])
            if conn.in_transaction():
                conn.commit()
            else:
                raw.commit()
            self._commits += 1
        except BaseException as exc:
            self._hooks = []
            if conn.in_transaction():
                conn.rollback()
            else:
                raw.rollback()
            if isinstance(exc, sa.exc.OperationalError | sqlite3.OperationalError) and _busy(exc):
                raise _Busy() from exc
            raise
        self._outbox_written()

    def _outbox_written(self) -> None:
        """After a commit: wake the delivery worker if it has new rows."""
        if self._hooks:
            self._hooks = []
            if self._on_outbox is not None:
                self._on_outbox()

    def _webhooks(self, event: ev.Event, record_id: str) -> None:
        """The outbox rows an event makes: one per webhook and endpoint."""
        for kind, data in webhook_payloads(event, record_id):
            msg_id = new_msg_id()
            body = webhook_body(kind, msg_id, event.ts, data)
            for endpoint in self.webhook_endpoints:
                self._hooks.append((endpoint, msg_id, kind, record_id, event.ts, body, outbox.PENDING, 0, event.ts))

    def _transaction(self, conn: sa.Connection, batch: list[ev.Event]) -> None:
        """The statements of one PostgreSQL transaction (run through ``run_sync``)."""
        rows: list[tuple[Any, ...]] = []
        self._hooks = []
        # Several gateway processes may share the database (a cluster). The first event of a
        # room this writer holds no record for looks the room's record up, or opens one: one
        # writer at a time per room, or two would open two records for one conversation.
        # Taken in one order (two writers' batches cannot deadlock), released at commit.
        for room in sorted({e.conversation for e in batch} - self._open.keys()):
            conn.execute(_ROOM_LOCK, {"room": room})
        for event in batch:
            self._apply(conn, event, rows)
        if rows:
            conn.execute(events.insert(), [dict(zip(_EVENT_COLUMNS, row, strict=True)) for row in rows])
        if self._hooks:
            conn.execute(webhook_outbox.insert(), [dict(zip(outbox.COLUMNS, h, strict=True)) for h in self._hooks])

    def _apply(self, conn: Any, event: ev.Event, rows: list[tuple[Any, ...]]) -> None:
        """Turn one event into timeline rows (appended) and conversation/customer updates
        (``conn``: a SQLAlchemy connection; None when the batch has no update to make)."""
        room = event.conversation
        if type(event) is ev.ChatPosted and (cached := self._open.get(room)) is not None:
            # The common case, kept short: one row, no update.
            message, sender = event.message, event.message.sender
            body = {"id": message.id, "text": message.text, "name": sender.name}
            json = _json.encode(body).decode() if self.sqlite else body
            rows.append((cached.id, event.ts, sender.identity, sender.role, "chat", json))
            if self.webhook_endpoints:
                self._webhooks(event, cached.id)
            return
        if isinstance(event, AFTERWORD_EVENTS) and room not in self._open:
            # A recording finishes after its call, maybe after the conversation closed: it
            # belongs to that record, which it must not reopen.
            latest = conn.execute(LATEST, {"room": room}).first()
            if latest is None:
                return
            record, fresh = _Open(latest.id), False
        else:
            record, fresh = self._record(conn, room, event.ts)
        if isinstance(event, ev.ConversationOpened):
            if event.customer is not None:
                conn.execute(_SET_CUSTOMER, {"rid": record.id, "customer": event.customer})
            if fresh and self.webhook_endpoints:
                # Once per record: not again when a join continues one the app opened.
                self._webhooks(event, record.id)
            return
        if self.webhook_endpoints:
            self._webhooks(event, record.id)

        def row(kind: str, actor: Participant | None, body: dict[str, Any]) -> None:
            actor_id, actor_role = (actor.identity, actor.role) if actor else (None, None)
            body_json = _json.encode(body).decode() if self.sqlite else body
            rows.append((record.id, event.ts, actor_id, actor_role, kind, body_json))

        def update(**values: Any) -> None:
            conn.execute(_update(*values), {"rid": record.id, **values})

        match event:
            case ev.ParticipantJoined(participant=who):
                if who.role == Role.CUSTOMER:
                    _upsert_customer(conn, who, event.profile, event.ts)
                    conn.execute(_SET_CUSTOMER, {"rid": record.id, "customer": who.identity})
                elif who.role == Role.AGENT and who.identity not in record.agents:
                    record.agents.append(who.identity)
                    update(agents=list(record.agents))
                elif who.role == Role.BOT:
                    update(bot=who.name)
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
                record.calls[who.identity] = event.ts
                record.sent[who.identity] = set()
                row("call.started", who, {})
            case ev.CallEnded(participant=who, reason=reason):
                started = record.calls.pop(who.identity, None)
                sent = record.sent.pop(who.identity, set())
                # None: the call started before this process's writer knew the conversation.
                duration = None if started is None else event.ts - started
                ended: dict[str, Any] = {"reason": reason, "duration_ms": duration}
                row("call.ended", who, {**ended, "audio": "audio" in sent, "video": "video" in sent})
            case ev.MediaChanged(identity=identity, audio=audio, video=video):
                sending = {"audio"} if audio else set()
                sending |= {"video"} if video else set()
                record.sent.setdefault(identity, set()).update(sending)
                used = {"voice"} if audio else set()
                used |= {"video"} if video else set()
                if not used <= record.channels:
                    record.channels |= used
                    update(channels=sorted(record.channels))
                row("media", None, {"identity": identity, "audio": audio, "video": video})
            case ev.UpgradeRequested(id=rid, media=media, sender=sender):
                row("upgrade.requested", sender, {"id": rid, "media": media})
            case ev.UpgradeAnswered(id=rid, media=media, replier=replier, accept=accept):
                row("upgrade.answered", replier, {"id": rid, "media": media, "accept": accept})
            case ev.MetaRecorded(kind=kind, body=body, actor=actor):
                row("meta", actor, {**body, "kind": kind})
            case ev.RecordingChanged(active=active):
                row("recording.started" if active else "recording.stopped", None, {})
            case ev.RecordingSaved(participant=who, media=media, file=file, started=started):
                saved = {"media": media, "file": file, "started": started, "duration_ms": event.duration_ms}
                row("recording.saved", who, {**saved, "bytes": event.size})
            case ev.ConversationClosed(reason=reason):
                update(closed=event.ts, ended=reason or record.last_reason)
                self._open.pop(room, None)
            case _:
                pass  # nothing else reaches the writer (see ``records.recorded``)

    def _record(self, conn: sa.Connection, room: str, ts: int) -> tuple[_Open, bool]:
        """The room's conversation record: the open one, one closed within the retention
        time (reopened; not one the app closed), or a new one; and whether it was opened now
        (new or reopened)."""
        cached = self._open.get(room)
        if cached is not None:
            return cached, False
        latest = conn.execute(LATEST, {"room": room}).first()
        fresh = True
        if latest is not None and (
            latest.closed is None or (latest.closed >= ts - self.retention_ms and latest.ended != ev.CLOSED_BY_APP)
        ):
            record = _Open(latest.id, set(latest.channels or ["chat"]), list(latest.agents or []))
            if latest.closed is not None:
                conn.execute(_update("closed", "ended"), {"rid": latest.id, "closed": None, "ended": None})
            else:
                fresh = False
        else:
            record = _Open(f"{room}~{uuid.uuid4().hex[:12]}")
            values = {"room": room, "opened": ts, "channels": ["chat"], "agents": [], "customer": None, "bot": None}
            conn.execute(_INSERT_CONVERSATION, {"id": record.id, **values})
        self._open[room] = record
        return record, fresh

    # -- SQLite checkpoints -----------------------------------------------------------

    async def _checkpoints(self) -> None:
        """Copy the WAL into the database file now and then, on a thread (never on the loop)."""
        while True:
            await asyncio.sleep(CHECKPOINT_INTERVAL)
            if self._commits:
                self._commits = 0
                await asyncio.to_thread(self._checkpoint_now)

    def _checkpoint_now(self) -> None:
        if self._sync_engine is None:
            return
        try:
            with self._sync_engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
        except sa.exc.SQLAlchemyError:
            log.warning("a records checkpoint failed (the next one catches up)", exc_info=True)


def _pg_columns(rows: list[tuple[Any, ...]]) -> list[list[Any]]:
    """Rows as column arrays for an ``INSERT … SELECT FROM unnest(…)`` (``_PG_INSERT``,
    ``outbox.PG_INSERT``): the sixth column, a JSON body, as JSON text."""
    columns: list[list[Any]] = [list(column) for column in zip(*rows, strict=True)]
    columns[5] = [body if isinstance(body, str) else _json.encode(body).decode() for body in columns[5]]
    return columns


# Statements built once, with bind parameters: building one per call (``.values``,
# ``.where``, its cache key) cost more than running it.

#: The most recent conversation record of ``:room``.
LATEST = (
    sa.select(conversations)
    .where(conversations.c.room == sa.bindparam("room"))
    .order_by(conversations.c.opened.desc())
    .limit(1)
)
_INSERT_CONVERSATION = conversations.insert()
#: PostgreSQL: a room's record lookup, one writer at a time (``_transaction``). The two-key
#: form keeps it apart from the one-key locks (webhook endpoints, migrations).
_ROOM_LOCK = sa.text("SELECT pg_advisory_xact_lock(7341, hashtext(:room))")
#: The record's customer: the first customer to join it.
_SET_CUSTOMER = (
    conversations.update()
    .where(conversations.c.id == sa.bindparam("rid"), conversations.c.customer.is_(None))
    .values(customer=sa.bindparam("customer"))
)


@functools.cache
def _update(*columns: str) -> sa.Update:
    """``UPDATE conversations SET <columns> WHERE id = :rid`` (one per set of columns)."""
    return (
        conversations.update()
        .where(conversations.c.id == sa.bindparam("rid"))
        .values({column: sa.bindparam(column) for column in columns})
    )


@functools.cache
def _customer_upsert(dialect: str, with_profile: bool) -> Any:
    """Insert a customer, or update the name, last seen (and profile) of a known one."""
    insert: Any
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    columns = ["identity", "name", "first_seen", "last_seen", *(["profile"] if with_profile else [])]
    statement = insert(customers).values({column: sa.bindparam(column) for column in columns})
    updated = ["name", "last_seen", *(["profile"] if with_profile else [])]
    return statement.on_conflict_do_update(
        index_elements=["identity"], set_={column: statement.excluded[column] for column in updated}
    )


def _writer_pragmas(dbapi_connection: Any, _: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    # On the event loop's thread: never wait for a lock, never checkpoint inline.
    cursor.execute("PRAGMA busy_timeout=0")
    cursor.execute("PRAGMA wal_autocheckpoint=0")
    cursor.close()


def _busy(exc: BaseException) -> bool:
    orig = getattr(exc, "orig", exc)
    return isinstance(orig, sqlite3.OperationalError) and getattr(orig, "sqlite_errorname", "") in (
        "SQLITE_BUSY",
        "SQLITE_LOCKED",
        "SQLITE_BUSY_SNAPSHOT",
    )


def _upsert_customer(conn: sa.Connection, who: Participant, profile: dict[str, Any] | None, ts: int) -> None:
    values: dict[str, Any] = {"identity": who.identity, "name": who.name, "first_seen": ts, "last_seen": ts}
    if profile is not None:
        values["profile"] = profile
    conn.execute(_customer_upsert(conn.dialect.name, profile is not None), values)
