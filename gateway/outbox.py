"""The webhook outbox's statements (``schema.webhook_outbox``), as functions of a
synchronous SQLAlchemy connection: the records run them on the writer's connection
(SQLite) or through ``run_sync`` (PostgreSQL); see ``SqlRecords.outbox``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from .schema import webhook_outbox as t

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
STATUSES = (PENDING, DELIVERED, FAILED)
#: The columns of an outbox row as the writer inserts it.
COLUMNS = ("endpoint", "msg_id", "type", "conversation", "created", "payload", "status", "attempts", "next_attempt")


@dataclass(frozen=True, slots=True)
class Delivery:
    """One outbox row: one event for one endpoint."""

    id: int
    endpoint: str
    msg_id: str
    type: str
    conversation: str | None
    created: int
    payload: dict[str, Any]
    status: str
    attempts: int
    next_attempt: int
    last_error: str | None
    delivered: int | None

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


def insert_sql(placeholder: str) -> str:
    """``INSERT`` of ``COLUMNS`` with the driver's placeholder (``?``)."""
    return f"INSERT INTO webhook_outbox ({', '.join(COLUMNS)}) VALUES ({', '.join([placeholder] * len(COLUMNS))})"


#: PostgreSQL: a batch of outbox rows as one statement (the columns as arrays).
PG_INSERT = (
    f"INSERT INTO webhook_outbox ({', '.join(COLUMNS)}) "
    "SELECT e, m, k, c, t, p::json, s, a, n FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], "
    "$5::bigint[], $6::text[], $7::text[], $8::int[], $9::bigint[]) AS u(e, m, k, c, t, p, s, a, n)"
)


def heads(conn: sa.Connection, endpoint: str, limit: int) -> list[Delivery]:
    """An endpoint's oldest pending deliveries, oldest first."""
    rows = conn.execute(_HEADS, {"endpoint": endpoint, "limit": limit}).all()
    return [Delivery(**row._mapping) for row in rows]


def settle(conn: sa.Connection, tries: list[dict[str, Any]]) -> None:
    """Record tries (``try_params``): delivered, to be retried at ``next_attempt``, or failed
    for good; one statement for them all."""
    conn.execute(_SETTLE, tries)


def try_params(
    row_id: int, *, status: str, attempts: int, next_attempt: int, error: str | None, delivered_at: int | None
) -> dict[str, Any]:
    """The outcome of one try, as ``settle`` takes it."""
    return {
        "rid": row_id,
        "status": status,
        "attempts": attempts,
        "next_attempt": next_attempt,
        "last_error": None if error is None else error[:500],
        "delivered": delivered_at,
    }


def listing(conn: sa.Connection, status: str | None, after: int | None, limit: int) -> tuple[list[Delivery], bool]:
    """Deliveries by id (of one status, or all) above ``after``; and whether more follow."""
    query = sa.select(t).order_by(t.c.id).limit(limit + 1)
    if status is not None:
        query = query.where(t.c.status == status)
    if after is not None:
        query = query.where(t.c.id > after)
    rows = [Delivery(**row._mapping) for row in conn.execute(query)]
    return rows[:limit], len(rows) > limit


def retry(conn: sa.Connection, row_id: int, now: int) -> Delivery | None:
    """Make a delivery pending again, due now (its attempts kept); None if there is none."""
    conn.execute(t.update().where(t.c.id == row_id).values(status=PENDING, next_attempt=now))
    row = conn.execute(sa.select(t).where(t.c.id == row_id)).first()
    return None if row is None else Delivery(**row._mapping)


def depth(conn: sa.Connection) -> tuple[int, int | None]:
    """Pending deliveries, and when the oldest of them was created (None: none)."""
    count, oldest = conn.execute(
        sa.select(sa.func.count(), sa.func.min(t.c.created)).where(t.c.status == PENDING)
    ).one()
    return int(count), None if oldest is None else int(oldest)


def about(conversation: str, limit: int) -> sa.Delete:
    """Delete up to ``limit`` rows about a conversation record, whatever their status (erasure)."""
    inner = t.alias("inner")
    chosen = sa.select(inner.c.id).where(inner.c.conversation == conversation).limit(limit)
    return t.delete().where(t.c.id.in_(chosen))


def settled_before(before: int, limit: int) -> sa.Delete:
    """Delete up to ``limit`` delivered or failed rows created before ``before`` (Unix ms)."""
    inner = t.alias("inner")
    chosen = sa.select(inner.c.id).where(inner.c.status != PENDING, inner.c.created < before).limit(limit)
    return t.delete().where(t.c.id.in_(chosen))


def prune_delivered(conn: sa.Connection, before: int, limit: int) -> int:
    """Delete up to ``limit`` rows delivered before ``before`` (Unix ms): how many went."""
    inner = t.alias("inner")
    chosen = sa.select(inner.c.id).where(inner.c.status == DELIVERED, inner.c.delivered < before).limit(limit)
    return int(conn.execute(t.delete().where(t.c.id.in_(chosen))).rowcount)


_HEADS = (
    sa.select(t)
    .where(t.c.endpoint == sa.bindparam("endpoint"), t.c.status == PENDING)
    .order_by(t.c.id)
    .limit(sa.bindparam("limit"))
)
_SETTLE = (
    t.update()
    .where(t.c.id == sa.bindparam("rid"))
    .values(
        status=sa.bindparam("status"),
        attempts=sa.bindparam("attempts"),
        next_attempt=sa.bindparam("next_attempt"),
        last_error=sa.bindparam("last_error"),
        delivered=sa.bindparam("delivered"),
    )
)
