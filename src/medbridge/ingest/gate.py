"""The ingest gate: every file typed by content, every DICOM file judged against an anonymisation profile.

The gate never crashes on a file and never follows a link: each file gets a report with
its media type and its issues (a rule it breaks, a truncation, a link, something
unreadable).  DICOM headers are parsed with large values deferred, so a file of
gigabytes costs a few reads and seeks.  Reasons name tags, never values.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast

import pydicom
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import BaseTag

from medbridge.errors import InvalidInput
from medbridge.ingest import media
from medbridge.ingest.profile import Profile, Requirement, value_text

#: Values larger than this are not read while judging a header (Pixel Data, above all).
DEFER = 1 << 20
PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
_UNDEFINED = 0xFFFFFFFF


@dataclass(frozen=True)
class Issue:
    """Why a file is refused; ``tag`` and ``keyword`` are None for problems of the whole file."""

    tag: str | None
    keyword: str | None
    reason: str

    def as_dict(self) -> dict[str, str | None]:
        return {"tag": self.tag, "keyword": self.keyword, "reason": self.reason}


@dataclass(frozen=True)
class FileReport:
    """One file: its path as shown (undecodable bytes as ``\\xNN``), media type, size and issues."""

    path: str
    media_type: str
    size: int | None
    issues: tuple[Issue, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.issues

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "media_type": self.media_type,
            "size": self.size,
            "passed": self.passed,
            "issues": [i.as_dict() for i in self.issues],
        }


@dataclass(frozen=True)
class GateReport:
    """Every file under a root; the tree passes when no file has an issue."""

    root: str
    profile: str
    files: tuple[FileReport, ...]

    @property
    def passed(self) -> bool:
        return all(f.passed for f in self.files)

    @property
    def failed(self) -> tuple[FileReport, ...]:
        return tuple(f for f in self.files if not f.passed)

    def as_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "profile": self.profile,
            "passed": self.passed,
            "file_count": len(self.files),
            "failed_count": len(self.failed),
            "media_types": dict(sorted(Counter(f.media_type for f in self.files).items())),
            "files": [f.as_dict() for f in self.files],
        }


def check_tree(root: Path, profile: Profile) -> GateReport:
    """Report on every entry under ``root``; links are reported and refused, never followed."""
    root = Path(root)
    try:
        st = root.lstat()
    except OSError as exc:
        raise InvalidInput(f"{root}: {exc.strerror}") from exc
    if stat.S_ISLNK(st.st_mode):
        raise InvalidInput(f"{root}: a symbolic link; give the folder it points to")
    if not stat.S_ISDIR(st.st_mode):
        raise InvalidInput(f"{root}: not a directory")
    reports: list[FileReport] = []

    def unreadable(exc: OSError) -> None:
        where = _shown(Path(exc.filename).relative_to(root).as_posix()) if exc.filename else "."
        reports.append(FileReport(where, "inode/directory", None, (_whole(f"cannot list folder: {exc.strerror}"),)))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        base = Path(dirpath)
        keep = []
        for name in dirnames:
            if (base / name).is_symlink():
                filenames.append(name)
            else:
                keep.append(name)
        dirnames[:] = sorted(keep)
        for name in filenames:
            path = base / name
            reports.append(_check(path, _shown(path.relative_to(root).as_posix()), profile))
    return GateReport(_shown(str(root)), profile.name, tuple(sorted(reports, key=lambda r: r.path)))


def check_file(path: Path, profile: Profile, shown: str | None = None) -> FileReport:
    """Type one file by content and, if it is DICOM, judge it against ``profile``; report it as ``shown``."""
    return _check(Path(path), _shown(shown if shown is not None else str(path)), profile)


@dataclass
class GateTally:
    """The gate's verdict on a stream of files in bounded memory: counts, and the first failures in full."""

    profile: str
    keep: int = 200
    files: int = 0
    failed_count: int = 0
    media_types: Counter[str] = field(default_factory=Counter)
    failed: list[FileReport] = field(default_factory=list)

    def add(self, report: FileReport) -> None:
        self.files += 1
        self.media_types[report.media_type] += 1
        if not report.passed:
            self.failed_count += 1
            if len(self.failed) < self.keep:
                self.failed.append(report)

    @property
    def passed(self) -> bool:
        return self.failed_count == 0


