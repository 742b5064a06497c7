"""The records: customers, conversations, events.

Revision ID: 0001
Revises:
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "customers",
        sa.Column("identity", sa.String(128), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("profile", sa.JSON(), nullable=True),
        sa.Column("first_seen", sa.BigInteger(), nullable=False),
        sa.Column("last_seen", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "conversations",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("room", sa.String(128), nullable=False),
        sa.Column("customer", sa.String(128), nullable=True),
        sa.Column("opened", sa.BigInteger(), nullable=False),
        sa.Column("closed", sa.BigInteger(), nullable=True),
        sa.Column("ended", sa.String(32), nullable=True),
        sa.Column("channels", sa.JSON(), nullable=False),
        sa.Column("bot", sa.String(128), nullable=True),
        sa.Column("agents", sa.JSON(), nullable=False),
    )
    op.create_index("ix_conversations_room_opened", "conversations", ["room", "opened"])
    op.create_index("ix_conversations_customer_opened", "conversations", ["customer", "opened"])
    op.create_table(
        "events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("conversation", sa.String(64), sa.ForeignKey("conversations.id"), nullable=False),
        sa.Column("ts", sa.BigInteger(), nullable=False),
        sa.Column("actor", sa.String(128), nullable=True),
        sa.Column("actor_role", sa.String(16), nullable=True),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("body", sa.JSON(), nullable=False),
    )
    op.create_index("ix_events_conversation_id", "events", ["conversation", "id"])


def downgrade() -> None:
    op.drop_table("events")
    op.drop_table("conversations")
    op.drop_table("customers")
