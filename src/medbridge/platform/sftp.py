"""SFTP handlers: the job's virtual namespace over the platform's storage.

Every request goes through one hook, :meth:`JobSFTPServer._resolve`: parse the
virtual path, let pure policy decide, map it to storage, and check that the real
path (symlinks resolved) stays under the root it was parsed under.  Refusals are
SFTP errors and audit events; nothing below the hook decides anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import inspect
import logging
import os
import stat
import struct
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import asyncssh
from asyncssh import SFTPAttrs, SFTPName
from asyncssh.constants import (
    FILEXFER_TYPE_DIRECTORY,
    FILEXFER_TYPE_REGULAR,
    FILEXFER_TYPE_SPECIAL,
    FILEXFER_TYPE_SYMLINK,
    FX_PERMISSION_DENIED,
    FXP_HANDLE,
    FXP_STATUS,
)
from asyncssh.sftp import MAX_SFTP_PACKET_LEN

from medbridge import fastpath
from medbridge.control.audit import AuditEvent, escape_text, needs_escape
from medbridge.errors import InvalidInput, MedbridgeError
from medbridge.platform.limits import Account, Committing, Handles, OverQuota, Refusals, Usage
from medbridge.platform.metrics import process_metrics
from medbridge.platform.requests import (
    FAST_EXTENSIONS,
    PASSED_EXTENSIONS,
    SERVED_TYPES,
    Held,
    RequestFilter,
    realpath_request,
)
from medbridge.policy.manifest import (
    DATASET_MANIFEST,
    MANIFEST_INDEX,
    PARTIAL_SUFFIX,
    RESULTS_MANIFEST,
    parse_manifest,
)
from medbridge.policy.paths import Action, Kind, PathEscape, Refusal, Target, decide, normalise, parse, within
from medbridge.processes import sha256_file

log = logging.getLogger("medbridge.platform")

if TYPE_CHECKING:
    from medbridge.platform.audit import AuditSink
    from medbridge.platform.server import LiveSession

#: The platform's one SFTP extension (READ_FILE_EXTENSION): ``length`` bytes of a file from
#: ``offset`` in one request, fewer only where the file ends.  A small file then costs one
#: request, one reply and one audit row instead of four requests (open, fstat, read, close)
#: and two rows.
MAX_READ = 4 << 20  # the most bytes one request returns, by READ or by the extension
_WRITE_FLAGS = asyncssh.FXF_WRITE | asyncssh.FXF_APPEND | asyncssh.FXF_CREAT | asyncssh.FXF_TRUNC
_NO_WRITE_BITS = ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
#: The largest file offset the kernel takes (``off_t``); a request past it reads or writes nothing anywhere.
MAX_OFFSET = (1 << 63) - 1
#: Unsent replies an SFTP channel may hold (its client's window closed) before requests with large replies wait.
REPLY_HIGH_WATER = 1 << 20
_T = TypeVar("_T")


def _attrs(st: os.stat_result, *, read_only: bool) -> SFTPAttrs:
    """What a client may know of a file: size, type, mode and times; owner 0 (never the platform's users).

    Built directly rather than by ``SFTPAttrs.from_local``, which looks up user and
    group names on every call: a cost per stat that the names here never use.
    """
    mode = st.st_mode & _NO_WRITE_BITS if read_only else st.st_mode
    kind = (
        FILEXFER_TYPE_REGULAR if stat.S_ISREG(mode)
        else FILEXFER_TYPE_DIRECTORY if stat.S_ISDIR(mode)
        else FILEXFER_TYPE_SYMLINK if stat.S_ISLNK(mode)
        else FILEXFER_TYPE_SPECIAL
    )  # fmt: skip
    return SFTPAttrs(type=kind, size=st.st_size, uid=0, gid=0, permissions=mode,
                     atime=int(st.st_atime), mtime=int(st.st_mtime))  # fmt: skip


class Backlog:
    """The unsent replies of one SFTP channel, as its session hears of them (``pause_writing``/``resume_writing``).

    Past the channel's high-water mark (:data:`REPLY_HIGH_WATER`) the requests whose replies
    can be larger than they are (reads, listings, attributes) wait for room before they are
    served.  asyncssh serves a channel's requests one at a time, so a client that stops reading
    its replies stalls only its own session, and holds at most the mark and one reply.
    """

    def __init__(self) -> None:
        self._room = asyncio.Event()
        self._room.set()
        self._why: set[str] = set()

    @property
    def full(self) -> bool:
        return not self._room.is_set()

    def pause(self, why: str = "channel") -> None:
        """No room, for ``why``: the channel's buffer, or the replies the audit holds (:class:`AuditGate`)."""
        self._why.add(why)
        self._room.clear()

    def resume(self, why: str = "channel") -> None:
        self._why.discard(why)
        if not self._why:
            self._room.set()

    async def room(self) -> None:
        await self._room.wait()

    async def after(self, reply: Callable[[], _T | Awaitable[_T]]) -> _T:
        """``reply()``, once there is room."""
        await self._room.wait()
        return await _answer(reply)


async def _answer(reply: Callable[[], _T | Awaitable[_T]]) -> _T:
    """``reply()``, awaited if it is awaitable (a server method may answer either way)."""
    result = reply()
    return await result if inspect.isawaitable(result) else result


async def _committed(entry: asyncio.Future[str | None] | None) -> None:
    """Return once ``entry`` (an audit entry a request depends on) is committed; refuse if it could not be."""
    if entry is not None and await entry is not None:
        raise asyncssh.SFTPPermissionDenied(AUDIT_REFUSED)


def _after(entry: asyncio.Future[str | None] | None, reply: Callable[[], _T | Awaitable[_T]]) -> _T | Awaitable[_T]:
    """``reply()`` now if ``entry`` is settled (refused if it failed), else once it is committed."""
    if entry is None or entry.done():
        if entry is not None and entry.result() is not None:
            raise asyncssh.SFTPPermissionDenied(AUDIT_REFUSED)
        return reply()
    return _after_commit(entry, reply)


async def _after_commit(entry: asyncio.Future[str | None], reply: Callable[[], _T | Awaitable[_T]]) -> _T:
    await _committed(entry)
    return await _answer(reply)


@dataclass
class OpenFile:
    """A handle the client holds, with the counters its close is audited with."""

    fd: int
    path: str
    writable: bool
    read_only_view: bool
    job_root: str | None = None
    #: The job whose results it holds open (quota; for a writable handle also the frozen check).
    job: str | None = None
    append: bool = False
    bytes_written: int = 0
    opened: float = field(default_factory=time.monotonic)
    write_failed: bool = False
    #: What its open did to the file ("created", "truncated"), if anything: a refused open cannot undo it.
    made: str = ""
    #: Its open's audit entry: no request on the handle is served before it is committed (None: nothing waits).
    granted: asyncio.Future[str | None] | None = field(default=None, repr=False)
    _bytes_read: int = field(default=0, init=False, repr=False)

    @property
    def ready(self) -> bool:
        """Whether its open is in the audit (the fast path's READ in place serves only such a handle)."""
        g = self.granted
        return g is None or (g.done() and g.result() is None)

    @property
    def bytes_read(self) -> int:
        """Bytes sent from it: its close is audited with them, and each addition is counted as served.

        Both paths add here (``JobSFTPServer.read``, and ``medbridge.fastpath``'s READ in place).
        """
        return self._bytes_read

    @bytes_read.setter
    def bytes_read(self, value: int) -> None:
        process_metrics().sent(self.path, value - self._bytes_read)
        self._bytes_read = value


class Results:
    """The results storage and its commits: a committed job folder is frozen.

    A commit is the rename of a staged file onto ``MANIFEST.sha256``: the platform
    first checks every hash it names.  While that runs the job is held against every
    worker's changes (:meth:`Usage.committing`: they are refused), and once the manifest
    is in place nothing in the folder can change.  Verification has threads of its own, so no number of
    commits can delay enforcement or the audit.

    Hashing is the one cost a job can make the platform pay at will (a sparse file of the
    quota's size reads as fast as memory, its holes hashed too), so it is bounded twice: a
    user's commits verify one at a time in each worker (another user's find a thread
    free), and a job whose commits were refused :data:`MAX_REFUSED_AFTER_HASHING` times
    once hashed cannot commit any more.
    """

    MAX_ENTRIES = 100_000
    #: Commits of one job refused after their files were hashed (a wrong SHA-256) before its commits are refused unread.
    MAX_REFUSED_AFTER_HASHING = 3

    def __init__(self, root: str, usage: Usage, workers: int = 2):
        self.root = root
        self.usage = usage
        self._committing: set[str] = set()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="medbridge-commit")
        #: One commit verifying at a time per user in this worker, and how many wait for it.
        self._users: dict[str, tuple[asyncio.Lock, int]] = {}

    def job_root(self, user: str, job: str) -> str:
        return os.path.join(self.root, user, job)

    def frozen(self, job_root: str) -> bool:
        return job_root in self._committing or os.path.lexists(os.path.join(job_root, RESULTS_MANIFEST))

    async def commit(self, user: str, job: str, staged: str, final: str) -> tuple[int, int, str] | str:
        """Verify ``staged`` against the job's folder and rename it onto ``final``; why not, if refused."""
        job_root = self.job_root(user, job)
        if self.frozen(job_root):
            return "the job's results are already committed"
        self._committing.add(job_root)
        lock, waiting = self._users.get(user) or (asyncio.Lock(), 0)
        self._users[user] = (lock, waiting + 1)
        try:
            async with lock:  # the user's previous commit in this worker first: other users' take the other threads
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(self._pool, self._commit, user, job, staged, final)
        finally:
            self._committing.discard(job_root)
            lock, waiting = self._users[user]
            if waiting == 1:
                del self._users[user]
            else:
                self._users[user] = (lock, waiting - 1)

    def _commit(self, user: str, job: str, staged: str, final: str) -> tuple[int, int, str] | str:
        """In a commit thread: with the job held against every worker's changes, verify, then rename."""
        job_root, quota, most = self.job_root(user, job), self.usage.quota, self.MAX_REFUSED_AFTER_HASHING
        with self.usage.committing(user, job):
            if os.path.lexists(os.path.join(job_root, RESULTS_MANIFEST)):
                return "the job's results are already committed"
            if self.usage.refused_after_hashing(user, job) >= most:
                return (f"the job's commits were refused {most} times after hashing (a wrong SHA-256): "
                        "it can no longer commit")  # fmt: skip
            verdict = verify_results(job_root, staged, self.MAX_ENTRIES, quota.file_size, quota.job_bytes)
            if isinstance(verdict, Mismatch):
                left = most - self.usage.refused_after_hashing(user, job, add=True)
                then = f"{left} more such refusal{'s' if left != 1 else ''} and" if left > 0 else "now"
                return f"{verdict} ({then} the job can no longer commit)"
            if not isinstance(verdict, str):
                os.replace(staged, final)
            return verdict

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _dir_attrs(mtime: int) -> SFTPAttrs:
    return SFTPAttrs(
        type=FILEXFER_TYPE_DIRECTORY,
        size=0,
        uid=0,
        gid=0,
        permissions=stat.S_IFDIR | 0o555,
        atime=mtime,
        mtime=mtime,
        nlink=2,
    )


