"""The records' schema: the migrations in ``gateway/migrations`` create exactly this
(a test compares them), and every change to it is a new migration."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()
#: Event ids: 64-bit on PostgreSQL; SQLite's INTEGER PRIMARY KEY is already 64-bit.
EventId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
#: Rooms, identities and names: at most ``tokens.MAX_FIELD_CHARS`` characters (what a join
#: may carry; the bot's name is held to it too).
FIELD_CHARS = 128
#: A conversation record's id: its room, "~" and 12 hex digits (``writer.Writer._record``).
RECORD_ID_CHARS = FIELD_CHARS + 1 + 12

customers = sa.Table(
    "customers",
    metadata,
    sa.Column("identity", sa.String(FIELD_CHARS), primary_key=True),
    sa.Column("name", sa.String(FIELD_CHARS), nullable=False),
    sa.Column("profile", sa.JSON(), nullable=True),
    sa.Column("first_seen", sa.BigInteger(), nullable=False),
    sa.Column("last_seen", sa.BigInteger(), nullable=False),
)

conversations = sa.Table(
    "conversations",
    metadata,
    sa.Column("id", sa.String(RECORD_ID_CHARS), primary_key=True),
    sa.Column("room", sa.String(FIELD_CHARS), nullable=False),
    sa.Column("customer", sa.String(FIELD_CHARS), nullable=True),
    sa.Column("opened", sa.BigInteger(), nullable=False),
    sa.Column("closed", sa.BigInteger(), nullable=True),
    #: How it ended: the last participant's leaving reason (left, disconnected, ...): the
    #: gateway's own words, never a client's.
    sa.Column("ended", sa.String(32), nullable=True),
    #: Channels used, of "chat", "voice", "video".
    sa.Column("channels", sa.JSON(), nullable=False),
    sa.Column("bot", sa.String(FIELD_CHARS), nullable=True),
    sa.Column("agents", sa.JSON(), nullable=False),
    sa.Index("ix_conversations_room_opened", "room", "opened"),
    sa.Index("ix_conversations_customer_opened", "customer", "opened"),
    #: Retention: the conversations closed before its cut-off.
    sa.Index("ix_conversations_closed", "closed"),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", EventId, primary_key=True, autoincrement=True),
    sa.Column("conversation", sa.String(RECORD_ID_CHARS), sa.ForeignKey("conversations.id"), nullable=False),
    sa.Column("ts", sa.BigInteger(), nullable=False),
    #: Who did it: an identity, or None (the gateway).
    sa.Column("actor", sa.String(FIELD_CHARS), nullable=True),
    sa.Column("actor_role", sa.String(16), nullable=True),
    sa.Column("type", sa.String(32), nullable=False),
    sa.Column("body", sa.JSON(), nullable=False),
    sa.Index("ix_events_conversation_id", "conversation", "id"),
    # No index on ``actor`` for erasure: it would cost every chat's commit about 14 µs
    # (a second index page per insert) to speed up a rare request, which reads the
    # events table once, off the event loop.
)

#: Webhook deliveries waiting, done or given up (``webhooks.py``, ``webhook_delivery.py``):
#: one row per event and endpoint, written by the records writer in the transaction of
#: the change it reports.
webhook_outbox = sa.Table(
    "webhook_outbox",
    metadata,
    sa.Column("id", EventId, primary_key=True, autoincrement=True),
    #: The endpoint's URL (``--webhook-url``).
    sa.Column("endpoint", sa.String(2000), nullable=False),
    #: The ``webhook-id``: one per event, the same for every endpoint.
    sa.Column("msg_id", sa.String(64), nullable=False),
    sa.Column("type", sa.String(32), nullable=False),
    #: The conversation record it is about (no foreign key: retention and erasure delete
    #: records, while what was already said about them stays to be delivered).
    sa.Column("conversation", sa.String(RECORD_ID_CHARS), nullable=True),
    sa.Column("created", sa.BigInteger(), nullable=False),
    #: The body: ``{"type", "id", "timestamp", "data"}``.
    sa.Column("payload", sa.JSON(), nullable=False),
    #: ``pending``, ``delivered`` or ``failed``.
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer(), nullable=False),
    #: When a pending delivery is tried next (Unix ms).
    sa.Column("next_attempt", sa.BigInteger(), nullable=False),
    sa.Column("last_error", sa.String(500), nullable=True),
    sa.Column("delivered", sa.BigInteger(), nullable=True),
    #: The worker: an endpoint's oldest pending delivery.
    sa.Index("ix_webhook_outbox_endpoint_status_id", "endpoint", "status", "id"),
    #: The API: deliveries by status, by id.
    sa.Index("ix_webhook_outbox_status_id", "status", "id"),
)
