"""The loader client: a pool of SFTP connections on a background event loop, used from plain code.

Why it is fast: every connection carries many requests at once (asyncssh splits a read
into parallel block requests, and ``read_many`` keeps a window of files in flight
across the pool), so a round trip of a few milliseconds is paid once per window, not
once per file.  Why it is safe: whole files are checked against the dataset manifest
(a changed file is an :class:`IntegrityError`, never silent), a dropped connection
stalls the read and resumes it by offset once the link is back, and nothing is
written to disk.  Errors say by type what happened (see :mod:`medbridge.errors`):
refused (:class:`AccessRevoked`: the platform refused or ended the job's session; at
once, never retried), cut (retried until ``patience``, then :class:`PlatformUnreachable`),
closed (:class:`LoaderClosed`) and broken (:class:`BadReply`: not retried).  After
``fork`` (DataLoader workers) a process never touches its parent's event loop or
connections: it opens its own on first use.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import posixpath
import sys
import sysconfig
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

import asyncssh

from medbridge import outage, processes
from medbridge.compute.session import Endpoint, PlatformSays, connect_watched, endpoint_from_job
from medbridge.errors import (
    AccessDenied,
    AccessRevoked,
    BadReply,
    IntegrityError,
    LoaderClosed,
    MedbridgeError,
    PlatformUnavailable,
    PlatformUnreachable,
)
from medbridge.fastpath import coalesce
from medbridge.loader.cache import ReadAheadCache
from medbridge.loader.wire import Attrs, Buffer, Wire, open_wire
from medbridge.policy.manifest import DATASET_MANIFEST, MANIFEST_INDEX, Piece, find_piece, parse_index, parse_manifest
from medbridge.policy.paths import Kind, PathEscape, normalise, parse

# Recycling trusts sys.getrefcount; from 3.14 CPython may borrow references without
# counting them, and free-threaded builds count them per thread, so a buffer still held
# could look free: recycle only where the count is exact (3.13 and older, with the GIL).
_REFCOUNT_EXACT = sys.version_info < (3, 14) and not sysconfig.get_config_var("Py_GIL_DISABLED")
T = TypeVar("T")
#: Manifest pieces a loader keeps (~100 KB each): enough for a job's working set of directories.
PIECES_KEPT = 64
#: A cut link: the read stalls and resumes on a fresh connection, within the patience.  A refusal
#: (``AccessRevoked``, asyncssh's ``PermissionDenied``) is caught before these and never retried.
_DROPPED = (asyncssh.ConnectionLost, asyncssh.DisconnectError, asyncssh.SFTPConnectionLost, OSError, TimeoutError)
CLOSED = "the loader was closed"


@dataclass(frozen=True)
class Sample:
    """Where one sample's bytes are: a whole file, or a member of a shard (one ranged read)."""

    path: str
    shard: str | None = None
    offset: int = 0
    size: int | None = None
    sha256: str | None = None


@dataclass
class Stats:
    started: int = 0  # reads read_many has started (at most its window ahead of the consumer)
    files: int = 0
    bytes: int = 0
    reconnects: int = 0
    seconds_stalled: float = 0.0
    verified: int = 0
    recycled: int = 0  # reads that landed in a buffer the consumer had let go of


class _Recycler:
    """Large buffers the consumer of ``read_many`` has let go of, reused for the next reads.

    Fresh memory costs a page fault per page on first touch (more than decrypting the
    bytes, on a virtual machine several times more); a buffer handed back is already
    mapped.  Only a buffer nothing else refers to is handed back, and a reused one
    returns only the bytes its new read wrote (see :class:`Buffer`).
    """

    SMALLEST = 1 << 20

    def __init__(self, stats: Stats, limit: int = 512 << 20):
        self._stats = stats
        self._free: list[bytearray] = []
        self._held = 0
        self._limit = limit
        self._lock = threading.Lock()

    def alloc(self, size: int) -> bytearray:
        if size >= self.SMALLEST:
            with self._lock:
                for i, buf in enumerate(self._free):
                    if size <= len(buf) <= 2 * size:
                        del self._free[i]
                        self._held -= len(buf)
                        break
                else:
                    buf = None
            if buf is not None:
                del buf[size:]  # within half the allocation: CPython shrinks in place
                self._stats.recycled += 1
                return buf
        return bytearray(size)

    def give(self, buf: bytearray) -> None:
        if len(buf) >= self.SMALLEST:
            with self._lock:
                if self._held + len(buf) <= self._limit:
                    self._free.append(buf)
                    self._held += len(buf)

    def clear(self) -> None:
        """Zero and drop every held buffer (they hold earlier samples' bytes)."""
        with self._lock:
            for buf in self._free:
                buf[:] = bytes(len(buf))
            self._free.clear()
            self._held = 0


