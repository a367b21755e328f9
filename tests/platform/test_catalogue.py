"""The catalogue: manifests built once per dataset version, off the loop, served as files in pieces."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import threading
from datetime import UTC, datetime
from pathlib import Path

import asyncssh

from medbridge.platform.catalogue import Catalogue
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
