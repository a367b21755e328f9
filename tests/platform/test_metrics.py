"""The platform's Prometheus metrics (issue 16, item 5): what moves them, bounded labels, the endpoint.

In-process platforms here read this process's metrics (``process_metrics``) and
assert differences; ``tests/platform/test_operations.py`` scrapes a served one with curl.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import struct
import urllib.request
from pathlib import Path

import asyncssh
import pytest
from asyncssh.constants import FXP_EXTENDED, FXP_INIT, FXP_OPEN
from asyncssh.packet import String
from prometheus_client import CollectorRegistry, Counter

from medbridge.errors import AddressInUse, GrantMissing, InvalidInput, LimitReached
from medbridge.platform.metrics import (
    ACTIONS,
    REASONS,
    MetricsServer,
    PlatformMetrics,
    SessionTable,
    action_label,
    error_code,
    op_name,
    process_metrics,
    reason_code,
)
from medbridge.platform.requests import SERVED_TYPES, RequestFilter
from medbridge.testing import RunningPlatform
from medbridge.testing.wait import until
from tests.conftest import CHEST


def value(name: str, **labels: str) -> float:
    return process_metrics().value(name, **labels)


# -- what moves them -----------------------------------------------------------------------


def test_a_job_session_moves_sessions_bytes_requests_refusals_and_certificates(platform: RunningPlatform) -> None:
    counted = (
        ("medbridge_platform_sessions_total", {}),
        ("medbridge_platform_served_bytes_total", {"dataset": "chest"}),
        ("medbridge_platform_requests_total", {"op": "open"}),
        ("medbridge_platform_requests_total", {"op": "read"}),
        ("medbridge_platform_requests_total", {"op": "read-file"}),
        ("medbridge_platform_refusals_total", {"action": "sftp", "reason": "no_grant"}),
        ("medbridge_platform_refusals_total", {"action": "certificate", "reason": "no_grant"}),
        ("medbridge_platform_certificates_issued_total", {}),
        ("medbridge_platform_certificates_renewed_total", {}),
        ("medbridge_platform_audit_write_lag_seconds_count", {}),
    )
    before = {(n, tuple(labels.items())): value(n, **labels) for n, labels in counted}
    open_before = value("medbridge_platform_sessions_open")

    async def go() -> float:
        key, cred = await platform.credential("alice", job_id="j-metrics")
        await platform.credential("alice", job_id="j-metrics")  # a renewal: the same job's second certificate
        with pytest.raises(GrantMissing):
            await platform.credential("alice", job_id="j-other", datasets=["knee"])
        async with await platform.connect("alice", [(key, cred.certificate)]) as conn:
            sftp = await conn.start_sftp_client()
            async with sftp.open("/datasets/chest/scan-001.bin", "rb") as f:
                assert await f.read() == CHEST["scan-001.bin"]
            with pytest.raises(asyncssh.SFTPNoSuchFile):
                await sftp.stat("/datasets/knee/knee-001.bin")
            return value("medbridge_platform_sessions_open")

    open_during = asyncio.run(go())
    assert open_during == open_before + 1
    until(lambda: value("medbridge_platform_sessions_open") == open_before, "the session to close", timeout=10)
    platform.audit()  # flushed: every event's write lag observed
    moved = {key: value(key[0], **dict(key[1])) - was for key, was in before.items()}
    assert moved[("medbridge_platform_sessions_total", ())] == 1
    assert moved[("medbridge_platform_served_bytes_total", (("dataset", "chest"),))] == len(CHEST["scan-001.bin"])
    assert moved[("medbridge_platform_requests_total", (("op", "open"),))] == 1
    assert moved[("medbridge_platform_requests_total", (("op", "read"),))] >= 1
    assert moved[("medbridge_platform_requests_total", (("op", "read-file"),))] == 0
    assert moved[("medbridge_platform_refusals_total", (("action", "sftp"), ("reason", "no_grant")))] == 1
    assert moved[("medbridge_platform_refusals_total", (("action", "certificate"), ("reason", "no_grant")))] == 1
    assert moved[("medbridge_platform_certificates_issued_total", ())] == 2
    assert moved[("medbridge_platform_certificates_renewed_total", ())] == 1
    assert moved[("medbridge_platform_audit_write_lag_seconds_count", ())] >= 4  # logins, open, refusal, end
    assert value("medbridge_platform_audit_queue_depth") == 0


def label_values() -> set[tuple[str, str]]:
    """Every (label, value) this process's metrics hold."""
    return {
        pair for family in process_metrics().registry.collect() for s in family.samples for pair in s.labels.items()
    }


