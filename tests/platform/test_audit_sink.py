"""The audit sink on a real SQLite store: group commit, a poison event isolated, a failing store fails closed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import pytest

from medbridge.control.audit import AuditEvent
from medbridge.control.store import Store
from medbridge.errors import AuditUnavailable, MedbridgeError
from medbridge.platform.audit import AuditSink


class FaultyStore(Store):
    """A real store that refuses some events (a poison) or every write (a full disk), as a test says."""

    poison = "poison"
    down = False
    transactions = 0

    def audit(self, events: Sequence[AuditEvent], now: datetime) -> None:
        self.transactions += 1
        if self.down:
            raise MedbridgeError("control database error: database or disk is full")
        if any(e.action == self.poison for e in events):
            raise ValueError("this event cannot be stored")
        super().audit(events, now)


@pytest.fixture
def store(tmp_path: Path) -> FaultyStore:
    s = FaultyStore(f"sqlite:///{tmp_path / 'c.db'}")
    s.create()
    return s


class Owner:
    def __init__(self) -> None:
        self.done: list[tuple[int, str | None]] = []

    def audit_done(self, ticket: int, error: str | None) -> None:
        self.done.append((ticket, error))


def ev(action: str, subject: str = "") -> AuditEvent:
    return AuditEvent(actor="alice", action=action, outcome="ok", subject=subject)


def test_many_decisions_share_one_commit_and_each_owner_hears_in_order(store: FaultyStore) -> None:
    async def go() -> Owner:
        sink = AuditSink(store)
        sink.start()
        owner = Owner()
        tickets = [sink.record(ev("sftp.open", f"/f{i}"), owner) for i in range(200)]
        await sink.flush()
        await sink.close()
        assert [t for t, _ in owner.done] == tickets
        return owner

    owner = asyncio.run(go())
    assert {e for _, e in owner.done} == {None}
    assert store.transactions <= 3, "200 decisions recorded in one pass are not 200 transactions"
    assert [r.subject for r in store.audit_records(action="sftp.open")] == [f"/f{i}" for i in range(200)]


def test_a_poison_event_is_replaced_and_never_blocks_the_others(store: FaultyStore) -> None:
    async def go() -> tuple[Owner, Owner]:
        sink = AuditSink(store)
        sink.start()
        good, bad = Owner(), Owner()
        for i in range(50):
            sink.record(ev("poison" if i == 17 else "sftp.open", f"/f{i}"), bad if i == 17 else good)
        await sink.flush()
        await sink.commit(ev("certificate.issue"))  # and the sink goes on
        await sink.close()
        return good, bad

    good, bad = asyncio.run(go())
    assert len(good.done) == 49 and all(e is None for _, e in good.done)
    assert len(bad.done) == 1 and "cannot be stored" in str(bad.done[0][1]), "the poison's own request is refused"
    actions = [r.action for r in store.audit_records()]
    assert actions.count("sftp.open") == 49 and actions[-1] == "certificate.issue"
    placeholder = store.audit_records(action="audit.unwritable")[0].as_dict()
    assert placeholder["detail"]["action"] == "poison" and placeholder["subject"] == "/f17"
    assert actions.index("audit.unwritable") == 17, "in its place, in order"
    assert store.verify_audit() == 51


def test_a_failing_store_refuses_at_once_keeps_the_events_and_recovers(
    store: FaultyStore, caplog: pytest.LogCaptureFixture
) -> None:
    async def go() -> list[str]:
        sink = AuditSink(store)
        sink.retry = (0.01, 0.05)
        sink.start()
        store.down = True
        outcomes = []
        for action in ("sftp.open", "certificate.issue"):
            try:
                await asyncio.wait_for(sink.commit(ev(action)), 10)
                outcomes.append("committed")
            except AuditUnavailable as exc:
                outcomes.append(str(exc))
        with pytest.raises(AuditUnavailable):
            await sink.flush()
        store.down = False
        await asyncio.wait_for(sink.flush(), 10)
        await sink.commit(ev("sftp.read"))
        await sink.close()
        return outcomes

    with caplog.at_level(logging.WARNING, logger="medbridge.platform"):
        outcomes = asyncio.run(go())
    assert all("disk is full" in o for o in outcomes), outcomes
    records = [r.as_dict() for r in store.audit_records()]
    assert [(r["action"], r["outcome"]) for r in records] == [
        ("sftp.open", "refused"), ("certificate.issue", "refused"), ("sftp.read", "ok")]  # fmt: skip
    assert "the request was refused" in records[0]["detail"]["audit"]
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "writes fail" in messages and "succeed again" in messages


def test_close_writes_what_is_pending(store: FaultyStore) -> None:
    async def go() -> None:
        sink = AuditSink(store)
        sink.start()
        for i in range(500):
            sink.record(ev("sftp.close", f"/f{i}"))
        await sink.close()

    asyncio.run(go())
    assert len(store.audit_records(action="sftp.close")) == 500
