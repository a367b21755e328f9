"""bench catalogue: growth exponents, per-process peak memory, the verdicts, and one small ladder end to end."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

from medbridge.bench.catalogue import Plan, exponent, generate, measure, run
from medbridge.testing.wait import HANG, until


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


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _reading(pid: int) -> bool:
    """A concurrent reader (``python -m medbridge.bench.catalogue``) runs under the benchmark."""
    for child in _descendants(pid):
        with contextlib.suppress(OSError):
            if b"medbridge.bench.catalogue" in Path(f"/proc/{child}/cmdline").read_bytes():
                return True
    return False


def test_sigterm_stops_the_benchmarks_servers_and_removes_its_files(tmp_path: Path) -> None:
    """A benchmark killed by its batch system's time limit (SIGTERM) stops its private PostgreSQL, its platform and
    its readers, and removes the files it generated: it once left a PostgreSQL server running."""
    cmd = [sys.executable, "-m", "medbridge", "bench", "catalogue", "--sizes", "20", "--database", "postgresql",
           "--concurrent", "1", "--concurrent-size", "20", "--seconds", "3600", "--workdir", str(tmp_path),
           "--json"]  # fmt: skip
    with subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as proc:
        pidfds: list[int] = []
        try:
            until(lambda: _reading(proc.pid) or proc.poll() is not None, "the readers to start", timeout=300)
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            for pid in _descendants(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    pidfds.append(os.pidfd_open(pid))
            assert len(pidfds) >= 3, "PostgreSQL, the platform and a reader run"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=HANG) == 130
            assert proc.stderr is not None and "aborted" in proc.stderr.read()
            for fd in pidfds:
                assert select.select([fd], [], [], HANG)[0], "every process the benchmark started has ended"
            assert list(tmp_path.iterdir()) == [], "its generated files are removed"
        finally:
            if proc.poll() is None:
                proc.kill()
            for fd in pidfds:  # what a failed run left behind, by its pidfd
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                os.close(fd)
