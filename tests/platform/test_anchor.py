"""Signed checkpoints and published anchors: what ``audit verify --anchor`` and ``--from`` catch, on a real store."""

from __future__ import annotations

import dataclasses
import re
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path

import asyncssh
import pytest
from sqlalchemy import text

from medbridge.control.audit import CHECKPOINT, GENESIS, Anchor, AuditEvent, Record, chain_hash, index_keys
from medbridge.control.models import AuditEntry
from medbridge.control.store import Store
from medbridge.errors import IntegrityError, InvalidInput
from medbridge.platform.anchor import checker, read_anchor, signer, write_anchor

KEY = asyncssh.generate_private_key("ssh-ed25519")
CHECK = checker(KEY.convert_to_public())


def _events(n: int, start: int = 0) -> list[AuditEvent]:
    return [AuditEvent(actor="alice", action="sftp.open", outcome="ok", subject=f"/datasets/chest/{i}.bin")
            for i in range(start, start + n)]  # fmt: skip


@pytest.fixture
def url(tmp_path: Path, database_url: str) -> str:
    return database_url or f"sqlite:///{tmp_path / 'c.db'}"


def _chain(url: str) -> tuple[Store, Anchor]:
    """300 entries with checkpoints after 100 and 200, an anchor published after 300, then 20 more."""
    store = Store(url)
    store.create()
    now = datetime.now(UTC)
    for part in range(3):
        store.audit(_events(100, part * 100), now)
        anchor = store.checkpoint(signer(KEY), now)
    store.audit(_events(20, 300), now)
    return store, anchor


def _sql(store: Store, statement: str) -> None:
    """What someone with write access to the database (and not the audit key) runs."""
    with store.engine.begin() as conn:
        conn.execute(text(statement))


def _rewrite(store: Store, records: list[Record]) -> None:
    """A chain that links and hashes again (and indexes itself as the platform would)."""
    prev, fresh = GENESIS, []
    for seq, r in enumerate(records, 1):
        r = dataclasses.replace(r, seq=seq, prev_hash=prev)
        r = dataclasses.replace(r, hash=chain_hash(r))
        job, dataset = index_keys(r.action, r.subject, r.detail)
        fresh.append(dataclasses.asdict(r) | {"job": job, "dataset": dataset})
        prev = r.hash
    with store.engine.begin() as conn:
        conn.execute(text("DELETE FROM audit"))
        conn.execute(AuditEntry.__table__.insert(), fresh)  # type: ignore[attr-defined]


def _edit(store: Store) -> None:
    _sql(store, "UPDATE audit SET subject = '/datasets/chest/innocent.bin' WHERE seq = 150")


def _delete(store: Store) -> None:
    _sql(store, "DELETE FROM audit WHERE seq = 150")


def _recompute(store: Store) -> None:
    """Entry 150 removed, and the checkpoints that would betray it, and the rest hashed again."""
    _rewrite(store, [r for r in store.audit_entries() if r.seq != 150 and r.action != CHECKPOINT])


def _truncate(store: Store) -> None:
    _sql(store, "DELETE FROM audit WHERE seq > 250")


@pytest.mark.parametrize(
    ("tamper", "alone", "anchored"),
    [
        (_edit, "broken at entry 150: content does not match its hash (altered)", None),
        (_delete, "broken at entry 151: entry 150 is missing", None),
        (_recompute, None, "differs from the published anchor: the chain was rewritten up to here"),
        (_truncate, None, "the chain ends at entry 250 but an anchor names entry 302 (the end was cut)"),
    ],
    ids=["edited", "deleted", "recomputed", "truncated"],
)
def test_anchor_detects_an_edited_a_deleted_a_recomputed_and_a_truncated_chain(
    url: str, tamper: object, alone: str | None, anchored: str | None
) -> None:
    store, anchor = _chain(url)
    assert store.verify_chain(anchors=[anchor], check=CHECK).checkpoints == 3
    tamper(store)  # type: ignore[operator]
    if alone is None:
        store.verify_chain(check=CHECK)  # the chain alone cannot tell: this is what the anchor is for
    else:
        with pytest.raises(IntegrityError, match=re.escape(alone)):
            store.verify_chain(check=CHECK)
    with pytest.raises(IntegrityError, match=re.escape(anchored or alone or "")):
        store.verify_chain(anchors=[anchor], check=CHECK)
    store.close()


