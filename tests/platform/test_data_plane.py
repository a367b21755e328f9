"""The SFTP data plane through asyncssh: what a job certificate opens, and every refusal."""

from __future__ import annotations

import asyncio
import os
import struct
from datetime import UTC, datetime, timedelta

import asyncssh
import pytest
from asyncssh.constants import FXP_DATA, FXP_STATUS

from medbridge.control.audit import Record
from medbridge.errors import GrantMissing
from medbridge.fastpath import SealingChannel, _CorkedWriter, coalesce
from medbridge.testing import RunningPlatform
from tests.conftest import CHEST


def _refused(r: Record) -> bool:
    return r.outcome == "refused"


def refusals(p: RunningPlatform) -> list[dict[str, object]]:
    return [{"subject": r.subject, **r.as_dict()["detail"]} for r in p.audit("sftp.refused")]


async def job_sftp(
    p: RunningPlatform, user: str = "alice", **kw: object
) -> tuple[asyncssh.SSHClientConnection, asyncssh.SFTPClient]:
    key, cred = await p.credential(user, **kw)  # type: ignore[arg-type]
    conn = await p.connect(user, [(key, cred.certificate)])
    return conn, await conn.start_sftp_client()


def test_granted_file_reads_byte_identical_and_is_audited(platform: RunningPlatform) -> None:
    async def go() -> bytes:
        conn, sftp = await job_sftp(platform)
        async with conn, sftp.open("/datasets/chest/scan-001.bin", "rb") as f:
            return await f.read()

    assert asyncio.run(go()) == CHEST["scan-001.bin"]
    closes = [r.as_dict()["detail"] for r in platform.audit("sftp.close")]
    assert closes and closes[-1]["bytes_read"] == len(CHEST["scan-001.bin"])
    logins = [r for r in platform.audit("login") if r.outcome == "ok" and r.subject == "certificate"]
    assert "medbridge:user=alice:job=job-1" in logins[-1].detail


def test_listing_hides_ungranted_datasets(platform: RunningPlatform) -> None:
    async def go() -> tuple[list[str], type[BaseException] | None]:
        conn, sftp = await job_sftp(platform)
        async with conn:
            names = sorted(await sftp.listdir("/datasets"))
            try:
                await sftp.stat("/datasets/knee")
            except asyncssh.SFTPError as exc:
                return names, type(exc)
            return names, None

    names, error = asyncio.run(go())
    assert [n for n in names if n not in (".", "..")] == ["chest"]
    assert error is asyncssh.SFTPNoSuchFile
    assert any(r["subject"] == "/datasets/knee" and "not granted" in str(r["reason"]) for r in refusals(platform))


@pytest.mark.parametrize(
    ("op", "path"),
    [
        ("write", "/datasets/chest/new.bin"),
        ("remove", "/datasets/chest/scan-002.bin"),
        ("mkdir", "/datasets/chest/sub"),
        ("overwrite", "/datasets/chest/scan-001.bin"),
    ],
)
def test_datasets_are_read_only(platform: RunningPlatform, op: str, path: str) -> None:
    async def go() -> None:
        conn, sftp = await job_sftp(platform)
        async with conn:
            with pytest.raises(asyncssh.SFTPPermissionDenied):
                if op == "remove":
                    await sftp.remove(path)
                elif op == "mkdir":
                    await sftp.mkdir(path)
                else:
                    async with sftp.open(path, "wb") as f:
                        await f.write(b"x")

    asyncio.run(go())
    assert (platform.home.datasets / "chest" / "scan-002.bin").read_bytes() == CHEST["scan-002.bin"]
    assert any(r["subject"] == path and "read-only" in str(r["reason"]) for r in refusals(platform))


def test_dotdot_cannot_leave_the_namespace(platform: RunningPlatform) -> None:
    async def go() -> list[type[BaseException]]:
        conn, sftp = await job_sftp(platform)
        errors = []
        async with conn:
            for path in ("/datasets/chest/../../etc/passwd", "/../../etc/passwd", "../../../../etc/hostname"):
                try:
                    async with sftp.open(path, "rb") as f:
                        await f.read()
                except asyncssh.SFTPError as exc:
                    errors.append(type(exc))
        return errors

    errors = asyncio.run(go())
    assert len(errors) == 3
    assert all(e in (asyncssh.SFTPNoSuchFile, asyncssh.SFTPPermissionDenied) for e in errors)
    reasons = [str(r["reason"]) for r in refusals(platform)]
    assert any("outside the namespace" in r for r in reasons)
    assert any("climbs above the root" in r for r in reasons)


