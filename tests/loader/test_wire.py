"""The loader's SFTP engine: exact bytes at every size, replies parsed however they are split, no hangs."""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Iterator
from typing import Any

import asyncssh
import pytest

from medbridge.compute.session import Endpoint
from medbridge.config import READ_FILE_EXTENSION
from medbridge.loader import Loader
from medbridge.loader.wire import DATA, FSTAT, HANDLE, OPEN, READ, STATUS, Buffer, Wire
from medbridge.testing import RunningPlatform
from tests.loader.conftest import alice_reads

BLOCK = 4096
SIZES = [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5, 64 * BLOCK + 7]
FILES = {f"s/{n:06d}.bin": os.urandom(n) for n in SIZES}
FILES |= {f"v/{i}.raw": os.urandom((3 << 20) + 1000 * i) for i in range(6)}


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningPlatform]:
    with alice_reads(tmp_path_factory.mktemp("wire"), "ct", FILES, 1 << 20) as p:
        yield p


def test_every_size_around_block_edges_reads_back_exactly(endpoint: Endpoint) -> None:
    with Loader(endpoint, block_size=BLOCK, max_requests=4) as loader:
        for rel, data in FILES.items():
            assert loader.read(f"/datasets/ct/{rel}") == data, rel
        biggest = f"s/{SIZES[-1]:06d}.bin"
        part = loader.read_range(f"/datasets/ct/{biggest}", BLOCK - 3, 2 * BLOCK)
        assert part == FILES[biggest][BLOCK - 3 : 3 * BLOCK - 3]
        assert loader.stats.verified == len(FILES)


def test_shards_are_opened_once_per_connection_not_once_per_sample(
    platform: RunningPlatform, endpoint: Endpoint
) -> None:
    with Loader(endpoint, connections=2) as loader:
        samples = loader.shard_samples("ct")
        before = len(platform.audit("sftp.open"))
        for sample, data in zip(samples, loader.read_many(samples), strict=True):
            assert data == FILES[sample.path.removeprefix("/datasets/ct/")]
    opens = [r for r in platform.audit("sftp.open")[before:] if "/.shards/" in r.subject]
    shards = {s.shard for s in samples}
    assert len(samples) > len(shards)
    assert len(opens) <= 2 * len(shards), "a kept handle serves every sample of its shard on a connection"


def test_items_the_consumer_keeps_are_never_reused(endpoint: Endpoint) -> None:
    paths = [f"/datasets/ct/v/{i}.raw" for i in range(6)] * 3
    with Loader(endpoint, window=2) as loader:
        kept = list(loader.read_many(paths))
        assert kept == [FILES[p.removeprefix("/datasets/ct/")] for p in paths]
        assert loader.stats.recycled == 0


def test_items_the_consumer_lets_go_are_recycled_and_still_exact(endpoint: Endpoint) -> None:
    paths = [f"/datasets/ct/v/{i}.raw" for i in range(6)] * 3
    with Loader(endpoint, window=2) as loader:
        for path, data in zip(paths, loader.read_many(paths), strict=True):
            assert data == FILES[path.removeprefix("/datasets/ct/")]
        assert loader.stats.recycled > 0


def test_a_recycled_buffer_never_shows_older_bytes_past_a_short_read() -> None:
    stale = bytearray(b"x" * 100)
    buf = Buffer(0, None, lambda n: stale if n <= 100 else bytearray(n))
    buf.sized(100)
    buf.sink(0, 10)[:] = b"0123456789"
    buf.got[0] = 10  # the file ended after 10 bytes (it shrank since its size was read)
    assert buf.result() == b"0123456789"


# -- the parser, fed by hand ------------------------------------------------------------
# A real server decides how its replies are cut into SSH packets; to cover every cut
# the parser is fed directly, through a stand-in for the channel that only records.


class _Chan:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.sent.append(data)

    def abort(self) -> None:
        self.aborted = True


def _reply(kind: int, rid: int, body: bytes) -> bytes:
    payload = bytes([kind]) + struct.pack(">I", rid) + body
    return struct.pack(">I", len(payload)) + payload


