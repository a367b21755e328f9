"""Refusals cannot flood the audit (issue 14's hostile review, the audit flood): a connection's refused requests
are budgeted, past the budget it is closed with one row saying so, and a refused path is kept short."""

from __future__ import annotations

import asyncio
import struct

import asyncssh

from medbridge.platform.limits import Refusals
from medbridge.platform.sftp import MAX_REFUSED_SUBJECT
from medbridge.testing import RunningPlatform
from tests.platform.test_data_plane import _Raw, _sftp
from tests.platform.test_limits import read

FLOOD = 400
PATH = b"/" + b"p" * 3999


def test_an_enrolment_key_cannot_flood_the_audit_with_refusals(platform: RunningPlatform) -> None:
    """The review's attack: pipelined STATs of 4000-byte paths over an enrolment key (every one refused).
    At most the budget is audited, then one row says the connection is closed, and it is; others are served."""
    budget = Refusals().enrolment_limit

    async def go() -> bytes:
        key = asyncssh.read_private_key(str(platform.keys["alice"]))
        conn = await platform.connect("alice", [key])
        async with conn:
            chan, raw = await conn.create_session(_Raw, subsystem="sftp", encoding=None)
            chan.write(_sftp(1, struct.pack(">I", 3)))
            assert (await raw.reply())[0] == 2
            chan.write(b"".join(_sftp(17, struct.pack(">II", 10 + i, len(PATH)) + PATH) for i in range(FLOOD)))
            await asyncio.wait_for(raw.closed, 30)
        return await read(platform, "alice")

    assert asyncio.run(go())
    closing = platform.audit("sftp.refused", until=lambda r: "too many refused requests" in r.detail)
    ours = [r for r in closing if r.actor == "?"]
    stats = [r for r in ours if r.as_dict()["detail"].get("op") == "stat"]
    assert len(stats) == budget + 1, "the budget, then the row that closes it"
    assert sum("too many refused requests" in r.detail for r in ours) == 1
    assert all(len(r.subject) <= MAX_REFUSED_SUBJECT + 30 for r in stats)
    assert stats[0].subject.endswith("... (4000 characters)")


def test_a_job_session_has_a_larger_budget_and_the_same_end(platform: RunningPlatform) -> None:
    """A certificate session: its refusals are its own to make (a payload probing), up to its larger budget."""
    budget = Refusals().certificate_limit

    async def go() -> tuple[int, str]:
        key, cred = await platform.credential("alice")
        conn = await platform.connect("alice", [(key, cred.certificate)])
        refused, last = 0, ""
        async with conn:
            sftp = await conn.start_sftp_client()
            for _ in range(budget + 5):
                try:
                    await sftp.stat("/datasets/secret/x")  # not granted: refused
                except (asyncssh.SFTPConnectionLost, asyncssh.SFTPNoConnection) as exc:
                    last = str(exc)
                    break
                except asyncssh.SFTPError as exc:
                    refused, last = refused + 1, str(exc)
                    if "too many refused" in last:
                        break
        return refused, last

    refused, last = asyncio.run(go())
    assert refused == budget + 1 and "too many refused requests" in last
    rows = platform.audit("sftp.refused", until=lambda r: "too many refused requests" in r.detail)
    assert sum(r.actor == "alice" for r in rows) == budget + 1
