"""Residue scan: find dataset copies and medical images left on a compute node, and purge the job's.

A file is looked at when its SHA-256 is in a manifest of the datasets the job could
read, or when its content carries a medical-image signature (DICOM ``DICM`` at byte
128, NIfTI-1/2 magic, NRRD, MetaImage headers; also inside gzip).  Whether it is the
job's, and so whether a purge may delete it, is decided by
:mod:`medbridge.policy.residue`; everything else is reported and left in place.
Mount points are never entered (the platform's own mount is not residue) and links
are not followed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import json
import os
import re
import stat
import zlib
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medbridge.errors import InvalidInput, MedbridgeError
from medbridge.policy.manifest import parse_manifest
from medbridge.policy.residue import Kind, judge
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
    #: Proven platform data brought by the job (only these are ever purged).
    ours: bool = False
    why: str = ""
    #: The file's identity when scanned: a purge deletes nothing that has changed since.
    identity: tuple[int, int, int] = field(default=(0, 0, 0), compare=False, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "reason": self.reason, "size": self.size, "purged": self.purged,
                "ours": self.ours, "why": self.why}  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class JobContext:
    """What ties a file to a job: its start (on the file-system clock) and the folders that are its alone.

    ``started`` None means no job (a scan by hand): then only dataset copies are proven
    platform data.  ``scratch`` folders are scanned as well as the scan's roots.
    ``existed``: the files (device, inode) that were in the roots when the job began
    (:func:`inventory`): never the job's, whatever they hold when it ends.
    """

    started: float | None = None
    scratch: Sequence[str | os.PathLike[str]] = ()
    existed: Collection[tuple[int, int]] = frozenset()


NO_JOB = JobContext()


@dataclass
class ScanReport:
    roots: list[str]
    #: Residue of the job: purged, or left in place (then the scan is not clean).
    findings: list[Finding] = field(default_factory=list)
    #: Medical files that were there before the job started: reported, never purged.
    preexisting: list[Finding] = field(default_factory=list)
    files_scanned: int = 0
    bytes_hashed: int = 0
    errors: list[str] = field(default_factory=list)
    started: float | None = None
    scratch: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not [f for f in self.findings if not f.purged]

    def as_dict(self, limit: int | None = None) -> dict[str, Any]:
        """The report as JSON data; ``limit`` keeps that many findings, pre-existing files and errors."""
        cut = slice(None, limit)
        return {
            "roots": self.roots,
            "scratch": self.scratch,
            "started": self.started,
            "files_scanned": self.files_scanned,
            "bytes_hashed": self.bytes_hashed,
            "found": len(self.findings),
            "purged": sum(1 for f in self.findings if f.purged),
            "findings": [f.as_dict() for f in self.findings[cut]],
            "preexisting_found": len(self.preexisting),
            "preexisting": [f.as_dict() for f in self.preexisting[cut]],
            "errors": self.errors[cut],
            "clean": self.clean,
        }

    def bounded(self, max_bytes: int) -> dict[str, Any]:
        """:meth:`as_dict` with its lists cut until its JSON fits ``max_bytes`` (the counts stay whole)."""
        limit: int | None = None
        while True:
            data = self.as_dict(limit)
            if len(json.dumps(data)) <= max_bytes or limit == 0:
                return data
            longest = max(len(self.findings), len(self.preexisting), len(self.errors))
            limit = (longest if limit is None else limit) // 2


#: ``lookup(hashes) -> {sha256: what it is a copy of}``: the manifest files, or the platform, asked in chunks.
Lookup = Callable[[Sequence[str]], Mapping[str, str]]
#: Candidate hashes held before they are looked up: memory stays flat whatever the scan or manifest size.
CHUNK = 4096


def load_manifests(texts: Iterable[str]) -> dict[str, str]:
    """Known SHA-256 → the dataset path it belongs to, from sha256sum-format texts (small manifests)."""
    known: dict[str, str] = {}
    for text in texts:
        for sha, path in parse_manifest(text):
            known.setdefault(sha, path)
    return known


class ManifestFiles:
    """A lookup in sha256sum-format files, streamed line by line for each chunk of hashes: never loaded whole."""

    def __init__(self, paths: Iterable[str | os.PathLike[str]]):
        self.paths = [Path(p) for p in paths]
        self(())  # one streamed pass now, so a missing or malformed manifest fails before any scan

    def __call__(self, hashes: Sequence[str]) -> dict[str, str]:
        wanted = set(hashes)
        found: dict[str, str] = {}
        for p in self.paths:
            try:
                with open(p, encoding="utf-8") as f:
                    for number, line in enumerate(f, 1):
                        try:
                            entries = parse_manifest(line)
                        except InvalidInput as exc:
                            raise InvalidInput(f"cannot read manifest {p}: line {number}: {exc}") from exc
                        for sha, path in entries:
                            if sha in wanted:
                                found.setdefault(sha, path)
            except (OSError, UnicodeDecodeError) as exc:
                raise InvalidInput(f"cannot read manifest {p}: {exc}") from exc
        return found


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


def _own_folder(path: Path, scratch: Sequence[str]) -> str | None:
    """The job's own folder that holds ``path`` (compared by real path), if any."""
    real = os.path.realpath(path.parent)
    for folder in scratch:
        if real == folder or real.startswith(folder.rstrip("/") + "/"):
            return folder
    return None