def test_a_client_cannot_grow_the_label_sets(platform: RunningPlatform) -> None:
    """Three hundred refusals, each naming a different crafted path, and reads of every file under several
    spellings: no new label value carries a client's text or a file's path, only the dataset's name,
    and each refusal counts under its code."""
    before = label_values()
    codes = ("no_grant", "path", "read_only")
    refused_before = {code: value("medbridge_platform_refusals_total", action="sftp", reason=code) for code in codes}

    def crafted(i: int) -> str:
        junk = f"x{i}-\x1b[31m{'A' * (i % 150)}"  # each name shorter than NAME_MAX: refused for its kind
        return (f"/datasets/{junk}/scan.bin", f"/datasets/{junk}/../../../etc/passwd", f"/results/bob/{junk}")[i % 3]

    async def go() -> None:
        key, cred = await platform.credential("alice")
        async with await platform.connect("alice", [(key, cred.certificate)]) as conn:
            sftp = await conn.start_sftp_client()
            for i in range(300):
                with pytest.raises(asyncssh.SFTPError):
                    await sftp.stat(crafted(i))
            for name, data in CHEST.items():
                for spelling in (
                    f"/datasets/chest/{name}",
                    f"/datasets//chest/./{name}",
                    f"/datasets/chest/../chest/{name}",
                ):
                    async with sftp.open(spelling, "rb") as f:
                        assert await f.read() == data

    asyncio.run(go())
    new = label_values() - before
    allowed = {*ACTIONS, *REASONS, *op_name_values(), "read", "written", "chest"}
    assert {v for k, v in new if k != "le"} <= allowed, new
    platform.audit()  # every refusal recorded, so counted
    for code in codes:
        moved = value("medbridge_platform_refusals_total", action="sftp", reason=code) - refused_before[code]
        assert moved == 100, code


def op_name_values() -> set[str]:
    from medbridge.platform.metrics import EXTENSIONS, OPS

    return {*OPS.values(), *EXTENSIONS.values(), "extended", "other"}


# -- bounded labels, as pure functions ---------------------------------------------------------

#: Reasons the platform writes into its audit today, and the code each must count under.
KNOWN = {
    "dataset 'knee' not granted": "no_grant",
    "grant ended for dataset(s) chest": "no_grant",
    "no live grant left for user 'alice'": "no_grant",
    "user 'alice' has no live grant for dataset(s): knee": "no_grant",
    "certificate expired": "expired",
    "certificate not yet valid": "expired",
    "the grants of user 'alice' end before a certificate could start": "expired",
    "certificate revoked": "revoked",
    "certificate revoked: job 'j1' has ended": "revoked",
    "account 'alice' disabled": "account_disabled",
    "key not enrolled": "identity",
    "signed by an unknown CA": "identity",
    "serial not issued by this platform": "identity",
    "principals are not the ones this platform signed": "identity",
    "issued to 'bob', not 'alice'": "identity",
    "the signature did not verify": "identity",
    "an enrolment key opens no data; a job certificate is needed": "identity",
    "only job-certificate sessions get data": "identity",
    "source-address 10.0.0.0/8 does not include the client 127.0.0.1": "identity",
    "the connection already holds 256 open handles (max_open_handles); close some first": "limit",
    "user 'alice' already has 64 sessions open (max_sessions_per_user)": "limit",
    "a result file may not grow past 1024 bytes (results_max_file_size)": "limit",
    "job 'j' already holds 32 live certificates (max_live_certificates_per_job = 32)": "limit",
    "results quota of job 'j' exceeded": "limit",
    "datasets are read-only": "read_only",
    "opened read-only": "read_only",
    "the job's results are committed and can no longer change": "read_only",
    "only the job's own results folder is writable": "read_only",
    "results of user 'bob' belong to another account": "read_only",
    "outside the namespace": "path",
    "'/datasets/x/../../etc' climbs above the root": "path",
    "name too long": "path",
    "resolves outside its root (symlink)": "path",
    "path is not valid UTF-8 (malformed)": "path",
    "dataset storage missing": "path",
    "links cannot be created": "unsupported",
    "copy-data and ranges@asyncssh.com are not served": "unsupported",
    "the platform grants no pty": "unsupported",
    "out of file descriptors (EMFILE); raise the platform's limit (ulimit -n, LimitNOFILE=)": "descriptors",
    "sessions cannot be counted: Too many open files": "descriptors",
    "the audit could not record the login: OperationalError": "audit_unavailable",
    "written late: the first write failed (disk I/O error); the request was refused": "audit_unavailable",
    "certificate request is not JSON: Expecting value": "bad_request",
    "certificate request has unknown field(s) principals; the platform alone decides": "bad_request",
    "bad PROXY header from a trusted gateway: bad signature": "proxy",
}


@pytest.mark.parametrize("reason", sorted(KNOWN))
def test_the_platforms_own_reasons_count_under_their_codes(reason: str) -> None:
    assert reason_code(reason) == KNOWN[reason]


