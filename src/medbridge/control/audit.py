"""The audit chain: each entry's hash covers the previous hash and all its fields.

Every text an entry holds may come from a client: a path that is not UTF-8, a
username with control characters, a request of any length.  :func:`entry_fields`
makes each field storable in any database and printable on any terminal before it
is hashed: a text that is not valid UTF-8 or holds control characters is escaped
reversibly (:func:`escape_text`, marked by ``"escaped": true`` in the detail), and
every field is bounded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
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
    #: What the entry is about, for indexed queries: derived from it (:func:`index_keys`), outside the hash.
    job: str | None = None
    dataset: str | None = None

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
            "job": self.job,
            "dataset": self.dataset,
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


#: Actions whose subject is a job id, and whose subject is a dataset's name (besides every ``dataset.*``).
_JOB_SUBJECT = frozenset({"certificate.issue", "job.end", "residue.scan"})
_DATASET_SUBJECT = frozenset({"grant", "revoke"})


def index_keys(action: str, subject: str, detail: str) -> tuple[str | None, str | None]:
    """The job and the dataset an entry is about, as stored for indexed queries.

    Derived from the entry itself (the session's job in its detail; a dataset from a
    ``/datasets/<name>/`` path or a dataset action's subject), so ``audit verify`` can
    check that no one changed them to hide an entry from a query.
    """
    try:
        fields = json.loads(detail)
    except ValueError:
        fields = None
    job = fields.get("job") if isinstance(fields, dict) else None
    if not isinstance(job, str):
        job = subject if action in _JOB_SUBJECT else None
    dataset = None
    if subject.startswith("/datasets/"):
        dataset = subject.split("/")[2]
    elif action in _DATASET_SUBJECT or action.startswith("dataset."):
        dataset = subject
    return (job or None) and job[:64], (dataset or None) and dataset[:64]


def chain_hash(r: Record) -> str:
    """SHA-256 over the previous hash and every field of ``r`` except its own hash."""
    body = json.dumps(
        [r.seq, r.at.isoformat(), r.actor, r.action, r.outcome, r.subject, r.detail, r.prev_hash],
        separators=(",", ":"),
    )
    return hashlib.sha256(body.encode()).hexdigest()


def first_break(records: Iterable[Record]) -> tuple[int, str] | None:
    """Walk the chain; return ``(seq, why)`` of the first entry that does not verify."""
    walk = ChainWalk()
    try:
        for r in records:
            walk.feed(r)
    except ChainBroken as exc:
        return exc.seq, exc.why
    return None


#: The action of a signed checkpoint entry (see :func:`checkpoint_detail`).
CHECKPOINT = "audit.checkpoint"


def checkpoint_message(seq: int, hash: str) -> bytes:
    """What a checkpoint's signature covers: entry ``seq`` of this chain has ``hash``."""
    return f"medbridge-audit-checkpoint:{seq}:{hash}".encode()


@dataclass(frozen=True, kw_only=True)
class Anchor:
    """A signed statement that entry ``seq`` of the chain has ``hash``.

    The platform signs one into the chain at every checkpoint (an ``audit.checkpoint``
    entry right after entry ``seq``) and writes it to a file an operator ships
    elsewhere: a chain cut below it, or rewritten up to it, no longer contains it.
    """

    seq: int
    hash: str
    at: str
    key: str
    signature: str

    FORMAT = "medbridge-audit-anchor/1"

    def message(self) -> bytes:
        return checkpoint_message(self.seq, self.hash)

    def to_json(self) -> str:
        body = {"format": self.FORMAT, **dataclasses.asdict(self)}
        return json.dumps(body, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Anchor:
        """Parse an anchor file; ValueError says what is wrong with it."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != cls.FORMAT:
            raise ValueError(f"not a {cls.FORMAT} file")
        try:
            anchor = cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})
        except KeyError as exc:
            raise ValueError(f"missing {exc.args[0]!r}") from exc
        if type(anchor.seq) is not int or anchor.seq < 1:
            raise ValueError("seq must be a positive entry number")
        if not all(isinstance(v, str) for v in (anchor.hash, anchor.at, anchor.key, anchor.signature)):
            raise ValueError("hash, at, key and signature must be strings")
        return anchor

    @classmethod
    def from_checkpoint(cls, r: Record) -> Anchor:
        """The anchor a checkpoint entry signs."""
        d = json.loads(r.detail)
        return cls(seq=d["seq"], hash=d["hash"], at=r.at.isoformat(), key=d["key"], signature=d["signature"])


#: Checks a signature: ``(key fingerprint, message, signature) -> bool``.
SignatureCheck = Callable[[str, bytes, str], bool]


class ChainBroken(Exception):
    """The chain does not verify at entry ``seq``."""

    def __init__(self, seq: int, why: str):
        super().__init__(f"audit chain broken at entry {seq}: {why}")
        self.seq = seq
        self.why = why


class ChainWalk:
    """Verifies a chain one entry at a time, holding nothing but the last link (memory stays flat).

    Starts at the genesis, or after a trusted :class:`Anchor` (entry ``seq`` with
    ``hash``, checked by the caller): then only the entries after it are read.
    Every ``audit.checkpoint`` entry must sign the entry before it, with a key
    ``check`` accepts; every anchor in ``anchors`` must be met by the entry it names.
    """

    def __init__(self, start: Anchor | None = None, *, check: SignatureCheck | None = None,
                 anchors: Sequence[Anchor] = ()):  # fmt: skip
        self.prev_hash = start.hash if start else GENESIS
        self.last = start.seq if start else 0
        self.entries = 0
        self.checkpoints = 0
        self._check = check
        #: Anchors at or below the start were verified with it (the caller checks ``start`` itself).
        self._anchors = {a.seq: a for a in anchors if a.seq > self.last}

    def feed(self, r: Record) -> None:
        if r.seq != self.last + 1:
            raise ChainBroken(r.seq, f"entry {self.last + 1} is missing")
        if r.prev_hash != self.prev_hash:
            raise ChainBroken(r.seq, "does not link to the entry before it")
        if chain_hash(r) != r.hash:
            raise ChainBroken(r.seq, "content does not match its hash (altered)")
        if (r.job, r.dataset) != index_keys(r.action, r.subject, r.detail):
            raise ChainBroken(r.seq, "its job or dataset column was altered (it would hide from queries)")
        if r.action == CHECKPOINT:
            self._checkpoint(r)
        anchor = self._anchors.pop(r.seq, None)
        if anchor is not None and anchor.hash != r.hash:
            raise ChainBroken(r.seq, "differs from the published anchor: the chain was rewritten up to here")
        self.prev_hash, self.last = r.hash, r.seq
        self.entries += 1

    def _checkpoint(self, r: Record) -> None:
        try:
            signed = Anchor.from_checkpoint(r)
            if not all(isinstance(v, str) for v in (signed.hash, signed.key, signed.signature)):
                raise TypeError("its hash, key and signature must be strings")
        except (ValueError, KeyError, TypeError) as exc:
            raise ChainBroken(r.seq, f"checkpoint unreadable ({exc})") from exc
        if signed.seq != self.last or signed.hash != self.prev_hash:
            raise ChainBroken(r.seq, "checkpoint signs another chain: the entries before it were rewritten")
        if self._check is not None and not self._check(signed.key, signed.message(), signed.signature):
            raise ChainBroken(r.seq, "checkpoint signature does not verify with the audit key")
        self.checkpoints += 1

    def finish(self) -> None:
        """The chain has ended: every anchor must have been met (else it was cut)."""
        if self._anchors:
            seq = min(self._anchors)
            raise ChainBroken(seq, f"missing: the chain ends at entry {self.last} but an anchor names entry {seq} "
                                   "(the end was cut)")  # fmt: skip