@dataclass
class _Slot:
    conn: asyncssh.SSHClientConnection | None = None
    wire: Wire | None = None
    says: PlatformSays | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class _Pool:
    """The async side: connections, reads with resume, manifests."""

    def __init__(self, ep: Endpoint, connections: int, block_size: int, max_requests: int, patience: float):
        self.ep = ep
        self.slots = [_Slot() for _ in range(connections)]
        self.block_size = block_size
        self.max_requests = max_requests
        self.patience = patience
        self.keepalive = outage.client_keepalive(patience)
        self.stats = Stats()
        self._next = itertools.count()
        self._indexes: dict[str, asyncio.Future[list[Piece]]] = {}
        #: Manifest pieces fetched (path -> SHA-256), the most recent :data:`PIECES_KEPT` of them.
        self._pieces: OrderedDict[tuple[str, int], asyncio.Future[dict[str, str]]] = OrderedDict()
        self._visible: set[str] | None = None
        self.recycler = _Recycler(self.stats)
        self.reads: set[asyncio.Task[bytearray]] = set()  # started by read_many, not yet done
        self.closed = False
        #: Why the platform refused this job, once it has: every later read fails with it, without a login.
        self.refused: str | None = None

    async def _wire(self, slot: _Slot) -> Wire:
        async with slot.lock:
            if slot.wire is not None:
                return slot.wire
            if self.refused is not None:
                raise AccessRevoked(self.refused)
            try:
                slot.conn, slot.says = await connect_watched(self.ep, keepalive_interval=self.keepalive.interval,
                                                             keepalive_count_max=self.keepalive.count,
                                                             connect_timeout=10)  # fmt: skip
            except AccessDenied as exc:  # refused at login: final
                raise self._revoked(str(exc)) from exc
            except PlatformUnavailable as exc:  # cut: the caller retries within its patience
                raise ConnectionError(str(exc)) from exc
            coalesce(slot.conn)
            outage.tune(slot.conn.get_extra_info("socket"), outage.tcp_user_timeout_ms(self.patience))
            try:
                slot.wire = await open_wire(slot.conn)
            except BaseException:
                self._drop(slot)  # no connection is left half set up
                raise
            return slot.wire

    def _drop(self, slot: _Slot) -> None:
        if slot.conn is not None:
            slot.conn.abort()
        slot.conn = slot.wire = slot.says = None

    async def read(self, path: str, offset: int = 0, size: int | None = None, keep_open: bool = False) -> bytearray:
        """Bytes ``offset..offset+size`` (to the end if None); stalls through cuts and resumes by offset.

        Blocks that arrived before a cut are kept; the read goes on from the first
        missing one on a fresh connection.  ``keep_open`` keeps the handle for more
        ranged reads of the same file (shards).
        """
        buf = Buffer(offset, size, self.recycler.alloc)
        started = time.monotonic()
        stalled_since: float | None = None
        delay = 0.2
        while True:
            slot = self.slots[next(self._next) % len(self.slots)]
            wire: Wire | None = None
            says = slot.says
            try:
                wire = await self._wire(slot)
                says = slot.says
                await wire.fill(path, buf, self.block_size, self.max_requests, keep_open)
            except AccessRevoked:
                raise
            except asyncssh.PermissionDenied as exc:  # the platform ended the session on policy grounds
                self._drop(slot)
                raise self._ended_by(path, exc) from exc
            except (asyncssh.SFTPNoSuchFile, asyncssh.SFTPPermissionDenied) as exc:
                raise await self._refusal(path, exc) from exc
            except _DROPPED as exc:
                ended = await _ended_by_platform(says)
                self._drop(slot)
                if ended is not None:  # the request failed first, then the platform said why: a refusal
                    raise self._ended_by(path, ended) from exc
                now = time.monotonic()
                # a silent cut is noticed only when keepalives give up: the stall began when the platform was last heard
                stalled_since = stalled_since or (max(started, min(now, wire.heard)) if wire is not None else now)
                if now - stalled_since > self.patience:
                    raise PlatformUnreachable(
                        f"{path}: the platform has been unreachable for {now - stalled_since:.0f} s "
                        f"(outage tolerance {self.patience:g} s)"
                    ) from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                self.stats.reconnects += 1
                continue
            except asyncssh.SFTPError as exc:  # a malformed reply or a refused size: this connection is done
                self._drop(slot)
                raise BadReply(f"{path}: {exc.reason}") from exc
            break
        if stalled_since is not None:
            self.stats.seconds_stalled += time.monotonic() - stalled_since
        data = buf.result()
        self.stats.bytes += len(data)
        return data

    def _revoked(self, message: str) -> AccessRevoked:
        """A refusal is final for the pool: later reads fail with it at once, not with a login each."""
        if self.refused is None:
            self.refused = message
        return AccessRevoked(message)

    def _ended_by(self, path: str, exc: asyncssh.PermissionDenied) -> AccessRevoked:
        return self._revoked(f"{path}: {exc.reason or 'access revoked'}")

    @contextlib.contextmanager
    def _ended(self, path: str) -> Iterator[None]:
        """A session the platform ended on policy grounds is a refusal, not a dropped link."""
        try:
            yield
        except asyncssh.PermissionDenied as exc:
            raise self._ended_by(path, exc) from exc

    async def _refusal(self, path: str, exc: Exception) -> OSError:
        dataset, _ = _split(path)
        if dataset is not None and dataset not in await self.visible():
            return PermissionError(f"dataset {dataset!r} is not granted to this job ({path})")
        if isinstance(exc, asyncssh.SFTPPermissionDenied):
            return PermissionError(f"{path}: permission denied")
        return FileNotFoundError(f"{path}: no such file")

    async def visible(self) -> set[str]:
        if self._visible is None:
            wire = await self._wire(self.slots[0])
            with self._ended("/datasets"):
                self._visible = {n for n in await wire.listdir("/datasets") if n not in (".", "..")}
        return self._visible

    async def index(self, dataset: str) -> list[Piece]:
        """The dataset's manifest index (a line per piece), fetched once; concurrent callers share the fetch."""
        job = self._indexes.get(dataset)
        if job is None:

            async def fetch() -> list[Piece]:
                raw = await self.read(f"/datasets/{dataset}/{MANIFEST_INDEX}")
                return parse_index(raw.decode())

            job = self._indexes[dataset] = asyncio.ensure_future(fetch())
            job.add_done_callback(lambda f: f.cancelled() or f.exception() is None or self._indexes.pop(dataset, None))
        return await asyncio.shield(job)

    async def piece(self, dataset: str, piece: Piece) -> dict[str, str]:
        """One piece of the manifest (path → SHA-256): a ranged read, checked against the index."""
        key = (dataset, piece.offset)
        job = self._pieces.get(key)
        if job is None:

            async def fetch() -> dict[str, str]:
                raw = await self.read(f"/datasets/{dataset}/{DATASET_MANIFEST}", piece.offset, piece.length)
                if hashlib.sha256(raw).hexdigest() != piece.sha256:
                    self._indexes.pop(dataset, None)  # a new version since the index was read: read it again
                    raise IntegrityError(f"dataset {dataset!r}: a manifest piece does not match its index "
                                         "(the dataset changed while it was read; try again)")  # fmt: skip
                return {p: sha for sha, p in parse_manifest(raw.decode())}

            job = self._pieces[key] = asyncio.ensure_future(fetch())
            job.add_done_callback(lambda f: f.cancelled() or f.exception() is None or self._pieces.pop(key, None))
            while len(self._pieces) > PIECES_KEPT:
                self._pieces.popitem(last=False)
        else:
            self._pieces.move_to_end(key)
        return await asyncio.shield(job)

    async def expected(self, dataset: str, rel: str) -> str | None:
        """The SHA-256 the manifest records for ``rel``, from the one piece that can hold it (None: not listed)."""
        found = find_piece(await self.index(dataset), rel)
        return None if found is None else (await self.piece(dataset, found)).get(rel)

    async def listing(self, dataset: str, prefix: str = "") -> list[tuple[str, str]]:
        """Every ``(path, sha256)`` of the manifest under ``prefix``, piece by piece (only the pieces it spans)."""
        pieces = await self.index(dataset)
        out: list[tuple[str, str]] = []
        for i, p in enumerate(pieces):
            after = pieces[i + 1].first if i + 1 < len(pieces) else None
            if (after is not None and after <= prefix) or (
                prefix and p.first > prefix and not p.first.startswith(prefix)
            ):
                continue
            raw = await self.read(f"/datasets/{dataset}/{DATASET_MANIFEST}", p.offset, p.length)
            if hashlib.sha256(raw).hexdigest() != p.sha256:
                self._indexes.pop(dataset, None)
                raise IntegrityError(f"dataset {dataset!r}: a manifest piece does not match its index")
            out.extend((path, sha) for sha, path in parse_manifest(raw.decode()) if path.startswith(prefix))
        return out

    async def read_verified(self, sample: Sample, verify: bool) -> bytearray:
        if sample.shard is not None:
            data = await self.read(sample.shard, sample.offset, sample.size, keep_open=True)
            expected = sample.sha256
        else:
            data = await self.read(sample.path, sample.offset, sample.size)
            expected = sample.sha256
            if expected is None and verify and sample.offset == 0 and sample.size is None:
                dataset, rel = _split(sample.path)
                expected = await self.expected(dataset, rel) if dataset else None
        if expected is not None:
            if hashlib.sha256(data).hexdigest() != expected:
                raise IntegrityError(f"{sample.path}: content does not match the dataset manifest "
                                     "(changed on the platform since it was recorded)")  # fmt: skip
            self.stats.verified += 1
        self.stats.files += 1
        return data

    async def stat(self, path: str) -> Attrs:
        wire = await self._wire(self.slots[0])
        try:
            with self._ended(path):
                return await wire.stat(path)
        except (asyncssh.SFTPNoSuchFile, asyncssh.SFTPPermissionDenied) as exc:
            raise await self._refusal(path, exc) from exc

    async def scandir(self, path: str) -> list[tuple[str, Attrs]]:
        wire = await self._wire(self.slots[0])
        try:
            with self._ended(path):
                entries = await wire.scandir(path)
        except (asyncssh.SFTPNoSuchFile, asyncssh.SFTPPermissionDenied) as exc:
            raise await self._refusal(path, exc) from exc
        except asyncssh.SFTPFailure as exc:  # the server cannot list it: a file, not a folder
            raise NotADirectoryError(f"{path}: not a folder") from exc
        return [(name, attrs) for name, attrs in entries if name not in (".", "..")]

    async def gather(self, samples: list[Sample], verify: bool, window: int) -> list[bytearray | Exception]:
        """Read every sample, ``window`` in flight, started in batches as ``read_many`` does.

        Reads start a quarter window at a time (one loop pass, so their requests leave in
        one channel write), not one per finished read: fewer packets for both ends.
        """
        out: list[bytearray | Exception] = [LoaderClosed(f"read cancelled: {CLOSED}")] * len(samples)
        todo = iter(enumerate(samples))
        refill = max(1, window // 4)
        wake = asyncio.Event()
        flying = 0
        loop = asyncio.get_running_loop()

        async def one(i: int, sample: Sample) -> None:
            nonlocal flying
            try:
                out[i] = await self.read_verified(sample, verify)
            except (OSError, MedbridgeError) as exc:
                out[i] = exc
            finally:
                flying -= 1
                if window - flying >= refill or flying == 0:
                    wake.set()

        while not self.closed:
            batch = list(itertools.islice(todo, window - flying))
            for i, sample in batch:
                task = loop.create_task(one(i, sample))
                self.reads.add(task)  # type: ignore[arg-type]
                task.add_done_callback(self.reads.discard)
            flying += len(batch)
            if flying == 0:
                break
            wake.clear()
            await wake.wait()
        return out

    async def close(self) -> None:
        """Stop the reads still in flight (their consumers get an error, not a hang), then the connections."""
        self.closed = True
        reads = list(self.reads)
        for task in reads:
            task.cancel()
        await asyncio.gather(*reads, return_exceptions=True)
        for slot in self.slots:
            if slot.conn is not None:
                slot.conn.close()
                await slot.conn.wait_closed()
            slot.conn = slot.wire = slot.says = None
        self.recycler.clear()


class _Pending:
    """One read's outcome, handed from the loop thread to the consumer without a lock unless it must wait.

    A ``concurrent.futures.Future`` per sample cost a condition variable's notify per
    read, and ``run_coroutine_threadsafe`` a loop wake-up per read: a large share of the
    loader's CPU for small files (docs/benchmarks.md).  Here the consumer sets ``waiter`` before it checks
    ``done`` and the loop sets ``done`` before it reads ``waiter``, so no wake-up is lost.
    """

    __slots__ = ("done", "error", "task", "value", "waiter")

    def __init__(self) -> None:
        self.done = False
        self.value: bytearray | None = None
        self.error: BaseException | None = None
        self.task: asyncio.Task[bytearray] | None = None
        self.waiter: threading.Lock | None = None

    def settle(self, task: asyncio.Task[bytearray]) -> None:
        """Loop thread: record the task's outcome and wake the consumer if it waits."""
        if task.cancelled():  # the consumer stopped early (nobody waits), or the loader was closed
            self.error = LoaderClosed(f"read cancelled: {CLOSED}")
        else:
            self.error = task.exception()
            self.value = None if self.error else task.result()
        self.task = None
        self.done = True
        waiter = self.waiter
        if waiter is not None:
            waiter.release()

    def result(self, closed: Callable[[], bool]) -> bytearray:
        """Consumer thread: the bytes, or the read's exception; an error once ``closed()`` says the loader is gone.

        A batch queued just as the loader closes may never run; waiting in slices and
        asking ``closed`` is what keeps its consumer from waiting forever.
        """
        if not self.done:
            lock = threading.Lock()
            lock.acquire()
            self.waiter = lock
            while not self.done and not lock.acquire(timeout=0.5):
                if closed() and not self.done:
                    raise LoaderClosed(f"read cancelled: {CLOSED}")
        if self.error is not None:
            raise self.error
        assert self.value is not None
        return self.value


def _start(pool: _Pool, batch: list[tuple[_Pending, Sample]], verify: bool) -> None:
    if pool.closed:  # a batch that raced close(): nothing starts (no reconnect after close)
        return
    loop = asyncio.get_running_loop()
    pool.stats.started += len(batch)
    for pending, sample in batch:
        pending.task = task = loop.create_task(pool.read_verified(sample, verify))
        pool.reads.add(task)
        task.add_done_callback(pool.reads.discard)
        task.add_done_callback(pending.settle)


def _cancel(pendings: list[_Pending]) -> None:
    for pending in pendings:
        if pending.task is not None:
            pending.task.cancel()


def _split(path: str) -> tuple[str | None, str]:
    """``/datasets/<name>/<rest>`` as ``(name, rest)``, parsed as the platform parses it; else ``(None, path)``."""
    try:
        target = parse(normalise(path))
    except PathEscape:
        return None, path
    if target.kind is Kind.DATASET:
        return target.name, "/".join(target.rest)
    return None, path


def job_tolerance(environ: Mapping[str, str]) -> float:
    """The outage tolerance ``job run`` settled with the platform (``MEDBRIDGE_OUTAGE_TOLERANCE``), else the default."""
    try:
        return outage.check(float(environ.get("MEDBRIDGE_OUTAGE_TOLERANCE", outage.DEFAULT_TOLERANCE)))
    except ValueError:
        return outage.DEFAULT_TOLERANCE


async def _ended_by_platform(says: PlatformSays | None) -> asyncssh.PermissionDenied | None:
    """Did the platform end this connection on policy grounds?

    A request can fail (its channel closed) just before the disconnect that says why
    arrives: wait briefly for it.
    """
    if says is None:
        return None
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(says.ended.wait(), 1.0)
    return says.ended_by if isinstance(says.ended_by, asyncssh.PermissionDenied) else None


class Loader:
    """Synchronous face of the pool; safe to use after fork (each process gets its own).

    ``patience``: seconds the platform may be unreachable before a read fails (default:
    the job's outage tolerance), waited out by reconnecting and resuming by offset.
    """

    def __init__(
        self,
        endpoint: Endpoint | None = None,
        *,
        connections: int = 4,
        window: int = 64,
        block_size: int = 1 << 20,
        max_requests: int = 16,
        verify: bool = True,
        patience: float | None = None,
        environ: Mapping[str, str] | None = None,
        keep_freed_memory: bool = True,
    ):
        env = environ if environ is not None else os.environ
        self._endpoint = endpoint or endpoint_from_job(env)
        self._options = (connections, block_size, max_requests, patience or job_tolerance(env))
        self.window = window
        self.verify = verify
        if keep_freed_memory:  # process-wide: see processes.keep_freed_memory (False leaves malloc alone)
            processes.keep_freed_memory()
        self._pid = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pool: _Pool | None = None
        self._thread: threading.Thread | None = None

    def _runtime(self) -> tuple[asyncio.AbstractEventLoop, _Pool]:
        if self._pid != os.getpid() or self._loop is None or self._pool is None:
            # A forked child must not use (or even close) its parent's loop and sockets.
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="medbridge-loader", daemon=True)
            thread.start()
            self._loop, self._thread, self._pid = loop, thread, os.getpid()
            self._pool = _Pool(self._endpoint, *self._options)
        return self._loop, self._pool

    def _submit(self, coro: Any) -> Future[Any]:
        loop, _ = self._runtime()
        return asyncio.run_coroutine_threadsafe(coro, loop)

    @property
    def stats(self) -> Stats:
        return self._runtime()[1].stats

    def read(self, path: str) -> bytearray:
        """A whole file, verified against its dataset's manifest."""
        return self.read_sample(Sample(path))

    def read_range(self, path: str, offset: int, size: int) -> bytes:
        return bytes(self._submit(self._runtime()[1].read(path, offset, size)).result())

    def read_sample(self, sample: Sample) -> bytearray:
        """One sample's bytes, verified; a bytearray the caller owns (no copy is made to hand it over)."""
        data: bytearray = self._submit(self._runtime()[1].read_verified(sample, self.verify)).result()
        return data

    def read_many(self, items: Iterable[str | Sample], window: int | None = None) -> Iterator[bytearray]:
        """Every item's bytes, in order, with up to ``window`` reads in flight ahead of the consumer.

        An item the consumer no longer holds two items later is recycled as the buffer of
        a later read (keep a reference, or a copy, to keep its bytes).
        """
        loop, pool = self._runtime()
        width = window or self.window
        refill = max(1, width // 4)  # reads start in batches: one loop wake-up per batch, not per item
        ahead: deque[_Pending] = deque()
        batch: list[tuple[_Pending, Sample]] = []
        handed: deque[bytearray] = deque()  # handed over, not yet judged: a loop variable still holds the last

        def start() -> None:
            if pool.closed or loop.is_closed():
                raise LoaderClosed(f"read_many: {CLOSED}")
            loop.call_soon_threadsafe(_start, pool, list(batch), self.verify)
            batch.clear()

        try:
            for item in items:
                pending = _Pending()
                batch.append((pending, item if isinstance(item, Sample) else Sample(item)))
                ahead.append(pending)
                if len(batch) >= refill:
                    start()
                if len(ahead) >= width:
                    if batch:
                        start()
                    yield self._hand_over(ahead.popleft(), handed, pool)
            if batch:
                start()
            while ahead:
                yield self._hand_over(ahead.popleft(), handed, pool)
            self._release(handed, pool, keep=1)
        finally:
            if ahead and not loop.is_closed():  # batches already sent start before this runs, then stop
                loop.call_soon_threadsafe(_cancel, list(ahead))

    @classmethod
    def _hand_over(cls, pending: _Pending, handed: deque[bytearray], pool: _Pool) -> bytearray:
        data = pending.result(lambda: pool.closed)
        handed.append(data)
        cls._release(handed, pool, keep=2)
        return data

    @staticmethod
    def _release(handed: deque[bytearray], pool: _Pool, keep: int) -> None:
        """Recycle the oldest items handed over, down to ``keep``, that the consumer let go of."""
        while len(handed) > keep:
            old = handed.popleft()
            if _REFCOUNT_EXACT and sys.getrefcount(old) <= 2:  # this frame and the argument: nobody else does
                pool.recycler.give(old)

    def datasets(self) -> list[str]:
        return sorted(self._submit(self._runtime()[1].visible()).result())

    def files(self, dataset: str) -> list[str]:
        """Every file of a dataset (from its manifest), as platform paths; shards left out."""
        listing = self._submit(self._runtime()[1].listing(dataset)).result()
        return [f"/datasets/{dataset}/{rel}" for rel, _ in listing if not rel.startswith(".shards/")]

    def shard_samples(self, dataset: str) -> list[Sample]:
        """Every member of the dataset's shards as a :class:`Sample` (one ranged read each)."""
        listing = self._submit(self._runtime()[1].listing(dataset, ".shards/")).result()
        samples = []
        for rel, _ in listing:
            if not (rel.startswith(".shards/") and rel.endswith(".index.json")):
                continue
            index = json.loads(self.read(f"/datasets/{dataset}/{rel}"))
            shard = f"/datasets/{dataset}/" + posixpath.join(posixpath.dirname(rel), index["shard"])
            for m in index["members"]:
                samples.append(Sample(f"/datasets/{dataset}/{m['name']}", shard, m["offset"], m["size"], m["sha256"]))
        return samples

    def open(self, path: str, *, block: int = 1 << 20, readahead: int = 4, capacity: int = 64 << 20) -> RemoteFile:
        """A read-only file object with a read-ahead cache (for readers that seek: pydicom, nibabel)."""
        size = self._submit(self._size(path)).result()
        cache = ReadAheadCache(lambda off, n: self.read_range(path, off, n), size, block=block,
                               readahead=readahead, capacity=capacity)  # fmt: skip
        return RemoteFile(path, cache)

    async def _size(self, path: str) -> int:
        return int((await self._runtime()[1].stat(path)).size or 0)

    @property
    def endpoint(self) -> Endpoint:
        return self._endpoint

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loader's event loop and wait for it (for clients built on its loop)."""
        result: T = self._submit(coro).result()
        return result

    def stat(self, path: str) -> Attrs:
        """A file's or folder's attributes (size, mode, modification time)."""
        attrs: Attrs = self._submit(self._runtime()[1].stat(path)).result()
        return attrs

    def scandir(self, path: str) -> list[tuple[str, Attrs]]:
        """A folder's entries with their attributes, ``.`` and ``..`` left out."""
        entries: list[tuple[str, Attrs]] = self._submit(self._runtime()[1].scandir(path)).result()
        return entries

    def gather(self, items: Sequence[str | Sample], window: int | None = None) -> list[bytearray | Exception]:
        """Every item's bytes or its error, in order, with up to ``window`` reads in flight.

        Unlike :meth:`read_many`, one failed item does not end the others: its place
        holds the exception (what fsspec's ``cat_ranges(on_error="return")`` needs).
        """
        pool = self._runtime()[1]
        samples = [item if isinstance(item, Sample) else Sample(item) for item in items]
        try:
            out: list[bytearray | Exception] = self._submit(
                pool.gather(samples, self.verify, window or self.window)
            ).result()
        except CancelledError:
            raise LoaderClosed(f"read cancelled: {CLOSED}") from None
        return out

    def close(self) -> None:
        if self._pid == os.getpid() and self._loop is not None and self._pool is not None:
            asyncio.run_coroutine_threadsafe(self._pool.close(), self._loop).result(timeout=30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=10)
            self._loop.close()
        self._loop = self._pool = self._thread = None
        self._pid = -1

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        """Pickled into DataLoader workers without the loop or connections."""
        state = dict(self.__dict__)
        state.update(_pid=-1, _loop=None, _pool=None, _thread=None)
        return state


class RemoteFile:
    """A seekable, read-only binary file over the loader's read-ahead cache."""

    def __init__(self, name: str, cache: ReadAheadCache):
        self.name = name
        self._cache = cache
        self._pos = 0

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = self._cache.length - self._pos
        data = self._cache.read(self._pos, size)
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._cache.length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    @property
    def counters(self) -> Any:
        return self._cache.counters

    def close(self) -> None:
        self._cache.close()

    def __enter__(self) -> RemoteFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
