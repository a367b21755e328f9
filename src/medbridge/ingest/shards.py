"""Shards: many small files packed into plain tar files, each member one ranged read away.

The format, readable with the standard library alone:

* ``<prefix>-NNNNN.tar`` is an uncompressed POSIX (pax) tar file.  Members are regular
  files only, named by their dataset-relative path, mode 0444, owner 0, mtime 0, so the
  same files always give the same bytes.  A file is never split across shards; members
  are added in the order given until the next would take the shard's data past
  ``shard_size``, and a file larger than ``shard_size`` gets a shard of its own.
* ``<prefix>-NNNNN.tar.index.json`` is its index::

      {"format": "medbridge-shard/1", "shard": "shard-00000.tar", "size": 30720,
       "sha256": "<of the whole tar file>",
       "members": [{"name": "a/b.dcm", "offset": 1536, "size": 5120, "sha256": "…"}, …]}

  ``offset`` is where the member's *data* starts in the tar file (after its header), so
  reading one sample is ``seek(offset); read(size)`` and checking it is one SHA-256.

Both files are written under temporary names and renamed into place, the index last:
a shard whose index exists is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from medbridge.errors import AlreadyExists, IntegrityError, InvalidInput

FORMAT = "medbridge-shard/1"
INDEX_SUFFIX = ".index.json"
BLOCK = 512
CHUNK = 1 << 20

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")


class _Digest(Protocol):
    def update(self, data: bytes, /) -> None: ...


@dataclass(frozen=True)
class Member:
    """One file in a shard: its data is ``size`` bytes at ``offset`` in the tar file."""

    name: str
    offset: int
    size: int
    sha256: str


@dataclass(frozen=True)
class ShardInfo:
    """One written shard: the tar file, its index, its size and digest, and its members."""

    path: Path
    index_path: Path
    size: int
    sha256: str
    members: tuple[Member, ...]


def parse_size(text: str) -> int:
    """Bytes in ``"256MB"``, ``"1.5 GiB"``, ``"4096"``: KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB of 1024."""
    m = _SIZE.fullmatch(text)
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise InvalidInput(f"size {text!r}: expected a number and one of B, KB, MB, GB, TB, KiB, MiB, GiB, TiB")
    number = m.group(1)
    whole, _, fraction = number.partition(".")
    scale: int = 10 ** len(fraction)
    scaled = int(whole + fraction) * _UNITS[unit]
    if scaled % scale:
        raise InvalidInput(f"size {text!r} is not a whole number of bytes")
    return scaled // scale


def index_path(shard_path: Path) -> Path:
    """Where a shard's index lives: next to it, ``.index.json`` appended."""
    return shard_path.with_name(shard_path.name + INDEX_SUFFIX)


def pack(files: Sequence[tuple[str, Path]], out_dir: Path, shard_size: int, prefix: str = "shard") -> list[ShardInfo]:
    """Pack ``(name, path)`` pairs into shards in ``out_dir``; refuse links, odd names and existing shards."""
    if shard_size <= 0:
        raise InvalidInput(f"shard size must be positive, not {shard_size}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", prefix):
        raise InvalidInput(f"shard prefix {prefix!r}: use letters, digits, '.', '_' and '-'")
    sizes = []
    seen: set[str] = set()
    for name, path in files:
        check_name(name)
        if name in seen:
            raise InvalidInput(f"member name {name!r} is given twice")
        seen.add(name)
        sizes.append(_regular_size(Path(path)))
    for name in seen:
        parent = name.rpartition("/")[0]
        while parent:
            if parent in seen:
                raise InvalidInput(f"member name {parent!r} is a file and also the folder of {name!r}")
            parent = parent.rpartition("/")[0]
    groups: list[list[int]] = []
    total = 0
    for i, size in enumerate(sizes):
        if not groups or total + size > shard_size:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += size
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = [out_dir / f"{prefix}-{n:05d}.tar" for n in range(len(groups))]
    for target in targets:
        for p in (target, index_path(target)):
            if os.path.lexists(p):
                raise AlreadyExists(f"{p} already exists")
    return [_write_shard(target, [files[i] for i in group]) for target, group in zip(targets, groups, strict=True)]


