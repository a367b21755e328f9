"""The platform's whole-file read extension: one request per small file, decided and audited like ``open``.

The extension is the fast path's (``medbridge.fastpath``); off it, the loader reads by handle.
"""

from __future__ import annotations

import asyncio
import os

import asyncssh
import pytest

from medbridge.loader import Loader
from medbridge.loader.wire import Buffer, Wire, open_wire
from medbridge.testing import RunningPlatform
from tests.conftest import CHEST


async def _wire(p: RunningPlatform) -> tuple[asyncssh.SSHClientConnection, Wire]:
    key, cred = await p.credential("alice")
    conn = await p.connect("alice", [(key, cred.certificate)])
    return conn, await open_wire(conn)


def _read_file(p: RunningPlatform, path: str, offset: int = 0, want: int = 1 << 20) -> tuple[bool, bytes]:
    """(whole, bytes) of one extension request, straight on the wire."""

    async def go() -> tuple[bool, bytes]:
        conn, wire = await _wire(p)
        async with conn:
            assert wire.read_file_max >= want
            buf = Buffer(offset, None)
            whole = await wire._read_file(path, buf, want)
            return whole, bytes(buf.result()) if whole else b""

    return asyncio.run(go())


@pytest.mark.fastpath
def test_a_small_file_is_one_request_and_one_audit_row(platform: RunningPlatform) -> None:
    """The file itself: one read-file request (its manifest piece, for the check, is a request of its own)."""
    path = "/datasets/chest/scan-001.bin"
    with platform.job_endpoint("alice") as ep, Loader(ep, connections=1) as loader:
        assert loader.read(path) == CHEST["scan-001.bin"]
    reads = [r for r in platform.audit("sftp.read") if r.subject == path]
    assert len(reads) == 1 and reads[0].as_dict()["detail"]["bytes_read"] == len(CHEST["scan-001.bin"])
    assert reads[0].as_dict()["detail"]["job"] == "job-1"
    assert [r for r in platform.audit("sftp.open") if r.subject == path] == [], "no handle was opened for it"


@pytest.mark.fastpath
def test_short_reply_means_the_end_and_offsets_count_from_it(platform: RunningPlatform) -> None:
    data = CHEST["scan-001.bin"]
    assert _read_file(platform, "/datasets/chest/scan-001.bin", offset=150_000) == (True, data[150_000:])
    assert _read_file(platform, "/datasets/chest/scan-001.bin", offset=len(data) + 5) == (True, b"")
    assert _read_file(platform, "/datasets/chest/scan-001.bin", want=len(data)) == (False, b""), "full: maybe more"


def test_a_file_larger_than_one_request_reads_on_by_handle(platform: RunningPlatform) -> None:
    with platform.job_endpoint("alice") as ep, Loader(ep, connections=1, block_size=64 << 10) as loader:
        assert loader.read("/datasets/chest/scan-001.bin") == CHEST["scan-001.bin"]
    assert any(r.subject == "/datasets/chest/scan-001.bin" for r in platform.audit("sftp.open"))


@pytest.mark.fastpath
def test_refusals_are_the_same_as_for_open(platform: RunningPlatform) -> None:
    storage = platform.home.datasets / "chest"
    os.chmod(storage, 0o750)
    (storage / "escape").symlink_to("/etc/passwd")
    paths = ["/datasets/chest/escape", "/datasets/knee/knee-001.bin", "/datasets/chest/../../etc/passwd",
             "/datasets/chest/labels"]  # fmt: skip

    def by_open(path: str) -> type[BaseException] | None:
        async def go() -> type[BaseException] | None:
            conn, _ = await _wire(platform)
            async with conn, conn.start_sftp_client() as sftp:
                try:
                    async with sftp.open(path, "rb") as f:
                        await f.read(10)
                except asyncssh.SFTPError as exc:
                    return type(exc)
                return None

        return asyncio.run(go())

    def by_read_file(path: str) -> type[BaseException] | None:
        try:
            _read_file(platform, path)
        except asyncssh.SFTPError as exc:
            return type(exc)
        return None

    for path in paths:
        assert by_read_file(path) == by_open(path) is not None, path
    assert by_read_file("/datasets/chest/escape") is asyncssh.SFTPPermissionDenied
    refused = {(r.subject, r.as_dict()["detail"]["op"]) for r in platform.audit("sftp.refused")}
    for path in paths[:2]:
        assert (path, "read-file") in refused and (path, "open") in refused


@pytest.mark.fastpath
def test_the_manifest_reads_whole_through_it(platform: RunningPlatform) -> None:
    whole, manifest = _read_file(platform, "/datasets/chest/.manifest")
    assert whole and b"scan-001.bin" in manifest


def test_without_the_extension_the_loader_reads_by_handle(platform: RunningPlatform) -> None:
    """As against OpenSSH's sftp-server, which does not offer it (parsing that is in test_wire)."""

    async def go() -> bytes:
        conn, wire = await _wire(platform)
        async with conn:
            wire.read_file_max = 0
            buf = Buffer(0, None)
            await wire.fill("/datasets/chest/scan-002.bin", buf, 1 << 20, 4)
            return bytes(buf.result())

    assert asyncio.run(go()) == CHEST["scan-002.bin"]


@pytest.mark.fastpath
def test_an_offset_past_the_kernels_is_a_clean_refusal(platform: RunningPlatform) -> None:
    """read-file at 2**64-1 (an OverflowError inside once): a one-line refusal, audited."""
    with pytest.raises(asyncssh.SFTPPermissionDenied, match="past the largest a file may have"):
        _read_file(platform, "/datasets/chest/scan-001.bin", offset=(1 << 64) - 1)
    refused = platform.audit("sftp.refused", until=lambda r: "past the largest" in r.detail)
    assert any(r.as_dict()["detail"]["op"] == "read-file" for r in refused)