def test_ranged_reads_are_exact_and_past_the_end_is_eof(platform: RunningPlatform) -> None:
    """Ranged READs (answered in place, read straight into the reply) are exact at the edges, and counted."""
    data = CHEST["scan-001.bin"]
    ranges = [(0, 1), (0, 32768), (1, 32768), (len(data) - 10, 32768), (100_000, 65536), (0, len(data))]

    async def go() -> tuple[list[bytes], bytes]:
        conn, sftp = await job_sftp(platform)
        async with conn, sftp.open("/datasets/chest/scan-001.bin", "rb") as f:
            got = [await f.read(size, offset) for offset, size in ranges]
            return got, await f.read(10, len(data))

    got, past = asyncio.run(go())
    assert got == [data[o : o + n] for o, n in ranges]
    assert past == b"", "reading at the end is EOF"
    closes = [r.as_dict()["detail"] for r in platform.audit("sftp.close")]
    assert closes[-1]["bytes_read"] == sum(len(g) for g in got), "bytes read are still counted for the audit"


@pytest.mark.fastpath
def test_replies_of_one_pass_share_channel_writes_in_order(platform: RunningPlatform) -> None:
    """64 reads sent together: answered in one channel write per MiB (the cork's bound), in request order, intact."""
    data = CHEST["scan-001.bin"]
    offsets = [i * 3_000 for i in range(64)]
    writes: list[bytes] = []

    async def go() -> list[bytes]:
        conn, sftp = await job_sftp(platform)
        async with conn, sftp.open("/datasets/chest/scan-001.bin", "rb") as f:
            (chan,) = [c for owner in platform.background.platform.sessions for c in owner.channels]
            assert isinstance(chan, SealingChannel)
            write = chan.write
            chan.write = lambda d, datatype=None: (writes.append(bytes(d)), write(d, datatype))[1]  # type: ignore[method-assign]
            coalesce(conn)  # the 64 requests leave in one send, so they arrive together
            return list(await asyncio.gather(*(f.read(32_768, o) for o in offsets)))

    got = asyncio.run(go())
    assert got == [data[o : o + 32_768] for o in offsets]
    # The file's close (a STATUS reply) is a write of its own; the backlog gate (1 MiB unsent) may split one more.
    data_writes = [w for w in writes if w[4] == FXP_DATA]  # the writes that begin with a DATA reply
    assert 2 <= len(data_writes) <= 5, (
        f"{len(data_writes)} channel writes of DATA for 64 replies (~1.9 MiB) sent together"
    )
    assert all(len(w) <= _CorkedWriter.limit + 32_768 + 13 for w in writes)
    stream, ids = b"".join(writes), []
    while stream:
        length, kind, pktid = struct.unpack_from(">IBI", stream)
        assert kind in (FXP_DATA, FXP_STATUS)  # data, or the end of the file for a read past it
        ids.append(pktid)
        stream = stream[4 + length :]
    assert len(ids) >= 64 and ids == sorted(ids), "replies leave in the order the requests came"


class _Raw(asyncssh.SSHClientSession[bytes]):
    """The client side of an SFTP channel spoken byte by byte, so requests and EOF can leave together."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.grown = asyncio.Event()
        self.closed = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.data += data
        self.grown.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set_result(None)

    async def reply(self) -> tuple[int, bytes]:
        """The next SFTP packet: its type and body (after the type byte)."""
        while len(self.data) < 4 or len(self.data) < 4 + int.from_bytes(self.data[:4], "big"):
            self.grown.clear()
            await asyncio.wait_for(self.grown.wait(), 10)
        n = int.from_bytes(self.data[:4], "big")
        body, self.data[: 4 + n] = bytes(self.data[4 : 4 + n]), b""
        return body[0], body[1:]


def _sftp(kind: int, body: bytes) -> bytes:
    return struct.pack(">IB", len(body) + 1, kind) + body


def test_replies_held_when_the_client_ends_the_session_still_reach_it(platform: RunningPlatform) -> None:
    """Eight reads and the EOF in one send: answered and ended in one pass; the cork sends its replies first."""
    data = CHEST["scan-001.bin"]
    path = b"/datasets/chest/scan-001.bin"

    async def go() -> list[tuple[int, int, bytes]]:
        key, cred = await platform.credential("alice")
        conn = await platform.connect("alice", [(key, cred.certificate)])
        async with conn:
            chan, raw = await conn.create_session(_Raw, subsystem="sftp", encoding=None)
            chan.write(_sftp(1, struct.pack(">I", 3)))  # INIT, version 3
            assert (await raw.reply())[0] == 2  # VERSION
            chan.write(_sftp(3, struct.pack(">II", 1, len(path)) + path + struct.pack(">II", 1, 0)))  # OPEN, read
            kind, body = await raw.reply()
            assert kind == 102  # HANDLE
            handle = body[4 : 8 + int.from_bytes(body[4:8], "big")]
            coalesce(conn)  # the reads and the EOF leave in one send, and arrive together
            chan.write(b"".join(_sftp(5, struct.pack(">I", 10 + i) + handle + struct.pack(">QI", i * 20_000, 20_000))
                                for i in range(8)))  # fmt: skip
            chan.write_eof()
            await asyncio.wait_for(raw.closed, 10)
            replies = []
            while raw.data:
                kind, body = await raw.reply()
                replies.append((kind, int.from_bytes(body[:4], "big"), body[8:]))
            return replies

    replies = asyncio.run(go())
    assert replies == [(FXP_DATA, 10 + i, data[i * 20_000 : (i + 1) * 20_000]) for i in range(8)]


def test_an_absurd_offset_is_an_error_and_the_session_goes_on(platform: RunningPlatform) -> None:
    """Offsets past the kernel's (2**63 and 2**64-1): a one-line refusal, audited, not an uncaught exception."""

    async def go() -> tuple[list[str], bytes]:
        conn, sftp = await job_sftp(platform)
        said = []
        async with conn, sftp.open("/datasets/chest/scan-002.bin", "rb") as f:
            for offset in (1 << 63, (1 << 64) - 1):
                with pytest.raises(asyncssh.SFTPPermissionDenied) as info:
                    await f.read(10, offset)
                said.append(str(info.value))
            return said, await f.read(10, 0)

    said, after = asyncio.run(go())
    assert all("past the largest a file may have" in s and "\n" not in s for s in said), said
    assert after == CHEST["scan-002.bin"][:10]
    refused = platform.audit("sftp.refused", until=lambda r: "past the largest" in r.detail)
    assert sum("past the largest" in r.detail for r in refused) == 2