def load_index(shard_path: Path) -> list[Member]:
    """The members of a shard, from its index; malformed indexes and unsafe names are refused."""
    path = index_path(Path(shard_path))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"cannot read shard index {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("members"), list):
        raise InvalidInput(f"{path}: not a {FORMAT} index")
    members = []
    for number, raw in enumerate(data["members"], 1):
        members.append(_member(raw, f"{path}: member {number}"))
    return members


def read_member(shard_path: Path, member: Member) -> bytes:
    """One member's bytes by a single ranged read, checked against its SHA-256."""
    with open(shard_path, "rb") as f:
        f.seek(member.offset)
        data = f.read(member.size)
    if len(data) != member.size:
        raise IntegrityError(f"{shard_path}: member {member.name!r} runs past the end of the shard")
    if hashlib.sha256(data).hexdigest() != member.sha256:
        raise IntegrityError(f"{shard_path}: member {member.name!r} does not match its SHA-256")
    return data


def extract(shard_path: Path, dest_dir: Path) -> list[Path]:
    """Extract every member into ``dest_dir``, byte for byte, verified; return the files written.

    The tar headers must agree with the index.  Names that would land outside
    ``dest_dir`` (absolute, ``..``, through a link in ``dest_dir``), links and special
    members are refused; existing files are not overwritten.  Each file is written under
    a temporary name and renamed once its SHA-256 is checked, so a member that fails
    never appears (those before it stay).
    """
    shard_path = Path(shard_path)
    members = load_index(shard_path)
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    by_name = {m.name: m for m in members}
    with tarfile.open(shard_path, "r:", encoding="utf-8", errors="strict") as tar:
        headers = tar.getmembers()
    for info in headers:
        check_name(info.name)
        if not info.isreg():
            raise InvalidInput(f"{shard_path}: member {info.name!r} is not a regular file")
        m = by_name.get(info.name)
        if m is None or (m.offset, m.size) != (info.offset_data, info.size):
            raise IntegrityError(f"{shard_path}: member {info.name!r} does not match the index")
    if len(headers) != len(members):
        raise IntegrityError(f"{shard_path}: the index lists {len(members)} members, the tar file {len(headers)}")
    written = []
    for m in members:
        target = _target(dest_dir, m.name)
        if os.path.lexists(target):
            raise AlreadyExists(f"{target} already exists")
        tmp = target.with_name(f".{target.name}.part-{os.getpid()}")
        try:
            with open(shard_path, "rb") as src, open(tmp, "xb") as out:
                _copy_checked(src, out, m, shard_path)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        written.append(target)
    return written


def check_name(name: str) -> None:
    """Refuse a member name that is not a plain relative path of UTF-8 text."""
    if not isinstance(name, str) or not name:
        raise InvalidInput("member name must be non-empty text")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(f"member name {name!r} is not valid UTF-8") from None
    parts = name.split("/")
    if name.startswith("/") or "\x00" in name or any(p in ("", ".", "..") for p in parts):
        raise InvalidInput(f"member name {name!r} must be a relative path without '.', '..' or empty parts")


