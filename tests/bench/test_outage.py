"""``bench outage``: its arithmetic, its plan's checks, and one small run on the three sites with its link cut."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from medbridge import processes
from medbridge.bench import outage
from medbridge.errors import InvalidInput
from medbridge.testing.netns import available
from medbridge.testing.wait import Lines


def test_timeline_is_bytes_per_second_by_direction_and_survives_a_counter_reset() -> None:
    samples = [(100.0, 0, 0), (100.5, 1000, 10), (101.5, 3000, 30), (102.0, 500, 5)]  # the gateway restarted
    assert outage.timeline(samples, 100.0) == [[0.5, 2020.0, 2000.0, 20.0], [1.5, 2020.0, 2000.0, 20.0],
                                               [2.0, 1010.0, 1000.0, 10.0]]  # fmt: skip


def test_stall_is_the_longest_wait_for_one_volume() -> None:
    reads = [{"asked": 0.0, "got": 1.0}, {"asked": 5.0, "got": 40.0}, {"asked": 41.0, "got": 42.0}]
    assert outage.stall(reads) == (35.0, 40.0)
    assert outage.stall([]) == (0.0, None)


def test_a_read_asked_for_and_never_answered_is_pending_unless_every_volume_was_read() -> None:
    reads = [{"asked": 0.0, "got": 1.0}, {"asked": 2.0, "got": 3.0}]
    assert outage.pending(reads, asking=4.0, count=3) == 4.0, "the payload died waiting for the third"
    assert outage.pending(reads, asking=4.0, count=2) is None, "it asked once more and heard: no more volumes"
    assert outage.pending(reads, asking=None, count=3) is None
    assert outage.pending([], asking=0.5, count=3) == 0.5, "it never got its first"


def test_differences_name_the_masks_that_differ_are_missing_or_extra() -> None:
    expected = {"a": "1", "b": "2", "c": "3"}
    assert outage.differences({"a": "1", "b": "X", "d": "4"}, expected) == {
        "differ": ["b"], "missing": ["c"], "extra": ["d"]}  # fmt: skip
    assert outage.differences(None, expected)["missing"] == ["a", "b", "c"], "nothing committed"
    assert outage.differences(dict(expected), expected) == {"differ": [], "missing": [], "extra": []}


def test_misread_names_the_volumes_whose_bytes_are_not_the_datasets() -> None:
    source = {"a.nii": "1", "b.nii": "2"}
    reads = [{"volume": "a.nii", "sha256": "1"}, {"volume": "b.nii", "sha256": "X"}, {"volume": "c.nii", "sha256": "3"}]
    assert outage.misread(reads, source) == ["b.nii", "c.nii"]
    assert outage.misread([{"volume": "a.nii"}], source) == [], "no digest recorded: nothing to say"


def test_enough_volumes_that_the_job_reads_past_the_cut() -> None:
    plan = outage.Plan(cut_at=500, cut_for=300)
    n = outage.volumes_for(plan, seconds_per_volume=1.6)
    assert n * 1.6 > 500 * outage.AFTER_CUT
    assert outage.volumes_for(outage.Plan(volumes=7), 1.6) == 7


@pytest.mark.parametrize(
    ("changes", "words"),
    [({"path": "nfs"}, "--path 'nfs'"), ({"cut_for": 0}, "--cut-for"), ({"volumes": 0}, "--volumes"),
     ({"tolerance": 1}, "--tolerance must be 3 to 86400")],
)  # fmt: skip
def test_plan_refuses_what_cannot_run(changes: dict[str, object], words: str) -> None:
    with pytest.raises(InvalidInput, match=words):
        outage.Plan(**changes).check()  # type: ignore[arg-type]


@pytest.mark.skipif(available() is not None, reason=f"no network namespaces here: {available()}")
def test_a_small_run_with_its_link_cut_completes_with_identical_outputs(tmp_path: Path) -> None:
    """Small volumes (16x32x32) so the job is short; the cut lands while it reads (after its fifth volume, not
    at a time: a quiet machine once read all 100 before a cut at 4 s)."""
    plan = outage.Plan(path="native", cut_for=8.0, volumes=100, shape=(16, 32, 32), cut_after_reads=5)
    kept = tmp_path / "kept"
    result = outage.run(plan, keep=kept)
    for key in ("path", "completed", "outputs_match", "cut_at_s", "cut_s", "stall_s", "timeline"):
        assert key in result
    assert result["outputs"] == {"differ": [], "missing": [], "extra": [], "reference_volumes": 100}
    assert not result["unfinished_read"]
    assert result["reads_differ"] == [], "every volume's bytes were the dataset's"
    assert len(list((kept / "ref").glob("*_lungs.nii"))) == 100, "the reference masks are kept"
    assert (kept / "job.log").exists() and (kept / "world").is_dir()
    tcp = (kept / "tcp.log").read_text()
    assert "=== " in tcp and "ESTAB" in tcp, "the TCP state of the job's connection was recorded"
    assert result["cut_landed"], result["cut_at_s"]
    assert result["completed"] and result["outputs_match"], result["job_said"]
    assert result["stall_s"] <= result["cut_s"] + 30
    assert any(o["seconds"] >= 7 for o in result["outages"]), "the job saw the cut"
    assert all(len(row) == 4 for row in result["timeline"]) and result["timeline"]
    outage.plot(result, tmp_path / "outage.png")
    assert (tmp_path / "outage.png").stat().st_size > 5000


def _descendants(pid: int) -> dict[int, str]:
    """Every living process under ``pid``: PID -> its start time (so a reused PID is not taken for it)."""
    found: dict[int, str] = {}
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            start = _started(child)
            if start is not None:
                found[child] = start
                todo.append(child)
    return found


def _started(pid: int) -> str | None:
    """A living process's start time; None once it is gone or a zombie (ended, its parent yet to reap it)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _netns(pid: int) -> str:
    """The named network namespace ``pid`` runs in ("" for the machine's own)."""
    return subprocess.run(["ip", "netns", "identify", str(pid)], capture_output=True, text=True).stdout.strip()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


