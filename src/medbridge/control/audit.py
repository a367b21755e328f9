"""The audit chain: each entry's hash covers the previous hash and all its fields.

Every text an entry holds may come from a client: a path that is not UTF-8, a
username with control characters, a request of any length.  :func:`entry_fields`
makes each field storable in any database and printable on any terminal before it
is hashed: a text that is not valid UTF-8 or holds control characters is escaped
reversibly (:func:`escape_text`, marked by ``"escaped": true`` in the detail), and
every field is bounded.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

GENESIS = "0" * 64
#: Set in the detail of an entry whose texts were escaped (:func:`escape_text`).
ESCAPED = "escaped"
#: Longest stored actor, action, outcome and subject (characters); the columns' own bounds.
FIELD_LIMITS = {"actor": 128, "action": 64, "outcome": 16, "subject": 4096}
#: Longest stored detail (characters of JSON); a longer one keeps its head and says so.
DETAIL_LIMIT = 16384
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_UNESCAPE = re.compile(r"\\(\\|x[0-9a-f]{2}|u[0-9a-f]{4})")


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


def needs_escape(text: str) -> bool:
    """Whether ``text`` is not valid UTF-8 (lone surrogates, e.g. from ``os.fsdecode``) or holds control characters."""
    if text.isascii():
        return _CONTROL.search(text) is not None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return _CONTROL.search(text) is not None


def escape_text(text: str) -> str:
    """A printable UTF-8 form of ``text``, reversed by :func:`unescape_text`.

    A backslash is doubled; a C0 control character or DEL becomes ``\\xNN``, and so does
    a byte that was not UTF-8 (``os.fsdecode``'s U+DC80-U+DCFF: ``NN`` is the byte the
    client sent, always 80-ff); a C1 control character or any other lone surrogate
    becomes ``\\uXXXX``.
    """
    out = []
    for ch in text:
        o = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif o < 0x20 or o == 0x7F:
            out.append(f"\\x{o:02x}")
        elif 0xDC80 <= o <= 0xDCFF:
            out.append(f"\\x{o - 0xDC00:02x}")
        elif 0x80 <= o <= 0x9F or 0xD800 <= o <= 0xDFFF:
            out.append(f"\\u{o:04x}")
        else:
            out.append(ch)
    return "".join(out)


def unescape_text(text: str) -> str:
    """The text :func:`escape_text` was given (bytes that were not UTF-8 as ``os.fsdecode`` gives them)."""

    def one(m: re.Match[str]) -> str:
        code = m.group(1)
        if code == "\\":
            return "\\"
        value = int(code[1:], 16)
        return chr(0xDC00 + value) if code[0] == "x" and value >= 0x80 else chr(value)

    return _UNESCAPE.sub(one, text)


def _escape_value(value: Any) -> Any:
    if isinstance(value, str):
        return escape_text(value) if needs_escape(value) else value
    if isinstance(value, Mapping):
        return {_escape_value(str(k)): _escape_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_escape_value(v) for v in value]
    return value


def _detail_needs_escape(detail: str) -> bool:
    """Whether a detail's JSON, read back, holds a lone surrogate or a control character."""
    return needs_escape(json.dumps(json.loads(detail), ensure_ascii=False))


def entry_fields(ev: AuditEvent) -> tuple[str, str, str, str, str]:
    """``(actor, action, outcome, subject, detail)`` as stored: escaped where needed, bounded, never failing.

    An entry whose texts were escaped has ``"escaped": true`` in its detail, so the
    escape is reversible; a text cut to its bound is noted in ``"truncated"``.
    """
    texts = {"actor": ev.actor, "action": ev.action, "outcome": ev.outcome, "subject": ev.subject}
    extra: dict[str, Any] = {}
    try:
        detail = encode_detail(ev.detail)
        escaped = "\\u" in detail and _detail_needs_escape(detail)
    except (TypeError, ValueError, RecursionError) as exc:  # an unencodable detail is recorded as such
        detail, escaped = encode_detail({"unencodable_detail": f"{type(exc).__name__}: {exc}"}), False
    if escaped or any(needs_escape(str(v)) for v in texts.values()):
        texts = {k: escape_text(str(v)) if needs_escape(str(v)) else str(v) for k, v in texts.items()}
        detail = encode_detail({**_escape_value(json.loads(detail)), ESCAPED: True})
    truncated = {k: len(v) for k, v in texts.items() if len(v) > FIELD_LIMITS[k]}
    if truncated:
        texts = {k: v[: FIELD_LIMITS[k]] for k, v in texts.items()}
        extra["truncated"] = truncated
    if extra:
        detail = encode_detail({**json.loads(detail), **extra})
    if len(detail) > DETAIL_LIMIT:
        detail = encode_detail({"detail_truncated": len(detail), "head": detail[: DETAIL_LIMIT // 2]})
    return texts["actor"], texts["action"], texts["outcome"], texts["subject"], detail


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
