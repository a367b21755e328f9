"""``bench hosts``: N platform hosts on one PostgreSQL and one home behind the gateway, read from hpc."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from medbridge.bench import hosts
from medbridge.testing.netns import available
from medbridge.testing.postgres import bindir


@pytest.mark.skipif(available() is not None, reason=f"no network namespaces here: {available()}")
@pytest.mark.skipif(bindir() is None, reason="PostgreSQL's binaries are missing (scripts/setup installs them)")
def test_bench_hosts_reads_everything_through_one_and_two_hosts(tmp_path: Path) -> None:
    plot = tmp_path / "hosts.png"
    r = subprocess.run([sys.executable, "-m", "medbridge", "bench", "hosts", "--hosts", "1,2", "--small-files", "20",
                        "--clients-per-host", "1", "--connections", "1", "--repeats", "1", "--json",
                        "--plot", str(plot)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    rows = {row["hosts"]: row for row in result["rows"]}
    assert set(rows) == {1, 2}
    for n, row in rows.items():
        assert row["clients"] == n and row["files_per_s"] > 0 and row["mb_per_s"] > 0  # every file read, verified
        assert row["cores_needed"] == 2 * n + 1
    assert rows[1]["speedup"] == 1.0
    assert rows[2]["speedup"] == pytest.approx(rows[2]["files_per_s"] / rows[1]["files_per_s"], abs=1e-3)
    assert [t["target"] for t in result["targets"]] == ["2 hosts >= 1.8x the small-file throughput of 1"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_more_hosts_than_the_sites_have_is_a_one_line_error() -> None:
    """(Malformed counts share ``bench scale``'s parser and its tests.)"""
    r = subprocess.run([sys.executable, "-m", "medbridge", "bench", "hosts", "--hosts", "1,4"], capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2
    assert r.stderr == "medbridge: error: --hosts: give counts from 1 to 3\n"


def test_the_verdict_holds_only_where_the_cores_were_free() -> None:
    def row(n: int, speedup: float, free: bool) -> dict[str, object]:
        return {"hosts": n, "clients": 2 * n, "speedup": speedup, "cores_free": free, "cores_needed": 3 * n + 1}

    assert hosts.verdicts([row(1, 1.0, True), row(2, 1.9, True)])[0]["met"] is True
    assert hosts.verdicts([row(1, 1.0, True), row(2, 1.5, True)])[0]["met"] is False
    starved = hosts.verdicts([row(1, 1.0, True), row(2, 1.1, False)])[0]
    assert starved["met"] is None and starved["measured"] == 1.1 and "not measurable here" in starved["why"]
    assert hosts.verdicts([row(1, 1.0, True)])[0]["met"] is None  # no two-host row: no verdict
