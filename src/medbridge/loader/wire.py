"""A lean SFTP v3 client engine for the loader, on one asyncssh channel.

Why not asyncssh's own SFTP client: it awaits every request as a task of its own and
copies a read's bytes five times (stream join, packet slice, block reassembly, ...),
and its file API costs four sequential round trips per file (open, stat, read, close).
Here a read's payload is copied once, straight from the decrypted SSH packet into the
caller's buffer.  A file smaller than a block is one request where the platform offers
``read-file@medbridge``; otherwise a file whose size is unknown is read as open, then
fstat and the next block together, and the close is sent without waiting for it.
Handles of files read by ranges (shards) stay open.

Only what the loader needs is spoken: open/close/read/fstat/stat/opendir/readdir and
the ``limits@openssh.com`` and ``read-file@medbridge`` extensions.  Servers answer the requests of one channel in
order (SFTP servers, ours and OpenSSH's, process them sequentially); nothing here
depends on it for correctness, only for saving a buffer copy.
"""

from __future__ import annotations

import asyncio
import itertools
import struct
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import asyncssh

from medbridge.config import READ_FILE_EXTENSION

INIT, VERSION, OPEN, CLOSE, READ, FSTAT, OPENDIR, READDIR, STAT, EXTENDED = 1, 2, 3, 4, 5, 8, 11, 12, 17, 200
STATUS, HANDLE, DATA, NAME, ATTRS, EXTENDED_REPLY = 101, 102, 103, 104, 105, 201
FX_OK, FX_EOF, FX_NO_SUCH_FILE, FX_PERMISSION_DENIED = 0, 1, 2, 3
FXF_READ = 0x1
_ATTR_SIZE, _ATTR_UIDGID, _ATTR_PERMISSIONS, _ATTR_ACMODTIME, _ATTR_EXTENDED = 0x1, 0x2, 0x4, 0x8, 0x80000000
MAX_PACKET = 8 << 20  # larger replies are a protocol error (reads are capped well below)
MAX_BUFFER = 16 << 30  # one read's buffer; a server claiming more is not believed into an allocation
DEFAULT_MAX_READ = 256 << 10  # what OpenSSH's sftp-server serves per read when it does not say
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_HEAD = struct.Struct(">IBI")  # length, type, request id


def _string(b: bytes) -> bytes:
    return _U32.pack(len(b)) + b


_ANSWERS = {OPEN: HANDLE, OPENDIR: HANDLE, CLOSE: STATUS, READ: DATA, FSTAT: ATTRS, STAT: ATTRS, READDIR: NAME,
            EXTENDED: EXTENDED_REPLY}  # fmt: skip


def _status_error(code: int, message: str) -> asyncssh.SFTPError:
    if code == FX_NO_SUCH_FILE:
        return asyncssh.SFTPNoSuchFile(message)
    if code == FX_PERMISSION_DENIED:
        return asyncssh.SFTPPermissionDenied(message)
    if code == FX_EOF:
        return asyncssh.SFTPEOFError(message)
    return asyncssh.SFTPFailure(message or f"SFTP status {code}")


@dataclass(frozen=True)
class Attrs:
    size: int | None
    permissions: int | None
    mtime: int | None = None


class _Reader:
    """Walks one reply's fields."""

    def __init__(self, data: bytes, pos: int = 0):
        self.data, self.pos = data, pos

    def u32(self) -> int:
        (v,) = _U32.unpack_from(self.data, self.pos)
        self.pos += 4
        return int(v)

    def u64(self) -> int:
        (v,) = _U64.unpack_from(self.data, self.pos)
        self.pos += 8
        return int(v)

    def string(self) -> bytes:
        n = self.u32()
        if self.pos + n > len(self.data):
            raise asyncssh.SFTPBadMessage("truncated string in reply")
        v = self.data[self.pos : self.pos + n]
        self.pos += n
        return v

    def attrs(self) -> Attrs:
        flags = self.u32()
        size = self.u64() if flags & _ATTR_SIZE else None
        if flags & _ATTR_UIDGID:
            self.pos += 8
        perms = self.u32() if flags & _ATTR_PERMISSIONS else None
        mtime = None
        if flags & _ATTR_ACMODTIME:
            self.u32()
            mtime = self.u32()
        if flags & _ATTR_EXTENDED:
            for _ in range(self.u32()):
                self.string()
                self.string()
        return Attrs(size, perms, mtime)


