"""The audit chain on its own: links, gaps, altered content, and client texts made storable."""

from __future__ import annotations

import dataclasses
import os
from datetime import UTC, datetime
from pathlib import Path

from medbridge.control.audit import (
    GENESIS,
    AuditEvent,
    Record,
    chain_hash,
    escape_text,
    first_break,
    needs_escape,
    unescape_text,
)
from medbridge.control.store import Store


def chain(n: int) -> list[Record]:
    out: list[Record] = []
    prev = GENESIS
    at = datetime(2026, 1, 1, tzinfo=UTC)
    for seq in range(1, n + 1):
        rec = Record(seq=seq, at=at, actor="a", action="x", outcome="ok", subject=str(seq), detail="{}", prev_hash=prev)
        out.append(dataclasses.replace(rec, hash=chain_hash(rec)))
        prev = out[-1].hash
    return out


def test_intact_chain() -> None:
    assert first_break(chain(5)) is None
    assert first_break([]) is None


def test_altered_entry() -> None:
    c = chain(5)
    c[2] = dataclasses.replace(c[2], detail='{"bytes":0}')
    assert first_break(c) == (3, "content does not match its hash (altered)")


def test_removed_entry() -> None:
    c = chain(5)
    del c[1]
    assert first_break(c) == (3, "entry 2 is missing")


def test_rewritten_entry_with_a_fresh_hash_still_breaks_the_link() -> None:
    c = chain(5)
    forged = dataclasses.replace(c[2], actor="m", prev_hash="f" * 64)
    c[2] = dataclasses.replace(forged, hash=chain_hash(forged))
    assert first_break(c) == (3, "does not link to the entry before it")


def test_escape_is_reversible_for_every_kind_of_client_text() -> None:
    texts = [
        os.fsdecode(b"/\xff"),  # a byte that is not UTF-8
        os.fsdecode(b"/a\\b\x80\xc3("),  # a backslash, a stray continuation byte, a truncated sequence
        "\ud800 half a pair",  # a lone surrogate from JSON's \ud800
        "tab\tnewline\nnul\x00esc\x1b[2J del\x7f c1\x85",  # control characters a terminal would act on
        "chest/ü/肺.nii",  # valid UTF-8 stays as it is
    ]
    for text in texts:
        escaped = escape_text(text)
        escaped.encode("utf-8")  # storable anywhere
        assert not needs_escape(escaped)
        assert unescape_text(escaped) == text
    assert escape_text(os.fsdecode(b"/\xff")) == "/\\xff"
    assert not needs_escape("chest/ü/肺.nii")


def test_stored_entries_are_escaped_bounded_and_still_verify(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'c.db'}")
    store.create()
    bad = os.fsdecode(b"/\xff\xfe")
    events = [
        AuditEvent(
            actor="u" * 2000,
            action="sftp.refused",
            outcome="refused",
            subject=bad,
            detail={"reason": "x", "attempts": [{"user": "\udcff\x00"}]},
        ),
        AuditEvent(actor="alice", action="sftp.open", outcome="ok", subject="/datasets/chest/ü"),
    ]
    store.audit(events, datetime.now(UTC))
    first, second = store.audit_records()
    assert first.subject == "/\\xff\\xfe" and unescape_text(first.subject) == bad
    detail = first.as_dict()["detail"]
    assert detail["escaped"] is True and unescape_text(detail["attempts"][0]["user"]) == "\udcff\x00"
    assert len(first.actor) == 128 and detail["truncated"] == {"actor": 2000}
    assert (second.subject, "escaped" in second.detail) == ("/datasets/chest/ü", False)
    assert store.verify_audit() == 2
    store.close()
