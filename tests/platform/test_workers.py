"""The worker pool as a process tree: workers never outlive their supervisor."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import socket
import subprocess
import sys
from pathlib import Path

import asyncssh
import pytest

from medbridge.compute.credentials import Enrolment, request_certificate
from medbridge.config import CIPHERS
from medbridge.platform.keys import KEY_ALG
from medbridge.testing import RunningPlatform
from medbridge.testing.wait import HANG


def children(pid: int) -> list[int]:
    return [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def wait_gone(pid: int, timeout: float = HANG) -> bool:
    """Wait for a process that is not our child to end (its pidfd turns readable); False if it did not."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def test_workers_stop_when_their_supervisor_is_killed(tmp_path: Path) -> None:
    """kill -9 of ``platform serve --workers 2``: both workers audit their stop, exit, and accept nothing more."""
    p = RunningPlatform(tmp_path, enforcement_interval=0.25)
    p.add_user("alice")
    p.add_dataset("chest", {"a.bin": b"a" * 1000})
    p.grant("alice", "chest")
    cmd = [sys.executable, "-m", "medbridge", "platform", "serve", "--home", str(p.home.root),
           "--listen", "127.0.0.1:0", "--workers", "2"]  # fmt: skip
    workers: list[int] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert "(2 workers)" in line, line
            port = int(line.split("127.0.0.1:")[1].split()[0])
            workers = children(proc.pid)
            assert len(workers) == 2

            async def session() -> tuple[asyncssh.SSHClientConnection, bytes]:
                key = asyncssh.read_private_key(str(p.keys["alice"]))
                eph = asyncssh.generate_private_key(KEY_ALG)
                cred = await request_certificate(Enrolment("127.0.0.1", port, "alice", key, p.fingerprint), eph,
                                                 "job-1", 600, None)  # fmt: skip
                conn = await asyncssh.connect("127.0.0.1", port, username="alice", known_hosts=None, config=None,
                                              agent_path=None, encryption_algs=CIPHERS,
                                              client_keys=[(eph, cred.certificate)])  # fmt: skip
                sftp = await conn.start_sftp_client()
                async with sftp.open("/datasets/chest/a.bin", "rb") as f:
                    return conn, await f.read()

            async def scenario() -> None:
                conn, data = await session()
                assert data == b"a" * 1000
                proc.kill()  # SIGKILL: the supervisor can forward nothing
                proc.wait(timeout=HANG)
                gone = await asyncio.get_running_loop().run_in_executor(None, lambda: [wait_gone(w) for w in workers])
                assert gone == [True, True], "a worker outlived its supervisor"
                await asyncio.wait_for(conn.wait_closed(), HANG)  # the session ended with its worker

            asyncio.run(scenario())
            with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=HANG):
                pass
        finally:
            for pid in [proc.pid, *workers]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                wait_gone(pid)
    starts = {json.loads(r.detail)["pid"] for r in p.store.audit_records(action="platform.start")}
    assert starts == set(workers)
    stops = p.store.audit_records(action="platform.stop")
    assert len(stops) == 2, "each worker stopped as on SIGTERM: the audit written out, its stop recorded"
    p.store.close()
