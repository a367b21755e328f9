"""Schema migrations: a new database is created at the newest revision; an old one upgrades to the same schema."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, create_engine, text

from medbridge.control import schema
from medbridge.control.audit import GENESIS, Record, chain_hash
from medbridge.control.models import Base
from medbridge.control.store import Store
from medbridge.errors import SchemaOutdated


@pytest.fixture
def url(tmp_path: Path, database_url: str) -> str:
    return database_url or f"sqlite:///{tmp_path / 'c.db'}"


def _differences(url: str) -> list[object]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            return [d for d in compare_metadata(ctx, Base.metadata)]
    finally:
        engine.dispose()


def test_a_new_database_is_at_the_newest_revision(url: str) -> None:
    store = Store(url)
    store.create()
    assert schema.current(store.engine) == schema.head()
    store.close()
    assert _differences(url) == []


def test_an_old_database_is_refused_then_migrated_with_its_data(url: str, tmp_path: Path) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        command.upgrade(schema._config(conn), schema.BASELINE)
        conn.execute(text("DELETE FROM alembic_version"))  # a home from before migrations
        conn.execute(text("INSERT INTO datasets (id, name, provider, storage_path, created_at) "
                          "VALUES (1, 'ct', '', '/x', '2026-01-01 00:00:00')"))  # fmt: skip
        for i, size in enumerate((10, 20, 30)):
            conn.execute(text("INSERT INTO dataset_files (dataset_id, path, size, sha256, media_type) "
                              f"VALUES (1, 'f{i}', {size}, '{i:064}', 'x')"))  # fmt: skip
        _old_audit(conn)
    engine.dispose()
    store = Store(url)
    with pytest.raises(SchemaOutdated, match="platform migrate"):
        store.datasets()
    assert schema.upgrade(store.engine) == (schema.BASELINE, schema.head())
    fresh = Store(url)
    (ds,) = fresh.datasets()
    assert (ds.files, ds.bytes, ds.version) == (3, 60, 1)
    assert [m.path for m in fresh.manifest("ct")] == ["f0", "f1", "f2"]
    assert [(r.job, r.dataset) for r in fresh.audit_records(dataset="ct")] == [("j1", "ct")], "the audit's index filled"
    assert fresh.verify_audit() == 2
    for s in (store, fresh):
        s.close()
    assert _differences(url) == []


def test_platform_init_and_migrate_on_either_database(tmp_path: Path, database_url: str) -> None:
    home = tmp_path / "home"
    run = [sys.executable, "-m", "medbridge", "platform"]
    made = subprocess.run([*run, "init", "--home", str(home), "--database-url", database_url], capture_output=True)
    assert made.returncode == 0, made.stderr
    assert (home / "control.db").exists() == (not database_url)
    again = subprocess.run([*run, "migrate", "--home", str(home)], capture_output=True, text=True)
    assert again.returncode == 0 and f"already at schema revision {schema.head()}" in again.stdout, again.stderr
    listed = subprocess.run([sys.executable, "-m", "medbridge", "dataset", "list", "--home", str(home), "--json"],
                            capture_output=True, text=True)  # fmt: skip
    assert listed.returncode == 0 and '"datasets": []' in listed.stdout, listed.stderr


def test_a_home_made_between_releases_without_a_revision_upgrades(url: str) -> None:
    """Tables from create_all of a later model but no alembic_version: each step is done only where missing."""
    engine = create_engine(url)
    Base.metadata.create_all(engine)
    engine.dispose()
    store = Store(url)
    assert schema.upgrade(store.engine) == (schema.BASELINE, schema.head())
    store.close()
    assert _differences(url) == []


def _old_audit(conn: Connection) -> None:
    """Two entries as a release before the audit's index wrote them (no job or dataset column)."""
    prev = GENESIS
    at = datetime(2026, 1, 1, tzinfo=UTC)
    for seq, (action, subject, detail) in enumerate(
        [("sftp.open", "/datasets/ct/f0", '{"job":"j1"}'), ("user.add", "alice", "{}")], 1
    ):
        r = Record(seq=seq, at=at, actor="alice", action=action, outcome="ok", subject=subject, detail=detail,
                   prev_hash=prev)  # fmt: skip
        prev = chain_hash(r)
        conn.execute(text("INSERT INTO audit (seq, at, actor, action, outcome, subject, detail, prev_hash, hash) "
                          "VALUES (:seq, :at, 'alice', :action, 'ok', :subject, :detail, :prev, :hash)"),
                     {"seq": seq, "at": "2026-01-01 00:00:00", "action": action, "subject": subject,
                      "detail": detail, "prev": r.prev_hash, "hash": prev})  # fmt: skip