def check_dataset(ds: Dataset, profile: Profile) -> list[Issue]:
    """The profile's rules applied to a parsed data set, nested sequences included."""
    issues: list[Issue] = []
    _judge(ds, profile, issues, "")
    for rule in profile.rules:
        if rule.require in (Requirement.EQUAL, Requirement.PRESENT) and rule.tag.exact and rule.tag.value not in ds:
            problem = rule.problem(False, True, None)
            assert problem is not None
            issues.append(Issue(_tag(rule.tag.value), rule.keyword, problem))
    return issues


def _check(path: Path, shown: str, profile: Profile) -> FileReport:
    try:
        st = path.lstat()
    except OSError as exc:
        return FileReport(shown, media.OCTET_STREAM, None, (_whole(f"cannot examine: {exc.strerror}"),))
    kind = _inode(st.st_mode)
    if kind == "inode/symlink":
        return FileReport(shown, kind, None, (_whole("symbolic link: refused, not followed"),))
    if kind:
        return FileReport(shown, kind, None, (_whole("not a regular file"),))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        return FileReport(shown, media.OCTET_STREAM, st.st_size, (_whole(f"cannot open: {exc.strerror}"),))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            return FileReport(shown, _inode(st.st_mode) or "inode/unknown", None, (_whole("not a regular file"),))
        try:
            head = f.read(media.HEAD)
        except OSError as exc:
            return FileReport(shown, media.OCTET_STREAM, st.st_size, (_whole(f"cannot read: {exc.strerror}"),))
        kind = media.media_type(head, path.name)
        issues: list[Issue] = []
        if kind == media.DICOM:
            issues = _judge_file(f, st.st_size, profile, force=head[128:132] != b"DICM")
        elif head[:2] == b"\x1f\x8b":
            inner = media.gunzip_head(head) or b""
            if inner[128:132] == b"DICM" or media.is_raw_dicom(inner):
                issues = [_whole("gzip-compressed DICOM cannot be checked: store it uncompressed")]
    return FileReport(shown, kind, st.st_size, tuple(issues))


