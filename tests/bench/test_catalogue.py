"""bench catalogue: growth exponents, per-process peak memory, the verdicts, and one small ladder end to end."""

from __future__ import annotations

import sys
from pathlib import Path

from medbridge.bench.catalogue import Plan, exponent, generate, measure, run


def test_the_exponent_is_the_slope_of_the_log_log_fit() -> None:
    linear = [{"files": n, "seconds": n / 1000} for n in (10_000, 100_000, 1_000_000)]
    flat = [{"files": n, "seconds": 2.0} for n in (10_000, 100_000, 1_000_000)]
    square = [{"files": n, "seconds": (n / 1000) ** 2} for n in (10_000, 100_000)]
    assert exponent(linear) == 1.0 and exponent(flat) == 0.0 and exponent(square) == 2.0
    assert exponent(linear[:1]) is None


def test_peak_memory_is_the_childs_own() -> None:
    small = measure([sys.executable, "-c", "pass"])
    big = measure([sys.executable, "-c", "b = b'x' * (300 << 20)"])
    assert big.peak_rss_mb > small.peak_rss_mb + 250


def test_a_small_ladder_end_to_end(tmp_path: Path) -> None:
    """Every step runs and is timed, the starvation test reads, and the verdicts are computed from the rows."""
    generate(tmp_path / "g", 250)
    assert len(list((tmp_path / "g").rglob("*.bin"))) == 250
    result = run(Plan(sizes=(20, 60), concurrent=2, seconds=2, unrelated=20, workdir=tmp_path))
    steps = {(r["step"], r["files"]) for r in result["rows"]}
    assert steps >= {(s, n) for s in ("dataset-add", "manifest", "job-start", "residue-scan", "audit-verify")
                     for n in (20, 60)} | {("job-start", 10)}  # fmt: skip
    assert all(r["seconds"] > 0 and r["peak_rss_mb"] > 10 for r in result["rows"])
    c = result["concurrent"]
    assert c["errors"] == [] and c["reads"] > 0 and all(f is not None for f in c["first_file_s"])
    assert {v["target"] for v in result["verdicts"]} >= {"dataset-add exponent <= 1.05"}
    assert [p.name for p in tmp_path.iterdir()] == ["g"], "the benchmark removes what it made"