def test_a_rename_that_climbs_above_the_root_is_a_clean_refusal(platform: RunningPlatform) -> None:
    """``rename x /../../x`` (once an uncaught PathEscape: "Uncaught exception", not audited)."""

    async def go() -> list[str]:
        conn, sftp = await job_sftp(platform)
        said = []
        async with conn:
            async with sftp.open("/results/alice/job-1/x", "wb") as f:
                await f.write(b"x")
            for rename in (sftp.rename, sftp.posix_rename):
                with pytest.raises(asyncssh.SFTPPermissionDenied) as info:
                    await rename("/results/alice/job-1/x", "/../../x")
                said.append(str(info.value))
        return said

    said = asyncio.run(go())
    assert all("climbs above the root" in s for s in said), said
    refused = platform.audit("sftp.refused", until=lambda r: r.subject == "/../../x")
    assert sum(r.subject == "/../../x" for r in refused) == 2


def test_symlink_pointing_outside_is_refused(platform: RunningPlatform) -> None:
    storage = platform.home.datasets / "chest"
    os.chmod(storage, 0o750)
    (storage / "escape").symlink_to("/etc/passwd")
    (storage / "inside").symlink_to("scan-002.bin")

    async def go() -> tuple[bytes, type[BaseException] | None]:
        conn, sftp = await job_sftp(platform)
        async with conn:
            async with sftp.open("/datasets/chest/inside", "rb") as f:
                inside = await f.read()
            try:
                async with sftp.open("/datasets/chest/escape", "rb") as f:
                    await f.read()
            except asyncssh.SFTPError as exc:
                return inside, type(exc)
            return inside, None

    inside, error = asyncio.run(go())
    assert inside == CHEST["scan-002.bin"]
    assert error is asyncssh.SFTPPermissionDenied
    assert any(r["subject"] == "/datasets/chest/escape" and "symlink" in str(r["reason"]) for r in refusals(platform))


def test_results_are_writable_only_in_the_own_job_folder(platform: RunningPlatform) -> None:
    platform.grant("bob", "chest")
    (platform.home.results / "bob" / "old").mkdir(parents=True)
    (platform.home.results / "bob" / "old" / "secret.txt").write_text("bob's")

    async def go() -> None:
        conn, sftp = await job_sftp(platform, job_id="j7")
        async with conn:
            async with sftp.open("/results/alice/j7/mask.bin", "wb") as f:
                await f.write(b"mask")
            await sftp.mkdir("/results/alice/j7/sub")
            await sftp.rename("/results/alice/j7/mask.bin", "/results/alice/j7/sub/mask.bin")
            with pytest.raises(asyncssh.SFTPPermissionDenied):
                await sftp.listdir("/results/bob")
            with pytest.raises(asyncssh.SFTPPermissionDenied):
                async with sftp.open("/results/bob/old/secret.txt", "rb") as f:
                    await f.read()
            with pytest.raises(asyncssh.SFTPPermissionDenied):
                async with sftp.open("/results/alice/other-job/x", "wb") as f:
                    await f.write(b"x")
            with pytest.raises(asyncssh.SFTPPermissionDenied):
                await sftp.symlink("/datasets/chest/scan-001.bin", "/results/alice/j7/link")

    asyncio.run(go())
    assert (platform.home.results / "alice" / "j7" / "sub" / "mask.bin").read_bytes() == b"mask"
    assert not (platform.home.results / "alice" / "other-job").exists()
    subjects = {str(r["subject"]) for r in refusals(platform)}
    assert {"/results/bob", "/results/bob/old/secret.txt", "/results/alice/other-job/x"} <= subjects
    assert [r for r in platform.audit("sftp.write") if r.subject == "/results/alice/j7/mask.bin"]


