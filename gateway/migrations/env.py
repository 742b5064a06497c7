"""Alembic's environment: migrations run on the connection the gateway hands over
(``records.migrate``), inside its own transaction; there is no alembic.ini."""

from __future__ import annotations

from alembic import context

from gateway.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - always called through records.migrate
    raise RuntimeError("run migrations with `talkgate db upgrade` (gateway.records.migrate)")
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
