"""Live enforcement: sessions end at certificate expiry, revocation or a disabled account.

OpenSSH checks certificates only at login; the platform re-checks every live
session each ``enforcement_interval`` (0.25 s here), so the stated bound is
interval + one audit flush, well under BOUND seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import asyncssh

from medbridge.testing import RunningPlatform

BOUND = 3.0


async def _open_session(
    p: RunningPlatform, lifetime: int = 600
) -> tuple[asyncssh.SSHClientConnection, asyncssh.SFTPClient]:
    key, cred = await p.credential("alice", lifetime=lifetime)
    conn = await p.connect("alice", [(key, cred.certificate)])
    sftp = await conn.start_sftp_client()
    assert await sftp.exists("/datasets/chest/scan-001.bin")
    return conn, sftp


def _ended_within(p: RunningPlatform, act: Callable[[], None], lifetime: int = 600) -> tuple[float, str]:
    """Open a session, ``act``, and measure how long until the server closes it."""

    async def go() -> float:
        conn, sftp = await _open_session(p, lifetime)
        act()
        start = time.monotonic()
        while time.monotonic() - start < BOUND + 5:
            try:
                await asyncio.wait_for(sftp.stat("/datasets"), timeout=1)
            except (asyncssh.Error, OSError, TimeoutError):
                break
            await asyncio.sleep(0.05)
        elapsed = time.monotonic() - start
        conn.close()
        return elapsed

    elapsed = asyncio.run(go())
    ends = p.audit("session.end")
    return elapsed, ends[-1].detail if ends else ""


def test_revoking_the_grant_ends_the_session(platform: RunningPlatform) -> None:
    elapsed, reason = _ended_within(platform, lambda: platform.store.revoke("alice", "chest", datetime.now(UTC), "t"))
    assert elapsed < BOUND
    assert "grant ended for dataset(s) chest" in reason


def test_disabling_the_account_ends_the_session(platform: RunningPlatform) -> None:
    elapsed, reason = _ended_within(
        platform, lambda: platform.store.set_enabled("alice", False, datetime.now(UTC), "t")
    )
    assert elapsed < BOUND
    assert "account 'alice' disabled" in reason


def test_revoking_a_group_grant_ends_the_members_sessions(platform: RunningPlatform) -> None:
    platform.store.add_group("society", datetime.now(UTC), "t")
    platform.store.add_member("alice", "society", datetime.now(UTC), "t")
    platform.grant("@society", "knee")

    async def sees_knee() -> list[str]:
        conn, sftp = await _open_session(platform)
        async with conn:
            return sorted(n for n in await sftp.listdir("/datasets") if n not in (".", ".."))

    assert asyncio.run(sees_knee()) == ["chest", "knee"]
    elapsed, reason = _ended_within(platform, lambda: platform.store.revoke("@society", "knee", datetime.now(UTC), "t"))
    assert elapsed < BOUND
    assert "knee" in reason


def test_certificate_expiry_ends_the_session(platform: RunningPlatform) -> None:
    elapsed, reason = _ended_within(platform, lambda: None, lifetime=3)
    assert elapsed < 3 + BOUND
    assert "certificate expired" in reason


def test_grant_expiry_ends_the_session(platform: RunningPlatform) -> None:
    platform.grant("alice", "chest", until=datetime.now(UTC) + timedelta(seconds=3))
    elapsed, reason = _ended_within(platform, lambda: None)
    assert elapsed < 3 + BOUND
    assert "certificate expired" in reason or "grant ended" in reason


def test_a_new_grant_appears_in_a_live_session(platform: RunningPlatform) -> None:
    async def go() -> list[str]:
        conn, sftp = await _open_session(platform)
        async with conn:
            platform.grant("alice", "knee")
            await asyncio.sleep(1.0)
            return sorted(n for n in await sftp.listdir("/datasets") if n not in (".", ".."))

    assert asyncio.run(go()) == ["chest", "knee"]
    assert platform.live_sessions() == 0
