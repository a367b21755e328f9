"""Alembic's environment: always handed a connection by medbridge.control.schema, never a URL of its own."""

from __future__ import annotations

from alembic import context

from medbridge.control.models import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters a table by copying it
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
