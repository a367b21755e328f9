"""Refused by default (issue 14, items 11 and 12): only the SFTP requests the platform lists reach asyncssh's
handler, every public ``SFTPServer`` method is overridden or refused, and directory handles are counted.

These hold on either path of ``medbridge.fastpath`` (``scripts/test`` runs this file again with it off).
"""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncssh
import pytest

from medbridge.config import READ_FILE_EXTENSION
from medbridge.platform.requests import PASSED_EXTENSIONS, SERVED_TYPES, Held, RequestFilter
from medbridge.platform.sftp import MAX_READ, JobSFTPServer
from medbridge.testing import RunningPlatform
from medbridge.testing.wait import until
from tests.conftest import CHEST
from tests.platform.test_data_plane import _Raw, _sftp

STATUS, HANDLE, EXTENDED, EXTENDED_REPLY = 101, 102, 200, 201
OP_UNSUPPORTED = 8


def _ext(pktid: int, name: bytes, body: bytes = b"") -> bytes:
    return _sftp(EXTENDED, struct.pack(">II", pktid, len(name)) + name + body)


def _path_request(kind: int, pktid: int, path: bytes) -> bytes:
    return _sftp(kind, struct.pack(">II", pktid, len(path)) + path)


# -- the filter alone ----------------------------------------------------------------------

_STREAM = [  # (packet, held back as)
    (_sftp(1, struct.pack(">I", 3)), None),  # INIT
    (_path_request(17, 1, b"/datasets"), None),  # STAT
    (_ext(2, b"copy-data", b"\0" * 40), Held(EXTENDED, b"copy-data", 2)),
    (_ext(3, b"posix-rename@openssh.com", b"\0\0\0\1a\0\0\0\1b"), None),
    (_sftp(22, struct.pack(">I", 4) + b"\0" * 24), Held(22, b"", 4)),  # BLOCK (version 6)
    (_ext(5, b"x" * 300), Held(EXTENDED, b"", 5)),  # a name too long to read
    (_sftp(5, struct.pack(">I", 6) + b"\0\0\0\4abcd" + b"\0" * 12), None),  # READ
    (_ext(7, READ_FILE_EXTENSION, b"\0" * 16), Held(EXTENDED, READ_FILE_EXTENSION, 7)),
    (_sftp(6, b"\0\0"), None),  # malformed (no request id): asyncssh rejects it
]


def _marked(request: Held) -> bytes:
    return b"<held %r>" % (request,)


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 13, 64, 10_000])
def test_the_filter_passes_what_is_served_and_replaces_the_rest_in_place_however_it_is_cut(piece: int) -> None:
    stream = b"".join(p for p, _ in _STREAM)
    f = RequestFilter(SERVED_TYPES, PASSED_EXTENSIONS, 1 << 20, _marked)
    passed = bytearray()
    for start in range(0, len(stream), piece):
        passed += b"".join(f.feed(stream[start : start + piece]))
    assert bytes(passed) == b"".join(p if h is None else _marked(h) for p, h in _STREAM)


def test_a_stream_of_served_requests_passes_as_it_came() -> None:
    """No copy and no split where nothing is held back: one feed in, the same bytes out."""
    data = b"".join(_path_request(17, i, b"/datasets/chest") for i in range(50))
    out = RequestFilter(SERVED_TYPES, PASSED_EXTENSIONS, 1 << 20, _marked).feed(data)
    assert len(out) == 1 and out[0] is data


# -- on the wire ---------------------------------------------------------------------------


async def _raw_session(p: RunningPlatform) -> tuple[asyncssh.SSHClientConnection, Any, _Raw, bytes]:
    key, cred = await p.credential("alice")
    conn = await p.connect("alice", [(key, cred.certificate)])
    chan, raw = await conn.create_session(_Raw, subsystem="sftp", encoding=None)
    chan.write(_sftp(1, struct.pack(">I", 3)))
    kind, version = await raw.reply()
    assert kind == 2
    return conn, chan, raw, version


def test_requests_not_served_are_refused_audited_and_the_session_goes_on(platform: RunningPlatform) -> None:
    """copy-data, ranges, an unknown extension, version 6 link and lock, an unknown type: each refused here."""
    refused = [
        _ext(10, b"copy-data", b"\0" * 40),
        _ext(11, b"ranges@asyncssh.com", b"\0\0\0\4abcd" + b"\0" * 16),
        _ext(12, b"expand-path@openssh.com", b"\0\0\0\1~"),
        _sftp(21, struct.pack(">I", 13) + b"\0\0\0\1a\0\0\0\1b\1"),  # LINK
        _sftp(22, struct.pack(">I", 14) + b"\0\0\0\4abcd" + b"\0" * 20),  # BLOCK
        _sftp(99, struct.pack(">I", 15)),
    ]

    async def go() -> list[tuple[int, int, int]]:
        conn, chan, raw, _ = await _raw_session(platform)
        async with conn:
            chan.write(_path_request(17, 9, b"/datasets/chest"))  # STAT, before them
            stream = b"".join(refused)
            for i in range(0, len(stream), 5):  # in pieces that cut every head, each its own channel packet
                chan.write(stream[i : i + 5])
            chan.write(_path_request(17, 16, b"/datasets/chest"))  # and after them
            replies = []
            for _ in range(len(refused) + 2):
                kind, body = await raw.reply()
                pktid = int.from_bytes(body[:4], "big")
                replies.append((pktid, kind, int.from_bytes(body[4:8], "big") if kind == STATUS else 0))
            return replies

    attrs = 105
    refusals = [(i, STATUS, OP_UNSUPPORTED) for i in range(10, 16)]
    assert asyncio.run(go()) == [(9, attrs, 0), *refusals, (16, attrs, 0)], "in turn: OpenSSH's client expects it"
    ops = {r.as_dict()["detail"]["op"] for r in platform.audit("sftp.refused") if r.actor == "alice"}
    assert {"extension copy-data", "extension ranges@asyncssh.com", "extension expand-path@openssh.com",
            "request type 21", "request type 22", "request type 99"} <= ops  # fmt: skip


