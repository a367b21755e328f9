"""The control store (SQLite; PostgreSQL under --database postgresql): serials, concurrent appends, checks."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from medbridge.control.audit import AuditEvent
from medbridge.control.store import ManifestEntry, Store
from medbridge.errors import AlreadyExists, NotFound

NOW = datetime.now(UTC)


@pytest.fixture
def url(tmp_path: Path, database_url: str) -> str:
    return database_url or f"sqlite:///{tmp_path / 'c.db'}"


@pytest.fixture
def store(url: str) -> Iterator[Store]:
    s = Store(url)
    s.create()
    s.add_user("alice", [("ssh-ed25519 AAAA", "SHA256:a")], [], NOW, "t")
    s.add_dataset("chest", "", "/nowhere", [ManifestEntry("a", 1, "0" * 64)], NOW, "t")
    yield s
    s.close()


def _issue(store: Store, job: str = "j", datasets: list[str] | None = None) -> int:
    spec, _ = store.issue_certificate(
        user="alice",
        job_id=job,
        requested=timedelta(hours=1),
        datasets=datasets,
        key_fingerprint="SHA256:e",
        now=NOW,
        max_lifetime=timedelta(hours=2),
        source_addresses=(),
        sign=lambda spec: "signed",
    )
    return spec.serial


def test_serials_are_unique_and_recorded(store: Store) -> None:
    store.grant("alice", "chest", None, NOW, "t")
    serials = [_issue(store, f"j{i}") for i in range(3)]
    assert serials == [1, 2, 3]
    assert [c.job_id for c in store.certificates("alice")] == ["j0", "j1", "j2"]


def test_session_check_follows_grants_and_accounts(store: Store) -> None:
    store.grant("alice", "chest", None, NOW, "t")
    serial = _issue(store, datasets=["chest"])
    assert store.check_sessions([serial], NOW)[serial].datasets == {"chest"}
    store.revoke("alice", "chest", NOW, "t")
    assert store.check_sessions([serial], NOW)[serial].datasets == frozenset()
    store.grant("alice", "chest", None, NOW, "t")
    store.set_enabled("alice", False, NOW, "t")
    check = store.check_sessions([serial], NOW)[serial]
    assert not check.ok and "disabled" in check.reason
    assert not store.check_sessions([serial], NOW + timedelta(hours=3))[serial].ok
    assert store.check_sessions([999], NOW)[999].reason == "certificate not issued by this platform"


def test_duplicates_and_unknowns(store: Store) -> None:
    with pytest.raises(AlreadyExists):
        store.add_user("alice", [], [], NOW, "t")
    with pytest.raises(AlreadyExists):
        store.add_user("carol", [("ssh-ed25519 AAAA", "SHA256:a")], [], NOW, "t")
    with pytest.raises(NotFound):
        store.grant("@nobody", "chest", None, NOW, "t")
    with pytest.raises(NotFound):
        store.revoke("alice", "chest", NOW, "t")


def test_concurrent_appends_keep_one_chain(store: Store, url: str) -> None:
    """Two stores on one database (as two server processes or hosts would be) append without forking the chain."""
    other = Store(url)

    def writer(s: Store, who: str) -> None:
        for i in range(40):
            s.audit([AuditEvent(actor=who, action="x", outcome="ok", subject=str(i))], datetime.now(UTC))

    threads = [threading.Thread(target=writer, args=(s, n)) for s, n in ((store, "a"), (other, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.verify_audit() == 2 + 80
    other.close()
