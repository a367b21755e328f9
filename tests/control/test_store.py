"""The control store (SQLite; PostgreSQL under --database postgresql): serials, concurrent appends, checks."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from medbridge.control.audit import AuditEvent
from medbridge.control.store import ManifestEntry, Store, audit_query
from medbridge.errors import AccountDisabled, AlreadyExists, CertificateRefused, NotFound
from medbridge.policy.sessions import SessionDecision, decide_session

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


def _issue(store: Store, job: str = "j", datasets: list[str] | None = None, now: datetime = NOW) -> int:
    spec, _ = store.issue_certificate(
        user="alice",
        job_id=job,
        requested=timedelta(hours=1),
        datasets=datasets,
        key_fingerprint="SHA256:e",
        now=now,
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


def _decide(store: Store, serial: int, now: datetime = NOW, **kw: object) -> SessionDecision:
    return decide_session(store.session_facts([serial], now)[serial], now, **kw)  # type: ignore[arg-type]


def test_session_facts_follow_grants_and_accounts(store: Store) -> None:
    store.grant("alice", "chest", None, NOW, "t")
    serial = _issue(store, datasets=["chest"])
    assert _decide(store, serial).datasets == {"chest"}
    store.revoke("alice", "chest", NOW, "t")
    assert _decide(store, serial).reason == "grant ended for dataset(s) chest", "a login is refused, not left empty"
    store.grant("alice", "chest", None, NOW, "t")
    store.set_enabled("alice", False, NOW, "t")
    assert _decide(store, serial).reason == "account 'alice' disabled"
    with pytest.raises(AccountDisabled):
        _issue(store, "j2")
    store.set_enabled("alice", True, NOW, "t")
    assert _decide(store, serial, NOW + timedelta(hours=3)).reason == "certificate expired"
    assert _decide(store, 999).reason == "certificate not issued by this platform"


def test_renewals_are_the_same_jobs_later_certificates_for_the_same_key(store: Store) -> None:
    store.grant("alice", "chest", None, NOW, "t")
    first = _issue(store)
    later = NOW + timedelta(minutes=50)
    renewal = _issue(store, now=later)
    _issue(store, "other-job", now=later)
    facts = store.session_facts([first], NOW + timedelta(minutes=70))[first]
    assert [c.serial for c in facts.renewals] == [renewal]
    assert _decide(store, first, NOW + timedelta(minutes=70)).certificate == store.certificate(renewal)


def test_an_ended_job_gets_no_certificate_and_its_old_ones_never_log_in(store: Store) -> None:
    store.grant("alice", "chest", None, NOW, "t")
    serial = _issue(store, "done")
    expired = _issue(store, "done", now=NOW - timedelta(hours=3))
    assert store.end_job("alice", "done", NOW, "alice") == 2, "expired certificates are marked too"
    assert store.session_facts([expired], NOW)[expired].job_ended
    assert _decide(store, serial).reason == "certificate revoked: job 'done' has ended"
    with pytest.raises(CertificateRefused, match="job 'done' of user 'alice' has ended"):
        _issue(store, "done")
    assert _issue(store, "next") > serial, "another job of the same user is not affected"


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


def test_audit_queries_by_user_job_dataset_action_and_time_use_their_indexes(store: Store) -> None:
    at = [NOW - timedelta(hours=h) for h in (3, 2, 1)]
    store.audit([AuditEvent(actor="alice", action="sftp.open", outcome="ok", subject="/datasets/chest/a.bin",
                            detail={"job": "j1"}, at=at[0]),
                 AuditEvent(actor="bob", action="sftp.open", outcome="ok", subject="/datasets/knee/b.bin",
                            detail={"job": "j2"}, at=at[1]),
                 AuditEvent(actor="alice", action="certificate.issue", outcome="ok", subject="j3", at=at[2])],
                NOW)  # fmt: skip
    assert [r.subject for r in store.audit_records(user="alice", action="sftp.open")] == ["/datasets/chest/a.bin"]
    assert [r.subject for r in store.audit_records(job="j3")] == ["j3"]
    assert [r.actor for r in store.audit_records(dataset="knee")] == ["bob"]
    assert len(store.audit_records(dataset="chest")) == 2, "dataset.add names it too"
    assert [r.subject for r in store.audit_records(since=at[1], until=at[2])] == ["/datasets/knee/b.bin"]
    # A log of some size, many users over two days, so that a cost-based planner (PostgreSQL) has a
    # reason to prefer one index to another: on three rows it may pick either (CI saw it take the time
    # index for a user's time window).
    store.audit([AuditEvent(actor=f"u{i % 50}", action="sftp.read", outcome="ok", subject=f"/datasets/knee/{i}",
                            detail={"job": f"k{i % 97}"}, at=NOW - timedelta(minutes=i)) for i in range(3000)],
                NOW)  # fmt: skip
    wide = {"since": NOW - timedelta(days=3), "until": NOW + timedelta(hours=1)}
    for kw, index in (({"user": "alice"}, "ix_audit_actor_at"), ({"job": "j1"}, "ix_audit_job_at"),
                      ({"dataset": "chest"}, "ix_audit_dataset_at"), ({"action": "grant"}, "ix_audit_action_at"),
                      ({"since": NOW}, "ix_audit_at_seq"),
                      ({"user": "alice", **wide}, "ix_audit_actor_at")):  # fmt: skip
        sql = str(audit_query(**kw).compile(store.engine, compile_kwargs={"literal_binds": True}))
        with store.engine.connect() as conn:
            if store.engine.dialect.name == "postgresql":
                conn.exec_driver_sql("ANALYZE audit")
                conn.exec_driver_sql("SET enable_seqscan = off")
                plan = " ".join(str(row[0]) for row in conn.exec_driver_sql(f"EXPLAIN {sql}"))
            else:
                plan = " ".join(str(row[-1]) for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}"))
        assert index in plan, (kw, plan)
