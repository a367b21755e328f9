"""What one user, job or connection can make the platform spend: sessions, handles, results.

Workers are separate processes, so what must hold across them is kept in small files
under locks the kernel releases when a process dies (``flock``): nothing to clean up
after a crash, nothing shared in memory.

- **Handles per user**: each worker counts the file and directory handles of each user
  over all the user's connections to it (:class:`HandleBudget`), besides each connection's
  ``max_open_handles``: descriptors are the worker's own, so a user's many sessions must
  not add up to all of them (:func:`handles_per_user`).
- **Sessions per user**: a session holds a lock on one of ``max_sessions_per_user``
  slot files of its user (``<home>/run/sessions/<user>/<n>``); no free slot, no session.
- **Results usage**: per user and per job, bytes (apparent sizes, so a sparse file counts
  whole) and entries (files and folders), in ``<results>/.medbridge-usage/<user>/``.  Every
  change that grows usage is checked against the quotas and recorded under the user's
  lock, in the same step as the change itself, so workers cannot together overshoot.  A
  missing record is recounted from the files; a crash between a write and its record
  leaves the record short by at most that one write.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from medbridge import descriptors

if TYPE_CHECKING:
    from medbridge.config import PlatformSettings

#: The block size ``statvfs`` answers in, and the longest name it reports.
STATVFS_BLOCK = 4096
NAME_MAX = 255
#: A usage record: bytes, entries.
_RECORD = struct.Struct("<qq")
#: The user's total, beside one file per job (job names start with a letter or digit).
_TOTAL = "_total"


class SessionSlots:
    """At most ``limit`` sessions per user, over every worker process of the platform."""

    def __init__(self, folder: Path, limit: int):
        self.folder = folder
        self.limit = limit

    def take(self, user: str) -> int | None:
        """A locked slot (a descriptor: close it to give the slot back), or None when all are held."""
        folder = self.folder / user
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        start = random.randrange(self.limit)  # a busy user's logins do not all try slot 0 first
        for i in range(self.limit):
            fd = os.open(folder / str((start + i) % self.limit), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return fd
        return None


@dataclass(frozen=True)
class Quota:
    """The results limits of ``platform.toml``."""

    user_bytes: int
    job_bytes: int
    user_entries: int
    job_entries: int
    file_size: int


class OverQuota(Exception):
    """A change would take a user or a job past a results limit; the message says which."""


class Committing(Exception):
    """A change to a job's results while a worker verifies its commit."""


#: Descriptors a session costs its worker besides its handles: the connection's socket, its
#: session slot, the user's and the job's usage records.
SESSION_DESCRIPTORS = 4


def handles_per_user(configured: int, descriptor_limit: int) -> int:
    """The handles one user may hold in one worker: ``max_open_handles_per_user`` when set (> 0),
    else a quarter of the worker's descriptors (:func:`medbridge.descriptors.share`)."""
    return configured if configured > 0 else descriptors.share(1, descriptor_limit)


def descriptor_shortfall(settings: PlatformSettings, descriptor_limit: int) -> str | None:
    """One line for the operator when the descriptor limit is below what the limits need; None when it is not.

    What they need: one user at ``max_sessions_per_user`` sessions of ``max_open_handles``
    each, all in one worker, within a quarter of the worker's descriptors.
    """
    s = settings
    handles = s.max_open_handles * s.max_sessions_per_user
    need = descriptors.needed(handles + s.max_sessions_per_user * SESSION_DESCRIPTORS, 1)
    if descriptor_limit >= need:
        return None
    per_user = handles_per_user(s.max_open_handles_per_user, descriptor_limit)
    return (f"descriptor limit {descriptor_limit} (ulimit -n, LimitNOFILE) is below the {need} the limits need "
            f"(max_sessions_per_user {s.max_sessions_per_user} x max_open_handles {s.max_open_handles} for one user "
            f"within a quarter of it): each user may hold at most {per_user} handles per worker "
            "(max_open_handles_per_user)")  # fmt: skip


class HandleBudget:
    """Handles each user holds in this worker process, over all the user's connections: at most ``limit``."""

    def __init__(self, limit: int):
        self.limit = limit
        self._held: dict[str, int] = {}

    def take(self, user: str) -> bool:
        held = self._held.get(user, 0)
        if held >= self.limit:
            return False
        self._held[user] = held + 1
        return True

    def give(self, user: str, count: int = 1) -> None:
        held = self._held.get(user, 0) - count
        if held > 0:
            self._held[user] = held
        else:
            self._held.pop(user, None)

    def held(self, user: str) -> int:
        return self._held.get(user, 0)