def test_any_reason_maps_into_the_fixed_set() -> None:
    rng = random.Random(16)
    texts: list[object] = [None, 42, b"bytes", "", "\x00" * 1000, "A" * 100_000]
    texts += ["".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randrange(0, 200))) for _ in range(2000)]
    assert {reason_code(t) for t in texts} <= set(REASONS)
    assert {action_label(str(t)) for t in texts} | {action_label("sftp.refused")} <= set(ACTIONS)


def test_issuer_errors_count_by_their_class_first() -> None:
    assert error_code(LimitReached("user 'grant-me' was issued 120 certificates")) == "limit"
    assert error_code(GrantMissing("anything at all")) == "no_grant"
    assert error_code(InvalidInput("certificate request needs a job_id string")) == "bad_request"


def test_sftp_operations_are_named_from_a_fixed_list() -> None:
    assert op_name(FXP_OPEN) == "open"
    assert op_name(FXP_EXTENDED, b"read-file@medbridge") == "read-file"
    assert op_name(FXP_EXTENDED, b"evil@attacker.example") == "extended"
    assert op_name(FXP_EXTENDED) == "extended", "a malformed name is still counted"
    assert op_name(250) == "other"


def test_the_request_filter_tells_each_request_once_however_it_is_split() -> None:
    """Every request the session's filter reads is told, served or held back, with an extended request's name."""
    seen: list[tuple[int, bytes]] = []
    f = RequestFilter(
        SERVED_TYPES, frozenset({b"read-file@medbridge"}), 1 << 20, lambda h: b"", seen=lambda k, n: seen.append((k, n))
    )

    def packet(kind: int, body: bytes) -> bytes:
        return struct.pack(">IB", 1 + len(body), kind) + body

    stream = (
        packet(FXP_INIT, b"\0\0\0\3")
        + packet(FXP_OPEN, b"\0\0\0\1" + String(b"/datasets/chest/a") + b"\0" * 8)
        + packet(FXP_EXTENDED, b"\0\0\0\2" + String(b"read-file@medbridge") + b"x" * 12)
        + packet(FXP_EXTENDED, b"\0\0\0\3" + String(b"evil@attacker.example"))
    )
    for i in range(len(stream)):  # one byte at a time
        f.feed(stream[i : i + 1])
    assert seen == [(FXP_OPEN, b""), (FXP_EXTENDED, b"read-file@medbridge"), (FXP_EXTENDED, b"evil@attacker.example")]
    assert [op_name(*s) for s in seen] == ["open", "read-file", "extended"]


def test_the_session_table_is_the_sessions_open_gauge() -> None:
    m = PlatformMetrics()
    table: SessionTable[str, int] = SessionTable(m)
    table["a"] = 1
    table["b"] = 2
    table["a"] = 3  # replaced, not a new session
    assert m.value("medbridge_platform_sessions_open") == 2
    assert m.value("medbridge_platform_sessions_total") == 2
    table.pop("a")
    table.pop("missing", None)
    del table["b"]
    assert m.value("medbridge_platform_sessions_open") == 0
    table.update({"c": 1, "d": 2})
    table.setdefault("e", 5)
    table.clear()
    assert m.value("medbridge_platform_sessions_open") == 0
    assert m.value("medbridge_platform_sessions_total") == 5


# -- the endpoint ----------------------------------------------------------------------------


def test_the_endpoint_serves_its_registry_and_frees_its_port() -> None:
    registry = CollectorRegistry()
    Counter("medbridge_test_things", "Things", registry=registry).inc(3)
    server = MetricsServer(registry, "127.0.0.1", 0).start()
    try:
        body = urllib.request.urlopen(server.url, timeout=10).read().decode()
        assert "medbridge_test_things_total 3.0" in body
        with pytest.raises(AddressInUse, match=r"metrics: cannot listen on 127\.0\.0\.1"):
            MetricsServer(registry, *server.address)
    finally:
        server.stop()
    with socket.create_server(server.address):  # free again
        pass


def test_a_stalled_scraper_does_not_hold_the_endpoint(tmp_path: Path) -> None:
    """Half a request, then nothing: the next scrape is answered while it stalls."""
    registry = CollectorRegistry()
    server = MetricsServer(registry, "127.0.0.1", 0).start()
    try:
        with socket.create_connection(server.address, timeout=10) as stalled:
            stalled.sendall(b"GET /metr")
            assert urllib.request.urlopen(server.url, timeout=10).status == 200
    finally:
        server.stop()


def test_every_interface_is_served_only_when_named_and_then_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """Loopback is quiet; ``0.0.0.0`` (bound here, never started: nothing is sent) is logged as reachable."""
    registry = CollectorRegistry()
    with caplog.at_level(logging.WARNING, logger="medbridge.platform"):
        quiet = MetricsServer(registry, "127.0.0.1", 0)
        quiet.stop()
        assert not quiet.wildcard and not caplog.records
        loud = MetricsServer(registry, "0.0.0.0", 0)
        loud.stop()
    assert loud.wildcard
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["metrics served on every interface"]
