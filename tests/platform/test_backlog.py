"""A client that stops reading its replies (issue 14's hostile review, the reply flood): the platform holds a
bounded backlog for it, serves everyone else meanwhile, and answers every request once it reads again."""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path

from asyncssh.constants import FXP_DATA

from medbridge.platform.sftp import MAX_READ, REPLY_HIGH_WATER
from medbridge.testing.wait import HANG
from tests.conftest import CHEST
from tests.platform.test_data_plane import _Raw, _sftp
from tests.platform.test_limits import read, two_users

READS = 1000
SIZE = 64 << 10
#: What a stalled channel may hold: the mark, one reply past it, and one event-loop pass of corked replies.
BOUND = REPLY_HIGH_WATER + MAX_READ + (1 << 20)


def test_a_client_that_reads_no_replies_gets_a_bounded_backlog(tmp_path: Path) -> None:
    """1000 pipelined 64 KiB READs (62.5 MiB of replies) with the client's window shut: the platform holds no
    more than its mark and a reply for it, another user logs in and reads meanwhile, and once the client reads
    again every request is answered, in order."""
    p = two_users(tmp_path)
    big = os.urandom(MAX_READ)
    p.add_dataset("big", {"scan.bin": big})
    p.grant("alice", "big")

    def buffered() -> int:
        """Unsent bytes on alice's channels, on the platform's side."""

        async def measure() -> int:
            assert p.platform is not None
            return max(
                (chan.get_write_buffer_size() for owner, s in p.platform.sessions.items() if s.user == "alice"
                 for chan in owner.channels),
                default=0,
            )  # fmt: skip

        return int(p.call(measure()))

    async def go() -> tuple[list[int], bytes, list[int]]:
        key, cred = await p.credential("alice")
        conn = await p.connect("alice", [(key, cred.certificate)])
        async with conn:
            chan, raw = await conn.create_session(_Raw, subsystem="sftp", encoding=None)
            chan.write(_sftp(1, struct.pack(">I", 3)))  # INIT, version 3
            assert (await raw.reply())[0] == 2
            path = b"/datasets/big/scan.bin"
            chan.write(_sftp(3, struct.pack(">II", 1, len(path)) + path + struct.pack(">II", 1, 0)))
            kind, body = await raw.reply()
            assert kind == 102
            handle = body[4 : 8 + int.from_bytes(body[4:8], "big")]
            chan.pause_reading()  # its window stays shut: replies pile up on the platform's side
            for i in range(READS):
                offset = (i * SIZE) % MAX_READ
                chan.write(_sftp(5, struct.pack(">I", 10 + i) + handle + struct.pack(">QI", offset, SIZE)))
            samples = []
            loop = asyncio.get_running_loop()
            deadline = loop.time() + HANG
            while (held := await asyncio.to_thread(buffered)) <= REPLY_HIGH_WATER and loop.time() < deadline:
                await asyncio.sleep(0.01)  # until the platform has filled what it may hold
            samples.append(held)
            other = await read(p, "bob")  # a whole login and read: many passes of the platform's loop
            samples.append(await asyncio.to_thread(buffered))
            chan.resume_reading()
            ids = []
            while len(ids) < READS:
                kind, body = await raw.reply()
                assert kind == FXP_DATA, kind
                pktid, n = struct.unpack_from(">II", body)
                assert n == SIZE and body[8:] == big[(pktid - 10) * SIZE % MAX_READ :][:SIZE]
                ids.append(pktid)
            return samples, other, ids

    with p:
        samples, other, ids = asyncio.run(go())
    assert samples[0] > REPLY_HIGH_WATER, "the replies did pile up"
    assert max(samples) <= BOUND, f"{max(samples)} bytes of replies held for a client that reads none"
    assert other == CHEST["scan-002.bin"]
    assert ids == list(range(10, 10 + READS))
