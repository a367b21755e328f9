"""The benchmarks run and report in their documented shape (figures are for docs/benchmarks.md, not asserted)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medbridge.bench.io import SSHD, _cpu_session, _cpu_tree
from medbridge.testing.netns import available


def test_bench_relay_reports_both_relays() -> None:
    r = subprocess.run([sys.executable, "-m", "medbridge", "bench", "relay", "--mb", "16", "--repeats", "1", "--json"],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = {row["relay"]: row for row in json.loads(r.stdout)["rows"]}
    assert set(rows) == {"medbridge-gateway", "python-asyncio"}
    assert all(row["mb_per_s"] > 0 and row["cpu_s_per_gb"] >= 0 for row in rows.values())


def test_bench_rtt_tcp_level_json_and_plot(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        plot = tmp_path / "rtt.png"
        r = subprocess.run([sys.executable, "-m", "medbridge", "bench", "rtt", "--route", f"loop=127.0.0.1:{port}",
                            "--samples", "5", "--json", "--plot", str(plot)], capture_output=True, text=True,
                           timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)["routes"]
    assert row["name"] == "loop" and row["level"] == "tcp" and row["samples"] == 5
    assert 0 <= row["min_ms"] <= row["mean_ms"] <= row["max_ms"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rtt_sftp_level_outside_a_job_is_a_clear_error() -> None:
    r = subprocess.run([sys.executable, "-m", "medbridge", "bench", "rtt", "--route", "x=127.0.0.1:1", "--level",
                        "sftp"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 9
    assert r.stderr.startswith("medbridge: error: not inside 'medbridge job run'")


@pytest.mark.parametrize(
    "network",
    [
        "loopback",
        pytest.param("sites", marks=pytest.mark.skipif(available() is not None, reason=f"{available()}")),
    ],
)
def test_bench_io_reads_by_every_path_and_reports_its_shape(network: str, tmp_path: Path) -> None:
    """Also run as if inside a Slurm job whose $TMPDIR holds the benchmark's data: the benchmark's own job at hpc
    must not scan and purge it (the reads below would fail)."""
    plot = tmp_path / "io.png"
    inside_a_slurm_job = {**os.environ, "SLURM_JOB_ID": "4242", "TMPDIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "medbridge", "bench", "io", "--small-files", "20", "--large-files", "1",
                        "--large-mb", "2", "--repeats", "1", "--rtt-ms", "0,2", "--server-workers", "1", "--json",
                        "--network", network, "--plot", str(plot)], capture_output=True, text=True,
                       timeout=600, env=inside_a_slurm_job)  # fmt: skip
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["network"] == network
    paths = {(row["path"], row["data"], row["rtt_ms"]) for row in result["rows"]}
    peers = ("openssh-sftp-server",) if Path(SSHD).exists() else ()  # the peer runs where OpenSSH's sshd is
    for path in ("sshfs-default", "sshfs-tuned", "native", *peers):
        assert {(path, "small", 0.0), (path, "small", 2.0), (path, "large", 2.0)} <= paths
    assert ("native-shards", "small", 2.0) in paths and ("local", "small", 0.0) in paths
    for row in result["rows"]:
        assert row["files_per_s"] > 0 and row["ratio_to_local"] > 0
        assert set(row["cpu_s"]) == {"client", "server", "relay"}
        if row["path"] != "local":
            assert row["cpu_s"]["client"] > 0  # the reader's CPU: this process, sshfs and its ssh, or the loader's
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_a_readers_cpu_counts_what_it_detached() -> None:
    """sshfs double-forks its ssh (its parent becomes init): counted by session, which a detached child keeps."""
    script = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    if os.fork() == 0:\n"
        "        t = time.process_time()\n"
        "        while time.process_time() - t < 0.5: pass\n"
        "        time.sleep(30)\n"
        "    os._exit(0)\n"
        "time.sleep(30)\n"
    )
    leader = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while _cpu_session(leader.pid) < 0.45 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _cpu_session(leader.pid) >= 0.45
        assert _cpu_tree(leader.pid) < 0.3, "the detached child is outside the leader's tree"
    finally:
        os.killpg(leader.pid, signal.SIGKILL)  # the leader's own group: it, and the child it detached
        leader.wait()
