"""``medbridge://``: an fsspec file system over the native loader (read datasets, write the job's results).

Registered through fsspec's ``fsspec.specs`` entry point, so inside ``medbridge job run``

    fsspec.open("medbridge://datasets/chest-ct/ct-001.nii").open().read()

works with nothing configured: the loader takes the platform, the pinned host key and
the job's agent from the job's environment.  The URL's path is the platform path
(``medbridge://datasets/NAME/…`` is ``/datasets/NAME/…``).

Datasets are read-only.  The one writable place is the job's own results folder
(``$MEDBRIDGE_RESULTS_URL``, i.e. ``medbridge://results/USER/JOB/…``): a file is written
under a ``.medbridge-part`` name, renamed when closed whole, and its SHA-256 is recorded
in the job's results ledger, from which ``job run`` commits it with the ``--outputs``
at teardown.  A file whose writer raised is never renamed nor recorded.  ``get`` writes
only into the job's scratch folder (``$MEDBRIDGE_SCRATCH``), which teardown wipes.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import asyncssh
from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

from medbridge.compute.session import connect
from medbridge.errors import AccessDenied, AccessRevoked, MedbridgeError, PlatformUnavailable
from medbridge.loader.client import Loader, Sample
from medbridge.loader.wire import Attrs
from medbridge.policy.manifest import PARTIAL_SUFFIX, RESULTS_MANIFEST, format_manifest
from medbridge.policy.paths import PathEscape, normalise

PROTOCOL = "medbridge"
#: Where ``job run`` keeps the lines (sha256, path) of results written through this file system.
LEDGER_ENV = "MEDBRIDGE_RESULTS_LEDGER"
#: The job's private scratch folder (wiped at teardown): the one place ``get`` writes to.
SCRATCH_ENV = "MEDBRIDGE_SCRATCH"
_PREFIX = re.compile(rf"^{PROTOCOL}:(?://)?/*")


def platform_path(url: str) -> str:
    """``medbridge://datasets/x``, ``medbridge:///datasets/x``, ``medbridge:/datasets/x`` (a path library's
    folding of the URL) and ``/datasets/x`` all name the platform path ``/datasets/x``."""
    path = _PREFIX.sub("/", os.fspath(url))
    try:
        return normalise(path)
    except PathEscape as exc:
        raise ValueError(f"{url}: {exc}") from None


class MedbridgeFileSystem(AbstractFileSystem):  # type: ignore[misc]
    """fsspec's interface over one :class:`~medbridge.loader.Loader` (one per process, fork-safe)."""

    protocol = PROTOCOL
    root_marker = "/"

    def __init__(
        self,
        loader: Loader | None = None,
        *,
        connections: int = 4,
        window: int = 64,
        ledger: str | None = None,
        scratch: str | None = None,
        environ: Mapping[str, str] | None = None,
        **storage_options: Any,
    ):
        super().__init__(**storage_options)
        env = os.environ if environ is None else environ
        self.loader = loader or Loader(connections=connections, window=window, environ=env)
        self.ledger = ledger if ledger is not None else env.get(LEDGER_ENV)
        self.scratch = scratch if scratch is not None else env.get(SCRATCH_ENV)
        ep = self.loader.endpoint
        self.results_root = f"/results/{ep.user}/{env['MEDBRIDGE_JOB_ID']}" if "MEDBRIDGE_JOB_ID" in env else None

    # -- paths ---------------------------------------------------------------------------

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        return platform_path(str(path))

    def unstrip_protocol(self, name: str) -> str:
        return f"{PROTOCOL}://{platform_path(name).lstrip('/')}"

    @classmethod
    def _parent(cls, path: str) -> str:
        return posixpath.dirname(platform_path(path))

    # -- reading -------------------------------------------------------------------------

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        path = self._strip_protocol(path)
        try:
            entries = self.loader.scandir(path)
        except (FileNotFoundError, NotADirectoryError):  # a file lists as itself, as in fsspec's other file systems
            info = self.info(path)
            if info["type"] == "directory":
                raise
            return [info] if detail else [info["name"]]
        out = [_entry(posixpath.join(path, name), attrs) for name, attrs in entries]
        return out if detail else [e["name"] for e in out]

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        path = self._strip_protocol(path)
        return _entry(path, self.loader.stat(path))

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        [data] = self.cat_ranges([path], [start], [end], on_error="raise")
        assert isinstance(data, bytes)
        return data

    def cat_ranges(
        self,
        paths: list[str],
        starts: int | list[int | None] | None,
        ends: int | list[int | None] | None,
        max_gap: int | None = None,
        on_error: str = "return",
        **kwargs: Any,
    ) -> list[bytes | Exception]:
        """Many ranges in flight at once (the loader's window), in order; an error stays in its place.

        A whole file (no start, no end) is one verified read; ranges follow Python's
        slices: negative bounds count from the end, a range past the end is cut there.
        """
        if not isinstance(paths, list):
            raise TypeError("paths must be a list")
        n = len(paths)
        starts_ = starts if isinstance(starts, list) else [starts] * n
        ends_ = ends if isinstance(ends, list) else [ends] * n
        if len(starts_) != n or len(ends_) != n:
            raise ValueError("paths, starts and ends must have the same length")
        samples: list[Sample | Exception] = []
        for p, s, e in zip(paths, starts_, ends_, strict=True):
            try:
                samples.append(self._sample(self._strip_protocol(p), s, e))
            except (OSError, ValueError, MedbridgeError) as exc:
                samples.append(exc)
        wanted = [s for s in samples if isinstance(s, Sample)]
        read = iter(self.loader.gather(wanted))
        out: list[bytes | Exception] = []
        for sample in samples:
            got: bytes | bytearray | Exception = next(read) if isinstance(sample, Sample) else sample
            if isinstance(got, Exception):
                if on_error == "raise":
                    raise got
                out.append(got)
            else:
                out.append(bytes(got))
        return out

    def _sample(self, path: str, start: int | None, end: int | None) -> Sample:
        if not start and end is None:
            return Sample(path)
        if (start or 0) < 0 or (end is not None and end < 0):
            size = self.size(path)
            start = max(0, size + start) if start is not None and start < 0 else start
            end = max(0, size + end) if end is not None and end < 0 else end
        start = start or 0
        return Sample(path, offset=start, size=None if end is None else max(0, end - start))

    def _open(
        self,
        path: str,
        mode: str = "rb",
        block_size: int | None = None,
        autocommit: bool = True,
        cache_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> AbstractBufferedFile:
        path = self._strip_protocol(path)
        if mode == "rb":
            return MedbridgeFile(self, path, mode, block_size or MedbridgeFile.DEFAULT_BLOCK_SIZE,
                                 cache_type=kwargs.pop("cache_type", "readahead"), cache_options=cache_options,
                                 **kwargs)  # fmt: skip
        if mode in ("wb", "xb"):
            rel = self._result_name(path)
            if mode == "xb" and self.exists(path):
                raise FileExistsError(f"{path} already exists")
            return ResultFile(self, path, rel, mode, block_size or ResultFile.DEFAULT_BLOCK_SIZE)
        raise ValueError(f"mode {mode!r}: medbridge:// reads ('rb') and writes new results ('wb', 'xb')")

    def get_file(self, rpath: str, lpath: str, callback: Any = None, outfile: Any = None, **kwargs: Any) -> None:
        """Copy one platform file into the job's scratch folder (nowhere else: teardown wipes it)."""
        rpath = self._strip_protocol(rpath)
        if outfile is None and not hasattr(lpath, "write"):
            target = self._scratch_target(lpath)
            if self.isdir(rpath):
                target.mkdir(parents=True, exist_ok=True)
                return
            data = self.cat_file(rpath)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}{PARTIAL_SUFFIX}")
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
            return
        sink: Any = outfile or lpath
        sink.write(self.cat_file(rpath))

    def _scratch_target(self, lpath: str) -> Path:
        if not self.scratch:
            raise PermissionError(f"{lpath}: get copies platform files only into the job's scratch "
                                  f"(${SCRATCH_ENV}, set by 'medbridge job run'), and none is set")  # fmt: skip
        scratch = Path(self.scratch).resolve()
        target = Path(os.path.realpath(lpath))
        if not target.is_relative_to(scratch):
            raise PermissionError(f"{lpath}: get copies platform files only into the job's scratch {scratch} "
                                  "(teardown wipes it); medical data may not stay elsewhere on the node")  # fmt: skip
        return target

    # -- writing -------------------------------------------------------------------------

    def _result_name(self, path: str) -> str:
        root = self.results_root
        if root is None or not path.startswith(root + "/"):
            where = f"medbridge:/{root}/" if root else "the job's results (inside 'medbridge job run')"
            raise PermissionError(f"{path}: read-only; medbridge:// writes only under {where}")
        rel = path[len(root) + 1 :]
        if rel == RESULTS_MANIFEST or rel.endswith(PARTIAL_SUFFIX):
            raise PermissionError(f"{path}: a name the job's commit keeps for itself")
        if not self.ledger:
            raise PermissionError(f"{path}: no results ledger (${LEDGER_ENV}): outside 'medbridge job run' "
                                  "nothing would commit the file")  # fmt: skip
        return rel

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        self.makedirs(path, exist_ok=True)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        path = self._strip_protocol(path)
        self._result_name(path + "/x")
        if not exist_ok and self.exists(path):
            raise FileExistsError(path)
        if path != self.results_root:  # the job's folder itself exists from the job's first login
            self.loader.run(_makedirs(self.loader, path))

    def rm(self, path: str, recursive: bool = False, maxdepth: int | None = None) -> None:
        raise PermissionError(f"{path}: medbridge:// never deletes (datasets are read-only, results are committed)")

    def rm_file(self, path: str) -> None:
        self.rm(path)

    def _rm(self, path: str) -> None:
        self.rm(path)

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:
        with self.open(path2, "wb") as f:
            f.write(self.cat_file(path1))

    def record(self, sha256: str, rel: str) -> None:
        """Add one whole result to the ledger ``job run`` commits from (one append: safe across processes)."""
        assert self.ledger is not None
        line = format_manifest([(sha256, rel)]).encode()
        fd = os.open(self.ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


def _entry(path: str, attrs: Attrs) -> dict[str, Any]:
    mode = attrs.permissions or 0
    kind = "directory" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "other"
    return {"name": path, "size": attrs.size if kind == "file" else 0, "type": kind,
            "mode": mode, "mtime": attrs.mtime}  # fmt: skip


class MedbridgeFile(AbstractBufferedFile):  # type: ignore[misc]
    """A read-only platform file: fsspec's buffered file with read-ahead, each miss one ranged read."""

    DEFAULT_BLOCK_SIZE = 1 << 20

    def _fetch_range(self, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        data: bytes = self.fs.loader.read_range(self.path, start, end - start)
        return data


class ResultFile(AbstractBufferedFile):  # type: ignore[misc]
    """A new result: streamed to ``<name>.medbridge-part``, renamed and recorded only when closed whole."""

    DEFAULT_BLOCK_SIZE = 4 << 20

    def __init__(self, fs: MedbridgeFileSystem, path: str, rel: str, mode: str, block_size: int):
        super().__init__(fs, path, mode, block_size)
        self.rel = rel
        self.digest = hashlib.sha256()
        self._remote: Any = None
        self._writer: _Writer | None = None

    def _initiate_upload(self) -> None:
        self._writer = _Writer(self.fs.loader)
        self._remote = self.fs.loader.run(self._writer.open(self.path + PARTIAL_SUFFIX, self.fs.results_root))

    def _upload_chunk(self, final: bool = False) -> bool:
        assert self._writer is not None
        data: bytes = self.buffer.getvalue()  # type: ignore[attr-defined]
        self.digest.update(data)
        self.fs.loader.run(self._writer.write(self._remote, data, self.offset))
        if final:
            self.fs.loader.run(self._writer.commit(self._remote, self.path + PARTIAL_SUFFIX, self.path))
            self.fs.record(self.digest.hexdigest(), self.rel)
        return True

    def discard(self) -> None:
        """Drop what was written (a writer that raised): never renamed, never recorded."""
        if self._writer is not None:
            self.fs.loader.run(self._writer.abandon(self._remote, self.path + PARTIAL_SUFFIX))
        self.buffer = None
        self.closed = True

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if e is not None and not self.closed:
            self.discard()
        else:
            self.close()


class _Writer:
    """One result's upload: an SFTP session of its own on the loader's event loop."""

    def __init__(self, loader: Loader):
        self.loader = loader
        self.conn: asyncssh.SSHClientConnection | None = None
        self.sftp: asyncssh.SFTPClient | None = None

    async def open(self, part: str, root: str) -> Any:
        self.conn = await _connect(self.loader)
        self.sftp = await self.conn.start_sftp_client()
        parent = posixpath.dirname(part)
        try:
            if parent != root:  # the job's folder itself exists from the job's first login
                await self.sftp.makedirs(parent, exist_ok=True)
            return await self.sftp.open(part, "wb")
        except asyncssh.SFTPError as exc:
            self._end()
            raise _os_error(part, exc) from exc

    async def write(self, remote: Any, data: bytes, offset: int) -> None:
        try:
            await remote.write(data, offset)
        except asyncssh.SFTPError as exc:
            self._end()
            raise _os_error(remote, exc) from exc

    async def commit(self, remote: Any, part: str, final: str) -> None:
        assert self.sftp is not None
        try:
            await remote.close()
            await self.sftp.posix_rename(part, final)
        except asyncssh.SFTPError as exc:
            raise _os_error(final, exc) from exc
        finally:
            self._end()

    async def abandon(self, remote: Any, part: str) -> None:
        if self.sftp is not None:
            try:
                await remote.close()
                await self.sftp.remove(part)
            except asyncssh.SFTPError:
                pass  # a part file is never committed: what is left of it is inert
        self._end()

    def _end(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn = self.sftp = None


async def _makedirs(loader: Loader, path: str) -> None:
    async with await _connect(loader) as conn, conn.start_sftp_client() as sftp:
        try:
            await sftp.makedirs(path, exist_ok=True)
        except asyncssh.SFTPError as exc:
            raise _os_error(path, exc) from exc


async def _connect(loader: Loader) -> asyncssh.SSHClientConnection:
    try:
        return await connect(loader.endpoint)
    except AccessDenied as exc:
        raise AccessRevoked(str(exc)) from exc
    except PlatformUnavailable as exc:
        raise ConnectionError(str(exc)) from exc


def _os_error(path: object, exc: asyncssh.SFTPError) -> OSError:
    if isinstance(exc, asyncssh.SFTPPermissionDenied):
        return PermissionError(f"{path}: {exc.reason}")
    if isinstance(exc, asyncssh.SFTPNoSuchFile):
        return FileNotFoundError(f"{path}: {exc.reason}")
    return OSError(f"{path}: {exc.reason}")
