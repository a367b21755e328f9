"""The catalogue: manifests built once per dataset version, off the loop, served as files in pieces."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import threading
from datetime import UTC, datetime
from pathlib import Path

import asyncssh
import pytest

from medbridge.compute.credentials import PlatformLookup
from medbridge.errors import InvalidInput
from medbridge.loader import Loader
from medbridge.platform.catalogue import Catalogue
from medbridge.policy import manifest as manifest_policy
from medbridge.policy.manifest import find_piece, format_manifest, parse_index, parse_manifest
from medbridge.testing import RunningPlatform
from tests.conftest import CHEST, KNEE
from tests.platform.test_data_plane import job_sftp


def test_manifest_and_index_describe_the_dataset_in_pieces(platform: RunningPlatform, tmp_path: Path) -> None:
    files = {f"d{i % 3}/f{i:03}.bin": bytes([i]) * (i + 1) for i in range(50)}
    platform.add_dataset("many", files)
    catalogue = Catalogue(platform.store, tmp_path / "manifests", piece_lines=8)
    _, manifest, index = catalogue.build("many")
    text = manifest.read_text()
    assert text == format_manifest((hashlib.sha256(d).hexdigest(), p) for p, d in files.items())
    pieces = parse_index(index.read_text())
    assert len(pieces) == 7 and pieces[-1].offset + pieces[-1].length == len(text.encode())
    raw = manifest.read_bytes()
    for path, data in files.items():
        piece = find_piece(pieces, path)
        assert piece is not None
        chunk = raw[piece.offset : piece.offset + piece.length]
        assert hashlib.sha256(chunk).hexdigest() == piece.sha256
        assert (hashlib.sha256(data).hexdigest(), path) in parse_manifest(chunk.decode())
    assert find_piece(pieces, "a-before-everything") is None


def test_a_new_version_is_built_once_and_replaces_the_old_files(platform: RunningPlatform, tmp_path: Path) -> None:
    catalogue = Catalogue(platform.store, tmp_path / "manifests")
    v1, m1, _ = catalogue.build("chest")
    assert catalogue.build("chest")[1] == m1 and m1.stat().st_nlink == 1
    first = m1.stat().st_mtime_ns
    assert catalogue.build("chest")[1].stat().st_mtime_ns == first, "a built version is never rebuilt"
    platform.store.add_files("chest", [], datetime.now(UTC), "t", "dataset.pack")
    v2, m2, _ = catalogue.build("chest")
    assert v2 == v1 + 1 and m2 != m1 and not m1.exists()


class _HeldBuild(Catalogue):
    """Fault: a manifest build that takes as long as the test says (a huge dataset), counted."""

    def __init__(self, inner: Catalogue):
        super().__init__(inner.store, inner.root)
        self.release = threading.Event()
        self.started = threading.Event()
        self.builds = 0

    def build(self, name: str) -> tuple[int, Path, Path]:
        self.builds += 1
        self.started.set()
        assert self.release.wait(60), "the test never released the build"
        return super().build(name)


def test_a_manifest_build_never_stops_other_sessions(platform: RunningPlatform) -> None:
    """While one job waits for a manifest being built, other sessions are served (one channel's requests are serial)."""
    platform.grant("alice", "knee")
    assert platform.platform is not None
    held = _HeldBuild(platform.platform.catalogue)
    platform.platform.catalogue = held
    shutil.rmtree(platform.home.manifests / "chest")

    async def go() -> tuple[bytes, bytes, bytes, list[bytes]]:
        conn, sftp = await job_sftp(platform)
        other_conn, other = await job_sftp(platform, job_id="job-2")
        async with conn, other_conn:

            async def manifest() -> bytes:
                async with sftp.open("/datasets/chest/.manifest", "rb") as f:
                    return bytes(await f.read())

            waiting = [asyncio.create_task(manifest()) for _ in range(4)]
            await asyncio.to_thread(held.started.wait, 30)
            async with other.open("/datasets/knee/knee-001.bin", "rb") as f:
                knee = bytes(await f.read())
            async with other.open("/datasets/chest/scan-002.bin", "rb") as f:
                chest = bytes(await f.read())
            size = (await other.stat("/datasets/knee/knee-001.bin")).size
            assert not any(t.done() for t in waiting), "the manifest cannot be ready before its build"
            held.release.set()
            return knee, chest, bytes(str(size), "ascii"), list(await asyncio.gather(*waiting))

    knee, chest, size, manifests = asyncio.run(asyncio.wait_for(go(), 60))
    assert knee == KNEE["knee-001.bin"] and chest == CHEST["scan-002.bin"] and size == b"5000"
    assert len(set(manifests)) == 1 and b"scan-001.bin" in manifests[0]
    assert held.builds == 1, "one build per version, however many wait for it"


def test_the_index_is_served_beside_the_manifest(platform: RunningPlatform) -> None:
    async def go() -> tuple[list[str], bytes, bytes]:
        conn, sftp = await job_sftp(platform)
        async with conn:
            names = sorted(await sftp.listdir("/datasets/chest"))
            async with sftp.open("/datasets/chest/.manifest.index", "rb") as f:
                index = bytes(await f.read())
            async with sftp.open("/datasets/chest/.manifest", "rb") as f:
                manifest = bytes(await f.read())
            try:
                async with sftp.open("/datasets/chest/.manifest", "wb"):
                    pass
            except asyncssh.SFTPPermissionDenied:
                return names, index, manifest
            raise AssertionError("the manifest was opened for writing")

    names, index, manifest = asyncio.run(go())
    assert ".manifest" in names and ".manifest.index" in names
    (piece,) = parse_index(index.decode())
    assert piece.length == len(manifest) and hashlib.sha256(manifest).hexdigest() == piece.sha256


def test_the_loader_verifies_reads_with_the_index_and_one_piece_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, database_url: str
) -> None:
    """A job reading 2 files of a 40-file dataset fetches the index and at most 2 of its 10 pieces."""
    monkeypatch.setattr(manifest_policy, "PIECE_LINES", 4)
    files = {f"s{i % 4}/f{i:02}.bin": os.urandom(50 + i) for i in range(40)}
    p = RunningPlatform(tmp_path, database_url)
    p.add_user("alice")
    p.add_dataset("many", files)
    p.grant("alice", "many")
    with p, p.job_endpoint("alice") as ep, Loader(ep) as loader:
        assert loader.read("/datasets/many/s1/f05.bin") == files["s1/f05.bin"]
        assert loader.read("/datasets/many/s3/f31.bin") == files["s3/f31.bin"]
        assert loader.stats.verified == 2
        reads = [r.as_dict() for r in p.audit() if r.action in ("sftp.read", "sftp.close")
                 and r.subject.startswith("/datasets/many/.manifest")]  # fmt: skip
        manifest_bytes = sum(r["detail"]["bytes_read"] for r in reads if r["subject"].endswith(".manifest"))
        whole = (p.home.manifests / "many" / "v1.sha256").stat().st_size
        assert [r["subject"] for r in reads].count("/datasets/many/.manifest.index") == 1
        assert 0 < manifest_bytes <= 2 * whole // 10 + 200, "only the pieces that hold the files read"
        assert sorted(loader.files("many")) == sorted(f"/datasets/many/{rel}" for rel in files)


def test_the_residue_lookup_answers_only_for_the_jobs_datasets(platform: RunningPlatform) -> None:
    chest, knee = (hashlib.sha256(d).hexdigest() for d in (CHEST["scan-001.bin"], KNEE["knee-001.bin"]))
    asyncio.run(platform.credential("alice", job_id="j-lookup"))
    lookup = PlatformLookup(platform.enrolment("alice"), "j-lookup")
    assert lookup([chest, knee, "0" * 64]) == {chest: "chest/scan-001.bin"}, "knee is not granted to alice"
    with pytest.raises(InvalidInput, match="no certificate for job"):
        PlatformLookup(platform.enrolment("alice"), "another-job")([chest])
    with pytest.raises(InvalidInput, match="64 lowercase hex"):
        lookup(["../../etc/passwd"])
    asked = [r.as_dict()["detail"] for r in platform.audit("residue.lookup")]
    assert asked and asked[-1]["asked"] == 3 and asked[-1]["known"] == 1
