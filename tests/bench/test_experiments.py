"""The original experiments run for real and report in their documented shape (speed is not asserted: the figures
are for docs/benchmarks.md).

One ``bench report --profile quick`` run serves the tests below it: the four places as
network namespaces, the 17 vision models reading through local disk, sshfs and the
loader, V-Net jobs and a pre-training chain through a real Slurm (the test cluster) when
it can start here, else as processes, and ``bench outage`` where it exists.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from medbridge.bench import losscurve, vision
from medbridge.bench.device import missing
from medbridge.bench.pretrain_job import HEADER, LOG, cubes
from medbridge.testing import netns
from medbridge.testing import slurm as test_slurm

needs_models = pytest.mark.skipif(missing() is not None, reason=f"{missing()}")
PNG = b"\x89PNG\r\n\x1a\n"


def medbridge(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "medbridge", *args], capture_output=True, text=True, timeout=timeout)


# -- without running a model ------------------------------------------------------------------------------------


def test_the_seventeen_vision_tests_are_the_originals() -> None:
    assert [t.number for t in vision.TESTS] == list(range(1, 18))
    by = {t.name: t for t in vision.TESTS}
    assert (by["MobileNet-V2"].batch, by["MobileNet-V2"].size) == (50, (224, 224))
    assert (by["ICNet"].batch, by["ICNet"].size) == (5, (1024, 1536))
    assert (by["Pixel-RNN"].batch, by["Pixel-RNN"].size) == (50, (64, 64))
    assert all(t.source for t in vision.TESTS)
    assert [t.number for t in vision.by_name(["3", "vgg-16"])] == [3, 7]
    with pytest.raises(Exception, match="no vision test"):
        vision.by_name(["LSTM-Sentiment"])


def _log(folder: Path, name: str, rows: list[tuple[object, ...]]) -> None:
    (folder / name).mkdir(parents=True)
    with open(folder / name / LOG, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        w.writerows(rows)


def test_loss_curve_finds_a_lost_step_and_a_resume_that_did_not_load_the_weights(tmp_path: Path) -> None:
    good = tmp_path / "good"
    _log(good, "a", [("a", 1, "train", 0.9, 1.0), ("a", 2, "train", 0.8, 2.0), ("a", 2, "val", 0.7, 2.5)])
    _log(good, "b", [("b", 2, "resume", 0.7, 2.5), ("b", 3, "train", 0.6, 3.5), ("b", 3, "val", 0.55, 4.0)])
    checked = losscurve.check(losscurve.load(good))
    assert checked["continuous"] and checked["jobs"] == ["a", "b"] and checked["steps"] == 3
    lost = tmp_path / "lost"
    _log(lost, "a", [("a", 1, "train", 0.9, 1.0), ("a", 1, "val", 0.7, 1.5)])
    _log(lost, "b", [("b", 1, "resume", 0.7, 1.5), ("b", 3, "train", 0.6, 3.5), ("b", 3, "val", 0.5, 4.0)])
    checked = losscurve.check(losscurve.load(lost))
    assert checked["lost_steps"] == [2] and not checked["continuous"]
    fresh = tmp_path / "fresh"  # the second job started from new weights: its first validation loss jumps
    _log(fresh, "a", [("a", 1, "train", 0.9, 1.0), ("a", 1, "val", 0.4, 1.5)])
    _log(fresh, "b", [("b", 1, "resume", 0.9, 1.5), ("b", 2, "train", 0.9, 2.5), ("b", 2, "val", 0.8, 3.0)])
    assert not losscurve.check(losscurve.load(fresh))["continuous"]


def test_loss_curve_command_says_what_is_wrong(tmp_path: Path) -> None:
    r = medbridge("bench", "loss-curve", str(tmp_path / "none"))
    assert r.returncode == 4 and "no such folder" in r.stderr
    r = medbridge("bench", "loss-curve", str(tmp_path))
    assert r.returncode == 4 and "no pretrain-log.csv" in r.stderr
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / LOG).write_text("a,b\n1,2\n")
    r = medbridge("bench", "loss-curve", str(tmp_path))
    assert r.returncode == 2 and "not a pretrain log" in r.stderr


def test_a_failed_part_is_said_in_the_report_not_left_out() -> None:
    from medbridge.bench import report

    text = report.markdown("quick", {"images": {"failed": "the images worker failed (exit 1): boom"}}, 3.0)
    assert "| images |" in text and "**failed**: the images worker failed (exit 1): boom" in text
    assert "**Failed in this run**: the images worker failed" in text


def test_masks_depend_only_on_the_seed() -> None:
    a, b = cubes((32, 32, 32), 0.5, (0, 7)), cubes((32, 32, 32), 0.5, (0, 7))
    assert (a == b).all() and 0.2 < a.mean() < 0.8
    assert not (a == cubes((32, 32, 32), 0.5, (0, 8))).all()


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["bench", "rtt"], 2, "give --route"),
        (["bench", "rtt", "--sites", "--pairs", "hpc-mars"], 2, "--pairs 'hpc-mars'"),
        (["bench", "rtt", "--sites", "--link-delay", "exp=soon"], 2, "--link-delay 'exp=soon'"),
        (["bench", "images", "--paths", "sshfs,native"], 2, "--paths: local and"),
        (["bench", "images", "--tests", "18"], 2, "no vision test '18'"),
        (["bench", "ct-train", "--size", "40"], 2, "multiple of 16"),
        (["bench", "ct-train", "--from", "/nonexistent-cases", "--scheduler", "local"], 2, "not a folder"),
        (["bench", "pretrain", "--size", "48", "--out", "/nonexistent/x"], 2, "multiple of 32"),
        (["bench", "report", "--out", "/nonexistent/x", "--only", "fig9"], 2, "--only fig9"),
    ],
)
@needs_models
def test_bad_input_is_one_line_and_its_exit_code(args: list[str], code: int, words: str) -> None:
    r = medbridge(*args)
    assert r.returncode == code, r.stderr
    assert words in r.stderr and "Traceback" not in r.stderr


# -- the quick report, for real ------------------------------------------------------------------------------------

real = pytest.mark.skipif(
    missing() is not None or netns.available() is not None or not os.path.exists("/dev/fuse"),
    reason=f"needs torch and MONAI, network namespaces and FUSE: {missing() or netns.available() or 'no /dev/fuse'}",
)


@pytest.fixture(scope="module")
def report() -> Iterator[tuple[Path, bool]]:
    """``bench report --profile quick`` once, through the test Slurm cluster where one can start here."""
    base = Path(tempfile.mkdtemp(prefix="medbridge-report-", dir="/var/tmp"))
    base.chmod(0o755)
    out = base / "report"
    try:
        with contextlib.ExitStack() as stack:
            exe, env, slurm = sys.executable, dict(os.environ), False
            if test_slurm.available() is None:
                exe, extra = stack.enter_context(test_slurm.job_python(base))
                (base / "state").mkdir()
                cluster = stack.enter_context(test_slurm.SlurmCluster(base / "cluster", "/bin/true", base / "state"))
                env, slurm = {**cluster.env, **extra}, True
            cmd = [exe, "-m", "medbridge", "bench", "report", "--profile", "quick", "--out", str(out)]
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
            assert r.returncode == 0, r.stderr[-4000:]
            assert r.stdout.strip().endswith("report.md")
        yield out, slurm
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _json(out: Path, part: str) -> dict[str, object]:
    return json.loads((out / f"{part}.json").read_text())  # type: ignore[no-any-return]


@real
def test_report_holds_every_figure_and_the_side_by_side_table(report: tuple[Path, bool]) -> None:
    out, _ = report
    text = (out / "report.md").read_text()
    assert "| figure | original system (published) | medbridge, this run | plain sshfs, this run |" in text
    figures = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    outage = _json(out, "outage")
    assert len(figures) >= (5 if "runs" in outage else 4), figures
    for name in figures:
        assert (out / name).read_bytes()[:8] == PNG, name
    for fig in ("Fig 3", "Fig 4", "Fig 5", "Fig 6", "Fig 7"):
        assert f"| {fig}" in text


@real
def test_rtt_per_pair_carries_each_links_delay(report: tuple[Path, bool]) -> None:
    rows = _json(report[0], "rtt")["rows"]
    assert isinstance(rows, list)
    assert {(r["src"], r["dst"], r["level"]) for r in rows} == {
        (a, b, lvl) for a, b in (("hpc", "exp"), ("hpc", "platform"), ("campus", "exp")) for lvl in ("tcp", "sftp")
    }
    for r in rows:  # a round trip cannot beat the delay its two links add (it would if a relay were bypassed)
        assert r["min_ms"] >= 0.95 * r["emulated_ms"], r
    median = {(r["src"], r["dst"], r["level"]): r["median_ms"] for r in rows}
    for level in ("tcp", "sftp"):
        assert median[("campus", "exp", level)] > median[("hpc", "platform", level)] + 3


@real
def test_images_time_load_and_compute_for_all_seventeen_by_every_path(report: tuple[Path, bool]) -> None:
    result = _json(report[0], "images")
    rows = result["rows"]
    assert isinstance(rows, list)
    paths = {r["path"] for r in rows}
    assert paths == {"local", "sshfs-default", "native"}
    assert sorted({r["test"] for r in rows}) == list(range(1, 18))
    for test in range(1, 18):
        mine = [r for r in rows if r["test"] == test]
        assert len(mine) == 3 and all(r["load_s"] > 0 and r["compute_s"] > 0 for r in mine)
        assert len({r["bytes"] for r in mine}) == 1 and mine[0]["bytes"] > 0  # every path read the same files
    assert set(result["summary"]) == {"sshfs-default", "native"}  # type: ignore[arg-type]


@real
def test_ct_train_jobs_committed_their_csvs_to_the_platform(report: tuple[Path, bool]) -> None:
    out, slurm = report
    result = _json(out, "ct-train")
    assert result["scheduler"] == ("slurm" if slurm else "local")
    jobs = result["jobs"]
    assert isinstance(jobs, list)
    assert sorted(j["path"] for j in jobs) == ["local", "mount", "native"]
    for j in jobs:
        assert j["steps"] == 2 and len(j["loss"]) == 2 and j["results"].startswith("results/bench/")
        if slurm:
            assert j["job_id"].isdigit()
        with open(out / "ct-train" / j["name"] / "steps.csv", newline="") as f:
            steps = list(csv.DictReader(f))
        assert [int(s["step"]) for s in steps] == [1, 2] and all(float(s["loss"]) > 0 for s in steps)
        with open(out / "ct-train" / j["name"] / "epochs.csv", newline="") as f:
            (epoch,) = csv.DictReader(f)
        assert 0 <= float(epoch["val_dice"]) <= 1
    assert set(result["ratios"]) == {"mount", "native"}  # type: ignore[arg-type]


@real
def test_pretrain_chain_resumes_from_checkpoints_without_losing_a_step(report: tuple[Path, bool]) -> None:
    out, slurm = report
    result = _json(out, "pretrain")
    assert result["continuous"] is True
    assert result["jobs"] == ["pretrain-1", "pretrain-2", "pretrain-3"]
    assert result["steps"] == 6 and result["lost_steps"] == [] and result["repeated_steps"] == []
    resumes = result["resumes"]
    assert isinstance(resumes, list) and len(resumes) == 2
    assert all(x["resumed"] and x["step_gap"] == 0 and x["val_loss_gap"] <= 1e-3 for x in resumes)
    committed = result["committed"]
    assert isinstance(committed, dict)
    assert all({"checkpoint.pt", LOG, "MANIFEST.sha256"} <= set(files) for files in committed.values())
    ids = result["job_ids"]
    assert isinstance(ids, list) and len(set(ids)) == 3
    if slurm:
        assert all(i.isdigit() for i in ids)


@real
def test_report_reuses_what_its_folder_holds(report: tuple[Path, bool]) -> None:
    out, _ = report
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")}
    r = medbridge("bench", "report", "--profile", "quick", "--out", str(out), timeout=120)
    assert r.returncode == 0, r.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")} == before
    assert "reusing" in r.stderr