class Buffer:
    """One range of a file being read: its bytes, and which blocks have arrived (kept across reconnects).

    ``alloc`` may hand out a recycled buffer holding older bytes: only the prefix that
    this read filled is ever returned.
    """

    def __init__(self, offset: int, size: int | None, alloc: Callable[[int], bytearray] = bytearray):
        self.offset = offset
        self.size = size
        self._alloc = alloc
        self.data: bytearray | None = None
        self.got: dict[int, int] = {}  # relative start -> bytes received there
        self._loose: dict[int, bytearray] = {}  # parts that arrived before the size was known
        self._landed: set[int] = set()  # loose parts that arrived whole (only those are ever used)
        if size is not None:
            self.sized(size)

    def sized(self, size: int) -> None:
        if size > MAX_BUFFER:
            raise asyncssh.SFTPFailure(
                f"{size} bytes is more than one read holds ({MAX_BUFFER >> 30} GiB): read it by ranges"
            )
        if self.data is None:
            self.size = size
            self.data = self._alloc(size)
            self._settle()

    def sink(self, pos: int, n: int) -> memoryview:
        """Where ``n`` bytes of the part at ``pos`` go; a part asked for again supersedes any earlier try."""
        self._loose.pop(pos, None)
        self._landed.discard(pos)
        if self.data is not None and pos + n <= len(self.data):
            return memoryview(self.data)[pos : pos + n]
        chunk = self._loose[pos] = bytearray(n)  # size not known yet (or the file grew): keep it aside
        return memoryview(chunk)

    def landed(self, pos: int) -> None:
        """The part at ``pos`` arrived whole; if it was kept aside, it may now be copied into place."""
        if pos in self._loose:
            self._landed.add(pos)
            self._settle()

    def _settle(self) -> None:
        if self.data is not None:
            for pos in self._landed:
                chunk = self._loose.pop(pos)
                self.data[pos : pos + len(chunk)] = chunk[: max(0, len(self.data) - pos)]
            self._landed.clear()

    def prefix(self) -> int:
        """How many bytes from the start have all arrived (where a resumed read starts)."""
        pos = 0
        while pos in self.got and self.got[pos] > 0:
            pos += self.got[pos]
        return pos

    def result(self) -> bytearray:
        """The bytes read, handed over: the buffer keeps no reference (so the caller's may be the only one)."""
        assert self.data is not None
        end = self.prefix()
        data, self.data = self.data, None
        return data if end == len(data) else data[:end]


@dataclass
class _Request:
    future: asyncio.Future[Any]
    expect: int  # the reply type that answers it (a STATUS error always may)
    sink: Callable[[int], memoryview] | None = None  # for READ: where the payload goes
    want: int = 0  # for READ: the most bytes asked for (a reply with more is refused)
    on_attrs: Callable[[Attrs], None] | None = None  # for FSTAT: run as the reply is parsed


