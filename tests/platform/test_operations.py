"""Operating ``platform serve`` (issue 16, item 5): metrics scraped with curl during a real job,
a graceful stop on SIGTERM with live sessions, logs as JSON lines.  Real processes, with and
without ``--workers``."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from medbridge.testing import PlatformProcess, RunningPlatform
from medbridge.testing.wait import until
from tests.conftest import CHEST, KNEE

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl (scripts/setup installs it)")

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Served(PlatformProcess):
    """``medbridge platform serve`` in a process of its own, stopped by PID; its metrics address if asked."""

    def __init__(self, p: RunningPlatform, *args: str):
        super().__init__(p.home, *args)
        assert self.proc.stdout is not None
        self.metrics = self.proc.stdout.readline().split()[-1] if "--metrics" in args else ""

    def scrape(self) -> Samples:
        """What curl reads from the endpoint, as {(name, labels): value}."""
        r = subprocess.run(["curl", "-sS", "--fail", "--max-time", "10", self.metrics], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.stdout)
            for s in family.samples
        }


@pytest.fixture
def served_platform(tmp_path: Path, database_url: str) -> Iterator[RunningPlatform]:
    """A home for ``platform serve``: alice may read ``chest``, not ``knee`` (nothing serves it in-process)."""
    p = RunningPlatform(tmp_path, database_url, enforcement_interval=0.25)
    p.add_user("alice")
    p.add_dataset("chest", CHEST)
    p.add_dataset("knee", KNEE)
    p.grant("alice", "chest")
    yield p
    p.store.close()


def get(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


#: Reads through the loader, then holds its connections open until the test says go.
PAYLOAD = """
import pathlib, sys, time
from medbridge.loader import Loader
signals = pathlib.Path(sys.argv[1])
loader = Loader()
sizes = [len(b) for b in loader.read_many(["/datasets/chest/scan-001.bin", "/datasets/chest/scan-002.bin"])]
try:
    loader.read("/datasets/knee/knee-001.bin")
except OSError as exc:
    print("knee refused:", type(exc).__name__)
(signals / "read").write_text(repr(sizes))
deadline = time.monotonic() + 120
while not (signals / "go").exists() and time.monotonic() < deadline:
    time.sleep(0.05)