def test_enrolment_key_alone_opens_no_data(platform: RunningPlatform) -> None:
    async def go() -> None:
        key = asyncssh.read_private_key(str(platform.keys["alice"]))
        async with await platform.connect("alice", [key]) as conn:
            with pytest.raises((asyncssh.Error, OSError)):
                sftp = await conn.start_sftp_client()
                await sftp.listdir("/datasets/chest")
            result = await conn.run("cat /etc/passwd")
            assert result.exit_status == 126

    asyncio.run(go())
    assert [r for r in platform.audit("sftp.refused") if "only a job certificate opens data" in r.detail]
    assert platform.audit("command.refused")


def test_no_account_is_refused_at_login(platform: RunningPlatform, tmp_path: object) -> None:
    async def go() -> None:
        stranger = asyncssh.generate_private_key("ssh-ed25519")
        with pytest.raises(asyncssh.PermissionDenied):
            await platform.connect("mallory", [stranger])

    asyncio.run(go())
    failed = [r for r in platform.audit("login", until=_refused) if r.outcome == "refused" and r.actor == "mallory"]
    assert failed and "key not enrolled" in failed[-1].detail


def test_no_grant_no_certificate(platform: RunningPlatform) -> None:
    async def go() -> None:
        with pytest.raises(GrantMissing):
            await platform.credential("bob")
        with pytest.raises(GrantMissing):
            await platform.credential("alice", datasets=["knee"])

    asyncio.run(go())
    refused = [r for r in platform.audit("certificate.issue") if r.outcome == "refused"]
    assert {r.actor for r in refused} == {"alice", "bob"}
    assert all("no live grant" in r.detail for r in refused)


def test_certificate_from_another_ca_is_refused(platform: RunningPlatform) -> None:
    async def go() -> None:
        rogue_ca = asyncssh.generate_private_key("ssh-ed25519")
        key = asyncssh.generate_private_key("ssh-ed25519")
        cert = rogue_ca.generate_user_certificate(
            key,
            "rogue",
            serial=1,
            principals=["alice", "medbridge-cert-1"],
            valid_before=int(datetime.now(UTC).timestamp()) + 600,
        )
        with pytest.raises(asyncssh.PermissionDenied):
            await platform.connect("alice", [(key, cert)])

    asyncio.run(go())
    failed = [r for r in platform.audit("login", until=_refused) if r.outcome == "refused"]
    assert failed and "signed by an unknown CA" in failed[-1].detail and '"serial":1' in failed[-1].detail


def test_expired_certificate_is_refused_at_login(platform: RunningPlatform) -> None:
    async def go() -> None:
        key, cred = await platform.credential("alice", lifetime=2)
        await asyncio.sleep(
            max(0.0, (datetime.fromisoformat(cred.valid_before) - datetime.now(UTC)).total_seconds()) + 0.2
        )
        with pytest.raises(asyncssh.PermissionDenied):
            await platform.connect("alice", [(key, cred.certificate)])

    asyncio.run(go())
    failed = [r for r in platform.audit("login", until=_refused) if r.outcome == "refused"]
    assert failed and "certificate expired" in failed[-1].detail and "medbridge:user=alice" in failed[-1].detail


def test_certificate_of_another_user_is_refused(platform: RunningPlatform) -> None:
    platform.grant("bob", "chest")

    async def go() -> None:
        key, cred = await platform.credential("bob")
        with pytest.raises(asyncssh.PermissionDenied):
            await platform.connect("alice", [(key, cred.certificate)])

    asyncio.run(go())
    failed = [r for r in platform.audit("login", until=_refused) if r.outcome == "refused"]
    assert failed and "issued to 'bob'" in failed[-1].detail


def test_lifetime_is_capped_by_grant_and_platform(platform: RunningPlatform) -> None:
    end = datetime.now(UTC) + timedelta(minutes=5)
    platform.grant("alice", "chest", until=end)

    async def go() -> str:
        _, cred = await platform.credential("alice", lifetime=10 * 24 * 3600)
        return cred.valid_before

    assert datetime.fromisoformat(asyncio.run(go())) <= end
    cert = platform.store.certificates("alice")[-1]
    assert cert.valid_before <= end
