"""What one connection or user can make the platform spend (issue 14, item 2): descriptors,
handles, channels, sessions.  The attacks are replayed against ``platform serve`` in a process
of its own under a low descriptor limit, as a service manager would start it."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import asyncssh
import pytest

from medbridge.platform.limits import SessionSlots
from medbridge.testing import RunningPlatform
from medbridge.testing.wait import HANG
from tests.conftest import CHEST


def two_users(root: Path, **settings: object) -> RunningPlatform:
    p = RunningPlatform(root, enforcement_interval=0.25, **settings)
    for user in ("alice", "bob"):
        p.add_user(user)
    p.add_dataset("chest", CHEST)
    for user in ("alice", "bob"):
        p.grant(user, "chest")
    return p


async def certificate_connection(
    p: RunningPlatform, user: str, port: int | None = None
) -> asyncssh.SSHClientConnection:
    key, cred = await p.credential(user, port=port)
    return await p.connect(user, [(key, cred.certificate)], port=port)


async def read(p: RunningPlatform, user: str, port: int | None = None) -> bytes:
    async with await certificate_connection(p, user, port) as conn:
        sftp = await conn.start_sftp_client()
        async with sftp.open("/datasets/chest/scan-002.bin", "rb") as f:
            return await f.read()


async def open_until_refused(sftp: asyncssh.SFTPClient, most: int) -> tuple[list[asyncssh.SFTPClientFile], str]:
    """Open handles until the platform says no (at most ``most``): the handles, and what it said."""
    handles = []
    for _ in range(most):
        try:
            handles.append(await sftp.open("/datasets/chest/scan-001.bin", "rb"))
        except asyncssh.SFTPError as exc:
            return handles, str(exc)
    return handles, ""


def test_a_session_cannot_take_the_platforms_descriptors(tmp_path: Path) -> None:
    """The issue's attack: one certificate session opens handles until refused, under ``ulimit -n 1024``.

    It is refused at 248, a quarter of the descriptors past 32 (the user's share of the worker,
    max_open_handles_per_user, below max_open_handles' 256), with a reason, audited; while it
    holds them another user logs in and reads.
    """
    p = two_users(tmp_path)
    with p.process(nofile=1024) as port:

        async def go() -> tuple[int, str, bytes]:
            async with await certificate_connection(p, "alice", port) as conn:
                sftp = await conn.start_sftp_client()
                handles, said = await open_until_refused(sftp, 2000)
                return len(handles), said, await read(p, "bob", port)

        opened, said, other = asyncio.run(go())
    assert opened == (1024 - 32) // 4 and "max_open_handles_per_user" in said
    assert other == CHEST["scan-002.bin"]
    refused = p.audit("sftp.refused", until=lambda r: "max_open_handles_per_user" in r.detail)
    assert any(r.actor == "alice" and "max_open_handles_per_user" in r.detail for r in refused)


def test_a_connection_is_refused_at_max_open_handles(tmp_path: Path) -> None:
    p = two_users(tmp_path, max_open_handles=20)
    with p.process() as port:

        async def go() -> tuple[int, str]:
            async with await certificate_connection(p, "alice", port) as conn:
                handles, said = await open_until_refused(await conn.start_sftp_client(), 100)
                return len(handles), said

        opened, said = asyncio.run(go())
    assert opened == 20 and "(max_open_handles)" in said


def test_one_user_cannot_take_a_workers_descriptors_over_many_connections(tmp_path: Path) -> None:
    """The review's attack: one certificate, 4 connections of 256 handles each, under ``ulimit -n 1024``.

    Each connection is within max_open_handles, but together they would hold every descriptor
    of the worker; the user's handles are counted over all of them (a quarter of the worker's
    descriptors), so another user still logs in and reads, and a closed connection's handles
    go back to its user.
    """
    p = two_users(tmp_path)
    with p.process(nofile=1024) as port:

        async def go() -> tuple[list[int], str, bytes, int]:
            key, cred = await p.credential("alice", port=port)
            conns = [await p.connect("alice", [(key, cred.certificate)], port=port) for _ in range(4)]
            try:
                opened, said = [], ""
                for conn in conns:
                    handles, said = await open_until_refused(await conn.start_sftp_client(), 256)
                    opened.append(len(handles))
                other = await read(p, "bob", port)
                first = conns.pop(0)
                first.close()  # gives its handles back to alice, once the worker sees it end
                await first.wait_closed()
                sftp = await conns[0].start_sftp_client()
                deadline = time.monotonic() + HANG
                while True:  # each refusal is a round trip: retried until the worker has seen the close
                    back, _ = await open_until_refused(sftp, 256)
                    if back or time.monotonic() > deadline:
                        return opened, said, other, len(back)
            finally:
                for conn in conns:
                    conn.close()

        opened, said, other, back = asyncio.run(go())
    budget = (1024 - 32) // 4
    assert sum(opened) == budget and "max_open_handles_per_user" in said
    assert other == CHEST["scan-002.bin"], "another user is served meanwhile"
    assert opened[0] == budget and back == budget, "the closed connection's handles went back to its user"


def test_out_of_descriptors_the_platform_refuses_counts_and_recovers(tmp_path: Path) -> None:
    """With a handle limit above the process's descriptors, a session exhausts them: new connections
    are refused (closed at once, counted in the audit), and once it leaves the platform serves again."""
    p = two_users(tmp_path, max_open_handles=100_000, max_open_handles_per_user=100_000)
    with p.process(nofile=256) as port:

        async def go() -> tuple[str, bytes, bytes]:
            async with await certificate_connection(p, "alice", port) as conn:
                sftp = await conn.start_sftp_client()
                _, said = await open_until_refused(sftp, 1000)
                with socket.create_connection(("127.0.0.1", port), timeout=30) as late:
                    shut = await asyncio.to_thread(late.recv, 100)
            return said, shut, await read(p, "bob", port)

        said, shut, after = asyncio.run(go())
        assert "Too many open files" in said
        assert shut == b"", "refused: closed without a banner"
        assert after == CHEST["scan-002.bin"], "serving again once the descriptors are back"
        refused = p.audit("connection.refused", until=lambda r: "EMFILE" in r.detail)
    assert refused and "out of file descriptors (EMFILE)" in refused[-1].detail
    assert refused[-1].as_dict()["detail"]["connections"] >= 1


def test_channels_per_connection_are_capped(platform: RunningPlatform) -> None:
    async def go() -> tuple[str, bytes]:
        async with await certificate_connection(platform, "alice") as conn:
            clients = [await conn.start_sftp_client() for _ in range(4)]
            with pytest.raises(asyncssh.ChannelOpenError) as info:
                await conn.start_sftp_client()
            clients.pop().exit()
            extra = None
            for _ in range(100):
                try:
                    extra = await conn.start_sftp_client()
                    break
                except asyncssh.ChannelOpenError:
                    await clients[0].stat("/datasets")  # a round trip: the close has reached the server
            assert extra is not None, "a closed channel gives its place back"
            async with extra.open("/datasets/chest/scan-002.bin", "rb") as f:
                return info.value.reason, await f.read()

    said, data = asyncio.run(go())
    assert "max_channels_per_connection" in said and data == CHEST["scan-002.bin"]
    refused = platform.audit("channel.refused")
    assert refused and "max_channels_per_connection" in refused[-1].detail


async def login_when_free(
    p: RunningPlatform, key: asyncssh.SSHKey, certificate: object
) -> asyncssh.SSHClientConnection:
    """Log in, waiting while the slot of a connection just closed (the issuer's) is still held."""
    for _ in range(200):
        try:
            conn = await p.connect("alice", [(key, certificate)])
            await conn.start_sftp_client()
            return conn
        except (asyncssh.DisconnectError, asyncssh.ConnectionLost) as exc:
            assert "max_sessions_per_user" in str(exc) or isinstance(exc, asyncssh.ConnectionLost)
            await asyncio.sleep(0.05)
    raise AssertionError("no session slot came free")


class Witness(asyncssh.SSHClient):
    """Keeps why the server ended the connection (its DISCONNECT reason)."""

    lost: Exception | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc


def test_sessions_per_user_are_capped_and_given_back(tmp_path: Path) -> None:
    p = two_users(tmp_path, max_sessions_per_user=2)

    async def go() -> tuple[str, bytes, bytes]:
        creds = [await p.credential("alice") for _ in range(3)]
        first = await login_when_free(p, creds[0][0], creds[0][1].certificate)
        second = await login_when_free(p, creds[1][0], creds[1][1].certificate)
        witness = Witness()
        third = await asyncssh.connect(p.host, p.port, username="alice", known_hosts=None, config=None,
                                       client_keys=[(creds[2][0], creds[2][1].certificate)], agent_path=None,
                                       client_factory=lambda: witness)  # fmt: skip
        await third.wait_closed()
        others = await read(p, "bob")
        first.close()
        await first.wait_closed()
        again = b""
        for _ in range(200):  # the server sees the close a moment after the client
            try:
                again = await read(p, "alice")
                break
            except (asyncssh.DisconnectError, asyncssh.ConnectionLost):
                await asyncio.sleep(0.05)
        second.close()
        return str(witness.lost), others, again

    with p:
        said, others, again = asyncio.run(go())
        assert "max_sessions_per_user" in said
        assert others == again == CHEST["scan-002.bin"]
        refused = p.audit("login", until=lambda r: "max_sessions_per_user" in r.detail)
    assert any(r.outcome == "refused" and "max_sessions_per_user" in r.detail for r in refused)


def test_session_slots_are_shared_by_every_process(tmp_path: Path) -> None:
    """Workers are processes: slots another process holds count, and come back when it ends (even killed)."""
    slots = SessionSlots(tmp_path / "sessions", 3)
    code = (
        "import sys\nfrom pathlib import Path\nfrom medbridge.platform.limits import SessionSlots\n"
        f"s = SessionSlots(Path({str(tmp_path / 'sessions')!r}), 3)\nheld = [s.take('alice') for _ in range(2)]\n"
        "print(all(h is not None for h in held), flush=True)\nsys.stdin.read()\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as held:
        try:
            assert held.stdout is not None and held.stdout.readline().strip() == "True"
            mine = slots.take("alice")
            assert mine is not None, "one of three is left"
            assert slots.take("alice") is None, "two held elsewhere, one here"
            bobs = slots.take("bob")
            assert bobs is not None, "per user"
            os.close(bobs)
        finally:
            held.kill()
    freed = [slots.take("alice") for _ in range(2)]
    assert all(fd is not None for fd in freed), "a dead process's slots are free"
    for fd in [mine, *freed]:
        if fd is not None:
            os.close(fd)


def test_serve_raises_its_descriptor_limit_and_says_what_the_limits_need(tmp_path: Path) -> None:
    """Started with systemd's default (soft 1024, hard higher), ``platform serve`` takes the hard limit
    and, still short of what the limits need, says so in one line; the worker's budget is derived from it."""
    p = two_users(tmp_path)
    cmd = ["prlimit", "--nofile=1024:4096", sys.executable, "-m", "medbridge", "platform", "serve", "--home",
           str(p.home.root), "--listen", "127.0.0.1:0", "--workers", "1"]  # fmt: skip
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            assert "listening on" in proc.stdout.readline()
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=HANG)
    lines = [line for line in err.splitlines() if "descriptor limit" in line]
    assert lines == [
        "medbridge platform: descriptor limit 4096 (ulimit -n, LimitNOFILE) is below the 66592 the limits need "
        "(max_sessions_per_user 64 x max_open_handles 256 for one user within a quarter of it): each user may "
        f"hold at most {(4096 - 32) // 4} handles per worker (max_open_handles_per_user)"
    ]
    start = p.audit("platform.start")[-1].as_dict()["detail"]
    assert start["descriptor_limit"] == 4096 and start["max_open_handles_per_user"] == (4096 - 32) // 4
