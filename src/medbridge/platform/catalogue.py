"""The catalogue's files: each dataset version's manifest and index, written once, then served as files.

A manifest is built from the control database by streaming its rows in path order
(memory stays flat), written beside the storage under a temporary name, synced and
renamed into place: readers see a whole file or none.  Several processes or hosts may
build the same version at once; the renames leave one identical file.  Serving it is
then a plain file read: no request rebuilds anything.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from medbridge.control.store import ManifestEntry, Store
from medbridge.policy import manifest as _manifest
from medbridge.policy.manifest import Piece, manifest_line

_VERSIONED = re.compile(r"v(\d+)\.(sha256|index)")


class Catalogue:
    """Manifest files of every dataset version, under ``root`` (``storage/manifests`` in a home)."""

    def __init__(self, store: Store, root: Path, piece_lines: int | None = None):
        self.store = store
        self.root = root
        self.piece_lines = piece_lines or _manifest.PIECE_LINES

    def files(self, name: str, version: int) -> tuple[Path, Path]:
        """Where version ``version`` of dataset ``name`` has its manifest and its index."""
        folder = self.root / name
        return folder / f"v{version}.sha256", folder / f"v{version}.index"

    def current(self, name: str, version: int) -> tuple[Path, Path] | None:
        """The files of that version if they are built (the index is renamed into place first)."""
        manifest, index = self.files(name, version)
        return (manifest, index) if manifest.exists() else None

    def build(self, name: str) -> tuple[int, Path, Path]:
        """Build the dataset's current version unless it is built; return it.  Older versions' files go."""
        with self.store.manifest_rows(name) as (info, rows):
            manifest, index = self.files(name, info.version)
            if not manifest.exists():
                manifest.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
                tag = f".tmp-{os.getpid()}-{secrets.token_hex(4)}"
                tmp_manifest, tmp_index = manifest.with_name(manifest.name + tag), index.with_name(index.name + tag)
                try:
                    with open(tmp_manifest, "xb") as m, open(tmp_index, "xb") as i:
                        _write(rows, m, i, self.piece_lines)
                        for f in (m, i):
                            f.flush()
                            os.fsync(f.fileno())
                    for tmp in (tmp_manifest, tmp_index):
                        os.chmod(tmp, 0o440)
                    os.replace(tmp_index, index)
                    os.replace(tmp_manifest, manifest)
                finally:
                    for tmp in (tmp_manifest, tmp_index):
                        tmp.unlink(missing_ok=True)
        self._prune(name, info.version)
        return info.version, manifest, index

    def _prune(self, name: str, keep: int) -> None:
        """Remove this catalogue's files of versions before ``keep`` (a reader holding one open keeps its copy)."""
        try:
            entries = list(os.scandir(self.root / name))
        except FileNotFoundError:
            return
        for entry in entries:
            m = _VERSIONED.fullmatch(entry.name)
            if m and int(m[1]) < keep:
                Path(entry.path).unlink(missing_ok=True)


def _write(rows: Iterator[ManifestEntry], manifest: IO[bytes], index: IO[bytes], piece_lines: int) -> None:
    """Stream ``rows`` (in path order) into the manifest, and one index line per piece."""
    offset = start = count = 0
    first = ""
    digest = hashlib.sha256()
    for entry in rows:
        line = manifest_line(entry.sha256, entry.path).encode()
        if count == 0:
            first, start, digest = entry.path, offset, hashlib.sha256()
        manifest.write(line)
        digest.update(line)
        offset += len(line)
        count += 1
        if count == piece_lines:
            index.write(Piece(start, offset - start, digest.hexdigest(), first).line().encode())
            count = 0
    if count:
        index.write(Piece(start, offset - start, digest.hexdigest(), first).line().encode())
