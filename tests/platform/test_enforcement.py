"""Live enforcement: sessions end at certificate expiry, revocation or a disabled account.

OpenSSH checks certificates only at login; the platform re-checks every live
session each ``enforcement_interval`` (0.25 s here).  The promise is counted in
enforcement ticks, not in seconds a busy machine would stretch: by the second
tick after a change (the first may have begun before it) the session is gone
from the platform, its client sees the end, and the audit says why.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import asyncssh
import pytest

from medbridge.compute.credentials import end_job
from medbridge.compute.session import Endpoint, connect
from medbridge.errors import AccessDenied, CertificateRefused
from medbridge.testing import RunningPlatform
from medbridge.testing.wait import HANG


async def _open_session(
    p: RunningPlatform, lifetime: int = 600
) -> tuple[asyncssh.SSHClientConnection, asyncssh.SFTPClient, datetime]:
    key, cred = await p.credential("alice", lifetime=lifetime)
    conn = await p.connect("alice", [(key, cred.certificate)])
    sftp = await conn.start_sftp_client()
    assert await sftp.exists("/datasets/chest/scan-001.bin")
    return conn, sftp, datetime.fromisoformat(cred.valid_before)


async def _past(moment: datetime) -> None:
    """Wait for the clock to pass ``moment`` (an expiry): the event is time itself."""
    while datetime.now(UTC) <= moment:
        await asyncio.sleep(max(0.01, min(0.2, (moment - datetime.now(UTC)).total_seconds())))


def _ended_by_enforcement(
    p: RunningPlatform, act: Callable[[], None], lifetime: int = 600, expires: datetime | None = None
) -> str:
    """Open a session, ``act`` (or let ``expires``, else the certificate, pass); after two ticks it must be over."""

    async def go() -> None:
        conn, _sftp, valid_before = await _open_session(p, lifetime)
        act()
        if lifetime < 600 or expires is not None:
            await _past(expires or valid_before)
        await asyncio.to_thread(p.enforced)
        assert p.live_sessions() == 0, "the platform still holds the session two ticks after the change"
        await asyncio.wait_for(conn.wait_closed(), HANG)

    asyncio.run(go())
    ends = p.audit("session.end")
    return ends[-1].detail if ends else ""


def test_revoking_the_grant_ends_the_session(platform: RunningPlatform) -> None:
    reason = _ended_by_enforcement(platform, lambda: platform.store.revoke("alice", "chest", datetime.now(UTC), "t"))
    assert "grant ended for dataset(s) chest" in reason


def test_disabling_the_account_ends_the_session(platform: RunningPlatform) -> None:
    reason = _ended_by_enforcement(platform, lambda: platform.store.set_enabled("alice", False, datetime.now(UTC), "t"))
    assert "account 'alice' disabled" in reason


def test_revoking_a_group_grant_ends_the_members_sessions(platform: RunningPlatform) -> None:
    platform.store.add_group("society", datetime.now(UTC), "t")
    platform.store.add_member("alice", "society", datetime.now(UTC), "t")
    platform.grant("@society", "knee")

    async def sees_knee() -> list[str]:
        conn, sftp, _ = await _open_session(platform)
        async with conn:
            return sorted(n for n in await sftp.listdir("/datasets") if n not in (".", ".."))

    assert asyncio.run(sees_knee()) == ["chest", "knee"]
    reason = _ended_by_enforcement(platform, lambda: platform.store.revoke("@society", "knee", datetime.now(UTC), "t"))
    assert "knee" in reason


def test_certificate_expiry_ends_the_session(platform: RunningPlatform) -> None:
    # 10 s, not less: the login and a first request must fit in it on a busy machine (3 s once did not).
    reason = _ended_by_enforcement(platform, lambda: None, lifetime=10)
    assert "certificate expired" in reason


def test_grant_expiry_ends_the_session(platform: RunningPlatform) -> None:
    until = datetime.now(UTC) + timedelta(seconds=10)  # room for the login on a busy machine
    platform.grant("alice", "chest", until=until)
    reason = _ended_by_enforcement(platform, lambda: None, expires=until)
    assert "certificate expired" in reason or "grant ended" in reason


def test_a_new_grant_appears_in_a_live_session(platform: RunningPlatform) -> None:
    async def go() -> list[str]:
        conn, sftp, _ = await _open_session(platform)
        async with conn:
            platform.grant("alice", "knee")
            await asyncio.to_thread(platform.enforced)
            return sorted(n for n in await sftp.listdir("/datasets") if n not in (".", ".."))

    assert asyncio.run(go()) == ["chest", "knee"]
    assert platform.live_sessions() == 0


class _Told(asyncssh.SSHClient):
    """Remembers why the platform ended the connection."""

    def __init__(self) -> None:
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


def test_a_session_ended_by_policy_tells_the_client_why(platform: RunningPlatform) -> None:
    """Not a bare close a client would take for a cut link: an SSH disconnect that says access was revoked."""

    async def go() -> Exception | None:
        key, cred = await platform.credential("alice")
        told = _Told()
        async with await platform.connect("alice", [(key, cred.certificate)], client_factory=lambda: told) as conn:
            sftp = await conn.start_sftp_client()
            assert await sftp.exists("/datasets/chest/scan-001.bin")
            platform.store.revoke("alice", "chest", datetime.now(UTC), "t")
            return await asyncio.wait_for(told.lost, HANG)

    exc = asyncio.run(go())
    assert isinstance(exc, asyncssh.PermissionDenied)
    assert exc.reason == "access revoked: grant ended for dataset(s) chest"


def test_revoked_disabled_and_ended_certificates_are_refused_at_login_with_the_reason(
    platform: RunningPlatform,
) -> None:
    """Ended is ended: a certificate whose grant, account or job ended logs in to nothing, and says why."""
    now = datetime.now(UTC)

    def login(ep: Endpoint) -> str:
        async def go() -> str:
            with pytest.raises(AccessDenied) as refused:
                await connect(ep)
            return str(refused.value)

        return asyncio.run(go())

    with platform.job_endpoint("alice", job_id="j1") as ep:
        platform.store.revoke("alice", "chest", now, "t")
        assert "no live grant left for user 'alice'" in login(ep), "not an empty view"
        platform.grant("alice", "chest")
        platform.store.set_enabled("alice", False, now, "t")
        assert "account 'alice' disabled" in login(ep)
        platform.store.set_enabled("alice", True, now, "t")
        asyncio.run(end_job(platform.enrolment("alice"), "j1", {}))
        assert "job 'j1' has ended" in login(ep)
    with pytest.raises(CertificateRefused, match="job 'j1' of user 'alice' has ended"):
        asyncio.run(platform.credential("alice", job_id="j1"))
    refusals = platform.audit("login", until=lambda r: "has ended" in r.detail)
    reasons = [r.detail for r in refusals if r.outcome == "refused"]
    assert any("no live grant left" in d for d in reasons) and any("has ended" in d for d in reasons)
    issued = [r for r in platform.audit("certificate.issue") if r.outcome == "refused"]
    assert issued and "has ended" in issued[-1].detail
