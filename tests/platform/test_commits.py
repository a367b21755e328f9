"""Commits as a CPU weapon (issue 14's hostile review, commit starvation): refused commits that hashed are counted
per job and end its commits, one user's commits take one verifying thread per worker, and a manifest that is not
UTF-8 is a clean refusal."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
from pathlib import Path

import asyncssh
import pytest

from medbridge.testing import RunningPlatform
from medbridge.testing.wait import HANG, until
from tests.conftest import CHEST
from tests.platform.test_results import job_sftp, limited_platform


async def commit(sftp: asyncssh.SFTPClient, job: str, manifest: bytes, user: str = "alice") -> None:
    folder = f"/results/{user}/{job}"
    async with sftp.open(f"{folder}/MANIFEST.sha256.medbridge-part", "wb") as f:
        await f.write(manifest)
    await sftp.posix_rename(f"{folder}/MANIFEST.sha256.medbridge-part", f"{folder}/MANIFEST.sha256")


async def put(sftp: asyncssh.SFTPClient, path: str, data: bytes) -> None:
    async with sftp.open(path, "wb") as f:
        await f.write(data)


def test_a_job_whose_commits_hashed_wrong_three_times_cannot_commit(tmp_path: Path) -> None:
    """Three wrong SHA-256s (each hashes the file), then even a right manifest is refused unread; across sessions."""
    p = limited_platform(tmp_path)
    data = b"x" * 100_000
    right = f"{hashlib.sha256(data).hexdigest()}  out.bin\n".encode()
    wrong = ("0" * 64 + "  out.bin\n").encode()

    async def go() -> list[str]:
        said = []
        for attempt in range(4):  # a new session each time: the count is the job's, not the connection's
            conn, sftp = await job_sftp(p)
            async with conn:
                if attempt == 0:
                    await put(sftp, "/results/alice/job-1/out.bin", data)
                with pytest.raises(asyncssh.SFTPFailure) as info:
                    await commit(sftp, "job-1", right if attempt == 3 else wrong)
                said.append(str(info.value))
        return said

    with p:
        said = asyncio.run(go())
        assert all("does not match its SHA-256" in s for s in said[:3]), said
        assert "2 more such refusals" in said[0] and "now the job can no longer commit" in said[2]
        assert "refused 3 times after hashing" in said[3] and "no longer commit" in said[3]
        assert not (p.home.results / "alice" / "job-1" / "MANIFEST.sha256").exists()
        refused = p.audit("results.commit", until=lambda r: "refused 3 times" in r.detail)
        assert [r.outcome for r in refused] == ["refused"] * 4

        async def other_job() -> None:  # another job of the same user commits as ever
            conn, sftp = await job_sftp(p, "job-2")
            async with conn:
                await put(sftp, "/results/alice/job-2/out.bin", data)
                await commit(sftp, "job-2", right)

        asyncio.run(other_job())
        assert (p.home.results / "alice" / "job-2" / "MANIFEST.sha256").exists()


def test_a_manifest_that_is_not_utf8_is_a_clean_refusal(tmp_path: Path) -> None:
    """Once an uncaught UnicodeDecodeError ("Uncaught exception" to the client, nothing audited)."""
    p = limited_platform(tmp_path)

    async def go() -> str:
        conn, sftp = await job_sftp(p)
        async with conn:
            await put(sftp, "/results/alice/job-1/f", b"f")
            with pytest.raises(asyncssh.SFTPFailure) as info:
                await commit(sftp, "job-1", b"\xff\xfe" + b"0" * 64 + b"  f\n")
            return str(info.value)

    with p:
        said = asyncio.run(go())
        assert said == "results manifest refused: the manifest is not UTF-8 (byte 0)"
        refused = p.audit("results.commit", until=lambda r: "not UTF-8" in r.detail)
        assert refused and refused[-1].outcome == "refused"


def test_one_users_commits_leave_a_verifying_thread_to_others(tmp_path: Path) -> None:
    """alice commits two jobs at once, each held at its start (the test holds their usage records, as a write
    under way would); bob's commit still runs: alice's second waits for her first, not for a thread."""
    p = RunningPlatform(tmp_path, enforcement_interval=0.25)
    p.add_dataset("chest", CHEST)
    for user in ("alice", "bob"):
        p.add_user(user)
        p.grant(user, "chest")
    data = b"result\n"
    right = f"{hashlib.sha256(data).hexdigest()}  out\n".encode()

    async def go(holds: list[int]) -> None:
        sessions = [await job_sftp(p, job, user) for user, job in (("alice", "a1"), ("alice", "a2"), ("bob", "b1"))]
        try:
            for (_, sftp), (user, job) in zip(sessions, (("alice", "a1"), ("alice", "a2"), ("bob", "b1")), strict=True):
                await put(sftp, f"/results/{user}/{job}/out", data)
                async with sftp.open(f"/results/{user}/{job}/MANIFEST.sha256.medbridge-part", "wb") as f:
                    await f.write(right)
            for job in ("a1", "a2"):  # a change under way holds the job's record shared: the commit waits for it
                fd = os.open(p.home.results / ".medbridge-usage" / "alice" / job, os.O_RDWR)
                fcntl.flock(fd, fcntl.LOCK_SH)
                holds.append(fd)
            alices = [
                asyncio.ensure_future(sftp.posix_rename(f"/results/alice/{job}/MANIFEST.sha256.medbridge-part",
                                                        f"/results/alice/{job}/MANIFEST.sha256"))
                for (_, sftp), job in zip(sessions[:2], ("a1", "a2"), strict=True)
            ]  # fmt: skip

            def both_committing() -> bool:
                async def look() -> int:
                    assert p.platform is not None
                    return len(p.platform.results._committing)

                return int(p.call(look())) == 2

            await asyncio.to_thread(until, both_committing, "alice's two commits under way", HANG)
            bob = sessions[2][1]
            await asyncio.wait_for(
                bob.posix_rename("/results/bob/b1/MANIFEST.sha256.medbridge-part", "/results/bob/b1/MANIFEST.sha256"),
                HANG,
            )
            while holds:
                os.close(holds.pop())
            await asyncio.wait_for(asyncio.gather(*alices), HANG)
        finally:
            for conn, _ in sessions:
                conn.close()

    with p:
        holds: list[int] = []
        try:
            asyncio.run(go(holds))
        finally:
            for fd in holds:
                os.close(fd)
        for user, job in (("alice", "a1"), ("alice", "a2"), ("bob", "b1")):
            assert (p.home.results / user / job / "MANIFEST.sha256").exists()