@dataclass
class Handles:
    """File and directory handles one connection holds, over all its SFTP sessions.

    Once the connection is a user's session, ``budget`` counts them against the user's too.
    """

    limit: int
    held: int = 0
    budget: HandleBudget | None = None
    user: str = ""

    def take(self) -> str | None:
        """Count one more handle; why not, when the connection or its user holds the most already."""
        if self.held >= self.limit:
            return f"the connection already holds {self.limit} open handles (max_open_handles); close some first"
        if self.budget is not None and not self.budget.take(self.user):
            return (f"user {self.user!r} already holds {self.budget.limit} open handles on this worker, over all "
                    "their connections (max_open_handles_per_user); close some first")  # fmt: skip
        self.held += 1
        return None

    def give(self) -> None:
        if self.held > 0:
            self.held -= 1
            if self.budget is not None:
                self.budget.give(self.user)

    def give_all(self) -> None:
        """The connection ended: whatever it still held goes back to its user."""
        if self.budget is not None and self.held:
            self.budget.give(self.user, self.held)
        self.held = 0


@dataclass
class Refusals:
    """Requests refused on one connection, over all its SFTP sessions.

    Each refusal is an audit row, and a client can ask for them as fast as it can send:
    past its budget the connection is closed (one row says so), so no key or certificate
    writes the audit without bound.  An enrolment key's SFTP requests are all refused, so
    it gets few; a job's own may probe (a payload testing for a file it may not write).
    """

    enrolment_limit: int = 256
    certificate_limit: int = 1024
    count: int = 0
    #: Whether the budget ran out and the connection was closed.
    spent: bool = False


class Usage:
    """Results usage of every user and job, shared by the platform's worker processes."""

    FOLDER = ".medbridge-usage"

    def __init__(self, root: Path, quota: Quota):
        self.root = root
        self.folder = root / self.FOLDER
        self.quota = quota

    def account(self, user: str) -> Account:
        return Account(self, user)

    def refused_after_hashing(self, user: str, job: str, *, add: bool = False) -> int:
        """How many of ``job``'s commits were refused once their files were hashed (``add``: one more).

        Call it holding :meth:`committing`: a count shared by every worker, kept beside the
        job's usage record (a name no job can have).
        """
        path = self.folder / user / f".refused-commits-{job}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            text = os.pread(fd, 32, 0)
            count = int(text) if text.strip().isdigit() else 0
            if add:
                count += 1
                os.pwrite(fd, str(count).encode().ljust(20), 0)
            return count
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def committing(self, user: str, job: str) -> Iterator[None]:
        """Hold ``job``'s record exclusively while its commit verifies: no worker changes the job meanwhile.

        Blocks until changes under way end; run it off the event loop (the commit threads do).
        """
        folder = self.folder / user
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = _open_record(folder / job)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


