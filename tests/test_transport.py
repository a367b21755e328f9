"""Coalesced socket writes: the packets of one loop pass leave in one send, in order, and nothing is lost."""

from __future__ import annotations

import asyncio
import os

from medbridge.loader import Loader
from medbridge.testing import RunningPlatform
from medbridge.transport import CoalescingTransport
from tests.conftest import CHEST


async def _pair() -> tuple[CoalescingTransport, asyncio.StreamReader, asyncio.StreamWriter]:
    """A real loopback TCP connection: a coalesced protocol side and a plain stream side."""
    accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Future()
    server = await asyncio.start_server(lambda r, w: accepted.set_result((r, w)), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
    reader, writer = await accepted
    server.close()
    assert isinstance(transport, asyncio.Transport)
    return CoalescingTransport(transport, loop), reader, writer


def test_writes_of_one_pass_leave_in_one_send_in_order() -> None:
    parts = [os.urandom(n) for n in range(1, 60)]

    async def run() -> tuple[bytes, int, int]:
        t, reader, writer = await _pair()
        for p in parts:
            t.write(p)
        assert t.sends == 0 and t.get_write_buffer_size() == sum(map(len, parts))  # nothing sent within the pass
        got = await reader.readexactly(sum(map(len, parts)))
        t.close()
        writer.close()
        return got, t.sends, t.packets

    got, sends, packets = asyncio.run(run())
    assert got == b"".join(parts)
    assert (sends, packets) == (1, len(parts))


def test_close_and_abort_send_what_is_pending_first() -> None:
    async def run(how: str) -> bytes:
        t, reader, writer = await _pair()
        t.write(b"last ")
        t.write(b"words")
        getattr(t, how)()
        got = await reader.read()  # to EOF: the pending bytes came before the end
        writer.close()
        return got

    assert asyncio.run(run("close")) == b"last words"
    assert asyncio.run(run("abort")) == b"last words"


def test_platform_and_loader_connections_are_coalesced(platform: RunningPlatform) -> None:
    """Guards the asyncssh attribute coalesce() replaces: if a release renames it, this fails."""
    names = ["scan-001.bin", "scan-002.bin", "labels/readme.txt"]
    with platform.job_endpoint("alice") as ep, Loader(ep, connections=1, verify=True) as loader:
        got = list(loader.read_many([f"/datasets/chest/{n}" for n in names * 5]))
        pool = loader._runtime()[1]
        client = [s.conn._transport for s in pool.slots if s.conn is not None]  # type: ignore[attr-defined]
        servers = [owner.transport for owner in platform.background.platform.sessions]
    assert [bytes(b) for b in got] == [CHEST[n] for n in names * 5]
    assert client and all(isinstance(t, CoalescingTransport) and t.packets > t.sends > 0 for t in client)
    assert servers and all(t is not None and t.packets > t.sends > 0 for t in servers)