class Wire(asyncssh.SSHClientSession[bytes]):
    """The protocol on one channel: requests out, replies parsed as bytes arrive."""

    def __init__(self) -> None:
        self._chan: asyncssh.SSHClientChannel[bytes] | None = None
        self._loop = asyncio.get_running_loop()
        self._ready: asyncio.Future[tuple[int, dict[bytes, bytes]]] = self._loop.create_future()
        self._pending: dict[int, _Request] = {}
        self._ids = itertools.count(1)
        self._buf = bytearray()
        self._need = 9
        self._sink: memoryview | None = None
        self._sink_req: _Request | None = None
        self._sink_pos = 0
        self._lost: Exception | None = None
        self.max_read = DEFAULT_MAX_READ
        self._handles: OrderedDict[str, asyncio.Future[bytes]] = OrderedDict()
        self.keep_handles = 32
        self._users: Counter[str] = Counter()  # reads now using a kept handle
        self._out: list[bytes] = []  # requests of this loop pass, sent as one channel write
        self.read_file_max = 0  # the platform's whole-file read (0: not offered, e.g. OpenSSH)
        self.heard = time.monotonic()  # when the platform last sent this channel data

    # -- asyncssh callbacks ------------------------------------------------------------

    def connection_made(self, chan: asyncssh.SSHClientChannel[bytes]) -> None:
        self._chan = chan
        chan.write(_U32.pack(5) + bytes([INIT]) + _U32.pack(3))

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.heard = time.monotonic()
        try:
            self._feed(memoryview(data))
        except Exception as exc:  # a reply we cannot parse ends the channel; no request may wait forever
            self._fail(asyncssh.SFTPBadMessage(f"malformed reply from the platform: {exc!r}"))
            if self._chan is not None:
                self._chan.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if isinstance(exc, asyncssh.PermissionDenied):  # the platform ended the session: a refusal, kept as such
            self._fail(exc)
        else:
            self._fail(asyncssh.SFTPConnectionLost(str(exc) if exc else "SFTP channel closed"))

    def _fail(self, exc: Exception) -> None:
        self._lost = self._lost or exc
        pending, self._pending = self._pending, {}
        if self._sink_req is not None:  # the read whose bytes were streaming in
            pending[-1] = self._sink_req
            self._sink = self._sink_req = None
        for req in pending.values():
            if not req.future.done():
                req.future.set_exception(exc)
        if not self._ready.done():
            self._ready.set_exception(exc)
        self._handles.clear()  # their futures were pending requests, failed above

    # -- parsing -----------------------------------------------------------------------

    def _feed(self, mv: memoryview) -> None:
        while mv:
            if self._sink is not None:
                n = min(len(mv), len(self._sink) - self._sink_pos)
                self._sink[self._sink_pos : self._sink_pos + n] = mv[:n]
                self._sink_pos += n
                mv = mv[n:]
                if self._sink_pos == len(self._sink):
                    req, done = self._sink_req, self._sink_pos
                    self._sink = self._sink_req = None
                    if req is not None and not req.future.done():
                        req.future.set_result(done)
                continue
            take = min(len(mv), self._need - len(self._buf))
            self._buf += mv[:take]
            mv = mv[take:]
            if len(self._buf) < self._need:
                return
            length, kind, rid = _HEAD.unpack_from(self._buf)
            if length > MAX_PACKET or length < 5:
                raise asyncssh.SFTPBadMessage(f"reply of {length} bytes")
            if kind == DATA and self._need == 9 and length >= 9:
                self._need = 13  # the payload's length follows; then it streams into its sink
                continue
            if kind == DATA and self._need == 13 and self._begin_data(rid, length):
                continue
            if self._need < 4 + length:
                self._need = 4 + length
                continue
            packet = bytes(self._buf)
            self._buf.clear()
            self._need = 9
            self._dispatch(kind, rid, packet)

    def _begin_data(self, rid: int, length: int) -> bool:
        (n,) = _U32.unpack_from(self._buf, 9)
        req = self._pending.get(rid)
        if req is None or req.sink is None or n + 9 != length:
            return False
        if n > req.want:
            raise asyncssh.SFTPBadMessage(f"read reply of {n} bytes to a request for {req.want}")
        del self._pending[rid]
        self._buf.clear()
        self._need = 9
        if n == 0:
            req.future.set_result(0)
            return True
        self._sink_req, self._sink_pos = req, 0
        self._sink = req.sink(n)
        return True

    def _dispatch(self, kind: int, rid: int, packet: bytes) -> None:
        if kind == VERSION:
            r = _Reader(packet, 9)  # rid was the version number
            ext = {}
            while r.pos < len(packet):
                name = r.string()
                ext[name] = r.string()
            if not self._ready.done():
                self._ready.set_result((rid, ext))
            return
        req = self._pending.pop(rid, None)
        if req is None:
            raise asyncssh.SFTPBadMessage(f"reply to unknown request {rid}")
        if req.future.done():
            return
        try:
            self._resolve(req, kind, packet)
        except Exception as exc:  # out of the table of pending requests: fail it here, then the channel
            if not req.future.done():
                req.future.set_exception(exc)
            raise

    def _resolve(self, req: _Request, kind: int, packet: bytes) -> None:
        r = _Reader(packet, 9)
        if kind != STATUS and kind != req.expect:
            raise asyncssh.SFTPBadMessage(f"reply of type {kind} to a request answered by type {req.expect}")
        if kind == STATUS:
            code = r.u32()
            message = r.string().decode(errors="replace") if r.pos < len(packet) else ""
            if code == FX_OK and req.expect != STATUS:
                raise asyncssh.SFTPBadMessage(f"empty success to a request answered by type {req.expect}")
            if code == FX_OK:
                req.future.set_result(None)
            elif code == FX_EOF and req.sink is not None:
                req.future.set_result(0)
            else:
                req.future.set_exception(_status_error(code, message))
        elif kind == HANDLE:
            req.future.set_result(r.string())
        elif kind == DATA:  # a read with no sink, or one whose length did not fit the sink path
            data = r.string()
            if req.sink is not None:
                if len(data) > req.want:
                    raise asyncssh.SFTPBadMessage(f"read reply of {len(data)} bytes to a request for {req.want}")
                req.sink(len(data))[:] = data
                req.future.set_result(len(data))
            else:
                req.future.set_result(data)
        elif kind == ATTRS:
            attrs = r.attrs()
            if attrs.size is None:
                raise asyncssh.SFTPBadMessage("file attributes without a size")
            if req.on_attrs is not None:
                req.on_attrs(attrs)
            req.future.set_result(attrs)
        elif kind == NAME:
            names = []
            for _ in range(r.u32()):
                name = r.string()
                r.string()  # long name
                names.append((name.decode(errors="surrogateescape"), r.attrs()))
            req.future.set_result(names)
        elif kind == EXTENDED_REPLY:
            req.future.set_result(packet[9:])
        else:
            raise asyncssh.SFTPBadMessage(f"unexpected reply type {kind}")

    # -- requests ----------------------------------------------------------------------

    def _send(self, kind: int, body: bytes, **fields: Any) -> asyncio.Future[Any]:
        """Send one request; ``fields`` are the :class:`_Request` extras its reply needs."""
        if self._lost is not None:
            raise self._lost
        assert self._chan is not None
        rid = next(self._ids) & 0xFFFFFFFF
        req = _Request(self._loop.create_future(), fields.pop("expect", _ANSWERS[kind]), **fields)
        self._pending[rid] = req
        if not self._out:
            self._loop.call_soon(self._flush)
        self._out.append(_U32.pack(len(body) + 5) + bytes([kind]) + _U32.pack(rid) + body)
        return req.future

    def _flush(self) -> None:
        """One channel write for the requests of a pass: one SSH packet to encrypt and decrypt, not one each."""
        out, self._out = self._out, []
        if self._chan is not None and self._lost is None:
            try:
                self._chan.write(b"".join(out))
            except (OSError, asyncssh.Error) as exc:  # the channel went away since: its requests fail, none hangs
                self._fail(asyncssh.SFTPConnectionLost(f"SFTP channel lost: {exc}"))
                self._chan.abort()

    async def start(self) -> None:
        """Wait for the server's version; learn how much one read may ask for."""
        try:
            version, ext = await asyncio.wait_for(self._ready, 30)
        except TimeoutError:
            raise asyncssh.SFTPConnectionLost("the platform did not start SFTP within 30 s") from None
        if version != 3:
            raise asyncssh.SFTPBadMessage(f"the platform answered SFTP version {version}, not 3")
        if READ_FILE_EXTENSION in ext:
            self.read_file_max = int(ext[READ_FILE_EXTENSION].decode() or 0)
        if b"limits@openssh.com" in ext:
            reply = await self._send(EXTENDED, _string(b"limits@openssh.com"))
            r = _Reader(reply)
            r.u64()
            max_read = r.u64()
            if max_read:
                self.max_read = min(max_read, MAX_PACKET - 64)

    def open(self, path: str) -> asyncio.Future[bytes]:
        return self._send(OPEN, _string(path.encode()) + _U32.pack(FXF_READ) + _U32.pack(0))

    def close_handle(self, handle: bytes) -> None:
        """Close without waiting: the reply is consumed when it comes."""
        if self._lost is None:
            fut = self._send(CLOSE, _string(handle))
            fut.add_done_callback(_consume)

    def fstat(self, handle: bytes, on_attrs: Callable[[Attrs], None] | None = None) -> asyncio.Future[Attrs]:
        return self._send(FSTAT, _string(handle), on_attrs=on_attrs)

    async def stat(self, path: str) -> Attrs:
        attrs: Attrs = await self._send(STAT, _string(path.encode()))
        return attrs

    def read(self, handle: bytes, offset: int, length: int, sink: Callable[[int], memoryview]) -> asyncio.Future[int]:
        return self._send(READ, _string(handle) + _U64.pack(offset) + _U32.pack(length), sink=sink, want=length)

    async def listdir(self, path: str) -> list[str]:
        return [name for name, _ in await self.scandir(path)]

    async def scandir(self, path: str) -> list[tuple[str, Attrs]]:
        """Every entry of a folder with its attributes (``.`` and ``..`` included, as the server sends them)."""
        handle = await self._send(OPENDIR, _string(path.encode()))
        names: list[tuple[str, Attrs]] = []
        try:
            while True:
                try:
                    batch = await self._send(READDIR, _string(handle))
                except asyncssh.SFTPEOFError:
                    return names
                names += batch
        finally:
            self.close_handle(handle)

    async def handle(self, path: str) -> bytes:
        """A handle kept open for repeated ranged reads (shards); the oldest is closed past ``keep_handles``."""
        fut = self._handles.get(path)
        if fut is None:
            fut = self._handles[path] = self.open(path)
            for name in list(self._handles):  # close the oldest unused ones past the bound
                if len(self._handles) <= self.keep_handles:
                    break
                if not self._users[name] and name != path:
                    self._handles.pop(name).add_done_callback(self._close_done)
        else:
            self._handles.move_to_end(path)
        try:
            return await asyncio.shield(fut)
        except asyncssh.SFTPError:
            if self._handles.get(path) is fut:
                del self._handles[path]
            raise

    def _close_done(self, fut: asyncio.Future[bytes]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self.close_handle(fut.result())

    async def fill(self, path: str, buf: Buffer, block: int, depth: int, keep_open: bool = False) -> None:
        """Read ``buf``'s range of ``path`` into it, skipping blocks it already has.

        A file smaller than a block may come whole in one request (:meth:`_read_file`).
        Otherwise, with the size unknown, fstat and the next missing block go out
        together; the reply to fstat sizes the buffer before that block's bytes are parsed.
        """
        block = max(1, min(block, self.max_read))
        whole = buf.size is None and not buf.got and not keep_open and self.read_file_max > 0
        if whole:
            block = min(block, self.read_file_max)  # so the part it brings is exactly block 0
            if await self._read_file(path, buf, block):
                return  # the whole file came in one request
        if keep_open:
            self._users[path] += 1
        try:
            handle = await (self.handle(path) if keep_open else self.open(path))
        except BaseException:
            self._users[path] -= keep_open
            raise
        inflight: set[asyncio.Future[int]] = set()
        try:
            ahead = -1  # the block sent with fstat, before the size was known
            if buf.size is None:
                stat = self.fstat(handle, lambda a: buf.sized(max(0, (a.size or 0) - buf.offset)))
                ahead = buf.prefix()  # 0, or block 0 already came by read-file
                if ahead % block:  # a block cut short before a reconnect: the block list below redoes it
                    ahead = -1
                else:
                    inflight.add(self._block(handle, buf, ahead, block))
                await stat
            assert buf.size is not None
            todo = [
                rel
                for rel in range(0, buf.size, block)
                if buf.got.get(rel, 0) < min(block, buf.size - rel) and rel != ahead
            ]
            todo.reverse()
            while todo or inflight:
                while todo and len(inflight) < depth:
                    rel = todo.pop()
                    inflight.add(self._block(handle, buf, rel, min(block, buf.size - rel)))
                done, inflight = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
                errors = [exc for fut in done if (exc := fut.exception()) is not None]  # each one read
                if errors:
                    raise errors[0]
        except BaseException:
            for rest in inflight:  # their outcome no longer matters; do not leave it unread
                rest.add_done_callback(_consume)
            raise
        finally:
            if keep_open:
                self._users[path] -= 1
            else:
                self.close_handle(handle)

    async def _read_file(self, path: str, buf: Buffer, want: int) -> bool:
        """The platform's whole-file read: one request, and the reply streams into the buffer.

        A reply shorter than asked ends at the file's end, so it sizes the buffer before
        its bytes land; a full one leaves the rest (and the size) to the handle path.
        """

        def sink(n: int) -> memoryview:
            if n < want:
                buf.sized(n)
            return buf.sink(0, n)

        body = _string(READ_FILE_EXTENSION) + _string(path.encode()) + _U64.pack(buf.offset) + _U32.pack(want)
        n: int = await self._send(EXTENDED, body, expect=DATA, sink=sink, want=want)
        if n < want:
            if buf.size is None:  # nothing to sink: an empty file, or an offset past its end
                buf.sized(0)
            buf.got[0] = n
            return True
        buf.landed(0)
        buf.got[0] = n
        return False

    def _block(self, handle: bytes, buf: Buffer, rel: int, length: int) -> asyncio.Future[int]:
        """Read one block; a short read (the server may give less) asks again for the rest."""
        out: asyncio.Future[int] = self._loop.create_future()

        def ask(got: int) -> None:
            part = self.read(handle, buf.offset + rel + got, length - got, lambda k: buf.sink(rel + got, k))
            part.add_done_callback(lambda fut: step(got, fut))

        def step(before: int, fut: asyncio.Future[int]) -> None:
            if out.done():
                return
            if fut.cancelled():
                out.cancel()
                return
            try:
                n = fut.result()
                buf.landed(rel + before)
                got = buf.got[rel] = before + n
                # The first block goes out before the size is known; once it is, it bounds the block.
                if n == 0 or got >= (length if buf.size is None else min(length, buf.size - rel)):
                    out.set_result(got)
                else:
                    ask(got)
            except Exception as exc:  # a failed part, or the channel gone between two parts: the block fails
                out.set_exception(exc)

        ask(0)
        return out


def _consume(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


async def open_wire(conn: asyncssh.SSHClientConnection, window: int = 8 << 20, max_pktsize: int = 128 << 10) -> Wire:
    """Start the ``sftp`` subsystem on ``conn`` with this engine.

    128 KiB SSH packets (asyncssh's default is 32 KiB) quarter the per-packet work of
    decrypting and delivering a read; an 8 MiB window keeps a 5 ms link full.
    """
    _, session = await conn.create_session(
        Wire, subsystem="sftp", encoding=None, window=window, max_pktsize=max_pktsize
    )
    wire = cast(Wire, session)
    await wire.start()
    return wire
