"""The control database's schema: created at the newest revision, upgraded by Alembic, checked before use.

A home from before migrations (tables, no ``alembic_version``) is taken to be at the
first revision.  medbridge never upgrades by itself: an operator runs ``platform
migrate`` (on PostgreSQL, once, for every platform host), and a process that finds
the schema behind or ahead of its own refuses with that remedy.
"""

from __future__ import annotations

import functools
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.engine import Connection, Engine

from medbridge.control.models import Base

BASELINE = "0001"


def _config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).with_name("migrations")))
    cfg.attributes["connection"] = connection
    return cfg


@functools.cache
def head() -> str:
    """The newest revision this medbridge knows."""
    found = ScriptDirectory.from_config(_config()).get_current_head()
    assert found is not None
    return found


def current(engine: Engine) -> str | None:
    """The database's revision; the baseline for a home from before migrations; None for an empty database."""
    with engine.connect() as conn:
        rev = MigrationContext.configure(conn).get_current_revision()
        if rev is None and inspect(conn).has_table("users"):
            return BASELINE
        return rev


def create(engine: Engine) -> None:
    """A new database: every table as the models say, stamped at the newest revision."""
    with engine.begin() as conn:
        Base.metadata.create_all(conn)
        command.stamp(_config(conn), "head")


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Bring the database to the newest revision; return (from, to)."""
    before = current(engine)
    with engine.begin() as conn:
        cfg = _config(conn)
        if before == BASELINE and MigrationContext.configure(conn).get_current_revision() is None:
            command.stamp(cfg, BASELINE)
        command.upgrade(cfg, "head")
    return before, head()