class JobSFTPServer(asyncssh.SFTPServer):
    """One SFTP session of a job certificate; ``session`` is ``None`` for anything else.

    Every public method of asyncssh's ``SFTPServer`` is overridden here or named in
    :data:`REFUSED` (refused and audited) or :data:`NOT_REQUESTS`; a test fails on a new one.
    ``map_path`` itself refuses: a base method that maps a client's path reaches nothing.
    """

    #: Base methods that serve nothing here: each refuses, audited.
    REFUSED = frozenset({"map_path", "reverse_map_path", "open56", "lock", "unlock"})
    #: Base members that are not requests: accessors of the session, and formatting of what a listing returns.
    NOT_REQUESTS = frozenset({"channel", "connection", "env", "logger", "convert_attrs", "format_longname"})
    #: The most bytes one read returns (said in the limits reply and the read-file extension).
    max_read = MAX_READ

    def __init__(
        self,
        chan: asyncssh.SSHServerChannel[bytes],
        session: LiveSession | None,
        record: Callable[[AuditEvent], object],
        results: Results,
        catalogue: Callable[[str, int], Awaitable[tuple[Path, Path]]],
        handles: Handles | None = None,
        refusals: Refusals | None = None,
        sink: AuditSink | None = None,
    ):
        super().__init__(chan)
        self._session = session
        self.metrics = process_metrics()
        self._record = record
        #: Where decisions are pledged (see :meth:`_durable`); None: only recorded (a test's bare server).
        self._sink = sink
        #: On the fast path, holds the replies until their decisions are committed (see :meth:`reply_gate`).
        self._gate: AuditGate | None = None
        #: The commits this request's decisions wait on (asyncssh serves a session's requests one at a time).
        self._pledged: list[Awaitable[str | None]] = []
        self._results = results
        #: Handles open on this session's connection, shared with its other SFTP sessions.
        self.handles = handles or Handles(limit=256)
        #: Requests refused on this session's connection, shared with its other SFTP sessions.
        self.refusals = refusals or Refusals()
        self._results_root = results.root
        self._catalogue = catalogue
        self._started = int(time.time())
        self._open: set[int] = set()
        #: Requests the session's RequestFilter held back, by the path only it can name (see realpath).
        self.held: dict[bytes, Held] = {}
        #: Handles on results files, by descriptor: each holds its file with a shared ``flock`` (see :meth:`_let_go`).
        self._held_results: dict[int, OpenFile] = {}
        self._real_roots: dict[str, str] = {}
        self._usage: Account | None = None
        #: The channel's unsent replies, once :class:`PlatformSession` started the session.
        self.backlog = Backlog()

    @property
    def congested(self) -> bool:
        """Whether the channel holds more unsent replies than it may: a reply waits for room (:class:`Backlog`)."""
        return self.backlog.full

    @property
    def _login(self) -> asyncio.Future[str | None] | None:
        """The session's login entry: nothing the session asks is answered before it is committed."""
        return self._session.login if self._session is not None else None

    def _paced(self, reply: Callable[[], _T | Awaitable[_T]]) -> _T | Awaitable[_T]:
        """``reply()`` now, or once the login is committed and the unsent replies are back under the mark."""
        return _after(self._login, lambda: self.backlog.after(reply) if self.backlog.full else reply())

    # -- the one hook ------------------------------------------------------------------

    def _refuse(self, path: str, op: str, refusal: Refusal, reason: str, *, told: str | None = None) -> NoReturn:
        """Audit a refusal (counted against the connection's budget) and raise it; ``told``: what the client reads."""
        s = self._session
        budget = self.refusals
        budget.count += 1
        limit = budget.certificate_limit if s else budget.enrolment_limit
        if budget.count > limit:
            self._spent(limit, op)
        self._record(
            AuditEvent(
                actor=s.user if s else "?",
                action="sftp.refused",
                outcome="refused",
                subject=_subject(path),
                detail={"op": op, "reason": reason, **(s.identity() if s else {})},
            )
        )
        shown = escape_text(path) if needs_escape(path) else path  # the reply is UTF-8 too
        if told is not None:
            raise asyncssh.SFTPPermissionDenied(told)
        if refusal is Refusal.NOT_FOUND:
            raise asyncssh.SFTPNoSuchFile(f"{shown}: no such file")
        if refusal is Refusal.LIMIT:
            raise asyncssh.SFTPQuotaExceeded(f"{shown}: {reason}")
        if refusal is Refusal.UNSUPPORTED:
            raise asyncssh.SFTPOpUnsupported(f"{op}: {reason}")
        raise asyncssh.SFTPPermissionDenied(f"{shown}: permission denied ({reason})")

    def _spent(self, limit: int, op: str) -> NoReturn:
        """The connection's refusal budget ran out: one audit row says so, and the connection is closed."""
        s = self._session
        if not self.refusals.spent:
            self.refusals.spent = True
            why = f"too many refused requests on one connection ({limit}): the connection is closed"
            self._record(
                AuditEvent(actor=s.user if s else "?", action="sftp.refused", outcome="refused", subject="",
                           detail={"op": op, "reason": why, **(s.identity() if s else {})})
            )  # fmt: skip
            log.warning("closing a connection of %s: %s", s.user if s else "an enrolment key", why)
            conn, loop = self.channel.get_connection(), asyncio.get_running_loop()

            def disconnect() -> None:
                conn.disconnect(asyncssh.DISC_BY_APPLICATION, "too many refused requests")

            loop.call_soon(loop.call_soon, disconnect)  # after this pass's replies (this one's too) have left
        raise asyncssh.SFTPPermissionDenied("too many refused requests: the connection is closed")

    def refuse_request(self, op: str, reason: str) -> NoReturn:
        """Refuse and audit a request that names no path (an extension the platform does not serve)."""
        self._refuse("", op, Refusal.UNSUPPORTED, reason)

    # -- asyncssh's own file system: never ------------------------------------------------

    def map_path(self, path: bytes) -> bytes:
        """Refused: every request is mapped by :meth:`_resolve`; asyncssh's mapping would name the host's files."""
        self._refuse(os.fsdecode(path), "map_path", Refusal.DENIED, "not a request the platform serves")

    def reverse_map_path(self, path: bytes) -> bytes:
        self._refuse(os.fsdecode(path), "reverse_map_path", Refusal.DENIED, "not a request the platform serves")

    def open56(self, path: bytes, desired_access: int, flags: int, attrs: SFTPAttrs) -> NoReturn:
        self._refuse(os.fsdecode(path), "open56", Refusal.UNSUPPORTED, "SFTP version 5 and 6 opens are not served")

    def lock(self, file_obj: object, offset: int, length: int, flags: int) -> NoReturn:
        self.refuse_request("lock", "byte-range locks are not served")

    def unlock(self, file_obj: object, offset: int, length: int) -> NoReturn:
        self.refuse_request("unlock", "byte-range locks are not served")

    # -- limits ------------------------------------------------------------------------

    def take_handle(self, vpath: str, op: str) -> None:
        """Count one more open handle, or refuse: the connection or its user holds the most (limits.Handles)."""
        why = self.handles.take()
        if why is not None:
            self._refuse(vpath, op, Refusal.LIMIT, why)

    def give_handle(self) -> None:
        self.handles.give()

    def _writable(self, f: OpenFile, op: str) -> str:
        """The job a change through ``f`` charges; refused (and audited) unless the handle may still change."""
        if not f.writable or f.job is None:
            self._refuse(f.path, op, Refusal.DENIED, "opened read-only")
        if f.job_root and self._results.frozen(f.job_root):
            self._refuse(f.path, op, Refusal.DENIED, "the job's results are committed and can no longer change")
        assert f.job is not None
        return f.job

    def _too_large(self, vpath: str, op: str, end: int) -> None:
        limit = self._results.usage.quota.file_size
        if end > limit:
            self._refuse(vpath, op, Refusal.LIMIT, f"a result file may not grow past {limit} bytes "
                         f"(results_max_file_size): {end} asked")  # fmt: skip

    @contextlib.contextmanager
    def _charged(self, vpath: str, op: str, job: str, measure: Callable[[], tuple[int, int]]) -> Iterator[None]:
        """Run a change of ``job``'s results under the user's lock, charged to its quota first.

        ``measure`` says, under the lock, what the change will add (bytes, entries; negative:
        give back); past a limit it is refused.  The lock is held across the change, so what
        several workers do for one user is checked and recorded one change at a time, and a
        change that raises is not charged.
        """
        account = self._account()
        try:
            with account.locked(job):
                size, entries = measure()
                try:
                    account.charge(job, size, entries)
                except OverQuota as exc:
                    self._refuse(vpath, op, Refusal.LIMIT, str(exc))
                try:
                    yield
                except BaseException:
                    account.charge(job, -size, -entries, check=False)
                    raise
        except Committing as exc:
            self._refuse(vpath, op, Refusal.DENIED, str(exc))

    def _account(self) -> Account:
        if self._usage is None:
            assert self._session is not None
            self._usage = self._results.usage.account(self._session.user)
        return self._usage

    def _resize(self, f: OpenFile, op: str, start: int, length: int, change: Callable[[], int]) -> int:
        """Run ``change``: a write of ``length`` bytes at ``start``, or (``length`` -1) a truncate to ``start``.

        Its growth is charged first, under the user's lock (which every change of the user's
        results holds, in every worker), and corrected by what it did: a short write, an
        append, a full disk.  ``change`` returns the bytes written (a truncate: 0).
        """
        job = self._writable(f, op)
        account = self._account()
        try:
            account.acquire(job)
        except Committing as exc:
            self._refuse(f.path, op, Refusal.DENIED, str(exc))
        try:
            before = os.fstat(f.fd).st_size
            truncate = length < 0
            if f.append and not truncate:  # O_APPEND writes at the end, whatever the offset
                start = before
            end = start if truncate else start + length
            self._too_large(f.path, op, end)
            growth = end - before if truncate else max(end - before, 0)
            try:
                account.charge(job, growth, 0, check=growth > 0)
            except OverQuota as exc:
                self._refuse(f.path, op, Refusal.LIMIT, str(exc))
            after = before  # unless the change happens
            try:
                done = change()
                after = start if truncate else max(before, start + done)
            finally:
                if after - before != growth:
                    account.charge(job, after - before - growth, 0, check=False)
            return done
        finally:
            account.release()

    def _resolve(self, raw: bytes, action: Action, op: str) -> tuple[Target, str | None]:
        """Decide and map one path; returns the target and its real path (None if virtual)."""
        text = os.fsdecode(raw)  # bytes that are not UTF-8 stay recoverable in the audit (escaped there)
        s = self._session
        if s is None:
            self._refuse(text, op, Refusal.DENIED, "only job-certificate sessions get data")
        malformed = _malformed(raw)
        if malformed:
            self._refuse(text, op, Refusal.DENIED, malformed)
        try:
            vpath = normalise(text)
        except PathEscape as exc:
            self._refuse(text, op, Refusal.DENIED, str(exc))
        target = parse(vpath)
        verdict = decide(s.view, target, action)
        if not verdict.allowed:
            assert verdict.refusal is not None
            self._refuse(vpath, op, verdict.refusal, verdict.reason)
        root = self._root(s, target)
        if root is None:
            return target, None
        if target.kind is Kind.RESULTS_USER:
            return target, root
        if action is Action.WRITE and target.kind is Kind.RESULT:
            if target.rest == (RESULTS_MANIFEST,) and op != "commit":
                self._refuse(vpath, op, Refusal.DENIED, "the results manifest is written only by committing (rename)")
            if self._results.frozen(root):
                self._refuse(vpath, op, Refusal.DENIED, "the job's results are committed and can no longer change")
        real = os.path.join(root, *target.rest) if target.rest else root
        resolved = os.path.realpath(real)
        real_root = self._real_roots.get(root) or os.path.realpath(root)
        if target.kind is Kind.DATASET:  # platform storage, fixed while served: resolved once per session
            self._real_roots[root] = real_root
        if not within(real_root, resolved):
            self._refuse(vpath, op, Refusal.DENIED, "resolves outside its root (symlink)")
        if op in ("lstat", "remove", "rename") and os.path.islink(real):
            return target, real
        return target, resolved

    def _root(self, s: LiveSession, target: Target) -> str | None:
        if target.kind is Kind.DATASET:
            root = s.roots.get(target.name or "")
            if root is None:
                self._refuse(target.path, "resolve", Refusal.NOT_FOUND, "dataset storage missing")
            return root
        if target.kind is Kind.RESULTS_USER:
            return os.path.join(self._results_root, s.user)
        if target.kind is Kind.RESULT:
            return os.path.join(self._results_root, s.user, target.job or "")
        return None

    def _attrs(self, target: Target, st: os.stat_result) -> SFTPAttrs:
        return _attrs(st, read_only=target.kind is Kind.DATASET)

    # -- names -------------------------------------------------------------------------

    def format_user(self, uid: int | None) -> str:
        return self._session.user if self._session else "?"

    def format_group(self, gid: int | None) -> str:
        return "medbridge"

    def realpath(self, path: bytes) -> bytes | Awaitable[bytes]:
        return self._paced(lambda: self._realpath(path))

    def _realpath(self, path: bytes) -> bytes:
        held = self.held.pop(path, None) if path[:1] == b"\0" else None
        if held is not None:  # a request not served, held back by PlatformSession's filter: refused in turn
            self.refuse_request(held.op, "not a request the platform serves")
        if self._session is None:
            self._refuse(os.fsdecode(path), "realpath", Refusal.DENIED, "only job-certificate sessions get data")
        malformed = _malformed(path)
        if malformed:
            self._refuse(os.fsdecode(path), "realpath", Refusal.DENIED, malformed)
        try:
            return os.fsencode(normalise(os.fsdecode(path)))
        except PathEscape as exc:
            self._refuse(os.fsdecode(path), "realpath", Refusal.DENIED, str(exc))

    def stat(self, path: bytes) -> SFTPAttrs | Awaitable[SFTPAttrs]:
        return self._paced(lambda: self._stat(path, "stat", os.stat))

    def lstat(self, path: bytes) -> SFTPAttrs | Awaitable[SFTPAttrs]:
        return self._paced(lambda: self._stat(path, "lstat", os.lstat))

    def _stat(self, path: bytes, op: str, fn: Callable[[str], os.stat_result]) -> SFTPAttrs | Awaitable[SFTPAttrs]:
        target, real = self._resolve(path, Action.READ, op)
        which = _catalogue_file(target)
        if which is not None:
            return self._catalogue_attrs(target, which)
        if real is None:
            return _dir_attrs(self._started)
        try:
            return self._attrs(target, fn(real))
        except FileNotFoundError:
            if target.kind is Kind.RESULTS_USER:
                return _dir_attrs(self._started)
            raise

    def scandir(self, path: bytes) -> AsyncIterator[SFTPName]:
        """A directory handle: counted against ``max_open_handles`` for as long as asyncssh holds it.

        asyncssh keeps what this returns as the handle and drops it on close or at the
        session's end; the count is given back then, on either path of medbridge.fastpath.
        """
        self.take_handle(os.fsdecode(path), "opendir")  # escaped by the audit and the reply
        return _Listing(self._scandir(path), self.give_handle, self.backlog)

    async def _scandir(self, path: bytes) -> AsyncIterator[SFTPName]:
        await _committed(self._login)
        target, real = self._resolve(path, Action.LIST, "list")
        s = self._session
        assert s is not None
        for dot in (b".", b".."):
            yield SFTPName(dot, attrs=_dir_attrs(self._started))
        if real is None:
            names: list[str]
            if target.kind is Kind.ROOT:
                names = ["datasets", "results"]
            elif target.kind is Kind.DATASETS:
                names = sorted(n for n in s.view.datasets if n in s.roots)
            else:
                names = [s.user]
            for name in names:
                yield SFTPName(name.encode(), attrs=_dir_attrs(self._started))
            return
        try:
            entries = sorted(os.scandir(real), key=lambda e: e.name)
        except FileNotFoundError:
            if target.kind is Kind.RESULTS_USER:
                return
            raise
        for entry in entries:
            yield SFTPName(os.fsencode(entry.name), attrs=self._attrs(target, entry.stat(follow_symlinks=False)))
        if target.kind is Kind.DATASET and not target.rest:
            for which, name in enumerate(_CATALOGUE_FILES):
                attrs = await self._catalogue_attrs(dataclasses.replace(target, rest=(name,)), which)
                yield SFTPName(name.encode(), attrs=attrs)

    async def _catalogue_path(self, target: Target, which: int) -> str:
        """The stored file behind a dataset's ``.manifest`` (0) or ``.manifest.index`` (1), built off the loop."""
        s = self._session
        assert s is not None
        name = target.name or ""
        try:
            files = await self._catalogue(name, s.versions.get(name, 0))
        except MedbridgeError as exc:
            raise asyncssh.SFTPFailure(f"{target.path}: the catalogue cannot be read ({exc})") from exc
        return str(files[which])

    async def _catalogue_attrs(self, target: Target, which: int) -> SFTPAttrs:
        return _attrs(os.stat(await self._catalogue_path(target, which)), read_only=True)

    def readlink(self, path: bytes) -> bytes | Awaitable[bytes]:
        return self._paced(lambda: self._readlink(path))

    def _readlink(self, path: bytes) -> bytes:
        self._resolve(path, Action.READ, "readlink")
        raise asyncssh.SFTPNoSuchFile("symbolic links are not served")

    def symlink(self, oldpath: bytes, newpath: bytes) -> None:
        self._resolve(newpath, Action.WRITE, "symlink")
        self._refuse(os.fsdecode(newpath), "symlink", Refusal.DENIED, "links cannot be created")

    def link(self, oldpath: bytes, newpath: bytes) -> None:
        self._resolve(newpath, Action.WRITE, "link")
        self._refuse(os.fsdecode(newpath), "link", Refusal.DENIED, "links cannot be created")

    # -- files -------------------------------------------------------------------------

    def open(self, path: bytes, pflags: int, attrs: SFTPAttrs) -> OpenFile | Awaitable[OpenFile]:
        if pflags & _WRITE_FLAGS:
            return self._settled_first(lambda: self._durable(self._open_file(path, pflags, attrs), self._abandon))
        return self._durable(self._open_file(path, pflags, attrs), self._abandon)

    def _open_file(self, path: bytes, pflags: int, attrs: SFTPAttrs) -> OpenFile | Awaitable[OpenFile]:
        writing = bool(pflags & _WRITE_FLAGS)
        target, real = self._resolve(path, Action.WRITE if writing else Action.READ, "open")
        self._audit_up(path, "open")
        vpath = normalise(os.fsdecode(path))
        self.take_handle(vpath, "open")
        try:
            which = _catalogue_file(target)
            if which is not None:
                return self._open_catalogue(target, which, vpath)
            if writing:
                handle = self._open_for_writing(target, real, vpath, pflags, attrs)
            else:
                fd, _ = _open_regular(target, real, vpath, os.O_RDONLY)
                handle = OpenFile(fd, vpath, False, target.kind is Kind.DATASET)
                if target.kind is Kind.RESULT:
                    handle.job = target.job
                    self._hold(handle)
        except BaseException:
            self.give_handle()
            raise
        self._open.add(handle.fd)
        return self._opened(handle)

    def _hold(self, f: OpenFile) -> None:
        """Hold a results file open with a shared ``flock``: while any handle holds it, removing it gives no bytes back.

        A file removed (or replaced) while open keeps its blocks until its last handle
        closes; its bytes stay charged until then (:meth:`_let_go`), so a job cannot
        write, remove and keep the handle to hold space its quota forgot.
        """
        try:
            fcntl.flock(f.fd, fcntl.LOCK_SH)
            gone = os.fstat(f.fd).st_nlink == 0
        except BaseException:
            os.close(f.fd)
            raise
        if gone:  # removed between the open and the lock: its bytes were given back
            os.close(f.fd)
            raise asyncssh.SFTPNoSuchFile(f"{f.path}: no such file")
        self._held_results[f.fd] = f

    def _let_go(self, fd: int) -> None:
        """Close a descriptor; the last handle on a removed results file gives its bytes back to the quota."""
        f = self._held_results.pop(fd, None)
        if f is None or f.job is None:
            os.close(fd)
            return
        try:
            account = self._account()
            try:
                account.acquire(f.job)  # removals decide under the same lock: each removed file is given back once
            except Committing:
                log.warning("%s: closed while its job commits; its removed bytes stay charged", f.path)
                return
            try:
                st = os.fstat(fd)
                if st.st_nlink == 0 and stat.S_ISREG(st.st_mode) and _lock_alone(fd):
                    account.charge(f.job, -st.st_size, 0, check=False)
            finally:
                account.release()
        finally:
            os.close(fd)

    def _open_for_writing(self, target: Target, real: str | None, vpath: str, pflags: int,
                          attrs: SFTPAttrs) -> OpenFile:  # fmt: skip
        """Open a result for writing: a new file is one more entry, a truncated one gives its bytes back."""
        assert self._session is not None and target.job is not None
        flags = os.O_RDWR if pflags & asyncssh.FXF_READ else os.O_WRONLY
        for sftp_flag, os_flag in (
            (asyncssh.FXF_APPEND, os.O_APPEND),
            (asyncssh.FXF_CREAT, os.O_CREAT),
            (asyncssh.FXF_TRUNC, os.O_TRUNC),
            (asyncssh.FXF_EXCL, os.O_EXCL),
        ):
            if pflags & sftp_flag:
                flags |= os_flag
        perms = 0o640 if attrs.permissions is None else _result_mode(attrs.permissions)

        made = []

        def measure() -> tuple[int, int]:  # a new file is one more entry, a truncated one gives its bytes back
            before = _lstat(real)
            if before is None:
                made.append("created" if flags & os.O_CREAT else "")
                return 0, 1 if flags & os.O_CREAT else 0
            truncated = bool(flags & os.O_TRUNC and stat.S_ISREG(before.st_mode) and before.st_size)
            made.append("truncated" if truncated else "")
            return (-before.st_size if flags & os.O_TRUNC and stat.S_ISREG(before.st_mode) else 0), 0

        with self._charged(vpath, "open", target.job, measure):
            fd, _ = _open_regular(target, real, vpath, flags, perms)
        job_root = self._root(self._session, target)
        handle = OpenFile(fd, vpath, True, False, job_root=job_root, job=target.job, append=bool(flags & os.O_APPEND),
                          made=made[-1] if made else "")  # fmt: skip
        self._hold(handle)
        return handle

    async def _open_catalogue(self, target: Target, which: int, vpath: str) -> OpenFile:
        """(Its handle already counted by :meth:`open`: given back if it cannot be opened.)"""
        try:
            fd = os.open(await self._catalogue_path(target, which), os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            self.give_handle()
            raise
        self._open.add(fd)
        return self._opened(OpenFile(fd, vpath, False, True))

    def read_file(self, path: bytes, offset: int, length: int) -> bytes | Awaitable[bytes]:
        """``read-file@medbridge``: decided by the same hook as ``open``, audited as one ``sftp.read``."""
        return self._durable(self._paced(lambda: self._read_file(path, offset, length)))

    def _read_file(self, path: bytes, offset: int, length: int) -> bytes | Awaitable[bytes]:
        target, real = self._resolve(path, Action.READ, "read-file")
        self._audit_up(path, "read-file")
        vpath = normalise(os.fsdecode(path))
        self._offset_bound(vpath, "read-file", offset)
        length = min(length, MAX_READ)
        which = _catalogue_file(target)
        if which is not None:
            return self._read_catalogue(target, which, vpath, offset, length)
        fd, st = _open_regular(target, real, vpath, os.O_RDONLY)
        try:
            data = _read_upto(fd, offset, length, st.st_size)
        finally:
            os.close(fd)
        self.metrics.sent(vpath, len(data))
        self._event("sftp.read", vpath, decision=True, offset=offset, bytes_read=len(data))
        return data

    async def _read_catalogue(self, target: Target, which: int, vpath: str, offset: int, length: int) -> bytes:
        fd = os.open(await self._catalogue_path(target, which), os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = _read_upto(fd, offset, length, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        self.metrics.sent(vpath, len(data))
        self._event("sftp.read", vpath, decision=True, offset=offset, bytes_read=len(data))
        return data

    def _event(
        self, action: str, subject: str, outcome: str = "ok", *, decision: bool = False, **detail: Any
    ) -> asyncio.Future[str | None] | None:
        """Audit one event of this session, with who, which job and from where.

        A ``decision`` (access granted, results changed) is pledged: the request's reply
        waits until it is committed (:meth:`_durable`); an account of what happened (a
        close's byte counts) is only recorded.
        """
        s = self._session
        assert s is not None
        event = AuditEvent(actor=s.user, action=action, outcome=outcome, subject=subject,
                           detail={**detail, **s.identity()})  # fmt: skip
        if decision and self._gate is not None:
            return self._gate.record(event)
        if decision and self._sink is not None:
            pledge = self._sink.pledge(event)
            self._pledged.append(pledge)
            return pledge
        self._record(event)
        return None

    def _durable(self, reply: _T | Awaitable[_T], undo: Callable[[_T], None] | None = None) -> _T | Awaitable[_T]:
        """``reply`` once the decisions it answers (and the session's login) are committed to the audit.

        A decision the audit could not record is refused (permission denied), what it
        granted undone by ``undo`` (an opened file closed): the client never holds
        access the audit does not show.  Many sessions' decisions share one commit.
        """
        if self._sink is None:
            return reply
        login = self._login
        if self._gate is not None and (login is None or (login.done() and login.result() is None)):
            return reply  # the gate holds the reply until its decisions are committed
        return self._settled(reply, undo)

    async def _settled(self, reply: _T | Awaitable[_T], undo: Callable[[_T], None] | None) -> _T:
        try:
            value = await reply if inspect.isawaitable(reply) else reply
        finally:
            pledged, self._pledged = self._pledged, []
        login = self._login
        errors = [e for e in await asyncio.gather(*([login] if login else []), *pledged) if e is not None]
        if errors:
            if undo is not None:
                undo(value)
            log.error("an SFTP reply refused: the audit could not record its decision (%s)", errors[0])
            raise asyncssh.SFTPPermissionDenied(AUDIT_REFUSED)
        return value

    def reply_gate(self) -> AuditGate | None:
        """The fast path's way (medbridge.fastpath.start_sftp): requests are served at once, replies held by the gate.

        Its replies then leave in order once their decisions are committed, so many
        requests in flight share one commit; asyncssh's public path awaits each instead.
        """
        if self._sink is not None and self._gate is None:
            self._gate = AuditGate(self._sink, self.backlog)
        return self._gate

    async def admitted(self) -> bool:
        """Whether the session's login is in the audit (waits for it); nothing is served before, and if it
        could not be written every request is refused (:meth:`_paced`, :meth:`_durable`)."""
        login = self._login
        return login is None or await login is None

    def abandon(self, handle: object) -> None:
        """Close a handle the client never received (its grant could not be audited)."""
        if isinstance(handle, OpenFile):
            self._abandon(handle)

    def _abandon(self, handle: OpenFile) -> None:
        """Close a handle the client never received (its grant could not be audited)."""
        self.give_handle()
        self._open.discard(handle.fd)
        self._let_go(handle.fd)

    def _opened(self, handle: OpenFile) -> OpenFile:
        mode = "write" if handle.writable else "read"
        acted: dict[str, Any] = {"acted": True, "made": handle.made} if handle.made else {}  # it stays made
        handle.granted = self._event("sftp.open", handle.path, decision=True, mode=mode, **acted)
        return handle

    def _granted(self, f: OpenFile, reply: Callable[[], _T | Awaitable[_T]]) -> _T | Awaitable[_T]:
        """``reply()`` once ``f``'s open is committed to the audit; refused if it could not be.

        On the fast path an open's reply is held until then, but its handle exists: a client
        that guesses it must get nothing through it before the audit has the open.
        """
        return _after(f.granted, reply)

    def _settled_first(self, change: Callable[[], _T | Awaitable[_T]]) -> _T | Awaitable[_T]:
        """``change()`` once this session's earlier decisions are settled (the fast path serves ahead of them).

        A change is made only while the audit is known to write (:meth:`_audit_up`): never
        made behind requests whose entries may yet fail.
        """
        gate, login = self._gate, self._login
        if (gate is None or not gate.unsettled) and (login is None or login.done()):
            return change()
        return self._after_settled(gate, change)

    async def _after_settled(self, gate: AuditGate | None, change: Callable[[], _T | Awaitable[_T]]) -> _T:
        await _committed(self._login)
        if gate is not None:
            await gate.settled()
        return await _answer(change)

    def _audit_up(self, path: bytes | str, op: str) -> None:
        """Refuse before acting while the audit cannot write: nothing is changed or read that it would not show."""
        login = self._login
        if login is not None and login.done() and login.result() is not None:
            raise asyncssh.SFTPPermissionDenied(AUDIT_REFUSED)  # the session's login is not in the audit
        failing = self._sink.failing if self._sink is not None else None
        if failing is None:
            return
        shown = path if isinstance(path, str) else os.fsdecode(path)
        self._refuse(shown, op, Refusal.DENIED, f"the audit cannot write: {failing}", told=AUDIT_REFUSED)

    def read(self, file_obj: object, offset: int, size: int) -> bytes | Awaitable[bytes]:
        f = _handle(file_obj)
        return self._paced(lambda: self._granted(f, lambda: self._read(f, offset, size)))

    def _offset_bound(self, vpath: str, op: str, offset: int) -> None:
        if offset > MAX_OFFSET:
            self._refuse(
                vpath, op, Refusal.DENIED, f"offset {offset} is past the largest a file may have ({MAX_OFFSET})"
            )

    def _read(self, f: OpenFile, offset: int, size: int) -> bytes:
        self._offset_bound(f.path, "read", offset)
        size = min(size, MAX_READ)  # a short read is allowed; a 4 GiB allocation per request is not
        data = os.pread(f.fd, size, offset)
        f.bytes_read += len(data)
        return data

    def write(self, file_obj: object, offset: int, data: bytes) -> int | Awaitable[int]:
        f = _handle(file_obj)
        return self._granted(f, lambda: self._write(f, offset, data))

    def _write(self, f: OpenFile, offset: int, data: bytes) -> int:
        view, cut_short = memoryview(data), []

        def write_all() -> int:
            n = 0
            while n < len(view):  # a write the file system cuts short is finished or fails: SFTP says OK or not
                try:
                    n += os.pwrite(f.fd, view[n:], offset + n)
                except OSError as exc:
                    if not n:
                        raise
                    cut_short.append(exc)  # what did land is accounted for; the error still goes back
                    break
            return n

        try:
            n = self._resize(f, "write", offset, len(data), write_all)
        except OSError as exc:
            self._write_failed(f, exc, offset)
            raise
        f.bytes_written += n
        self.metrics.written(n)
        if cut_short:
            self._write_failed(f, cut_short[0], offset + n)
            raise cut_short[0]
        return n

    def _write_failed(self, f: OpenFile, exc: OSError, offset: int) -> None:
        """Results storage full, say: the job is told (the error goes back), and so is the audit, once per file."""
        if not f.write_failed:
            f.write_failed = True
            self._event("sftp.write", f.path, "failed", reason=exc.strerror or str(exc), offset=offset)

    def close(self, file_obj: object) -> None:
        f = _handle(file_obj)
        self.give_handle()
        self._open.discard(f.fd)
        self._let_go(f.fd)
        seconds = round(time.monotonic() - f.opened, 3)
        self._event("sftp.close", f.path, bytes_read=f.bytes_read, bytes_written=f.bytes_written, seconds=seconds)
        if f.bytes_written:
            self._event("sftp.write", f.path, bytes=f.bytes_written)

    def fstat(self, file_obj: object) -> SFTPAttrs | Awaitable[SFTPAttrs]:
        f = _handle(file_obj)
        return self._paced(lambda: self._granted(f, lambda: _attrs(os.fstat(f.fd), read_only=f.read_only_view)))

    def fsetstat(self, file_obj: object, attrs: SFTPAttrs) -> Awaitable[None] | None:
        f = _handle(file_obj)
        return self._settled_first(lambda: self._granted(f, lambda: self._fsetstat(f, attrs)))

    def _fsetstat(self, f: OpenFile, attrs: SFTPAttrs) -> Awaitable[None] | None:
        self._writable(f, "fsetstat")
        if attrs.size is not None:
            self._audit_up(f.path, "fsetstat")
        self._set_attrs(f, attrs, "fsetstat")
        return self._durable(None)

    def _set_attrs(self, f: OpenFile, attrs: SFTPAttrs, op: str) -> None:
        """Apply what a client may change (size, permission bits, times); a size is charged like a write."""
        if attrs.size is not None:
            size = attrs.size

            def truncate() -> int:
                os.ftruncate(f.fd, size)
                return 0

            self._resize(f, op, size, -1, truncate)
            self._event("sftp.truncate", f.path, decision=True, acted=True, size=size, op=op)
        if attrs.permissions is not None:
            os.fchmod(f.fd, _result_mode(attrs.permissions))
        if attrs.atime is not None and attrs.mtime is not None:
            os.utime(f.fd, (attrs.atime, attrs.mtime))

    def fsync(self, file_obj: object) -> Awaitable[None] | None:
        f = _handle(file_obj)
        return self._granted(f, lambda: os.fsync(f.fd))

    def setstat(self, path: bytes, attrs: SFTPAttrs) -> Awaitable[None] | None:
        return self._paced(lambda: self._settled_first(lambda: self._setstat(path, attrs)))

    def _setstat(self, path: bytes, attrs: SFTPAttrs) -> Awaitable[None] | None:
        target, real = self._resolve(path, Action.WRITE, "setstat")
        assert real is not None and target.job is not None
        vpath = normalise(os.fsdecode(path))
        flags = os.O_WRONLY if attrs.size is not None else os.O_RDONLY
        fd = os.open(real, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            regular = stat.S_ISREG(st.st_mode)
            if attrs.size is not None and not regular:
                raise asyncssh.SFTPFailure(f"{vpath}: not a regular file")
            job_root = self._root(self._session, target) if self._session is not None else None
            f = OpenFile(fd, vpath, True, False, job_root=job_root, job=target.job)
            if attrs.size is not None:
                self._audit_up(vpath, "setstat")
            self._set_attrs(f, attrs, "setstat")
        finally:
            os.close(fd)
        return self._durable(None)

    def lsetstat(self, path: bytes, attrs: SFTPAttrs) -> Awaitable[None] | None:
        return self.setstat(path, attrs)

    # -- names that change ---------------------------------------------------------------

    def remove(self, path: bytes) -> Awaitable[None] | None:
        return self._settled_first(lambda: self._remove(path))

    def _remove(self, path: bytes) -> Awaitable[None] | None:
        target, real = self._resolve(path, Action.WRITE, "remove")
        assert real is not None and target.job is not None
        self._audit_up(path, "remove")
        with _Replaced(real) as replaced, self._charged(target.path, "remove", target.job, replaced.measure):
            os.remove(real)
        return self._audit_change("sftp.remove", path)

    def mkdir(self, path: bytes, attrs: SFTPAttrs) -> Awaitable[None] | None:
        return self._settled_first(lambda: self._mkdir(path, attrs))

    def _mkdir(self, path: bytes, attrs: SFTPAttrs) -> Awaitable[None] | None:
        target, real = self._resolve(path, Action.WRITE, "mkdir")
        assert real is not None and target.job is not None
        self._audit_up(path, "mkdir")
        with self._charged(target.path, "mkdir", target.job, lambda: (0, 1)):
            os.mkdir(real, 0o750)
        return self._audit_change("sftp.mkdir", path)

    def rmdir(self, path: bytes) -> Awaitable[None] | None:
        return self._settled_first(lambda: self._rmdir(path))

    def _rmdir(self, path: bytes) -> Awaitable[None] | None:
        target, real = self._resolve(path, Action.WRITE, "rmdir")
        assert real is not None and target.job is not None
        self._audit_up(path, "rmdir")
        with self._charged(target.path, "rmdir", target.job, lambda: (0, -1)):
            os.rmdir(real)
        return self._audit_change("sftp.rmdir", path)

    async def rename(self, oldpath: bytes, newpath: bytes) -> None:
        await self._rename(oldpath, newpath, replace=False)

    async def posix_rename(self, oldpath: bytes, newpath: bytes) -> None:
        await self._rename(oldpath, newpath, replace=True)

    async def _rename(self, oldpath: bytes, newpath: bytes, *, replace: bool) -> None:
        await _committed(self._login)
        if self._gate is not None:
            await self._gate.settled()
        _, old = self._resolve(oldpath, Action.WRITE, "rename")
        try:
            named = parse(normalise(os.fsdecode(newpath)))
        except PathEscape:  # refused (and audited) by _resolve below
            named = None
        committing = named is not None and named.kind is Kind.RESULT and named.rest == (RESULTS_MANIFEST,)
        target, new = self._resolve(newpath, Action.WRITE, "commit" if committing else "rename")
        assert old is not None and new is not None
        self._audit_up(newpath, "commit" if committing else "rename")
        if not replace and os.path.lexists(new):
            raise asyncssh.SFTPFailure(f"{os.fsdecode(newpath)}: already exists")
        if committing:
            await self._commit(target, old, new)
        else:
            assert target.job is not None
            with _Replaced(new, old) as replaced, self._charged(target.path, "rename", target.job, replaced.measure):
                os.replace(old, new)
        done = self._audit_change("sftp.rename", oldpath, to=normalise(os.fsdecode(newpath)))
        if done is not None:
            await done

    async def _commit(self, target: Target, staged: str, final: str) -> None:
        """Outputs are complete only when a manifest naming them verifies here, on the platform."""
        s = self._session
        assert s is not None
        try:
            verdict = await self._results.commit(s.user, target.job or "", staged, final)
        except (InvalidInput, OSError) as exc:
            verdict = str(exc)
        if isinstance(verdict, str):
            self._event("results.commit", target.path, "refused", reason=verdict)
            raise asyncssh.SFTPFailure(f"results manifest refused: {verdict}")
        files, size, digest = verdict
        self._event("results.commit", target.path, decision=True, acted=True, files=files, bytes=size,
                    manifest_sha256=digest)  # fmt: skip

    def _audit_change(self, action: str, path: bytes, **extra: Any) -> Awaitable[None] | None:
        """A change to the job's results: its reply waits for the audit (made, it cannot be undone, only refused)."""
        self._event(action, normalise(os.fsdecode(path)), decision=True, acted=True, **extra)
        return self._durable(None)

    # -- file systems ------------------------------------------------------------------

    def statvfs(self, path: bytes) -> os.statvfs_result | Awaitable[os.statvfs_result]:
        """The job's results quotas and what is left of them (limits.Account.statvfs), for any path it may see."""
        return self._paced(lambda: self._statvfs(path))

    def _statvfs(self, path: bytes) -> os.statvfs_result:
        self._resolve(path, Action.READ, "statvfs")
        assert self._session is not None
        return self._account().statvfs(self._session.job)

    def fstatvfs(self, file_obj: object) -> os.statvfs_result | Awaitable[os.statvfs_result]:
        f = _handle(file_obj)
        assert self._session is not None
        job = self._session.job
        return self._granted(f, lambda: self._account().statvfs(job))

    def exit(self) -> None:
        for fd in list(self._open):
            try:
                self._let_go(fd)
            except OSError as exc:
                if exc.errno != errno.EBADF:
                    raise
        self._open.clear()
        if self._usage is not None:
            self._usage.close()
            self._usage = None


def _open_regular(target: Target, real: str | None, vpath: str, flags: int,
                  perms: int = 0o640) -> tuple[int, os.stat_result]:  # fmt: skip
    """Open a stored file: never through a final symlink, never blocking on a FIFO, regular files only."""
    if real is None or target.kind is Kind.RESULTS_USER:
        raise asyncssh.SFTPFailure(f"{vpath}: is a directory")
    fd = os.open(real, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, perms)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise asyncssh.SFTPFailure(f"{vpath}: {'is a directory' if stat.S_ISDIR(st.st_mode) else 'not a regular file'}")
    return fd, st


def _read_upto(fd: int, offset: int, length: int, size: int) -> bytes:
    """``length`` bytes from ``offset``, fewer only at the end of the file (the reply's size says so).

    Sized by ``fstat`` so a small file does not allocate a whole ``length``; a file that
    grew since is read on, so a short reply still means the end.
    """
    first = min(length, max(size - offset, 0) + 1)
    data = os.pread(fd, first, offset)
    if len(data) == first < length:
        data += os.pread(fd, length - first, offset + first)
    return data


class _Listing:
    """A directory handle as asyncssh holds it: the names, and the handle given back when it is dropped."""

    def __init__(self, names: AsyncIterator[SFTPName], give_back: Callable[[], None], backlog: Backlog):
        self._names = names
        self._backlog = backlog
        weakref.finalize(self, give_back)  # asyncssh drops it on close and at the session's end

    def __aiter__(self) -> _Listing:
        return self

    async def __anext__(self) -> SFTPName:
        if self._backlog.full:
            await self._backlog.room()
        return await anext(self._names)


#: Most replies an :class:`AuditGate` holds before the session's next request waits (a store that stalls
#: must not let one session pile up requests without bound).
MAX_HELD_REPLIES = 4096


class AuditGate:
    """Holds an SFTP session's replies until the audit has committed the decisions they answer (the fast path).

    asyncssh serves a session's requests one at a time, so the decisions recorded since
    the previous reply belong to the next one.  A reply leaves once its decisions are
    committed, in order; one whose decision could not be committed leaves as a
    permission-denied status instead, and a handle it would have granted is closed.  A
    reply with no decision of its own waits only for the replies before it.  Past
    :data:`REPLY_HIGH_WATER` held bytes the session's backlog is full (reads wait).
    """

    def __init__(self, sink: AuditSink, backlog: Backlog):
        self._sink = sink
        self._backlog = backlog
        self._outstanding: deque[int] = deque()  # this session's tickets not yet settled, in order
        self._unanswered: list[int] = []  # tickets of the request being served
        self._failed: dict[int, str] = {}  # settled with an error before their reply was written
        self._held: deque[_Held] = deque()
        self._held_bytes = 0
        self._drained: list[Callable[[], None]] = []
        self._deliver: Callable[[bytes], None] = _nowhere
        self._revoke: Callable[[bytes], None] = _nowhere
        self._futures: dict[int, asyncio.Future[str | None]] = {}
        #: Set while the session may send requests: cleared past the held-replies mark (the handler waits).
        self._room = asyncio.Event()
        self._room.set()

    def connect(self, deliver: Callable[[bytes], None], revoke: Callable[[bytes], None]) -> None:
        """Where replies go, and how a handle the client never receives is closed."""
        self._deliver, self._revoke = deliver, revoke

    def record(self, event: AuditEvent) -> asyncio.Future[str | None]:
        """Record a decision; the reply to the request being served waits until it is committed.

        The future says None once it is, else why not (what waits on the decision, a handle's requests).
        """
        ticket = self._sink.record(event, self)
        self._outstanding.append(ticket)
        self._unanswered.append(ticket)
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._futures[ticket] = future
        return future

    @property
    def unsettled(self) -> bool:
        """Whether decisions of this session still wait for the audit."""
        return bool(self._outstanding)

    async def settled(self) -> None:
        """Return once every decision recorded so far is settled (committed or refused)."""
        if self._outstanding:
            await asyncio.gather(*(f for t, f in self._futures.items() if t <= self._outstanding[-1]))

    @property
    def full(self) -> bool:
        """Past the mark of held replies: the session's next request waits (:meth:`room`)."""
        return not self._room.is_set()

    async def room(self) -> None:
        await self._room.wait()

    def audit_done(self, ticket: int, error: str | None) -> None:
        future = self._futures.pop(ticket, None)
        if future is not None and not future.done():
            future.set_result(error)
        if self._outstanding and self._outstanding[0] == ticket:
            self._outstanding.popleft()
        elif ticket in self._outstanding:
            self._outstanding.remove(ticket)
        if error is not None:
            held = next((h for h in self._held if ticket in h.tickets), None)
            if held is None:
                self._failed[ticket] = error
            elif held.error is None:
                held.error = error
        self._release()

    def write(self, data: bytes) -> None:
        tickets, self._unanswered = self._unanswered, []
        error = next((self._failed.pop(t) for t in tickets if t in self._failed), None)
        self._held.append(_Held(data, tickets, error))
        self._held_bytes += len(data)
        self._release()

    def when_drained(self, then: Callable[[], None]) -> None:
        """Run ``then`` once every held reply has left (at once if none is held)."""
        if self._held:
            self._drained.append(then)
        else:
            then()

    def _release(self) -> None:
        while self._held:
            held = self._held[0]
            if held.tickets and self._outstanding and self._outstanding[0] <= held.tickets[-1]:
                break
            self._held.popleft()
            self._held_bytes -= len(held.data)
            self._deliver(held.data if held.error is None else self._refusal(held.data, held.error))
        if self._held_bytes > REPLY_HIGH_WATER or len(self._held) > MAX_HELD_REPLIES:
            self._backlog.pause("audit")
            self._room.clear()
        else:
            self._backlog.resume("audit")
            self._room.set()
        if not self._held:
            drained, self._drained = self._drained, []
            for then in drained:
                then()

    def _refusal(self, reply: bytes, error: str) -> bytes:
        """A permission-denied status in place of ``reply`` (same request id); a handle it granted is closed."""
        kind, pktid = struct.unpack_from(">BI", reply, 4)
        if kind == FXP_HANDLE:
            (size,) = struct.unpack_from(">I", reply, 9)
            self._revoke(bytes(reply[13 : 13 + size]))
        log.error("an SFTP reply refused: the audit could not record its decision (%s)", error)
        message = AUDIT_REFUSED.encode()
        body = struct.pack(f">BIII{len(message)}sI", FXP_STATUS, pktid, FX_PERMISSION_DENIED, len(message), message, 0)
        return struct.pack(">I", len(body)) + body


@dataclass(slots=True)
class _Held:
    data: bytes
    tickets: list[int]
    error: str | None


def _nowhere(_data: bytes) -> None:
    raise AssertionError("an AuditGate must be connected before it is used")


class PlatformSession(asyncssh.SSHServerProcess[bytes]):
    """A session channel: commands go to the process factory, the sftp subsystem to a :class:`JobSFTPServer`.

    An SFTP session's requests pass a :class:`RequestFilter` first: only those listed in
    ``medbridge.platform.requests`` reach asyncssh's handler; the rest are refused here,
    audited (``limits@openssh.com`` is answered here).  The handler is asyncssh's own, or
    on the fast path ``medbridge.fastpath.SFTPHandler``.
    """

    def __init__(
        self,
        process_factory: asyncssh.SSHServerProcessFactory[bytes],
        sftp_factory: Callable[[asyncssh.SSHServerChannel[bytes]], JobSFTPServer],
        sftp_version: int,
        allow_scp: bool,
        *,
        closed: Callable[[], None] | None = None,
    ):
        super().__init__(process_factory, self._start_server, sftp_version, allow_scp)  # type: ignore[arg-type]
        self._make_server = sftp_factory
        self._closed = closed
        self._filter: RequestFilter | None = None
        #: The SFTP server of this session, once its sftp subsystem started.
        self.server: JobSFTPServer | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.server is not None:  # a reply waiting for room goes nowhere now: let it end
            self.server.backlog.resume()
        if self._closed is not None:  # once: the connection's count of open channels
            self._closed()
            self._closed = None

    def _start_server(self, chan: asyncssh.SSHServerChannel[bytes]) -> JobSFTPServer:
        self.server = self._make_server(chan)
        chan.set_write_buffer_limits(REPLY_HIGH_WATER)  # past it, pause_writing: the server's replies wait
        return self.server

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.server is not None:
            self.server.backlog.pause()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.server is not None:
            self.server.backlog.resume()

    def session_started(self) -> None:
        if self.channel.get_subsystem() != "sftp":
            super().session_started()
            return
        extensions = PASSED_EXTENSIONS | (FAST_EXTENSIONS if fastpath.enabled() else frozenset())
        self._filter = RequestFilter(
            SERVED_TYPES, extensions, MAX_SFTP_PACKET_LEN, self._hold, seen=process_metrics().request
        )
        if not fastpath.start_sftp(self, self._start_server, PASSED_EXTENSIONS):
            super().session_started()  # asyncssh's public path: its own handler calls _start_server

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if self._filter is None or datatype is not None:
            super().data_received(data, datatype)
            return
        for part in self._filter.feed(data):
            super().data_received(part, datatype)

    def _hold(self, request: Held) -> bytes:
        """A request not served becomes a REALPATH of a path only this session can name; realpath refuses it."""
        server = self.server
        assert server is not None  # made before any request is read, on either path
        path = b"\0held/" + os.urandom(16).hex().encode()
        server.held[path] = request
        return realpath_request(request.pktid, path)


#: What a request is told when the audit could not record its decision (or the session's login).
AUDIT_REFUSED = "refused: the audit could not record this request"

#: Longest path and path component a request may name, in bytes (Linux's PATH_MAX and NAME_MAX).
MAX_PATH = 4096
MAX_NAME = 255


#: The most characters of a refused path the audit keeps: a path is the client's to make up.
MAX_REFUSED_SUBJECT = 256


def _subject(path: str) -> str:
    """A refused path as audited: at most :data:`MAX_REFUSED_SUBJECT` characters, and how long it was."""
    if len(path) <= MAX_REFUSED_SUBJECT:
        return path
    return f"{path[:MAX_REFUSED_SUBJECT]}... ({len(path)} characters)"


def _malformed(raw: bytes) -> str:
    """Why a client's path can name nothing here ('' if it can): checked before any storage call."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return "path is not valid UTF-8"
    if b"\0" in raw:
        return "path contains a NUL byte"
    if len(raw) > MAX_PATH or any(len(part) > MAX_NAME for part in raw.split(b"/")):
        return "name too long"
    return ""


_CATALOGUE_FILES = (DATASET_MANIFEST, MANIFEST_INDEX)


def _catalogue_file(target: Target) -> int | None:
    """0 for a dataset's ``.manifest``, 1 for its ``.manifest.index``, None for anything else."""
    if target.kind is Kind.DATASET and len(target.rest) == 1 and target.rest[0] in _CATALOGUE_FILES:
        return _CATALOGUE_FILES.index(target.rest[0])
    return None


class Mismatch(str):
    """A commit refused once its files were hashed: a file does not match its SHA-256 (counted per job)."""


def verify_results(
    job_root: str, manifest_file: str, max_entries: int, max_file: int, max_bytes: int
) -> tuple[int, int, str] | str:
    """Check every file a results manifest names; ``(files, bytes, manifest sha256)`` or why not.

    Sizes are checked before anything is hashed, so no manifest makes the platform hash
    more than a job may hold (a sparse file counts whole: its holes are hashed too).
    """
    fd = os.open(manifest_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return "the manifest is not a regular file"
        raw = f.read(1 << 24)
    try:
        text = raw.decode("utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        return f"the manifest is not UTF-8 (byte {exc.start})"
    entries = parse_manifest(text)
    if not entries:
        return "the manifest names no files"
    if len(entries) > max_entries:
        return f"the manifest names more than {max_entries} files"
    if len({rel for _, rel in entries}) != len(entries):
        return "the manifest names a file twice"
    real_root = os.path.realpath(job_root)
    paths, size = [], 0
    for _, rel in entries:
        path = os.path.realpath(os.path.join(job_root, rel))
        if not within(real_root, path) or not os.path.isfile(path) or rel.endswith(PARTIAL_SUFFIX):
            return f"{rel} is missing"
        st = os.stat(path)
        if st.st_size > max_file:
            return f"{rel} is larger than a result file may be ({st.st_size} > {max_file} bytes)"
        size += st.st_size
        paths.append(path)
    if size > max_bytes:
        return f"the files it names hold {size} bytes, more than a job may ({max_bytes})"
    total = 0
    for (sha, rel), path in zip(entries, paths, strict=True):
        total += os.path.getsize(path)
        if sha256_file(path) != sha:
            return Mismatch(f"{rel} does not match its SHA-256")
    return len(entries), total, hashlib.sha256(raw).hexdigest()


def _handle(file_obj: object) -> OpenFile:
    if not isinstance(file_obj, OpenFile):
        raise asyncssh.SFTPInvalidHandle("not a medbridge handle")
    return file_obj


class _Replaced:
    """What removing ``path`` (or renaming ``source`` onto it) gives back to the quota, measured under the user's lock.

    Its entry, and its bytes if it is a regular file no handle holds (a held one gives
    them back at its last close, :meth:`JobSFTPServer._let_go`).  Nothing if it is absent,
    or if ``source`` is the same file (a name renamed onto itself, or a hard link of it:
    the rename does nothing).  The file stays locked until the change is done, so no
    handle takes hold of it in between.
    """

    def __init__(self, path: str, source: str | None = None):
        self._path = path
        self._source = source
        self._fd: int | None = None

    def __enter__(self) -> _Replaced:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def measure(self) -> tuple[int, int]:
        st = _lstat(self._path)
        if st is None:
            return 0, 0
        source = _lstat(self._source)
        if source is not None and (source.st_dev, source.st_ino) == (st.st_dev, st.st_ino):
            return 0, 0
        if not stat.S_ISREG(st.st_mode):
            return 0, -1
        fd = self._fd = os.open(self._path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        held = os.fstat(fd)
        if (held.st_dev, held.st_ino) != (st.st_dev, st.st_ino) or not _lock_alone(fd):
            return 0, -1  # held open by a handle: its bytes stay charged until the last one closes
        return -held.st_size, -1


def _result_mode(asked: int) -> int:
    """A mode a client asks for a result: never beyond 0750, never unreadable to the platform (it hashes, locks it)."""
    return (asked & 0o750) | 0o600


def _lock_alone(fd: int) -> bool:
    """Lock ``fd``'s file exclusively if no other handle holds it (any worker's: ``flock`` is the kernel's)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _lstat(path: str | None) -> os.stat_result | None:
    if path is None:
        return None
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
