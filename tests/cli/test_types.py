"""Options checked before a long run starts: non-finite seconds and an unwritable chart are usage errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli.test_cli import mb


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--cut-for", "nan"], "'nan' is not a finite number of seconds"),
        (["--cut-for", "inf"], "'inf' is not a finite number of seconds"),
        (["--cut-at", "1e308"], "is not in the range"),
        (["--tolerance", "-5"], "is not in the range"),
        (["--plot", "{tmp}/missing/x.png"], "is not a folder: the chart could not be written there"),
        (["--plot", "{tmp}"], "is a directory"),
        (["--keep", "{tmp}"], "already exists: name a folder that does not"),
        (["--keep", "{tmp}/missing/kept"], "is not a writable folder"),
    ],
)
def test_bench_outage_refuses_bad_options_before_it_starts(tmp_path: Path, args: list[str], words: str) -> None:
    """Before, nan and 1e308 reached the run, and a bad --plot failed only after it (20 minutes and more)."""
    given = [a.replace("{tmp}", str(tmp_path)) for a in args]
    r = mb("bench", "outage", *given, "--volumes", "0", timeout=60)  # a bad value after it: never a real run
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert words in r.stderr
    assert list(tmp_path.iterdir()) == [], "nothing made"


def test_job_run_refuses_a_non_finite_outage_tolerance(tmp_path: Path) -> None:
    r = mb("job", "run", "--platform", "127.0.0.1:9", "--key", str(tmp_path / "k"), "--host-key-fingerprint",
           "SHA256:x", "--outage-tolerance", "nan", "--", "true")  # fmt: skip
    assert r.returncode == 2 and "'nan' is not a finite number of seconds" in r.stderr
