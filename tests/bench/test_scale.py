"""``bench scale``: N workers serve N loader processes; every client reads all of the data, rows say what was free."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medbridge.bench import scale


def test_bench_scale_reads_everything_with_each_worker_count(tmp_path: Path) -> None:
    plot = tmp_path / "scale.png"
    r = subprocess.run([sys.executable, "-m", "medbridge", "bench", "scale", "--workers", "1,2", "--small-files", "30",
                        "--large-files", "2", "--large-mb", "1", "--repeats", "1", "--json", "--plot", str(plot)],
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    rows = {(row["workers"], row["data"]): row for row in result["rows"]}
    assert set(rows) == {(n, d) for n in (1, 2) for d in ("shards", "small", "large")}
    per_client = {"shards": 30 * 100 << 10, "small": 30 * 100 << 10, "large": 2 << 20}
    for (n, data), row in rows.items():
        assert row["clients"] == n
        assert row["bytes"] == n * per_client[data]  # every client read the whole data set, verified
        assert row["files_per_s"] > 0 and row["mb_per_s"] > 0 and row["cores_busy"] > 0
        assert row["cores_free"] == (2 * n <= len(os.sched_getaffinity(0)))
        assert row["cpu_s"]["clients"] > 0
    assert all(rows[(1, d)]["scaling"] == 1.0 for d in ("shards", "small", "large"))
    assert rows[(2, "small")]["scaling"] == pytest.approx(
        rows[(2, "small")]["files_per_s"] / (2 * rows[(1, "small")]["files_per_s"]), abs=1e-3
    )
    assert [t["target"] for t in result["targets"]] == [
        "shards files_per_s >= 8000", "large mb_per_s >= 1100", "scaling >= 0.8 with N workers on N free cores"
    ]  # fmt: skip
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "0"], "--workers '0': use counts from 1 to 256"),
        (["--workers", "two"], "--workers 'two': use counts from 1 to 256"),
        (["--data", "shards,videos"], "--data: choose from shards, small, large"),
    ],
)
def test_bad_options_are_one_line_errors(args: list[str], message: str) -> None:
    r = subprocess.run([sys.executable, "-m", "medbridge", "bench", "scale", *args], capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.startswith(f"medbridge: error: {message}") and r.stderr.count("\n") == 1


def test_scaling_and_verdicts_follow_the_rows() -> None:
    def row(n: int, data: str, rate: float, free: bool) -> dict[str, object]:
        return {"workers": n, "clients": n, "data": data, "files_per_s": rate, "mb_per_s": rate / 10,
                "cores_free": free, "scaling": None}  # fmt: skip

    rows = scale._with_scaling([row(1, "shards", 1000, True), row(2, "shards", 1700, True),
                                row(4, "shards", 2400, False), row(8, "large", 12000, False)])  # fmt: skip
    assert [r["scaling"] for r in rows] == [1.0, 0.85, 0.6, None]
    shards, large, scaling = scale.verdicts(rows)
    assert (shards["measured"], shards["workers"], shards["met"]) == (2400, 4, False)
    assert (large["measured"], large["met"]) == (1200, True)
    # the 4-worker row had no free cores, so only N=2 counts
    assert (scaling["measured"], scaling["workers"], scaling["met"]) == (0.85, 2, True)
    rows[1]["scaling"] = 0.7
    assert scale.verdicts(rows)[2]["met"] is False
    assert scale.verdicts([row(1, "small", 10, True)])[2]["met"] is None  # nothing to scale against: no verdict


def test_default_worker_counts_leave_a_core_per_client() -> None:
    assert scale.default_workers(2) == (1,)
    assert scale.default_workers(16) == (1, 2, 4, 8)
    assert scale.default_workers(12) == (1, 2, 4, 6)
    assert scale.default_workers(1) == (1,)