def test_a_rewritten_chain_that_keeps_its_checkpoints_fails_their_signatures(url: str) -> None:
    store, _ = _chain(url)
    _rewrite(store, [r for r in store.audit_entries() if r.seq != 150])
    with pytest.raises(IntegrityError, match="checkpoint signs another chain"):
        store.verify_chain(check=CHECK)
    store.close()


def test_anchor_files_verify_only_with_the_audit_key(url: str, tmp_path: Path) -> None:
    store, anchor = _chain(url)
    write_anchor(tmp_path / "anchor.json", anchor)
    assert read_anchor(tmp_path / "anchor.json", CHECK) == anchor
    other = asyncssh.generate_private_key("ssh-ed25519")
    write_anchor(tmp_path / "forged.json", signer(other)(anchor.seq, anchor.hash))
    with pytest.raises(InvalidInput, match="does not verify with the audit key"):
        read_anchor(tmp_path / "forged.json", CHECK)
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(InvalidInput, match="not a medbridge-audit-anchor/1 file"):
        read_anchor(tmp_path / "junk.json", CHECK)
    store.close()


def test_from_a_trusted_anchor_only_what_follows_is_read_and_memory_stays_flat(url: str) -> None:
    store = Store(url)
    store.create()
    now = datetime.now(UTC)
    store.audit(_events(1000), now)
    anchor = store.checkpoint(signer(KEY), now)
    store.audit(_events(10, 1000), now)
    walk = store.verify_chain(start=anchor, check=CHECK)
    assert (walk.entries, walk.last) == (11, 1011), "the checkpoint entry and the ten after it, nothing before"

    def peak(run: object) -> int:
        tracemalloc.start()
        run()  # type: ignore[operator]
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    streamed = peak(lambda: store.verify_chain(check=CHECK, batch=50))
    held = peak(lambda: list(store.audit_entries()))
    assert streamed * 4 < held, (streamed, held)  # one page at a time, not the chain
    _sql(store, "UPDATE audit SET subject = 'x' WHERE seq = 1005")
    with pytest.raises(IntegrityError, match="broken at entry 1005"):
        store.verify_chain(start=anchor, check=CHECK)
    store.close()


def test_an_entry_hidden_from_queries_by_its_index_columns_fails_verify(url: str) -> None:
    store, _ = _chain(url)
    assert len(store.audit_records(dataset="chest")) == 320
    _sql(store, "UPDATE audit SET dataset = 'knee' WHERE seq = 77")
    assert len(store.audit_records(dataset="chest")) == 319, "hidden from the query"
    with pytest.raises(IntegrityError, match="broken at entry 77: its job or dataset column was altered"):
        store.verify_chain(check=CHECK)
    store.close()


def test_a_checkpoint_or_anchor_with_a_signature_that_is_not_text_is_refused_not_a_crash(
    url: str, tmp_path: Path
) -> None:
    """The hostile review: an integer signature, the chain hashed again, made `audit verify` an internal error."""
    store, anchor = _chain(url)
    records = list(store.audit_entries())
    forged = []
    for r in records:
        if r.action == CHECKPOINT and r.seq > 200:
            r = dataclasses.replace(r, detail=r.detail.replace(f'"{anchor.signature}"', "5"))
        forged.append(r)
    _rewrite(store, forged)
    with pytest.raises(IntegrityError, match="checkpoint unreadable"):
        store.verify_chain(check=CHECK)
    path = tmp_path / "anchor.json"
    write_anchor(path, anchor)
    path.write_text(path.read_text().replace(f'"{anchor.signature}"', "5"))
    with pytest.raises(InvalidInput, match="signature must be strings"):
        read_anchor(path, CHECK)
    store.close()


def test_an_older_anchor_below_the_start_is_not_taken_for_a_cut_chain(url: str) -> None:
    """``--from NEW --anchor OLD`` on an intact chain said "the end was cut": OLD lies before where the walk starts."""
    store, anchor = _chain(url)
    newer = store.checkpoint(signer(KEY), datetime.now(UTC))
    walk = store.verify_chain(start=newer, anchors=[anchor], check=CHECK)
    assert (walk.entries, walk.checkpoints) == (1, 1), "the new checkpoint's own entry, nothing before it"
    store.close()
