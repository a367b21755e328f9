"""Residue scan: find dataset copies and medical images left on a compute node, and purge them.

A file is residue when its SHA-256 is in a manifest of the datasets the job used,
or when its content carries a medical-image signature (DICOM ``DICM`` at byte 128,
NIfTI-1/2 magic, NRRD, MetaImage headers; also inside gzip).  Mount points are
never entered (the platform's own mount is not residue) and links are not followed.
"""

from __future__ import annotations

import gzip
import os
import re
import stat
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medbridge.errors import InvalidInput
from medbridge.policy.manifest import parse_manifest
from medbridge.processes import sha256_file

HEAD = 1024
_METAIMAGE = re.compile(rb"^\s*ObjectType\s*=\s*Image\s*$", re.MULTILINE)
_METAIMAGE_DIMS = re.compile(rb"^\s*NDims\s*=\s*\d+", re.MULTILINE)


def signature(head: bytes) -> str | None:
    """The medical-image format whose signature ``head`` (a file's first bytes) carries."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "DICOM preamble"
    if len(head) >= 348 and head[344:348] in (b"n+1\0", b"ni1\0"):
        return "NIfTI-1 header"
    if len(head) >= 12 and head[4:12] in (b"n+2\0\r\n\x1a\n", b"ni2\0\r\n\x1a\n"):
        return "NIfTI-2 header"
    if head.startswith(b"NRRD000"):
        return "NRRD header"
    if _METAIMAGE.search(head) and _METAIMAGE_DIMS.search(head):
        return "MetaImage header"
    return None


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        head = f.read(HEAD)
    if head[:2] == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as g:
                inner = g.read(HEAD)
        except (OSError, EOFError, zlib.error):
            return head
        return inner if signature(inner) else head
    return head


@dataclass(frozen=True)
class Finding:
    path: str
    reason: str
    size: int
    purged: bool = False


@dataclass
class ScanReport:
    roots: list[str]
    findings: list[Finding] = field(default_factory=list)
    files_scanned: int = 0
    bytes_hashed: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not [f for f in self.findings if not f.purged]

    def as_dict(self) -> dict[str, Any]:
        return {
            "roots": self.roots,
            "files_scanned": self.files_scanned,
            "bytes_hashed": self.bytes_hashed,
            "findings": [f.__dict__ for f in self.findings],
            "errors": self.errors,
            "clean": self.clean,
        }


def load_manifests(texts: Iterable[str]) -> dict[str, str]:
    """Known SHA-256 → the dataset path it belongs to, from sha256sum-format texts."""
    known: dict[str, str] = {}
    for text in texts:
        for sha, path in parse_manifest(text):
            known.setdefault(sha, path)
    return known


def read_manifest_files(paths: Iterable[str | os.PathLike[str]]) -> dict[str, str]:
    texts = []
    for p in paths:
        try:
            texts.append(Path(p).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"cannot read manifest {p}: {exc}") from exc
    return load_manifests(texts)


def _walk(root: Path, exclude: set[str], errors: list[str]) -> Iterator[Path]:
    try:
        st = root.lstat()
    except FileNotFoundError:
        return
    except OSError as exc:
        errors.append(f"{root}: {exc.strerror}")
        return
    if stat.S_ISREG(st.st_mode):
        yield root
        return
    if not stat.S_ISDIR(st.st_mode):
        return
    for dirpath, dirnames, filenames in os.walk(root, onerror=lambda e: errors.append(f"{e.filename}: {e.strerror}")):
        keep = []
        for d in dirnames:
            full = os.path.join(dirpath, d)
            if full in exclude or os.path.ismount(full) or os.path.islink(full):
                continue
            keep.append(d)
        dirnames[:] = keep
        for name in filenames:
            p = Path(dirpath, name)
            if str(p) not in exclude and p.is_file() and not p.is_symlink():
                yield p


def scan(
    roots: Iterable[str | os.PathLike[str]],
    known: dict[str, str],
    *,
    exclude: Iterable[str | os.PathLike[str]] = (),
    owner: int | None = None,
    progress: Callable[[Path], None] | None = None,
) -> ScanReport:
    """Scan ``roots`` for residue; ``owner`` limits findings to files that uid owns."""
    resolved = []
    for r in roots:
        p = Path(r).absolute()
        if str(p) not in resolved:
            resolved.append(str(p))
    skip = {str(Path(e).absolute()) for e in exclude}
    report = ScanReport(roots=resolved)
    seen: set[tuple[int, int]] = set()
    for root in resolved:
        for path in _walk(Path(root), skip, report.errors):
            try:
                st = path.lstat()
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                if owner is not None and st.st_uid != owner:
                    continue
                report.files_scanned += 1
                if progress:
                    progress(path)
                reason = signature(_head(path))
                if reason is None and known:
                    digest = sha256_file(path)
                    report.bytes_hashed += st.st_size
                    if digest in known:
                        reason = f"copy of dataset file {known[digest]}"
            except OSError as exc:
                report.errors.append(f"{path}: {exc.strerror}")
                continue
            if reason:
                report.findings.append(Finding(str(path), reason, st.st_size))
    return report


def purge(report: ScanReport) -> ScanReport:
    """Delete every finding; a file that cannot be removed stays listed as not purged."""
    done = []
    for f in report.findings:
        try:
            os.remove(f.path)
            done.append(Finding(f.path, f.reason, f.size, purged=True))
        except FileNotFoundError:
            done.append(Finding(f.path, f.reason, f.size, purged=True))
        except OSError as exc:
            report.errors.append(f"{f.path}: cannot purge: {exc.strerror}")
            done.append(f)
    report.findings = done
    return report
