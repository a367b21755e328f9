"""Hostile bytes against a platform of several workers: the audit and the issuer never stop.

Replays the attack of issue 14: with only an enrolment key, paths that are not
UTF-8 (``stat(b"/\\xff")``) and such bytes in every other string field of SSH and
SFTP requests, on connections spread over two worker processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncssh

from medbridge.compute.credentials import Enrolment, request_certificate
from medbridge.config import CIPHERS
from medbridge.control.audit import Record, unescape_text
from medbridge.gateway import proxy
from medbridge.platform.issuer import ISSUE_COMMAND
from medbridge.testing import RunningPlatform

DATA = os.urandom(3000)
BAD = [b"/\xff", b"/datasets/chest/\xfe\x80", b"/\xc3(", b"/datasets/chest/a\x00b", b"/datasets/" + b"n" * 300]
ATTRS = struct.pack(">I", 0)


def _s(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


def _requests(paths: list[bytes]) -> Iterator[tuple[int, bytes]]:
    """Every SFTP request that carries a string, each string one of ``paths`` (handles included)."""
    ext = 200
    for path in paths:
        yield from [
            (17, _s(path)), (7, _s(path)), (16, _s(path)), (19, _s(path)), (11, _s(path)), (13, _s(path)),
            (15, _s(path)), (14, _s(path) + ATTRS), (9, _s(path) + ATTRS), (3, _s(path) + struct.pack(">I", 1) + ATTRS),
            (3, _s(path) + struct.pack(">I", 0x1A) + ATTRS), (18, _s(path) + _s(path + b"2")),
            (20, _s(path) + _s(path)), (5, _s(path) + struct.pack(">QI", 0, 10)), (4, _s(path)), (8, _s(path)),
            (10, _s(path) + ATTRS), (12, _s(path)),
            (ext, _s(b"read-file@medbridge") + _s(path) + struct.pack(">QI", 0, 100)),
            (ext, _s(b"posix-rename@openssh.com") + _s(path) + _s(path)),
            (ext, _s(b"statvfs@openssh.com") + _s(path)), (ext, _s(b"hardlink@openssh.com") + _s(path) + _s(path)),
            (ext, _s(b"lsetstat@openssh.com") + _s(path) + ATTRS), (ext, _s(path) + _s(path)),
        ]  # fmt: skip


class _Raw(asyncssh.SSHClientSession[bytes]):
    def __init__(self) -> None:
        self.data = bytearray()
        self.grown = asyncio.Event()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.data += data
        self.grown.set()

    async def replies(self, n: int) -> list[tuple[int, bytes]]:
        out = []
        while len(out) < n:
            if len(self.data) >= 4 and len(self.data) >= 4 + int.from_bytes(self.data[:4], "big"):
                size = int.from_bytes(self.data[:4], "big")
                out.append((self.data[4], bytes(self.data[5 : 4 + size])))
                del self.data[: 4 + size]
                continue
            self.grown.clear()
            await asyncio.wait_for(self.grown.wait(), 30)
        return out


async def _spray(conn: asyncssh.SSHClientConnection, paths: list[bytes]) -> list[int]:
    """Send every request with every path in one go; the reply types, in order."""
    chan, raw = await conn.create_session(_Raw, subsystem="sftp", encoding=None)
    chan.write(struct.pack(">IBI", 5, 1, 3))
    assert (await raw.replies(1))[0][0] == 2  # VERSION
    requests = list(_requests(paths))
    chan.write(b"".join(struct.pack(">IBI", 5 + len(body), kind, i) + body for i, (kind, body) in enumerate(requests)))
    replies = await raw.replies(len(requests))
    # OPENDIR only names a listing (asyncssh decides nothing until it is read): READDIR is the request decided
    listings = [body[4:] for (kind, _), (reply, body) in zip(requests, replies, strict=True) if reply == 102]
    assert all(kind == 11 for (kind, _), (reply, _) in zip(requests, replies, strict=True) if reply == 102)
    chan.write(b"".join(struct.pack(">IBI", 5 + len(h), 12, 10_000 + i) + h for i, h in enumerate(listings)))
    replies = [r for r in replies if r[0] != 102] + await raw.replies(len(listings))
    chan.close()
    return [kind for kind, _ in replies]


async def _session_requests(conn: asyncssh.SSHClientConnection) -> None:
    """Commands, subsystems and environment names that are not UTF-8, and a request body that is not either."""
    for kw in ({"command": b"medbridge-\xff"}, {"subsystem": b"sftp\xff"}, {"command": ISSUE_COMMAND,
               "env": {b"LANG\xff": b"\xfe"}}):  # fmt: skip
        try:
            chan, _ = await conn.create_session(asyncssh.SSHClientSession, encoding=None, **kw)  # type: ignore[arg-type]
            chan.write_eof()
            await asyncio.wait_for(chan.wait_closed(), 30)
        except asyncssh.ChannelOpenError:
            pass
    public = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    for body in (b'{"public_key": "\xff", "job_id": "j", "lifetime": 60}',
                 b'{"public_key": "%s", "job_id": "\\udcff\\ud800", "lifetime": 60}' % public.encode()):  # fmt: skip
        result = await conn.run(ISSUE_COMMAND, input=body, encoding=None)
        assert result.exit_status == 2, result.stdout  # refused as bad input, with an answer


def _wait_for(store_records: Callable[[], list[Record]], accept: Callable[[list[Record]], bool]) -> list[Record]:
    deadline = time.monotonic() + 60  # bounds a hang only
    while True:
        records = store_records()
        if accept(records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def test_non_utf8_bytes_everywhere_never_stop_the_audit_or_the_issuer(tmp_path: Path) -> None:
    p = RunningPlatform(tmp_path)  # a home with content; served below by `platform serve --workers 2`
    key_path = p.add_user("alice")
    p.add_dataset("chest", {"a.bin": DATA})
    p.grant("alice", "chest")
    cmd = [sys.executable, "-m", "medbridge", "platform", "serve", "--home", str(p.home.root),
           "--listen", "127.0.0.1:0", "--workers", "2"]  # fmt: skip
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        port = int(line.split("127.0.0.1:")[1].split()[0])
        fpr = line.split("host key ")[1].split()[0]
        key = asyncssh.read_private_key(str(key_path))

        async def connect(user: str, keys: list[object]) -> asyncssh.SSHClientConnection:
            return await asyncssh.connect("127.0.0.1", port, username=user, client_keys=keys, known_hosts=None,
                                          agent_path=None, encryption_algs=list(CIPHERS), config=None)  # fmt: skip

        async def attack() -> None:
            conns = [await connect("alice", [key]) for _ in range(8)]  # spread over both workers
            replies = await asyncio.gather(*(_spray(c, BAD) for c in conns))
            assert all(kind == 101 for kinds in replies for kind in kinds), "every request answered with a status"
            await asyncio.gather(*(_session_requests(c) for c in conns[:2]))
            for c in conns:
                c.close()

        asyncio.run(attack())
        ssh = subprocess.run([b"ssh", b"-p", str(port).encode(), b"-l", b"\xff\xfe", b"-o", b"BatchMode=yes",
                              b"-o", b"StrictHostKeyChecking=no", b"-o", b"UserKnownHostsFile=/dev/null",
                              b"-i", str(key_path).encode(), b"127.0.0.1", b"true"],
                             capture_output=True, timeout=60)  # fmt: skip
        assert ssh.returncode == 255
        with socket.create_connection(("127.0.0.1", port)) as s:  # a PROXY header nobody trusts, then junk
            s.sendall(proxy.SIGNATURE + b"\x21\x11\x00\x0c" + b"\xff" * 12)
            with contextlib.suppress(ConnectionResetError):
                assert s.recv(100) == b"", "refused: closed before any SSH"

        async def afterwards() -> bytes:
            eph = asyncssh.generate_private_key("ssh-ed25519")
            cred = await request_certificate(Enrolment("127.0.0.1", port, "alice", key, fpr), eph, "job-9", 600, None)
            conn = await connect("alice", [(eph, cred.certificate)])
            async with conn:
                kinds = await _spray(conn, BAD)
                assert set(kinds) == {101}
                sftp = await conn.start_sftp_client()
                async with sftp.open("/datasets/chest/a.bin", "rb") as f:
                    return bytes(await f.read())

        assert asyncio.run(afterwards()) == DATA, "certificates are still issued and reads still served"

        def seen(records: list[Record]) -> bool:
            subjects = {(r.action, r.subject) for r in records}
            return {("sftp.open", "/datasets/chest/a.bin"), ("sftp.refused", "/\\xff"), ("proxy.refused", "")} <= {
                (a, s if a != "proxy.refused" else "") for a, s in subjects
            } and any(r.action == "login" and "xff" in r.detail for r in records)

        records = _wait_for(p.store.audit_records, seen)
        assert seen(records), sorted({r.action for r in records})
    finally:
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=60)
    assert server.returncode == 0, err
    records = p.store.audit_records()
    refused = [r for r in records if r.action == "sftp.refused"]
    reasons = {json.loads(r.detail)["reason"] for r in refused if r.actor == "alice" and "job" in r.detail}
    assert {"path is not valid UTF-8", "path contains a NUL byte", "name too long"} <= reasons
    assert any(unescape_text(r.subject) == os.fsdecode(b"/\xff") for r in refused)
    issued = [r.outcome for r in records if r.action == "certificate.issue"]
    assert issued.count("refused") == 6 and issued.count("ok") == 1
    job_ids = [unescape_text(r.subject) for r in records if r.action == "certificate.issue"]
    assert "\udcff\ud800" in job_ids, "a job id that is no text at all is recorded, escaped"
    assert sum(r.action == "platform.stop" for r in records) == 2, "each worker wrote what it held at SIGTERM"
    assert not any(r.action in ("audit.unwritable", "audit.lost") for r in records)
    assert p.store.verify_audit() == len(records)
    p.store.close()
