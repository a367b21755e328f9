"""Results as a hostile job would treat them (issue 14, items 4, 5 and 6): frozen once committed,
bounded in size and number, no server-side copies, and a full results file system that stops
nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import pytest

from medbridge import fastpath
from medbridge.control.audit import Record
from medbridge.testing import RunningPlatform
from tests.conftest import CHEST
from tests.platform.test_data_plane import _Raw, _sftp

MiB = 1 << 20


async def job_sftp(
    p: RunningPlatform, job_id: str = "job-1", user: str = "alice"
) -> tuple[asyncssh.SSHClientConnection, asyncssh.SFTPClient]:
    key, cred = await p.credential(user, job_id=job_id)
    conn = await p.connect(user, [(key, cred.certificate)])
    return conn, await conn.start_sftp_client()


def refusals(p: RunningPlatform, until: str) -> list[Record]:
    """The data plane's refusals, once one whose detail contains ``until`` is recorded."""
    found = p.audit("sftp.refused", until=lambda r: until in r.detail)
    return [r for r in found if r.outcome == "refused"]


def limited_platform(root: Path, **settings: object) -> RunningPlatform:
    p = RunningPlatform(root, enforcement_interval=0.25, **settings)
    p.add_user("alice")
    p.add_dataset("chest", CHEST)
    p.grant("alice", "chest")
    return p


def test_committed_results_cannot_change_through_any_request(platform: RunningPlatform) -> None:
    """A handle opened before the commit, and every mutating request by path after it: all refused, all audited."""
    folder = "/results/alice/c1"

    async def go() -> dict[str, type[BaseException] | None]:
        conn, sftp = await job_sftp(platform, "c1")
        outcomes: dict[str, type[BaseException] | None] = {}
        async with conn:
            async with sftp.open(f"{folder}/out.bin", "wb") as f:
                await f.write(b"real data")
            await sftp.mkdir(f"{folder}/sub")
            held = await sftp.open(f"{folder}/out.bin", "r+b")
            digest = hashlib.sha256(b"real data").hexdigest()
            async with sftp.open(f"{folder}/m.part", "wb") as f:
                await f.write(f"{digest}  out.bin\n".encode())
            await sftp.posix_rename(f"{folder}/m.part", f"{folder}/MANIFEST.sha256")
            attempts = {
                "fsetstat": held.truncate(3),
                "fsetstat-mode": held.chmod(0o600),
                "write": held.write(b"fake", 0),
                "setstat": sftp.truncate(f"{folder}/out.bin", 3),
                "setstat-times": sftp.utime(f"{folder}/out.bin", (0, 0)),
                "remove": sftp.remove(f"{folder}/out.bin"),
                "rename": sftp.rename(f"{folder}/out.bin", f"{folder}/moved.bin"),
                "posix-rename": sftp.posix_rename(f"{folder}/out.bin", f"{folder}/moved.bin"),
                "mkdir": sftp.mkdir(f"{folder}/new"),
                "rmdir": sftp.rmdir(f"{folder}/sub"),
                "open-append": sftp.open(f"{folder}/out.bin", "ab"),
            }
            for name, attempt in attempts.items():
                try:
                    await attempt
                    outcomes[name] = None
                except asyncssh.SFTPError as exc:
                    outcomes[name] = type(exc)
            await held.close()
        return outcomes

    outcomes = asyncio.run(go())
    assert outcomes == dict.fromkeys(outcomes, asyncssh.SFTPPermissionDenied)
    stored = platform.home.results / "alice" / "c1"
    assert (stored / "out.bin").read_bytes() == b"real data" and (stored / "sub").is_dir()
    refused = refusals(platform, '"op":"rmdir"')
    ops = {r.as_dict()["detail"]["op"] for r in refused if "committed" in r.detail}
    assert {"fsetstat", "write", "setstat", "remove", "rename", "mkdir", "rmdir", "open"} <= ops


