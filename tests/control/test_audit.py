"""The audit chain function on its own: links, gaps and altered content."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

from medbridge.control.audit import GENESIS, Record, chain_hash, first_break


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
