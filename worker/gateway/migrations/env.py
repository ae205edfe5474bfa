"""Alembic's environment: migrations run on the connection :func:`worker.gateway.migrate` passes."""

from __future__ import annotations

from alembic import context

from worker.gateway.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through worker.gateway.migrate.upgrade")
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
