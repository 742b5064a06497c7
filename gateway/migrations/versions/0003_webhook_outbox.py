"""The webhook outbox: one row per event and endpoint, written in the transaction of the
change it reports, sent (and retried) by the delivery worker.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "webhook_outbox",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("endpoint", sa.String(2000), nullable=False),
        sa.Column("msg_id", sa.String(64), nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("conversation", sa.String(141), nullable=True),
        sa.Column("created", sa.BigInteger(), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt", sa.BigInteger(), nullable=False),
        sa.Column("last_error", sa.String(500), nullable=True),
        sa.Column("delivered", sa.BigInteger(), nullable=True),
    )
    op.create_index("ix_webhook_outbox_endpoint_status_id", "webhook_outbox", ["endpoint", "status", "id"])
    op.create_index("ix_webhook_outbox_status_id", "webhook_outbox", ["status", "id"])


def downgrade() -> None:
    op.drop_index("ix_webhook_outbox_status_id", "webhook_outbox")
    op.drop_index("ix_webhook_outbox_endpoint_status_id", "webhook_outbox")
    op.drop_table("webhook_outbox")