def scan(
    roots: Iterable[str | os.PathLike[str]],
    known: Mapping[str, str] | Lookup | None,
    *,
    exclude: Iterable[str | os.PathLike[str]] = (),
    owner: int | None = None,
    job: JobContext = NO_JOB,
    progress: Callable[[Path], None] | None = None,
) -> ScanReport:
    """Scan ``roots`` and the job's own folders for residue; ``owner`` limits it to files that uid owns.

    Each medical-looking file is judged by :func:`medbridge.policy.residue.judge`: only
    what it proves is the job's is marked for :func:`purge`.  With ``known`` (a table,
    or a lookup: the manifests, or the platform) every file is hashed and the hashes
    are looked up in chunks of :data:`CHUNK`, so memory stays flat; a lookup that fails
    is an error in the report (those files are not proven to be no copies).
    """
    lookup: Lookup | None = known if not isinstance(known, Mapping) else None
    if isinstance(known, Mapping) and known:
        lookup = lambda hs: {h: known[h] for h in hs if h in known}  # noqa: E731
    scratch = [os.path.realpath(s) for s in job.scratch]
    resolved: list[str] = []
    for r in [*roots, *job.scratch]:
        p = Path(r).absolute()
        if str(p) not in resolved:
            resolved.append(str(p))
    skip = {str(Path(e).absolute()) for e in exclude}
    report = ScanReport(roots=resolved, started=job.started, scratch=scratch)
    seen: set[tuple[int, int]] = set()
    pending: list[tuple[Path, str, os.stat_result, str | None]] = []

    def settle() -> None:
        assert lookup is not None
        try:
            found = lookup([sha for _, sha, _, _ in pending])
        except MedbridgeError as exc:
            report.errors.append(f"{len(pending)} file(s) not checked against the datasets: {exc}")
            found = {}
        for path, sha, st, sig in pending:
            copy_of = found.get(sha)
            _judge(report, path, st, copy_of, sig, job, scratch)
        pending.clear()

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
                sig = signature(_head(path))
                if lookup is not None and _sparse(st):
                    report.errors.append(f"{path}: not hashed: sparse ({st.st_size} bytes, "
                                         f"{st.st_blocks * 512} allocated), so not proven to be no copy")  # fmt: skip
                elif lookup is not None:
                    pending.append((path, sha256_file(path), st, sig))
                    report.bytes_hashed += st.st_size
            except OSError as exc:
                report.errors.append(f"{path}: {exc.strerror}")
                continue
            if lookup is None:
                _judge(report, path, st, None, sig, job, scratch)
            elif len(pending) >= CHUNK:
                settle()
    if pending:
        settle()
    return report


#: Files from this size on are hashed only if at least half of them is allocated on disk.
SPARSE_FROM = 1 << 20


def _sparse(st: os.stat_result) -> bool:
    """A mostly unallocated file (one byte written at 1 TiB): hashing it would read zeros for hours.

    No dataset file is stored sparse, so no copy of one is either (``cp`` keeps holes only
    where the source had them); it is reported unchecked, never silently passed.
    """
    return stat.S_ISREG(st.st_mode) and st.st_size >= SPARSE_FROM and st.st_blocks * 512 < st.st_size // 2


def _judge(report: ScanReport, path: Path, st: os.stat_result, copy_of: str | None, sig: str | None,
           job: JobContext, scratch: Sequence[str]) -> None:  # fmt: skip
    verdict = judge(
        copy_of=copy_of,
        signature=sig,
        changed=st.st_ctime,
        started=job.started,
        own_folder=_own_folder(path, scratch) if sig and scratch else None,
        size=st.st_size,
        existed=(st.st_dev, st.st_ino) in job.existed,
        modified=st.st_mtime,
    )
    if verdict is None:
        return
    reason = f"copy of dataset file {copy_of}" if copy_of is not None else str(sig)
    finding = Finding(
        str(path), reason, st.st_size, ours=verdict.kind is Kind.OURS, why=verdict.why,
        identity=(st.st_dev, st.st_ino, st.st_ctime_ns),
    )  # fmt: skip
    (report.preexisting if verdict.kind is Kind.PREEXISTING else report.findings).append(finding)


#: Files :func:`inventory` records at most: beyond that, the rest are protected only by their ctime.
INVENTORY_MAX = 1_000_000


def inventory(roots: Iterable[str | os.PathLike[str]], errors: list[str] | None = None) -> frozenset[tuple[int, int]]:
    """The (device, inode) of every file in ``roots`` now (no content read): what a job found there when it began.

    A user's file the job moves, renames or chmods gets a new ctime but keeps its inode:
    this is what still proves it was not the job's.  At most :data:`INVENTORY_MAX` files.
    """
    seen: set[tuple[int, int]] = set()
    errs = errors if errors is not None else []
    for root in roots:
        for path in _walk(Path(root).absolute(), set(), errs):
            if len(seen) >= INVENTORY_MAX:
                errs.append(f"more than {INVENTORY_MAX} files in the scan's folders: the rest are not inventoried")
                return frozenset(seen)
            with contextlib.suppress(OSError):  # gone meanwhile: nothing to protect
                st = path.lstat()
                seen.add((st.st_dev, st.st_ino))
    return frozenset(seen)


def purge(report: ScanReport) -> ScanReport:
    """Delete the findings proven to be the job's; everything else stays, listed as not purged.

    A file is deleted only if it is still the very file the scan judged (same device,
    inode and ctime): one replaced or changed since is left and reported.
    """
    done = []
    for f in report.findings:
        if not f.ours:
            done.append(f)
            continue
        try:
            st = os.lstat(f.path)
            if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino, st.st_ctime_ns) != f.identity:
                report.errors.append(f"{f.path}: changed since it was scanned: not purged")
                done.append(f)
                continue
            os.remove(f.path)
            done.append(dataclasses.replace(f, purged=True))
        except FileNotFoundError:
            done.append(dataclasses.replace(f, purged=True))
        except OSError as exc:
            report.errors.append(f"{f.path}: cannot purge: {exc.strerror}")
            done.append(f)
    report.findings = done
    return report