def test_copy_data_is_refused_and_audited(platform: RunningPlatform) -> None:
    """The issue's attack: copy-data from a handle onto itself (length 0, target offset 256 KiB) filled a disk."""
    path = b"/results/alice/job-1/x"

    async def go() -> tuple[bytes, int, bytes, bytes]:
        key, cred = await platform.credential("alice")
        conn = await platform.connect("alice", [(key, cred.certificate)])
        async with conn:
            chan, raw = await conn.create_session(_Raw, subsystem="sftp", encoding=None)
            chan.write(_sftp(1, struct.pack(">I", 3)))  # INIT, version 3
            kind, version = await raw.reply()
            assert kind == 2
            write_create = 0x02 | 0x08 | 0x10  # WRITE | CREAT | TRUNC
            chan.write(_sftp(3, struct.pack(">II", 1, len(path)) + path + struct.pack(">II", write_create, 0)))
            kind, body = await raw.reply()
            assert kind == 102, body  # HANDLE
            handle = body[4 : 8 + int.from_bytes(body[4:8], "big")]
            chan.write(_sftp(6, struct.pack(">I", 2) + handle + struct.pack(">Q", 0) + struct.pack(">I", 256 << 10)
                             + os.urandom(256 << 10)))  # fmt: skip
            assert (await raw.reply())[0] == 101  # STATUS (ok)
            name = b"copy-data"
            copy = struct.pack(">II", 3, len(name)) + name + handle + struct.pack(">QQ", 0, 0) + handle
            chan.write(_sftp(200, copy + struct.pack(">Q", 256 << 10)))  # EXTENDED copy-data
            kind, status = await raw.reply()
            return version, kind, status, handle

    version, kind, status, _ = asyncio.run(go())
    if fastpath.enabled():  # asyncssh's own handler (the public path) names it; it is refused all the same
        assert b"copy-data" not in version, "not offered"
    assert kind == 101 and struct.unpack(">I", status[4:8])[0] == 8, "SSH_FX_OP_UNSUPPORTED"
    assert os.path.getsize(platform.home.results / "alice" / "job-1" / "x") == 256 << 10
    assert any("copy-data" in r.detail for r in refusals(platform, "copy-data"))


def test_write_offsets_and_sizes_are_bounded(tmp_path: Path) -> None:
    """One byte at offset 2**40 (a sparse 1 TiB file for the commit to hash): refused, as is a truncate that far."""
    p = limited_platform(tmp_path, results_max_file_size="1MiB")

    async def go() -> list[type[BaseException]]:
        conn, sftp = await job_sftp(p)
        errors = []
        async with conn, sftp.open("/results/alice/job-1/sparse.bin", "wb") as f:
            for attempt in (f.write(b"x", 1 << 40), f.write(b"x", MiB), f.truncate(1 << 40)):
                with pytest.raises(asyncssh.SFTPFailure, match="results_max_file_size") as info:
                    await attempt
                errors.append(info.type)
            await f.write(b"x", MiB - 1)  # the last byte allowed
        return errors

    with p:
        assert len(asyncio.run(go())) == 3
        assert os.path.getsize(p.home.results / "alice" / "job-1" / "sparse.bin") == MiB
        assert len([r for r in refusals(p, "results_max_file_size") if "results_max_file_size" in r.detail]) == 3


def test_a_manifest_naming_a_file_too_large_is_refused_before_hashing(tmp_path: Path) -> None:
    """A file bigger than a result may be (left by older limits, say): the commit is refused without reading it."""
    quota = {"results_quota_per_job": "2TiB", "results_quota_per_user": "2TiB"}  # the quota alone would refuse it
    p = limited_platform(tmp_path, results_max_file_size="1MiB", **quota)
    with p:
        folder = p.home.results / "alice" / "old"
        folder.mkdir(parents=True)
        with (folder / "huge.bin").open("wb") as f:
            f.truncate(1 << 40)  # sparse: one TiB of holes

        async def go() -> None:
            conn, sftp = await job_sftp(p, "old")
            async with conn:
                async with sftp.open("/results/alice/old/m.part", "wb") as f:
                    await f.write(b"0" * 64 + b"  huge.bin\n")
                with pytest.raises(asyncssh.SFTPFailure, match="larger than a result file may be"):
                    await sftp.posix_rename("/results/alice/old/m.part", "/results/alice/old/MANIFEST.sha256")

        asyncio.run(go())