def _string(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


async def _wire() -> tuple[Wire, _Chan]:
    wire, chan = Wire(), _Chan()
    wire.connection_made(chan)  # type: ignore[arg-type]
    wire.data_received(_reply(2, 3, b""), None)  # VERSION 3, no extensions
    await wire.start()
    return wire, chan


def _ids(chan: _Chan) -> list[tuple[int, int]]:
    """(type, id) of every request sent after INIT; one channel write may carry several."""
    out, stream = [], b"".join(chan.sent[1:])
    while stream:
        (n,) = struct.unpack(">I", stream[:4])
        out.append((stream[4], struct.unpack(">I", stream[5:9])[0]))
        stream = stream[4 + n :]
    return out


async def _sent() -> None:
    """Let the wire run and flush what it queued (requests of one pass leave in one write)."""
    for _ in range(3):
        await asyncio.sleep(0)


def test_the_platform_extension_is_used_only_where_offered() -> None:
    async def run(ext: bytes) -> int:
        wire, chan = Wire(), _Chan()
        wire.connection_made(chan)  # type: ignore[arg-type]
        wire.data_received(_reply(2, 3, ext), None)  # VERSION 3
        await wire.start()
        return wire.read_file_max

    assert asyncio.run(run(b"")) == 0, "OpenSSH offers no read-file: handles are used"
    assert asyncio.run(run(_string(READ_FILE_EXTENSION) + _string(b"4194304"))) == 4 << 20


def test_replies_cut_at_every_byte_parse_the_same() -> None:
    payload = os.urandom(3000)

    async def run(cut: int) -> bytes:
        wire, chan = await _wire()
        buf = Buffer(0, None)
        task = asyncio.ensure_future(wire.fill("/datasets/ct/a", buf, 1 << 20, 4))
        await _sent()
        ((kind, rid),) = _ids(chan)
        assert kind == OPEN
        wire.data_received(_reply(HANDLE, rid, _string(b"h1")), None)
        await _sent()
        (_, fstat), (_, read) = _ids(chan)[1:]
        assert len(chan.sent) == 3, "INIT, OPEN, then fstat and the first read in one channel write"
        attrs = struct.pack(">IQ", 1, len(payload))
        stream = _reply(105, fstat, attrs) + _reply(DATA, read, _string(payload))
        for part in (stream[:cut], stream[cut:]):
            if part:
                wire.data_received(part, None)
        await task
        assert [k for k, _ in _ids(chan)] == [OPEN, FSTAT, READ, 4], "open, fstat with the first read, close"
        return buf.result()

    async def every_cut() -> None:
        stream_len = 4 + 9 + 4 + 8 + 4 + 9 + 4 + len(payload)
        for cut in [*range(0, 60), stream_len // 2, stream_len - 1]:
            assert await run(cut) == payload, cut

    asyncio.run(every_cut())


def test_an_unparseable_reply_fails_waiting_requests_and_the_channel() -> None:
    async def run() -> tuple[BaseException | None, bool, Any]:
        wire, chan = await _wire()
        fut = wire.open("/datasets/ct/a")
        wire.data_received(_reply(HANDLE, 999, _string(b"h")), None)  # answers nothing we asked
        with pytest.raises(asyncssh.SFTPBadMessage):
            await fut
        with pytest.raises(asyncssh.SFTPBadMessage):
            wire.open("/datasets/ct/b")
        return None, chan.aborted, None

    _, aborted, _ = asyncio.run(run())
    assert aborted


@pytest.mark.parametrize(
    ("why", "raised"),
    [
        (ConnectionResetError("link cut"), asyncssh.SFTPConnectionLost),
        (asyncssh.PermissionDenied("access revoked: grant ended for dataset(s) ct"), asyncssh.PermissionDenied),
    ],
    ids=["cut", "ended-by-the-platform"],
)
def test_a_lost_channel_fails_a_read_mid_payload_and_every_request_after(
    why: Exception, raised: type[Exception]
) -> None:
    """A cut stays a cut; a session the platform ended stays a refusal (the loader never retries it)."""

    async def run() -> None:
        wire, _ = await _wire()
        buf = Buffer(0, 10)
        fut = wire.read(b"h", 0, 10, lambda n: buf.sink(0, n))
        wire.data_received(_reply(DATA, 1, _string(b"0123456789"))[:-4], None)
        wire.connection_lost(why)
        with pytest.raises(raised):
            await fut
        with pytest.raises(raised):
            wire.open("/datasets/ct/b")

    asyncio.run(run())


def test_status_codes_become_the_matching_errors() -> None:
    async def run() -> None:
        wire, _ = await _wire()
        fut = wire.open("/datasets/ct/nope")
        wire.data_received(_reply(STATUS, 1, struct.pack(">I", 2) + _string(b"no such file") + _string(b"")), None)
        with pytest.raises(asyncssh.SFTPNoSuchFile, match="no such file"):
            await fut

    asyncio.run(run())


def test_a_read_reply_longer_than_asked_is_refused_not_written() -> None:
    async def run() -> bytearray:
        wire, chan = await _wire()
        buf = Buffer(0, 8)
        fut = wire.read(b"h", 0, 4, lambda n: buf.sink(0, n))
        wire.data_received(_reply(DATA, 1, _string(b"01234567")), None)
        with pytest.raises(asyncssh.SFTPBadMessage, match="request for 4"):
            await fut
        assert chan.aborted
        assert buf.data is not None
        return buf.data

    assert asyncio.run(run()) == bytes(8), "nothing past what was asked lands in the buffer"


async def _opened(wire: Wire, chan: _Chan, buf: Buffer) -> tuple[asyncio.Future[None], list[tuple[int, int]]]:
    """Start ``fill`` and answer its open; the requests it sends next."""
    task = asyncio.ensure_future(wire.fill("/datasets/ct/a", buf, 4096, 4))
    await _sent()
    ((_, rid),) = _ids(chan)
    wire.data_received(_reply(HANDLE, rid, _string(b"h")), None)
    await _sent()
    return task, _ids(chan)[1:]


def test_a_part_cut_mid_payload_never_lands_after_the_resume() -> None:
    good = bytes(range(1, 101))

    async def run() -> bytearray:
        buf = Buffer(0, None)
        wire, chan = await _wire()
        task, ((_, fstat), (_, read)) = await _opened(wire, chan, buf)
        wire.data_received(_reply(105, fstat, struct.pack(">IQ", 1, 100)), None)  # 100 bytes at fstat...
        wire.data_received(_reply(DATA, read, _string(good + b"\xee" * 100))[: 13 + 30], None)  # ...200 sent, cut
        wire.connection_lost(ConnectionResetError("link cut"))
        with pytest.raises(asyncssh.SFTPConnectionLost):
            await task
        wire, chan = await _wire()  # the resume, on a new connection
        task, ((_, read),) = await _opened(wire, chan, buf)
        wire.data_received(_reply(DATA, read, _string(good)), None)
        await task
        return buf.result()

    assert asyncio.run(run()) == good


@pytest.mark.parametrize("answer", [_reply(STATUS, 0, struct.pack(">I", 0) + _string(b"") + _string(b"")),
                                    _reply(HANDLE, 0, _string(b"h2"))])  # fmt: skip
def test_a_read_answered_by_the_wrong_reply_fails_instead_of_hanging(answer: bytes) -> None:
    async def run() -> None:
        wire, chan = await _wire()
        task, ((_, read),) = await _opened(wire, chan, Buffer(0, 10))
        wire.data_received(answer[:5] + struct.pack(">I", read) + answer[9:], None)
        with pytest.raises(asyncssh.SFTPBadMessage, match="answered by type"):
            await asyncio.wait_for(task, 5)
        assert chan.aborted

    asyncio.run(run())


def test_attributes_without_a_size_are_refused_not_read_as_empty() -> None:
    async def run() -> None:
        wire, chan = await _wire()
        task, ((_, fstat), (_, read)) = await _opened(wire, chan, Buffer(0, None))
        wire.data_received(_reply(105, fstat, struct.pack(">I", 0)) + _reply(DATA, read, _string(b"hello")), None)
        with pytest.raises(asyncssh.SFTPBadMessage, match="without a size"):
            await asyncio.wait_for(task, 5)

    asyncio.run(run())


def test_a_claimed_size_past_the_bound_is_refused_before_allocating() -> None:
    with pytest.raises(asyncssh.SFTPFailure, match="read it by ranges"):
        Buffer(0, None).sized(1 << 50)