@pytest.mark.skipif(available() is not None, reason=f"no network namespaces here: {available()}")
def test_a_run_stopped_by_sigterm_mid_cut_stops_its_job_servers_namespaces_and_files() -> None:
    """SIGTERM while the job waits out a cut on the mount (a batch system's time limit): the job run, its payload
    and sshfs, the platform, the gateway and the namespaces all go, and the run's folder too. Before, the job run
    outlived the run: with its platform gone it went on trying to upload for the whole outage tolerance."""
    cmd = [sys.executable, "-m", "medbridge", "bench", "outage", "--path", "mount", "--volumes", "8",
           "--cut-at", "0", "--cut-for", "86400"]  # fmt: skip
    bench = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert bench.stderr is not None
        said = Lines(bench.stderr)
        said.wait_for("link cut at gw", timeout=600)
        seen = _descendants(bench.pid)
        assert any(" job run " in _cmdline(p) for p in seen) and any("sshfs" in _cmdline(p) for p in seen)
        # its own namespaces and folder (other runs on the machine may make theirs meanwhile)
        namespaces = {_netns(p) for p in seen} - {""}
        folders = set(re.findall(r"/var/tmp/medbridge-bench-outage-[A-Za-z0-9_]+", " ".join(map(_cmdline, seen))))
        assert len(namespaces) >= 3 and len(folders) == 1, (namespaces, folders)
        bench.send_signal(signal.SIGTERM)
        bench.wait(timeout=300)
        err = said.join()
    finally:
        processes.stop(bench, timeout=120)  # SIGTERM first: a failed test must not leave the run's world behind
        if bench.stderr is not None:
            bench.stderr.close()
    assert bench.returncode == 130, err
    assert "Traceback" not in err
    left = [f"{p} {_cmdline(p)}" for p, start in seen.items() if _started(p) == start]
    assert not left, left
    listed = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    assert not namespaces & listed, namespaces & listed
    assert not any(Path(f).exists() for f in folders), folders
