"""The audit chain: each entry's hash covers the previous hash and all its fields."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

GENESIS = "0" * 64


@dataclass(frozen=True, kw_only=True)
class AuditEvent:
    """Something that happened: who did what to which subject, and how it ended."""

    actor: str
    action: str
    outcome: str
    subject: str = ""
    detail: Mapping[str, Any] = field(default_factory=dict)
    #: When it happened; ``None`` means when it is written.
    at: datetime | None = None


@dataclass(frozen=True, kw_only=True)
class Record:
    """A stored audit entry as read back."""

    seq: int
    at: datetime
    actor: str
    action: str
    outcome: str
    subject: str
    detail: str
    prev_hash: str
    hash: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "at": self.at.isoformat(),
            "actor": self.actor,
            "action": self.action,
            "outcome": self.outcome,
            "subject": self.subject,
            "detail": json.loads(self.detail),
            "hash": self.hash,
        }


def encode_detail(detail: Mapping[str, Any]) -> str:
    return json.dumps(detail, sort_keys=True, separators=(",", ":"), default=str)


def chain_hash(r: Record) -> str:
    """SHA-256 over the previous hash and every field of ``r`` except its own hash."""
    body = json.dumps(
        [r.seq, r.at.isoformat(), r.actor, r.action, r.outcome, r.subject, r.detail, r.prev_hash],
        separators=(",", ":"),
    )
    return hashlib.sha256(body.encode()).hexdigest()


def first_break(records: Iterable[Record]) -> tuple[int, str] | None:
    """Walk the chain; return ``(seq, why)`` of the first entry that does not verify."""
    prev_hash, expected_seq = GENESIS, None
    for r in records:
        if expected_seq is not None and r.seq != expected_seq:
            return r.seq, f"entry {expected_seq} is missing"
        if r.prev_hash != prev_hash:
            return r.seq, "does not link to the entry before it"
        if chain_hash(r) != r.hash:
            return r.seq, "content does not match its hash (altered)"
        prev_hash, expected_seq = r.hash, r.seq + 1
    return None