class Account:
    """One user's usage records, as one SFTP session uses them: opened once, locked per change.

    Cheap enough for every write: a lock, two 16-byte reads and writes, no allocation of
    messages unless a limit is reached.
    """

    def __init__(self, usage: Usage, user: str):
        self._usage = usage
        self._user = user
        self._total: int | None = None
        self._jobs: dict[str, int] = {}
        self._held: int | None = None

    def acquire(self, job: str) -> None:
        """Take the user's lock for a change of ``job``'s results (release it with :meth:`release`).

        The job's record is also held shared, so while a commit of the job verifies in any
        worker (it holds the record exclusively, :meth:`Usage.committing`) the change is
        refused: Committing.
        """
        total = self._total if self._total is not None else self._open_total()
        fcntl.flock(total, fcntl.LOCK_EX)
        try:
            fd = self._job(job)
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            fcntl.flock(total, fcntl.LOCK_UN)
            raise Committing(f"job {job!r}'s results are being committed and can no longer change") from None
        except BaseException:
            fcntl.flock(total, fcntl.LOCK_UN)
            raise
        self._held = fd

    def release(self) -> None:
        assert self._held is not None and self._total is not None
        fcntl.flock(self._held, fcntl.LOCK_UN)
        fcntl.flock(self._total, fcntl.LOCK_UN)
        self._held = None

    @contextlib.contextmanager
    def locked(self, job: str) -> Iterator[Account]:
        """:meth:`acquire` … :meth:`release` around a block."""
        self.acquire(job)
        try:
            yield self
        finally:
            self.release()

    def _open_total(self) -> int:
        folder = self._usage.folder / self._user
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = self._total = _open_record(folder / _TOTAL)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.fstat(fd).st_size < _RECORD.size:  # first use: count what is stored
                _write(fd, *count(self._usage.root / self._user))
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        return fd

    def _job(self, job: str) -> int:
        """The job's record (the user's lock held: a missing one is counted from the files)."""
        fd = self._jobs.get(job)
        if fd is None:
            fd = self._jobs[job] = _open_record(self._usage.folder / self._user / job)
            if os.fstat(fd).st_size < _RECORD.size:
                _write(fd, *count(self._usage.root / self._user / job))
        return fd

    def charge(self, job: str, size: int, entries: int, *, check: bool = True) -> None:
        """Add ``size`` bytes and ``entries`` entries (negative: give back); growth past a limit raises OverQuota."""
        assert self._held is not None and self._total is not None, "charge only while acquired"
        fd = self._jobs[job]
        job_bytes, job_entries = _read(fd)
        user_bytes, user_entries = _read(self._total)
        q = self._usage.quota
        if check and (
            (size > 0 and (job_bytes + size > q.job_bytes or user_bytes + size > q.user_bytes))
            or (entries > 0 and (job_entries + entries > q.job_entries or user_entries + entries > q.user_entries))
        ):
            raise OverQuota(self._why(job, size, entries, (job_bytes, job_entries), (user_bytes, user_entries)))
        _write(fd, max(job_bytes + size, 0), max(job_entries + entries, 0))
        _write(self._total, max(user_bytes + size, 0), max(user_entries + entries, 0))

    def _why(self, job: str, size: int, entries: int, used_job: tuple[int, int], used_user: tuple[int, int]) -> str:
        q, user = self._usage.quota, self._user
        for used, grow, limit, what in (
            (used_job[0], size, q.job_bytes, f"job {job!r} results quota (results_quota_per_job"),
            (used_user[0], size, q.user_bytes, f"user {user!r} results quota (results_quota_per_user"),
            (used_job[1], entries, q.job_entries, f"job {job!r} entry limit (results_max_entries_per_job"),
            (used_user[1], entries, q.user_entries, f"user {user!r} entry limit (results_max_entries_per_user"),
        ):
            if grow > 0 and used + grow > limit:
                return f"{what} = {limit}) reached: {used} used, {grow} more asked"
        raise AssertionError("no limit was passed")

    def statvfs(self, job: str) -> os.statvfs_result:
        """``statvfs`` as the job sees its results: its quotas and what is left of them.

        Never the file system's own figures: its size and free space are other users' business.
        Reads under the user's lock only, so it answers while the job's commit verifies.
        """
        total = self._total if self._total is not None else self._open_total()
        fcntl.flock(total, fcntl.LOCK_EX)
        try:
            job_bytes, job_entries = _read(self._job(job))
            user_bytes, user_entries = _read(total)
        finally:
            fcntl.flock(total, fcntl.LOCK_UN)
        q, b = self._usage.quota, STATVFS_BLOCK
        size = min(q.user_bytes, q.job_bytes)
        free = max(0, min(q.user_bytes - user_bytes, q.job_bytes - job_bytes))
        files = min(q.user_entries, q.job_entries)
        free_files = max(0, min(q.user_entries - user_entries, q.job_entries - job_entries))
        return os.statvfs_result((b, b, size // b, free // b, free // b, files, free_files, free_files,
                                  os.ST_NOSUID, NAME_MAX))  # fmt: skip

    def used(self, job: str) -> tuple[tuple[int, int], tuple[int, int]]:
        """(bytes, entries) recorded for the job, and for the user."""
        with self.locked(job):
            assert self._total is not None
            return _read(self._jobs[job]), _read(self._total)

    def close(self) -> None:
        for fd in [*self._jobs.values(), *([self._total] if self._total is not None else [])]:
            os.close(fd)
        self._jobs.clear()
        self._total = None


def count(folder: Path) -> tuple[int, int]:
    """(bytes, entries) below ``folder``: apparent sizes of regular files, every file and folder once."""
    size = entries = 0
    stack = [str(folder)]
    while stack:
        try:
            it = os.scandir(stack.pop())
        except (FileNotFoundError, NotADirectoryError):
            continue
        with it:
            for entry in it:
                st = entry.stat(follow_symlinks=False)
                entries += 1
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
                elif stat.S_ISREG(st.st_mode):
                    size += st.st_size
    return size, entries


def _open_record(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)


def _read(fd: int) -> tuple[int, int]:
    size, entries = _RECORD.unpack(os.pread(fd, _RECORD.size, 0))
    return int(size), int(entries)


def _write(fd: int, size: int, entries: int) -> None:
    if os.pwrite(fd, _RECORD.pack(size, entries), 0) != _RECORD.size:
        raise OSError(f"short write to the results usage record of descriptor {fd}")