def test_quotas_per_job_and_per_user_are_enforced_and_audited(tmp_path: Path) -> None:
    p = limited_platform(
        tmp_path, results_quota_per_job="1MiB", results_quota_per_user="1280KiB", results_max_entries_per_job=4
    )

    async def go() -> None:
        conn, sftp = await job_sftp(p, "j1")
        async with conn:
            async with sftp.open("/results/alice/j1/a.bin", "wb") as f:
                await f.write(b"a" * MiB)
            with pytest.raises(asyncssh.SFTPFailure, match="results_quota_per_job"):
                async with sftp.open("/results/alice/j1/b.bin", "wb") as f:
                    await f.write(b"b")
            await sftp.remove("/results/alice/j1/a.bin")  # the space comes back
            async with sftp.open("/results/alice/j1/b.bin", "wb") as f:
                await f.write(b"b" * (MiB // 2))
            for name in ("d1", "d2", "d3"):  # with b.bin, four entries (a.bin's was given back)
                await sftp.mkdir(f"/results/alice/j1/{name}")
            with pytest.raises(asyncssh.SFTPFailure, match="results_max_entries_per_job"):
                await sftp.mkdir("/results/alice/j1/d4")
        conn, sftp = await job_sftp(p, "j2")
        async with conn, sftp.open("/results/alice/j2/c.bin", "wb") as f:
            await f.write(b"c" * (768 << 10))  # with j1's 512 KiB, the user's 1280 KiB exactly
            with pytest.raises(asyncssh.SFTPFailure, match="results_quota_per_user"):
                await f.write(b"c", 768 << 10)

    with p:
        asyncio.run(go())
        results = p.home.results / "alice"
        assert os.path.getsize(results / "j1" / "b.bin") == MiB // 2
        assert os.path.getsize(results / "j2" / "c.bin") == 768 << 10
        assert not (results / "j1" / "d4").exists()
        reasons = [r.detail for r in refusals(p, "results_quota_per_user")]
        assert any("results_quota_per_job" in d for d in reasons)
        assert any("results_max_entries_per_job" in d for d in reasons)


def test_quota_records_are_recounted_from_the_files_when_missing(tmp_path: Path) -> None:
    """Records lost (or never made, for results older than the limits) are rebuilt from what is stored."""
    p = limited_platform(tmp_path, results_quota_per_job="1MiB")
    with p:
        folder = p.home.results / "alice" / "job-1"
        folder.mkdir(parents=True)
        (folder / "older.bin").write_bytes(b"o" * (MiB - 10))

        async def go() -> None:
            conn, sftp = await job_sftp(p)
            async with conn, sftp.open("/results/alice/job-1/new.bin", "wb") as f:
                await f.write(b"n" * 10)
                with pytest.raises(asyncssh.SFTPFailure, match="results_quota_per_job"):
                    await f.write(b"n", 10)

        asyncio.run(go())


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0750", "medbridge-test", str(where)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (root is needed): {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_a_full_results_file_system_stops_neither_revocation_nor_enforcement(tmp_path: Path) -> None:
    """The issue's attack filled the disk that control.db shared, and 'medbridge revoke' failed with
    'database or disk is full'.  With results on their own file system, filling it through SFTP
    fails the writes, and revocation still works and ends the session."""
    with tmpfs(tmp_path / "results", "4m") as results:
        p = limited_platform(tmp_path / "platform", results_dir=str(results))
        with p:

            async def go() -> tuple[str, float]:
                conn, sftp = await job_sftp(p)
                async with conn:
                    with pytest.raises(asyncssh.SFTPFailure, match="No space left"):
                        async with sftp.open("/results/alice/job-1/fill.bin", "wb") as f:
                            for i in range(64):
                                await f.write(os.urandom(256 << 10), i * (256 << 10))
                    assert await sftp.exists("/datasets/chest/scan-001.bin"), "reading goes on"
                    revoke = subprocess.run(
                        [sys.executable, "-m", "medbridge", "revoke", "alice", "chest", "--home", str(p.home.root)],
                        capture_output=True, text=True, timeout=120,
                    )  # fmt: skip
                    assert revoke.returncode == 0, revoke.stderr
                    start = time.monotonic()
                    with pytest.raises((asyncssh.Error, OSError)):
                        for _ in range(400):
                            await asyncio.wait_for(sftp.stat("/datasets"), timeout=10)
                            await asyncio.sleep(0.05)
                    return revoke.stdout, time.monotonic() - start

            said, _ = asyncio.run(go())
            assert "revoked chest from alice" in said
            ends = p.audit("session.end", until=lambda r: "grant ended" in r.detail)
            assert any("grant ended for dataset(s) chest" in r.detail for r in ends)
            assert not (p.home.root / "storage" / "results" / "alice").exists(), "results went to results_dir"


def test_statvfs_shows_the_jobs_quota_not_the_file_system(tmp_path: Path) -> None:
    """The review's finding: ``statvfs /`` told any user the results file system's size and free space."""
    p = limited_platform(tmp_path, results_quota_per_job="1MiB", results_quota_per_user="4MiB",
                         results_max_entries_per_job=10)  # fmt: skip

    async def go() -> list[tuple[int, int, int, int]]:
        conn, sftp = await job_sftp(p, "j1")
        async with conn:
            seen = []
            for path in ("/", "/datasets/chest", "/results/alice/j1"):
                v = await sftp.statvfs(path)
                seen.append((v.frsize * v.blocks, v.frsize * v.bavail, v.files, v.ffree))
            async with sftp.open("/results/alice/j1/a.bin", "wb") as f:
                await f.write(b"a" * (256 << 10))
                v = await f.statvfs()
                seen.append((v.frsize * v.blocks, v.frsize * v.bavail, v.files, v.ffree))
            return seen

    with p:
        seen = asyncio.run(go())
    assert seen[:3] == [(MiB, MiB, 10, 10)] * 3, "the job's quota, whatever the path"
    assert seen[3] == (MiB, MiB - (256 << 10), 10, 9), "less what the job wrote"
