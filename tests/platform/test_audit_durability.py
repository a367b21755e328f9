"""Decisions are committed to the audit before the client hears them; one that cannot be is refused.

The fast-path-off rerun in ``scripts/test`` runs these on asyncssh's public path too.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import asyncssh
import pytest

from medbridge import fastpath
from medbridge.compute.credentials import Enrolment, request_certificate
from medbridge.config import CIPHERS
from medbridge.control.audit import AuditEvent
from medbridge.control.store import Store
from medbridge.errors import MedbridgeError
from medbridge.loader.wire import Buffer, open_wire
from medbridge.testing import PlatformProcess, RunningPlatform

REFUSED = "refused: the audit could not record this request"


def test_login_open_and_read_are_in_the_chain_when_the_platform_is_killed_right_after(
    tmp_path: Path, database_url: str
) -> None:
    """The issue's probe: SIGKILL of the platform the moment a read returned lost the login, open and read."""
    p = RunningPlatform(tmp_path, database_url)  # its home, served below as a process of its own
    key_path = p.add_user("alice")
    p.add_dataset("chest", {"a.bin": b"A" * 3000, "b.bin": b"B" * 5000})
    p.grant("alice", "chest")
    server = PlatformProcess(p.home)
    port, fpr = server.port, server.fingerprint
    try:

        async def read_then_kill() -> tuple[bytes, bytes]:
            key = asyncssh.read_private_key(str(key_path))
            eph = asyncssh.generate_private_key("ssh-ed25519")
            cred = await request_certificate(Enrolment("127.0.0.1", port, "alice", key, fpr), eph, "job-1", 600, None)
            conn = await asyncssh.connect("127.0.0.1", port, username="alice", client_keys=[(eph, cred.certificate)],
                                          known_hosts=None, agent_path=None, encryption_algs=list(CIPHERS),
                                          config=None)  # fmt: skip
            sftp = await conn.start_sftp_client()
            if fastpath.enabled():  # the platform's whole-file read (read-file@medbridge)
                buf = Buffer(0, None)
                assert await (await open_wire(conn))._read_file("/datasets/chest/b.bin", buf, 1 << 20)
                whole = bytes(buf.result())
            else:
                whole = await (await sftp.open("/datasets/chest/b.bin", "rb")).read()
            data = await (await sftp.open("/datasets/chest/a.bin", "rb")).read()
            os.kill(server.proc.pid, signal.SIGKILL)  # the moment the read has returned
            conn.abort()
            return whole, data

        assert asyncio.run(read_then_kill()) == (b"B" * 5000, b"A" * 3000)
    finally:
        server.kill()
    fresh = Store(p.home.database_url(p.home.settings()))  # what a new process sees
    records = fresh.audit_records()
    fresh.close()
    seen = {(r.action, r.subject) for r in records if r.actor == "alice"}
    whole = ("sftp.read" if fastpath.enabled() else "sftp.open", "/datasets/chest/b.bin")
    assert {("certificate.issue", "job-1"), ("login", "enrolment"), ("login", "certificate"), whole,
            ("sftp.open", "/datasets/chest/a.bin")} <= seen  # fmt: skip
    assert p.store.verify_audit() == len(records)
    p.store.close()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_what_the_audit_cannot_record_is_refused_and_recorded_once_it_can(
    platform: RunningPlatform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full control database: open, read-file and results changes are refused, their handles closed."""
    assert platform.platform is not None
    store = platform.platform.store
    working = store.audit

    def down(events: Sequence[AuditEvent], now: datetime) -> None:
        raise MedbridgeError("control database error: database or disk is full")

    async def go() -> tuple[list[str], int]:
        key, cred = await platform.credential("alice")
        outcomes = []
        async with await platform.connect("alice", [(key, cred.certificate)]) as conn:
            sftp = await conn.start_sftp_client()
            wire = await open_wire(conn) if fastpath.enabled() else None
            async with sftp.open("/results/alice/job-1/kept.txt", "wb") as f:
                await f.write(b"mine")
            before = _fds()
            monkeypatch.setattr(store, "audit", down)
            attempts = {
                "open": lambda: sftp.open("/datasets/chest/scan-002.bin", "rb"),
                "read-file": lambda: (
                    wire._read_file("/datasets/chest/scan-002.bin", Buffer(0, None), 1 << 20)
                    if wire is not None
                    else sftp.open("/datasets/chest/scan-001.bin", "rb")
                ),  # public path: no read-file, another open
                "mkdir": lambda: sftp.mkdir("/results/alice/job-1/sub"),
                "remove": lambda: sftp.remove("/results/alice/job-1/kept.txt"),
            }
            for name, attempt in attempts.items():
                try:
                    await attempt()
                    outcomes.append(f"{name}: answered")
                except asyncssh.SFTPPermissionDenied as exc:
                    outcomes.append(f"{name}: {exc.reason}")
            leaked = _fds() - before
        async with await platform.connect("alice", [(key, cred.certificate)]) as again:
            try:  # the login could not be committed: nothing it would grant is served
                await (await again.start_sftp_client()).open("/datasets/chest/scan-001.bin", "rb")
                outcomes.append("after login: served")
            except asyncssh.SFTPPermissionDenied as exc:
                outcomes.append(f"after login: {exc.reason}")
        monkeypatch.setattr(store, "audit", working)
        return outcomes, leaked

    outcomes, leaked = asyncio.run(go())
    assert outcomes == [f"{a}: {REFUSED}" for a in ("open", "read-file", "mkdir", "remove", "after login")]
    assert leaked <= 0, "the handle the refused open had made is closed"
    records = platform.audit(until=lambda r: r.action == "login" and "written late" in r.detail)
    late = {(r.action, r.outcome) for r in records if "written late" in r.detail}
    assert ("login", "refused") in late
    # each request is in the chain: written late if it was the first to fail, else refused up front
    up_front = {json.loads(r.detail)["op"] for r in records if r.action == "sftp.refused"}
    said = up_front | {action.removeprefix("sftp.") for action, _ in late}
    assert {"open", "mkdir", "remove"} <= said, (late, up_front)
    assert platform.store.verify_audit() == len(records)


def test_a_close_is_an_account_not_a_decision(platform: RunningPlatform, monkeypatch: pytest.MonkeyPatch) -> None:
    """A handle opened while the audit worked closes when it does not: its byte counts are written late."""
    assert platform.platform is not None
    store = platform.platform.store
    working = store.audit

    def down(events: Sequence[AuditEvent], now: datetime) -> None:
        raise MedbridgeError("control database error: database or disk is full")

    async def go() -> bytes:
        key, cred = await platform.credential("alice")
        async with await platform.connect("alice", [(key, cred.certificate)]) as conn:
            sftp = await conn.start_sftp_client()
            f = await sftp.open("/datasets/chest/scan-001.bin", "rb")
            monkeypatch.setattr(store, "audit", down)
            data = await f.read()  # reads on a granted handle are accounted at its close
            await f.close()
            monkeypatch.setattr(store, "audit", working)
            return bytes(data)

    assert asyncio.run(go())
    closes = platform.audit("sftp.close", until=lambda r: r.action == "sftp.close")
    assert [r.subject for r in closes] == ["/datasets/chest/scan-001.bin"]