def _judge_file(f: BinaryIO, size: int, profile: Profile, *, force: bool) -> list[Issue]:
    """Parse a DICOM file's header (large values deferred) and judge it; any parse failure is an issue."""
    f.seek(0)
    guard = _Guarded(f, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(cast(BinaryIO, guard), defer_size=DEFER, force=force)
            issues = check_dataset(ds, profile)
            pixels = _pixel_issues(ds, profile)
        except InvalidDicomError as exc:
            return [_whole(f"not readable as DICOM: {exc}")]
        except Exception as exc:  # pydicom raises many types on malformed input: each one refuses the file
            return [_whole(f"not readable as DICOM ({type(exc).__name__})")]
    if guard.overrun or _short_values(ds):
        issues.insert(0, _whole("truncated: the file ends inside a data element"))
    return issues + pixels


def _judge(ds: Dataset, profile: Profile, issues: list[Issue], where: str) -> None:
    private_seen: set[int] = set()
    for tag in list(ds.keys()):
        keyword = keyword_for_tag(tag) or None
        if tag.is_private:
            if profile.forbid_private_tags and tag.group not in private_seen:
                private_seen.add(tag.group)
                issues.append(Issue(f"({tag.group:04X},xxxx)", None, f"private tags are forbidden{where}"))
            continue
        rule = profile.rule_for(tag)
        if rule is not None and not (rule.require in (Requirement.EQUAL, Requirement.PRESENT) and where):
            state = _state(ds, tag)
            if state is None:
                issues.append(Issue(_tag(tag), keyword, f"value cannot be decoded{where}"))
                continue
            problem = rule.problem(True, *state)
            if problem:
                issues.append(Issue(_tag(tag), keyword, problem + where))
                continue
        raw = ds.get_item(tag, keep_deferred=True)
        if raw is not None and raw.VR == "SQ":
            elem = _decode(ds, tag)
            if elem is None:
                issues.append(Issue(_tag(tag), keyword, f"sequence cannot be decoded{where}"))
                continue
            for number, item in enumerate(elem.value, 1):
                _judge(item, profile, issues, f" (in {keyword or _tag(tag)} item {number})")


def _state(ds: Dataset, tag: BaseTag) -> tuple[bool, str | None] | None:
    """``(empty, text)`` of an element without reading deferred values; None if it cannot be decoded."""
    raw = ds.get_item(tag, keep_deferred=True)
    if isinstance(raw, RawDataElement) and raw.value is None and raw.length not in (0, _UNDEFINED):
        return False, None
    elem = _decode(ds, tag)
    if elem is None:
        return None
    return elem.is_empty, value_text(elem.value)


def _decode(ds: Dataset, tag: BaseTag) -> DataElement | None:
    try:
        return ds[tag]
    except Exception:  # pydicom raises many types on a malformed value: the caller reports it
        return None


def _pixel_issues(ds: Dataset, profile: Profile) -> list[Issue]:
    found = [t for t in PIXEL_TAGS if t in ds]
    if not found:
        if profile.require_pixel_data:
            return [Issue("(7FE0,0010)", "PixelData", "no pixel data: not an image")]
        return []
    raw = ds.get_item(found[0], keep_deferred=True)
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if raw is None or found[0] != 0x7FE00010 or (syntax is not None and syntax.is_encapsulated):
        return []
    length = raw.length if isinstance(raw, RawDataElement) else len(raw.value or b"")
    if length == _UNDEFINED:
        return []
    dims = [_int(ds, k) for k in ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated")]
    if any(d is None for d in dims):
        return []
    rows, columns, samples, bits = cast(list[int], dims)
    frames = _int(ds, "NumberOfFrames") or 1
    expected = (rows * columns * samples * frames * bits + 7) // 8
    if length < expected:
        return [Issue("(7FE0,0010)", "PixelData", f"holds {length} bytes; Rows, Columns and frames need {expected}")]
    return []


def _int(ds: Dataset, keyword: str) -> int | None:
    tag = tag_for_keyword(keyword)
    elem = _decode(ds, BaseTag(tag)) if tag is not None and tag in ds else None
    if elem is None or elem.VM != 1:
        return None
    try:
        return int(elem.value)
    except (TypeError, ValueError):
        return None


def _short_values(ds: Dataset) -> bool:
    """Whether a top-level value was cut short by the end of the file."""
    for tag in list(ds.keys()):
        raw = ds.get_item(tag, keep_deferred=True)
        if not isinstance(raw, RawDataElement) or not isinstance(raw.value, bytes) or raw.length == _UNDEFINED:
            continue
        if len(raw.value) < raw.length:
            return True
    return False


class _Guarded(io.RawIOBase):
    """A read-only view of a file that notes any read or seek running past its end (a truncated file)."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        super().__init__()
        self._f = f
        self._size = size
        self.overrun = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        start = self._f.tell()
        data = self._f.read(size)
        if size > 0 and len(data) < size and start < self._size:
            self.overrun = True
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        position = self._f.seek(offset, whence)
        if position > self._size:
            self.overrun = True
        return position

    def tell(self) -> int:
        return self._f.tell()


def _inode(mode: int) -> str | None:
    """The ``inode/*`` type of anything but a regular file."""
    for test, kind in (
        (stat.S_ISLNK, "inode/symlink"),
        (stat.S_ISDIR, "inode/directory"),
        (stat.S_ISFIFO, "inode/fifo"),
        (stat.S_ISSOCK, "inode/socket"),
        (stat.S_ISCHR, "inode/chardevice"),
        (stat.S_ISBLK, "inode/blockdevice"),
    ):
        if test(mode):
            return kind
    return None if stat.S_ISREG(mode) else "inode/unknown"


def _whole(reason: str) -> Issue:
    return Issue(None, None, reason)


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _shown(path: str) -> str:
    """A path as text: bytes that are not UTF-8 become ``\\xNN``."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
