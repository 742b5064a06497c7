"""Retention and erasure: what the records delete, in small transactions.

Both read what to delete without blocking the writer, then delete at most
``PURGE_BATCH`` rows per transaction, so the writer's commits get in between (on SQLite
the writer never waits for the lock: it retries, see ``writer.py``).
"""

from __future__ import annotations

import datetime
import json
import logging
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from . import outbox
from .schema import conversations, customers, events
from .writer import Writer

log = logging.getLogger("talkgate.records")

#: Rows one retention or erasure transaction deletes at most (then the writer may go on).
PURGE_BATCH = 1_000
#: How often the retention task runs after its first pass at start (seconds).
RETENTION_INTERVAL = 3600.0
DAY_MS = 86_400_000


@dataclass(frozen=True, slots=True)
class Removed:
    """What retention or an erasure deleted from the records (rows; all 0: nothing)."""

    customers: int = 0
    conversations: int = 0
    #: Events of the removed conversations.
    events: int = 0
    #: Events the erased customer authored in conversations that stay (others' rooms).
    events_elsewhere: int = 0
    #: The call recordings the removed events listed (``recording.saved``: files relative
    #: to the ``--record`` directory), for whoever holds that directory to delete.
    recordings: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return any((self.customers, self.conversations, self.events, self.events_elsewhere, self.recordings))


class OpenConversation(Exception):
    """An erasure refused: the customer has an open conversation (they may be connected,
    and the gateway serving it would write its next events into a record that is gone)."""

    def __init__(self, identity: str, conversations: list[str]) -> None:
        super().__init__(f"{identity!r} has {len(conversations)} open conversation(s): {', '.join(conversations)}")
        self.conversations = conversations


def authored(identity: str) -> sa.ColumnElement[bool]:
    """The events someone authored: those they are the actor of, and the ``media`` events
    about them (the gateway's, without an actor). No index serves it: erasure reads the
    events table once (an index on ``actor`` would cost every chat's commit; schema.py)."""
    return sa.or_(
        events.c.actor == identity,
        sa.and_(events.c.type == "media", events.c.body["identity"].as_string() == identity),
    )


async def recording_files(engine: AsyncEngine, where: sa.ColumnElement[bool]) -> tuple[str, ...]:
    """The files of the ``recording.saved`` events that ``where`` selects."""
    async with engine.connect() as conn:
        bodies = (await conn.scalars(sa.select(events.c.body).where(events.c.type == "recording.saved", where))).all()
    files = []
    for body in bodies:
        value = json.loads(body) if isinstance(body, str) else body
        if isinstance(value, dict) and isinstance(value.get("file"), str):
            files.append(value["file"])
    return tuple(files)


async def expire(engine: AsyncEngine, before: int) -> Removed:
    """One retention pass: delete the conversations closed before ``before`` (Unix ms)
    with their events, then the customers with no conversation left and not seen since.
    Open conversations stay, however old."""
    expired = conversations.alias("expired")
    old = sa.select(expired.c.id).where(expired.c.closed.is_not(None), expired.c.closed < before)
    files = await recording_files(engine, events.c.conversation.in_(old))
    timeline = events.alias("timeline")
    removed_events = await delete_batches(
        engine,
        events.delete().where(
            events.c.id.in_(sa.select(timeline.c.id).where(timeline.c.conversation.in_(old)).limit(PURGE_BATCH))
        ),
    )
    emptied = old.where(~sa.exists().where(events.c.conversation == expired.c.id)).limit(PURGE_BATCH)
    removed_conversations = await delete_batches(
        engine, conversations.delete().where(conversations.c.id.in_(emptied), conversations.c.closed < before)
    )
    stale = customers.alias("stale")
    unseen = (
        sa.select(stale.c.identity)
        .where(stale.c.last_seen < before, ~sa.exists().where(conversations.c.customer == stale.c.identity))
        .limit(PURGE_BATCH)
    )
    await delete_batches(engine, outbox.settled_before(before, PURGE_BATCH))  # delivered or failed webhooks
    # last_seen again in the outer statement: a customer who joins meanwhile stays.
    removed_customers = await delete_batches(
        engine, customers.delete().where(customers.c.identity.in_(unseen), customers.c.last_seen < before)
    )
    return Removed(
        customers=removed_customers, conversations=removed_conversations, events=removed_events, recordings=files
    )


async def erase_customer(engine: AsyncEngine, writer: Writer | None, identity: str, *, force: bool = False) -> Removed:
    """Delete a customer's profile, their conversations with every event, and the events they
    authored elsewhere (``Records.erase_customer``)."""
    theirs = sa.select(conversations.c.id).where(conversations.c.customer == identity)
    async with engine.connect() as conn:  # reading only: the writer goes on meanwhile
        own = (
            await conn.execute(
                sa.select(conversations.c.id, conversations.c.room, conversations.c.closed).where(
                    conversations.c.customer == identity
                )
            )
        ).all()
        still_open = [row.id for row in own if row.closed is None]
        if still_open and not force:
            raise OpenConversation(identity, still_open)
        elsewhere = list(
            (
                await conn.scalars(
                    sa.select(events.c.id).where(authored(identity), events.c.conversation.not_in(theirs))
                )
            ).all()
        )
    ids = {row.id for row in own}
    # Their calls (every track: what others said to them is theirs too) and their voice elsewhere.
    files = await recording_files(engine, sa.or_(events.c.conversation.in_(ids), events.c.actor == identity))
    if writer is not None:
        for row in own:
            if row.closed is None:  # forced: this process's writer starts a new record, not a missing one
                writer.forget(row.room)
    timeline = events.alias("timeline")
    removed_events = 0
    for conversation in ids:
        removed_events += await delete_batches(
            engine,
            events.delete().where(
                events.c.id.in_(
                    sa.select(timeline.c.id).where(timeline.c.conversation == conversation).limit(PURGE_BATCH)
                )
            ),
        )
    for conversation in ids:  # webhooks about them, sent or not: they carry what was said
        await delete_batches(engine, outbox.about(conversation, PURGE_BATCH))
    removed_elsewhere = 0
    for start in range(0, len(elsewhere), PURGE_BATCH):
        async with engine.begin() as conn:
            chunk = elsewhere[start : start + PURGE_BATCH]
            removed_elsewhere += (await conn.execute(events.delete().where(events.c.id.in_(chunk)))).rowcount
    async with engine.begin() as conn:
        # Not one that got new events meanwhile (forced, or the customer came back).
        emptied = ~sa.exists().where(events.c.conversation == conversations.c.id)
        removed_conversations = (
            await conn.execute(conversations.delete().where(conversations.c.customer == identity, emptied))
        ).rowcount
        removed_customers = (await conn.execute(customers.delete().where(customers.c.identity == identity))).rowcount
    removed = Removed(removed_customers, removed_conversations, removed_events, removed_elsewhere, files)
    if removed_conversations < len(ids):
        log.warning(
            "erasing %r: %d conversations got new events meanwhile and stay",
            identity,
            len(ids) - removed_conversations,
        )
    log.info("erased customer %r from the records: %s", identity, removed)
    return removed


async def delete_batches(engine: AsyncEngine, statement: sa.Delete) -> int:
    """Run a delete that removes at most ``PURGE_BATCH`` rows until it removes fewer,
    each time in a transaction of its own (the writer's commits get in between)."""
    total = 0
    while True:
        async with engine.begin() as conn:
            count = (await conn.execute(statement)).rowcount
        total += count
        if count < PURGE_BATCH:
            return total


def utc(ms: int) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
