"""The results quota's bookkeeping of renames and removals (issue 14's hostile review, quota probes Q1 and Q2):
nothing a job does with names gives back bytes or entries that are still on disk."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import asyncssh
import pytest

from medbridge.platform.limits import Quota, Usage
from tests.platform.test_results import MiB, job_sftp, limited_platform, refusals

JOB = "/results/alice/job-1"


def test_a_file_renamed_onto_itself_gives_nothing_back(tmp_path: Path) -> None:
    """Q1: ``posix-rename x x`` does nothing on disk, so it may not give x's bytes or entry back to the quota."""
    p = limited_platform(tmp_path, results_quota_per_job="1MiB", results_max_entries_per_job=2)

    async def go() -> None:
        conn, sftp = await job_sftp(p)
        async with conn:
            async with sftp.open(f"{JOB}/x", "wb") as f:
                await f.write(b"x" * (768 << 10))
            for _ in range(5):
                await sftp.posix_rename(f"{JOB}/x", f"{JOB}/x")
            with pytest.raises(asyncssh.SFTPFailure, match="results_quota_per_job"):
                async with sftp.open(f"{JOB}/y", "wb") as f:  # the second of two entries
                    await f.write(b"y" * (512 << 10))
            with pytest.raises(asyncssh.SFTPFailure, match="results_max_entries_per_job"):
                await sftp.mkdir(f"{JOB}/z")

    with p:
        asyncio.run(go())
        folder = p.home.results / "alice" / "job-1"
        assert os.path.getsize(folder / "x") == 768 << 10
        assert not (folder / "z").exists()
        assert refusals(p, "results_max_entries_per_job")


def test_a_rename_onto_a_hard_link_of_itself_gives_nothing_back(tmp_path: Path) -> None:
    """Two names of one file (made on the platform: a job cannot link): renaming one onto the other does nothing."""
    p = limited_platform(tmp_path, results_quota_per_job="1MiB")
    with p:
        folder = p.home.results / "alice" / "job-1"
        folder.mkdir(parents=True)
        (folder / "a").write_bytes(b"a" * 1000)
        os.link(folder / "a", folder / "b")
        usage = Usage(p.home.results, Quota(MiB, MiB, 100, 100, MiB)).account("alice")
        before = usage.used("job-1")

        async def go() -> None:
            conn, sftp = await job_sftp(p)
            async with conn:
                await sftp.posix_rename(f"{JOB}/a", f"{JOB}/b")

        asyncio.run(go())
        assert (folder / "a").exists() and (folder / "b").exists(), "rename(2) of one file onto itself does nothing"
        assert usage.used("job-1") == before
        usage.close()


def test_a_removed_file_held_open_stays_charged_until_its_last_handle_closes(tmp_path: Path) -> None:
    """Q2: write up to the quota, remove the file, keep the handle, write again: refused while the handle holds
    the space; once it closes (or a reader of it does) the bytes come back."""
    p = limited_platform(tmp_path, results_quota_per_job="1MiB")

    async def go() -> None:
        conn, sftp = await job_sftp(p)
        async with conn:
            held = await sftp.open(f"{JOB}/f0", "wb")
            await held.write(b"q" * (768 << 10))
            reader = await sftp.open(f"{JOB}/f0", "rb")
            await sftp.remove(f"{JOB}/f0")
            with pytest.raises(asyncssh.SFTPFailure, match="results_quota_per_job"):
                async with sftp.open(f"{JOB}/f1", "wb") as f:
                    await f.write(b"q" * (512 << 10))
            await held.write(b"q", 768 << 10)  # still the job's file: charged like any write
            await held.close()
            with pytest.raises(asyncssh.SFTPFailure, match="results_quota_per_job"):
                async with sftp.open(f"{JOB}/f2", "wb") as f:  # the reader still holds it
                    await f.write(b"q" * (512 << 10))
            assert len(await reader.read(16)) == 16
            await reader.close()
            async with sftp.open(f"{JOB}/f3", "wb") as f:  # the last handle closed: the space is back
                await f.write(b"q" * (768 << 10))

    with p:
        asyncio.run(go())
        assert os.path.getsize(p.home.results / "alice" / "job-1" / "f3") == 768 << 10


def test_a_removed_file_held_by_a_session_that_ends_is_given_back(tmp_path: Path) -> None:
    """A session that ends with the handle open (its connection dropped): the bytes come back at its end."""
    p = limited_platform(tmp_path, results_quota_per_job="1MiB")

    async def go() -> None:
        conn, sftp = await job_sftp(p)
        async with conn:
            f = await sftp.open(f"{JOB}/f0", "wb")
            await f.write(b"q" * (768 << 10))
            await sftp.remove(f"{JOB}/f0")
        for _ in range(200):  # the server ends the session after the client has gone
            conn, sftp = await job_sftp(p, "job-1")
            async with conn:
                try:
                    async with sftp.open(f"{JOB}/f1", "wb") as f:
                        await f.write(b"q" * (768 << 10))
                    return
                except asyncssh.SFTPFailure as exc:
                    assert "results_quota_per_job" in str(exc)
            await asyncio.sleep(0.05)
        raise AssertionError("the removed file's bytes never came back")

    with p:
        asyncio.run(go())
