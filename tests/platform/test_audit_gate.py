"""The hostile review of "audit before the answer", replayed with raw SFTP packets (both paths: scripts/test reruns
this file with the fast path off).

Each request is pipelined the way an attacker sends it: a handle guessed before its open was answered, changes
queued behind a decision the audit cannot record, requests on a session whose login it could not record.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import asyncssh
import pytest

from medbridge.control.audit import AuditEvent
from medbridge.errors import MedbridgeError
from medbridge.platform.limits import Refusals
from medbridge.testing import RunningPlatform
from medbridge.testing.wait import HANG, until

OPEN, CLOSE, READ, WRITE, FSTAT, SETSTAT, REMOVE, MKDIR = 3, 4, 5, 6, 8, 9, 13, 14
STATUS, HANDLE, DATA = 101, 102, 103
READ_FLAG, WRITE_FLAG, CREATE, TRUNCATE = 1, 2, 8, 0x10
RESULTS = "/results/alice/job-1/"
REFUSED = b"refused: the audit could not record this request"


def _s(b: bytes | str) -> bytes:
    b = b.encode() if isinstance(b, str) else b
    return struct.pack(">I", len(b)) + b


def _pkt(kind: int, pktid: int, body: bytes) -> bytes:
    payload = bytes([kind]) + struct.pack(">I", pktid) + body
    return struct.pack(">I", len(payload)) + payload


def _open(pktid: int, path: str, flags: int) -> bytes:
    return _pkt(OPEN, pktid, _s(path) + struct.pack(">II", flags, 0))


class Raw:
    """One SFTP channel spoken byte by byte (asyncssh's client would never send a guessed handle)."""

    def __init__(self, writer: asyncssh.SSHWriter[bytes], reader: asyncssh.SSHReader[bytes]):
        self.writer, self.reader = writer, reader

    @classmethod
    async def start(cls, conn: asyncssh.SSHClientConnection) -> Raw:
        writer, reader, _ = await conn.open_session(subsystem="sftp", encoding=None)
        raw = cls(writer, reader)
        writer.write(struct.pack(">IBI", 5, 1, 3))  # INIT, version 3
        await raw.reply()
        return raw

    async def reply(self) -> tuple[int, bytes]:
        (size,) = struct.unpack(">I", await self.reader.readexactly(4))
        body = await self.reader.readexactly(size)
        return body[0], body[1:]

    async def replies(self, n: int) -> dict[int, tuple[int, bytes]]:
        """``n`` replies by request id: (type, the rest)."""
        got = {}
        for _ in range(n):
            kind, rest = await self.reply()
            got[struct.unpack(">I", rest[:4])[0]] = (kind, rest[4:])
        return got


def _down(events: Sequence[AuditEvent], now: datetime) -> None:
    raise MedbridgeError("control database error: database or disk is full")


def _seed(platform: RunningPlatform, names: Sequence[str]) -> Path:
    async def go() -> None:
        key, cred = await platform.credential("alice")
        async with await platform.connect("alice", [(key, cred.certificate)]) as conn:
            sftp = await conn.start_sftp_client()
            for name in names:
                async with sftp.open(RESULTS + name, "wb") as f:
                    await f.write(b"precious " * 100)

    asyncio.run(go())
    return platform.home.root / "storage" / "results" / "alice" / "job-1"


def test_a_guessed_handle_gets_nothing_before_its_open_is_committed(
    platform: RunningPlatform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The review's critical finding: READs on handle 0, sent behind its OPEN, were answered with dataset bytes."""
    assert platform.platform is not None
    working = platform.platform.store.audit

    async def go() -> dict[int, tuple[int, bytes]]:
        key, cred = await platform.credential("alice")
        async with await platform.connect("alice", [(key, cred.certificate)]) as conn:
            raw = await Raw.start(conn)  # its INIT answered: the login is in the audit
            monkeypatch.setattr(platform.platform.store, "audit", _down)
            h0 = _s(b"\0\0\0\0")  # asyncssh numbers handles from 0
            raw.writer.write(_open(1, "/datasets/chest/scan-001.bin", READ_FLAG)
                             + _pkt(READ, 2, h0 + struct.pack(">QI", 0, 65536))
                             + _pkt(READ, 3, h0 + struct.pack(">QI", 65536, 65536)) + _pkt(FSTAT, 4, h0))  # fmt: skip
            got = await raw.replies(4)
            monkeypatch.setattr(platform.platform.store, "audit", working)
            return got

    got = asyncio.run(go())
    assert got[1][0] == STATUS and REFUSED in got[1][1]
    assert all(kind == STATUS for kind, _ in got.values()), "no DATA or ATTRS through a handle the audit lacks"
    records = platform.audit(until=lambda r: r.action == "sftp.open")
    assert [(r.action, r.outcome) for r in records if r.actor == "alice" and r.action.startswith("sftp.")] == [
        ("sftp.open", "refused")], "and nothing read"  # fmt: skip


def test_changes_queued_behind_a_failing_decision_are_never_made(
    platform: RunningPlatform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The review's finding 3: a remove, a mkdir and a truncate, pipelined behind an open the audit cannot record,
    were made and then answered "refused"."""
    assert platform.platform is not None
    folder = _seed(platform, ["a.txt", "b.txt"])
    working = platform.platform.store.audit

    async def go() -> dict[int, tuple[int, bytes]]:
        key, cred = await platform.credential("alice")
        async with await platform.connect("alice", [(key, cred.certificate)]) as conn:
            raw = await Raw.start(conn)
            monkeypatch.setattr(platform.platform.store, "audit", _down)
            raw.writer.write(_open(1, "/datasets/chest/scan-002.bin", READ_FLAG)
                             + _pkt(REMOVE, 2, _s(RESULTS + "a.txt"))
                             + _pkt(MKDIR, 3, _s(RESULTS + "made") + struct.pack(">I", 0))
                             + _pkt(SETSTAT, 4, _s(RESULTS + "b.txt") + struct.pack(">IQ", 1, 0)))  # fmt: skip
            got = await raw.replies(4)
            monkeypatch.setattr(platform.platform.store, "audit", working)
            return got

    got = asyncio.run(go())
    assert all(kind == STATUS and REFUSED in rest for kind, rest in got.values()), got
    assert (folder / "a.txt").stat().st_size == 900 and (folder / "b.txt").stat().st_size == 900
    assert not (folder / "made").exists()


def test_a_session_whose_login_the_audit_lacks_changes_nothing(
    platform: RunningPlatform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The review's finding 4: after a login that could not be recorded, SETSTAT truncated and REMOVE removed."""
    assert platform.platform is not None
    folder = _seed(platform, ["b.txt", "c.txt"])
    store, sink = platform.platform.store, platform.platform.sink
    working = store.audit

    async def go() -> dict[int, tuple[int, bytes]]:
        key, cred = await platform.credential("alice")
        monkeypatch.setattr(store, "audit", _down)
        conn = await platform.connect("alice", [(key, cred.certificate)])
        async with conn:
            await asyncio.to_thread(until, lambda: sink.failing, "the login's entry to fail")
            monkeypatch.setattr(store, "audit", working)  # the store is back; this login was never written in time
            await asyncio.to_thread(until, lambda: sink.failing is None, "the audit to write again")
            raw = await Raw.start(conn)
            raw.writer.write(_pkt(SETSTAT, 1, _s(RESULTS + "b.txt") + struct.pack(">IQ", 1, 0))
                             + _pkt(REMOVE, 2, _s(RESULTS + "c.txt")) + _open(3, RESULTS + "d.txt", WRITE_FLAG | CREATE)
                             + _open(4, "/datasets/chest/scan-002.bin", READ_FLAG))  # fmt: skip
            return await raw.replies(4)

    got = asyncio.run(go())
    assert all(kind == STATUS and REFUSED in rest for kind, rest in got.values()), got
    assert sorted(p.name for p in folder.iterdir()) == ["b.txt", "c.txt"]
    assert (folder / "b.txt").stat().st_size == 900


def test_the_first_change_to_fail_is_written_late_as_made(
    platform: RunningPlatform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second review: a truncating open, the first request after the store failed, was written as "refused"."""
    assert platform.platform is not None
    folder = _seed(platform, ["kept.txt"])
    working = platform.platform.store.audit

    async def go() -> dict[int, tuple[int, bytes]]:
        key, cred = await platform.credential("alice")
        async with await platform.connect("alice", [(key, cred.certificate)]) as conn:
            raw = await Raw.start(conn)
            monkeypatch.setattr(platform.platform.store, "audit", _down)
            raw.writer.write(_open(1, RESULTS + "kept.txt", WRITE_FLAG | TRUNCATE))
            got = await raw.replies(1)
            monkeypatch.setattr(platform.platform.store, "audit", working)
            return got

    got = asyncio.run(go())
    assert got[1][0] == STATUS and REFUSED in got[1][1]
    assert (folder / "kept.txt").stat().st_size == 0, "the window the docs name: made before the failure was known"
    late = [r for r in platform.audit(until=lambda r: "written late" in r.detail) if "written late" in r.detail]
    assert [(r.action, r.outcome) for r in late] == [("sftp.open", "ok")]
    assert '"made":"truncated"' in late[0].detail and "the change was made" in late[0].detail


def test_refusals_while_the_audit_cannot_write_spend_the_connections_budget(
    platform: RunningPlatform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second review: 5,000 opens refused while the store failed were never counted; the connection stayed."""
    assert platform.platform is not None
    working = platform.platform.store.audit
    budget = Refusals().certificate_limit

    async def go() -> int:
        key, cred = await platform.credential("alice")
        conn = await platform.connect("alice", [(key, cred.certificate)])
        async with conn:
            raw = await Raw.start(conn)
            monkeypatch.setattr(platform.platform.store, "audit", _down)
            raw.writer.write(_open(0, "/datasets/chest/scan-002.bin", READ_FLAG))
            assert REFUSED in (await raw.reply())[1], "the first to fail: now the audit is known to fail"
            raw.writer.write(
                b"".join(_open(i, "/datasets/chest/scan-002.bin", READ_FLAG) for i in range(1, budget + 200))
            )
            spent = 0
            try:
                while True:  # bounded: a connection left open would hang here
                    _, rest = await asyncio.wait_for(raw.reply(), HANG)
                    spent += b"too many refused requests" in rest
            except asyncio.IncompleteReadError:  # the connection was closed
                pass
            monkeypatch.setattr(platform.platform.store, "audit", working)
        return spent

    assert asyncio.run(go()) > 0, "past its budget the connection's refusals say so, and it is closed"
    ends = platform.audit("sftp.refused", until=lambda r: "too many refused requests" in r.detail)
    assert any("too many refused requests on one connection (1024)" in r.detail for r in ends)