@pytest.mark.fastpath
def test_limits_are_the_platforms(platform: RunningPlatform) -> None:
    """``limits@openssh.com`` says the handles the connection may hold and the longest read.

    (asyncssh's own reply, on the public path, names the process's descriptors: advice only;
    the platform's limits hold either way.)
    """

    async def go() -> tuple[int, bytes]:
        conn, chan, raw, _ = await _raw_session(platform)
        async with conn:
            chan.write(_ext(3, b"limits@openssh.com"))
            return await raw.reply()

    kind, body = asyncio.run(go())
    assert kind == EXTENDED_REPLY
    pktid, _packet, read, _write, handles = struct.unpack(">IQQQQ", body)
    assert (pktid, read, handles) == (3, MAX_READ, 256)


def test_directory_handles_count_and_are_given_back(tmp_path: Path) -> None:
    """On close and at the session's end: the count follows asyncssh's own handle, on either path."""
    p = RunningPlatform(tmp_path, enforcement_interval=0.25, max_open_handles=4)
    p.add_user("alice")
    p.add_dataset("chest", CHEST)
    p.grant("alice", "chest")

    async def opendir(chan: Any, raw: _Raw, pktid: int) -> tuple[int, bytes]:
        chan.write(_path_request(11, pktid, b"/datasets/chest"))
        kind, body = await raw.reply()
        return kind, body[8 : 8 + int.from_bytes(body[4:8], "big")] if kind == HANDLE else body

    async def go() -> list[str]:
        seen = []
        key, cred = await p.credential("alice")
        conn = await p.connect("alice", [(key, cred.certificate)])
        async with conn:
            chan, raw = await conn.create_session(_Raw, subsystem="sftp", encoding=None)
            chan.write(_sftp(1, struct.pack(">I", 3)))
            await raw.reply()
            handles = [await opendir(chan, raw, i) for i in range(5)]
            seen.append("".join("H" if k == HANDLE else "S" for k, _ in handles))
            chan.write(_sftp(4, struct.pack(">II", 9, len(handles[0][1])) + handles[0][1]))  # CLOSE the first
            assert (await raw.reply())[0] == STATUS
            seen.append("H" if (await opendir(chan, raw, 10))[0] == HANDLE else "S")
            chan.close()  # the session ends holding four: all given back to the connection
            await raw.closed
            sessions = p.background.platform.sessions
            until(lambda: all(s.handles.held == 0 for s in sessions), "the ended session's handles given back")
            chan, raw = await conn.create_session(_Raw, subsystem="sftp", encoding=None)
            chan.write(_sftp(1, struct.pack(">I", 3)))
            await raw.reply()
            seen.append("".join(["H" if (await opendir(chan, raw, 20 + i))[0] == HANDLE else "S" for i in range(4)]))
        return seen

    with p:
        assert asyncio.run(go()) == ["HHHHS", "H", "HHHH"]
        assert any("max_open_handles" in r.detail for r in p.audit("sftp.refused"))


# -- asyncssh's SFTPServer, method by method -------------------------------------------------


def test_every_public_sftp_server_method_is_ours_or_refused() -> None:
    """A release of asyncssh that adds a method fails here until it is overridden or refused."""
    public = {n for n in dir(asyncssh.SFTPServer) if not n.startswith("_")}
    ours = {n for n in public if n in vars(JobSFTPServer)}
    assert public - ours - JobSFTPServer.NOT_REQUESTS == JobSFTPServer.REFUSED - ours == set()
    assert ours >= JobSFTPServer.REFUSED, "each refusal is an override of ours"
    assert not JobSFTPServer.NOT_REQUESTS & ours


_ARGS: dict[str, tuple[Any, ...]] = {
    "map_path": (b"/etc/passwd",),
    "reverse_map_path": (b"/etc/passwd",),
    "open56": (b"/etc/passwd", 0, 0, asyncssh.SFTPAttrs()),
    "lock": (object(), 0, 1, 0),
    "unlock": (object(), 0, 1),
}


@pytest.mark.parametrize("name", sorted(JobSFTPServer.REFUSED))
def test_each_refused_method_refuses_and_audits(name: str) -> None:
    recorded: list[Any] = []
    server = JobSFTPServer(None, None, recorded.append, SimpleNamespace(root="/nonexistent"), None)  # type: ignore[arg-type]
    with pytest.raises(asyncssh.SFTPError):
        getattr(server, name)(*_ARGS[name])
    assert [(e.action, e.outcome, e.detail["op"]) for e in recorded] == [("sftp.refused", "refused", name)]
