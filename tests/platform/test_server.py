"""A command's request is read whole, up to its EOF, however the client's packets split it."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import asyncssh
import pytest

from medbridge import outage
from medbridge.errors import InvalidInput
from medbridge.platform.issuer import LOOKUP_COMMAND, MAX_REQUEST, REPORT_COMMAND, RESIDUE_REPORTED
from medbridge.platform.server import read_request
from medbridge.testing import RunningPlatform


class Packets:
    """Stands in for asyncssh's reader: real SSH cannot be made to split a body at a chosen byte.

    Like the real one, ``read(n)`` returns what the next packet brought (at most ``n``), b"" at EOF.
    """

    def __init__(self, packets: list[bytes], hang: bool = False):
        self.packets = packets
        self.hang = hang

    async def read(self, n: int) -> bytes:
        if not self.packets:
            if self.hang:
                await asyncio.Event().wait()
            return b""
        head, self.packets[0] = self.packets[0][:n], self.packets[0][n:]
        if not self.packets[0]:
            self.packets.pop(0)
        return head


def test_a_body_split_over_packets_is_read_whole() -> None:
    body = json.dumps({"job_id": "j", "report": {"findings": ["x" * 100] * 600}}).encode()
    packets = [body[i : i + 32768] for i in range(0, len(body), 32768)]
    assert len(packets) > 1
    assert asyncio.run(read_request(Packets(packets), MAX_REQUEST)) == body  # type: ignore[arg-type]


def test_a_body_over_the_limit_is_refused_before_more_is_buffered() -> None:
    reader = Packets([b"a" * 10, b"b" * 10, b"c" * 1000])
    with pytest.raises(InvalidInput, match="at most 15 bytes"):
        asyncio.run(read_request(reader, 15))  # type: ignore[arg-type]
    assert reader.packets == [b"b" * 4, b"c" * 1000], "one byte past the limit is read, nothing more"


def test_a_request_that_never_ends_is_refused() -> None:
    with pytest.raises(InvalidInput, match="did not end within"):
        asyncio.run(read_request(Packets([b"{"], hang=True), MAX_REQUEST, seconds=0.05))  # type: ignore[arg-type]


def test_a_report_written_in_many_small_writes_is_recorded(platform: RunningPlatform) -> None:
    """Over real SSH: the client drains after each 1 KiB, so the body reaches the platform in pieces."""
    asyncio.run(platform.credential("alice", job_id="w1"))
    report = {"clean": True, "found": 0, "purged": 0, "findings": [], "roots": ["/scratch/" + "d" * 4000]}
    body = json.dumps({"job_id": "w1", "report": report, "ended": False}).encode()

    async def send() -> tuple[int, bytes]:
        key = asyncssh.read_private_key(str(platform.keys["alice"]))
        async with await platform.connect("alice", [key]) as conn:
            process = await conn.create_process(REPORT_COMMAND, encoding=None)
            for i in range(0, len(body), 1024):
                process.stdin.write(body[i : i + 1024])
                await process.stdin.drain()
            process.stdin.write_eof()
            done = await process.wait()
            return done.exit_status or 0, done.stdout or b""

    code, reply = asyncio.run(send())
    assert (code, json.loads(reply)) == (0, {"recorded": True, "revoked": 0})
    assert [r.subject for r in platform.audit(RESIDUE_REPORTED)] == ["w1"]


def test_an_oversized_request_gets_a_clear_refusal(platform: RunningPlatform) -> None:
    async def send() -> tuple[int, dict[str, object]]:
        key = asyncssh.read_private_key(str(platform.keys["alice"]))
        async with await platform.connect("alice", [key]) as conn:
            done = await conn.run(LOOKUP_COMMAND, input=b" " * (20 * MAX_REQUEST), encoding=None)
            return done.exit_status or 0, json.loads(done.stdout or b"{}")

    code, reply = asyncio.run(send())
    assert code == InvalidInput.exit_code and reply["type"] == "InvalidInput"
    assert "a request is at most" in str(reply["error"])


@pytest.mark.parametrize(("retries", "warned"), [(15, True), (29, False)])
def test_a_kernel_that_would_drop_a_silent_link_before_the_tolerance_is_named_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, retries: int, warned: bool
) -> None:
    """``tcp_retries2`` read from a file of the test's: setting the machine's own is not a test's to do."""
    setting = tmp_path / "tcp_retries2"
    setting.write_text(f"{retries}\n")
    monkeypatch.setattr(outage, "RETRIES2", setting)
    with caplog.at_level(logging.WARNING, logger="medbridge.platform"), RunningPlatform(tmp_path / "home"):
        pass
    said = [r.getMessage() for r in caplog.records if "tcp_retries2" in r.getMessage()]
    assert bool(said) == warned, said
    if warned:
        assert "outage_tolerance is 2400 s" in said[0] and "tcp_retries2=29" in said[0]
