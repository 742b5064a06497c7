"""The records' schema: the migrations in ``gateway/migrations`` create exactly this
(a test compares them), and every change to it is a new migration."""

from __future__ import annotations

import sqlalchemy as sa

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
