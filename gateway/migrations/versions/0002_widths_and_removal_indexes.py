"""Record ids wide enough for every room; an index for retention.

A record id is its room (up to 128 characters, ``tokens.MAX_FIELD_CHARS``), "~" and 12
hex digits: up to 141 characters, where 0001 gave ``conversations.id`` and
``events.conversation`` 64, so on PostgreSQL every write into a room of more than 51
characters failed. Every other column already holds what the gateway writes into it.

The index ``conversations(closed)`` lets retention find the conversations closed
before its cut-off. Erasure gets none on ``events``: an index on ``actor`` (with a
partial one for the ``media`` events about a customer) spared it a scan of the events
table, but cost every chat's commit about 14 µs, a second index page per insert, and
erasure is a rare request that reads off the event loop.

On SQLite the two tables are copied into new ones (``batch_alter_table``), which needs
its foreign keys off: ``records.migrate`` turns them off around the migrations and
checks them before committing.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("conversations") as batch:
        batch.alter_column("id", existing_type=sa.String(64), type_=sa.String(141), existing_nullable=False)
        batch.create_index("ix_conversations_closed", ["closed"])
    with op.batch_alter_table("events") as batch:
        batch.alter_column("conversation", existing_type=sa.String(64), type_=sa.String(141), existing_nullable=False)


def downgrade() -> None:
    # Back to 64 characters: only while no record id is longer (PostgreSQL refuses otherwise).
    with op.batch_alter_table("events") as batch:
        batch.alter_column("conversation", existing_type=sa.String(141), type_=sa.String(64), existing_nullable=False)
    with op.batch_alter_table("conversations") as batch:
        batch.drop_index("ix_conversations_closed")
        batch.alter_column("id", existing_type=sa.String(141), type_=sa.String(64), existing_nullable=False)