def _write_shard(target: Path, files: Sequence[tuple[str, Path]]) -> ShardInfo:
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp_index = target.with_name(f".{target.name}{INDEX_SUFFIX}.tmp-{os.getpid()}")
    whole = hashlib.sha256()
    members = []
    try:
        with open(tmp, "xb") as out:
            offset = 0
            for name, path in files:
                member, offset = _add(out, whole, offset, name, Path(path))
                members.append(member)
            end = b"\0" * (2 * BLOCK)
            out.write(end)
            whole.update(end)
            offset += len(end)
            out.flush()
            os.fsync(out.fileno())
        index = {
            "format": FORMAT,
            "shard": target.name,
            "size": offset,
            "sha256": whole.hexdigest(),
            "members": [m.__dict__ for m in members],
        }
        with open(tmp_index, "x", encoding="utf-8") as out_index:
            json.dump(index, out_index, indent=1, ensure_ascii=False)
            out_index.write("\n")
            out_index.flush()
            os.fsync(out_index.fileno())
        os.replace(tmp, target)
        os.replace(tmp_index, index_path(target))
        _fsync_dir(target.parent)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_index.unlink(missing_ok=True)
    return ShardInfo(target, index_path(target), offset, whole.hexdigest(), tuple(members))


def _add(out: BinaryIO, whole: _Digest, offset: int, name: str, path: Path) -> tuple[Member, int]:
    """Append one member (header, data, padding); return it and the new end of the tar file."""
    with _open_regular(path) as src:
        size = os.fstat(src.fileno()).st_size
        info = tarfile.TarInfo(name)
        info.size = size
        info.mode = 0o444
        info.mtime = 0
        info.type = tarfile.REGTYPE
        header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "strict")
        out.write(header)
        whole.update(header)
        digest = hashlib.sha256()
        left = size
        while left:
            chunk = src.read(min(CHUNK, left))
            if not chunk:
                raise InvalidInput(f"{path}: file shrank while it was being packed")
            out.write(chunk)
            whole.update(chunk)
            digest.update(chunk)
            left -= len(chunk)
        pad = b"\0" * (-size % BLOCK)
        out.write(pad)
        whole.update(pad)
    data_offset = offset + len(header)
    return Member(name, data_offset, size, digest.hexdigest()), data_offset + size + len(pad)


def _open_regular(path: Path) -> BinaryIO:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot open ({exc.strerror}); links are not packed") from exc
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise InvalidInput(f"{path}: not a regular file")
    return f


def _regular_size(path: Path) -> int:
    try:
        st = path.lstat()
    except OSError as exc:
        raise InvalidInput(f"{path}: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise InvalidInput(f"{path}: not a regular file (links are not packed)")
    return st.st_size


def _member(raw: object, where: str) -> Member:
    if not isinstance(raw, dict) or set(raw) != {"name", "offset", "size", "sha256"}:
        raise InvalidInput(f"{where}: expected name, offset, size and sha256")
    name, offset, size, sha = raw["name"], raw["offset"], raw["size"], raw["sha256"]
    if not isinstance(name, str):
        raise InvalidInput(f"{where}: name must be text")
    check_name(name)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (offset, size)):
        raise InvalidInput(f"{where}: offset and size must be whole numbers")
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise InvalidInput(f"{where}: sha256 must be 64 lowercase hex digits")
    return Member(name, offset, size, sha)


def _target(dest: Path, name: str) -> Path:
    """Where ``name`` lands in ``dest``, creating folders; refuse anything that is a link or not a folder."""
    check_name(name)
    *folders, leaf = name.split("/")
    here = dest
    for part in folders:
        here = here / part
        try:
            st = here.lstat()
        except FileNotFoundError:
            here.mkdir()
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise InvalidInput(f"cannot extract {name!r}: {here} is not a folder (links are not followed)")
    return here / leaf


def _copy_checked(src: BinaryIO, out: BinaryIO, member: Member, shard_path: Path) -> None:
    src.seek(member.offset)
    digest = hashlib.sha256()
    left = member.size
    while left:
        chunk = src.read(min(CHUNK, left))
        if not chunk:
            raise IntegrityError(f"{shard_path}: member {member.name!r} runs past the end of the shard")
        digest.update(chunk)
        out.write(chunk)
        left -= len(chunk)
    if digest.hexdigest() != member.sha256:
        raise IntegrityError(f"{shard_path}: member {member.name!r} does not match its SHA-256")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