"""


def test_curl_shows_the_counters_moving_during_a_job(served_platform: RunningPlatform, tmp_path: Path) -> None:
    """Two workers, one endpoint: a job reading through the loader moves every counter the issue names."""
    p = served_platform
    server = Served(p, "--workers", "2", "--metrics", "127.0.0.1:0")
    try:
        before = server.scrape()
        signals = tmp_path / "signals"
        signals.mkdir()
        (tmp_path / "payload.py").write_text(PAYLOAD)
        work = tmp_path / "work"
        work.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MEDBRIDGE_"))}
        cmd = [sys.executable, "-m", "medbridge", "job", "run", "--platform", f"127.0.0.1:{server.port}",
               "--key", str(p.keys["alice"]), "--user", "alice", "--host-key-fingerprint", server.fingerprint,
               "--job-id", "j-metrics", "--", sys.executable, str(tmp_path / "payload.py"), str(signals)]  # fmt: skip
        with subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as job:
            try:
                until(lambda: (signals / "read").exists() or job.poll() is not None, "the job's reads", timeout=60)
                assert job.poll() is None, job.communicate()
                during = server.scrape()
            finally:
                (signals / "go").touch()
                out, err = job.communicate(timeout=120)
        assert job.returncode == 0, err
        assert "knee refused" in out
        after = server.scrape()
        until(
            lambda: get(server.scrape(), "medbridge_platform_sessions_open") == 0,
            "the job's sessions to close",
            timeout=60,
        )
    finally:
        code, err = server.stop()
    assert code == 0, err

    def moved(name: str, **labels: str) -> float:
        return get(during, name, **labels) - get(before, name, **labels)

    assert get(before, "medbridge_platform_sessions_open") == 0
    assert get(during, "medbridge_platform_sessions_open") >= 1, "the loader's sessions are open while it holds them"
    assert moved("medbridge_platform_sessions_total") >= 1
    size = len(CHEST["scan-001.bin"]) + len(CHEST["scan-002.bin"])
    assert moved("medbridge_platform_served_bytes_total", dataset="chest") >= size
    assert get(during, "medbridge_platform_served_bytes_total", dataset="knee") == 0
    assert moved("medbridge_platform_requests_total", op="read-file") >= 2
    assert moved("medbridge_platform_certificates_issued_total") >= 1
    assert moved("medbridge_platform_refusals_total", action="sftp", reason="no_grant") >= 1
    assert moved("medbridge_platform_audit_write_lag_seconds_count") >= 1
    assert get(after, "medbridge_platform_served_bytes_total", dataset="chest") >= get(
        during, "medbridge_platform_served_bytes_total", dataset="chest"
    ), "counters never go back"
    assert not list((p.home.root / "run").glob("metrics-*")), "the workers' metric files go with the server"


def openssh_files(p: RunningPlatform, port: int, folder: Path) -> list[str]:
    """A job certificate for alice as files OpenSSH reads, and the options that use them."""
    key, cred = asyncio.run(p.credential("alice", job_id="j-stop", port=port))
    folder.mkdir()
    (folder / "id").write_bytes(key.export_private_key())
    (folder / "id").chmod(0o600)
    (folder / "id-cert.pub").write_bytes(cred.certificate.export_certificate())
    (folder / "known_hosts").write_bytes(b"[127.0.0.1]:%d " % port + cred.host_key.export_public_key())
    return ["-F", "none", "-i", str(folder / "id"), "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
            "-o", f"UserKnownHostsFile={folder / 'known_hosts'}", "-o", "StrictHostKeyChecking=yes",
            "-P", str(port), "alice@127.0.0.1"]  # fmt: skip


@pytest.mark.skipif(shutil.which("sftp") is None, reason="needs OpenSSH's sftp (apt-get install openssh-client)")
@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_closes_live_sessions_with_a_reason_flushes_the_audit_and_exits_0(
    served_platform: RunningPlatform, tmp_path: Path, workers: int
) -> None:
    """OpenSSH's sftp holds a live session (the endpoint counts it); SIGTERM: it is told why, the audit says so,
    exit 0, and every log line was one JSON object."""
    p = served_platform
    server = Served(p, "--workers", str(workers), "--log-format", "json", "--metrics", "0")
    assert server.metrics.startswith("http://127.0.0.1:"), "a port alone is served on loopback"
    try:
        options = openssh_files(p, server.port, tmp_path / "ssh")
        copy = tmp_path / "copy.bin"
        with subprocess.Popen(["sftp", "-b", "-", *options], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) as client:  # fmt: skip
            try:
                assert client.stdin is not None
                client.stdin.write(f"get /datasets/chest/scan-002.bin {copy}\n")
                client.stdin.flush()
                until(
                    lambda: copy.exists() and copy.stat().st_size == len(CHEST["scan-002.bin"]),
                    "sftp's get",
                    timeout=60,
                )
                assert get(server.scrape(), "medbridge_platform_sessions_open") == 1
                code, err = server.stop()
            finally:
                _, said = client.communicate(timeout=60)
    finally:
        server.kill()
    assert code == 0, err
    assert "Received disconnect" in said and "11: medbridge: the platform is stopping" in said, said

    entries = [r for r in p.store.audit_records() if r.action in ("session.end", "platform.stop")]
    ends = [json.loads(r.detail) for r in entries if r.action == "session.end"]
    assert [(d["job"], d["reason"]) for d in ends] == [("j-stop", "the platform is stopping")]
    stops = [r for r in entries if r.action == "platform.stop"]
    assert len(stops) == workers, "every worker wrote its stop"
    assert entries.index(next(r for r in entries if r.action == "session.end")) < entries.index(stops[-1])
    p.store.verify_audit()

    lines = [json.loads(line) for line in err.splitlines()]  # every line one JSON object
    assert all({"time", "level", "logger", "message", "pid"} <= line.keys() for line in lines), lines
    stopping = [line for line in lines if "disconnected 1 connection" in line["message"]]
    assert len(stopping) == 1 and stopping[0]["connections"] == 1 and stopping[0]["sessions"] == 1, lines
    assert stopping[0]["level"] == "info" and stopping[0]["logger"] == "medbridge.platform"


@pytest.mark.parametrize("where", ["--metrics", "platform.toml"])
def test_a_taken_metrics_address_is_a_clear_error(served_platform: RunningPlatform, where: str) -> None:
    """Exit 8 and one line, and the workers' metrics folder is gone (one worker binds as test_metrics shows).

    From platform.toml as a port alone, with one process: loopback, as the flag's HOST:PORT with two workers.
    """
    home = served_platform.home
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        args = ["--workers", "2", "--metrics", f"127.0.0.1:{port}"]
        if where == "platform.toml":
            home.settings_file.write_text(home.settings_file.read_text() + f'metrics = "{port}"\n')
            args = ["--workers", "1"]
        r = subprocess.run(
            [sys.executable, "-m", "medbridge", "platform", "serve", "--home", str(home.root),
             "--listen", "127.0.0.1:0", *args],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert r.returncode == 8, r.stderr
    assert f"metrics: cannot listen on 127.0.0.1:{port}: address already in use" in r.stderr
    assert "Traceback" not in r.stderr
    assert not list((home.root / "run").glob("metrics-*"))
