"""A real Slurm (munge + slurmctld + slurmd, started here and stopped by PID) runs medbridge jobs.

Jobs run as root: on this kind of machine /dev/fuse is root-only and the checkout's
Python lives under /root, so a non-root job could neither mount nor start medbridge.
Non-root users are used where Slurm's own decision is the point (AllowGroups).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from medbridge.compute import residue, slurm
from medbridge.compute.job import default_job_id
from medbridge.compute.slurm import Submission, batch_script, private_temp
from medbridge.errors import InvalidInput
from medbridge.testing import RunningPlatform
from medbridge.testing.slurm import DONE, JOB_USER, OUTSIDER, SlurmCluster, available, job_python
from medbridge.testing.wait import until
from tests.compute.test_guard import enrol_node
from tests.compute.test_residue import dicom
from tests.conftest import CHEST

pytestmark = pytest.mark.skipif(available() is not None, reason=f"no Slurm here: {available()}")


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    """Outside /tmp: with job_container/tmpfs a job cannot see the host's /tmp."""
    path = Path(tempfile.mkdtemp(prefix="medbridge-slurm-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def python(base: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """The interpreter jobs run medbridge with (the checkout may be under the host's /tmp)."""
    with job_python(base) as found:
        yield found


@pytest.fixture(scope="module")
def cluster(base: Path, python: tuple[str, dict[str, str]]) -> Iterator[SlurmCluster]:
    state = base / "state"
    state.mkdir()
    state.chmod(0o1733)
    epilog = base / "epilog.sh"
    exe, extra_env = python
    exports = "".join(f"export {k}={v}\n" for k, v in extra_env.items())
    epilog.write_text(
        "#!/bin/sh\n" + exports + f"{exe} -m medbridge slurm epilog --state-dir {state} "
        f"--container-base {base / 'cluster' / 'containers'} --node-config {base / 'node.toml'}"
        f" > {base}/epilog-$SLURM_JOB_ID.json 2>> {base}/epilog.err\n"
        "exit 0\n"
    )
    epilog.chmod(0o755)
    with SlurmCluster(base / "cluster", str(epilog), state) as c:
        c.env.update(extra_env)
        c.python = exe
        yield c


@pytest.fixture
def platform(base: Path) -> Iterator[RunningPlatform]:
    """alice may read chest; this machine is enrolled as the cluster's node, its credential in base/node.toml."""
    root = Path(tempfile.mkdtemp(prefix="platform-", dir=base))
    p = RunningPlatform(root, enforcement_interval=0.25)
    p.add_user("alice")
    p.add_dataset("chest", CHEST)
    p.grant("alice", "chest")
    with p:
        enrol_node(p, base)
        yield p


def submit(cluster: SlurmCluster, p: RunningPlatform, base: Path, command: str, *extra: str) -> str:
    cmd = [cluster.python, "-m", "medbridge", "job", "submit", "--platform", p.address, "--key", str(p.keys["alice"]),
           "--user", "alice", "--host-key-fingerprint", p.fingerprint, "--json",
           f"--sbatch=--output={base}/slurm-%j.out", *extra,
           "--", "sh", "-c", command]  # fmt: skip
    env = {**cluster.env, "MEDBRIDGE_STATE_DIR": str(base / "state")}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=p.root)
    assert r.returncode == 0, r.stderr
    return str(json.loads(r.stdout)["job_id"])


def epilog_report(base: Path, job: str) -> dict[str, object]:
    path = base / f"epilog-{job}.json"
    until(lambda: path.exists() and path.read_text().strip(), f"the epilog's report for job {job}")
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def workdir(p: RunningPlatform, job: str) -> Path:
    return p.root / f"medbridge-job-{job}"


def test_batch_script_is_stable() -> None:
    sub = Submission(
        command=["python", "train.py", "--epochs", "9"],
        job_run_args=["--platform", "p:22"],
        partition="bridge",
        sbatch_args=["--time=10"],
    )
    script = batch_script(sub, python="/opt/mb/bin/python")
    assert script == (
        "#!/bin/bash\n"
        "#SBATCH --partition=bridge\n"
        "#SBATCH --job-name=medbridge\n"
        "# Written by 'medbridge job submit': job run holds the job's platform access and always tears down.\n"
        "umask 077  # what the job writes is its user's alone\n"
        'workdir="${MEDBRIDGE_WORKDIR:-$SLURM_SUBMIT_DIR}/medbridge-job-$SLURM_JOB_ID"\n'
        'mkdir -p "$workdir" && cd "$workdir" || exit 9\n'
        "exec /opt/mb/bin/python -m medbridge job run --platform p:22 --scan /tmp --scan /dev/shm --scratch . "
        "--purge -- python train.py --epochs 9\n"
    )


def test_a_job_of_several_nodes_runs_a_job_run_of_its_own_on_each() -> None:
    sub = Submission(command=["python", "train.py"], job_run_args=["--platform", "p:22"], partition="bridge", nodes=2)
    script = batch_script(sub, python="/opt/mb/bin/python")
    assert script.splitlines()[3:5] == ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1"]
    assert script.splitlines()[-3:] == [
        "exec srun --ntasks-per-node=1 /bin/bash -c 'workdir=\"${MEDBRIDGE_WORKDIR:-$SLURM_SUBMIT_DIR}/"
        'medbridge-job-$SLURM_JOB_ID-n$SLURM_NODEID"',
        'mkdir -p "$workdir" && cd "$workdir" || exit 9',
        "exec /opt/mb/bin/python -m medbridge job run --platform p:22 --scan /tmp --scan /dev/shm --scratch . "
        "--purge -- python train.py'",
    ]
    with pytest.raises(InvalidInput, match="at least one node"):
        batch_script(dataclasses.replace(sub, nodes=0))
    one = {"SLURM_JOB_ID": "41", "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0"}
    assert default_job_id(one) == "41"
    assert default_job_id({**one, "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1"}) == "41-n1"
    assert default_job_id({"SLURM_JOB_ID": "41"}) == "41"  # an older Slurm or a step without the node's number


#: /proc/self/mountinfo inside a job of this test cluster (Slurm 22.05, job_container/tmpfs), trimmed.
JOB_MOUNTINFO = """\
45 1 254:0 / / rw,relatime - ext4 /dev/vda rw
60 45 0:6 / /dev rw,relatime - devtmpfs devtmpfs rw,mode=755
61 60 0:23 / /dev/shm rw,relatime - tmpfs tmpfs rw,size=24683656k
68 45 254:0 /var/tmp/slurm/containers/vm/17/.17 /tmp rw,relatime - ext4 /dev/vda rw
62 61 0:39 / /dev/shm rw,relatime - tmpfs tmpfs rw
"""


def test_private_temp_is_recognised_only_for_its_own_job() -> None:
    assert private_temp(JOB_MOUNTINFO, "17") == ["/tmp", "/dev/shm"]
    assert private_temp(JOB_MOUNTINFO, "1") == [], "another job's container is not this job's"
    assert private_temp(JOB_MOUNTINFO, "") == []
    host = "\n".join(line for line in JOB_MOUNTINFO.splitlines() if " /tmp " not in line and not line.startswith("62"))
    assert private_temp(host, "17") == [], "the host's shared /tmp and /dev/shm"
    only_tmp = "\n".join(line for line in JOB_MOUNTINFO.splitlines() if not line.startswith("62"))
    assert private_temp(only_tmp, "17") == ["/tmp"], "the host's /dev/shm is not stacked over: shared"
    escaped = JOB_MOUNTINFO.replace("/var/tmp/slurm", "/var/my\\040spool")
    assert private_temp(escaped, "17") == ["/tmp", "/dev/shm"]


def test_job_reads_computes_and_writes_back(cluster: SlurmCluster, platform: RunningPlatform, base: Path) -> None:
    command = 'sha256sum "$MEDBRIDGE_MOUNT/datasets/chest/scan-001.bin" | cut -c1-64 > "$OUT/sum.txt"'
    job = submit(
        cluster,
        platform,
        base,
        f"OUT=out-$SLURM_JOB_ID; mkdir -p $OUT; {command}",
        "--mount",
        str(platform.root / "mnt-{job}"),
        "--outputs",
        "out-{job}",
    )
    state = cluster.wait_done(job)
    assert state["JobState"] == "COMPLETED", (base / f"slurm-{job}.out").read_text()
    res = platform.home.results / "alice" / job
    assert (res / "sum.txt").read_text().strip() == hashlib.sha256(CHEST["scan-001.bin"]).hexdigest()
    assert "sum.txt" in (res / "MANIFEST.sha256").read_text()
    assert not os.path.ismount(platform.root / f"mnt-{job}")
    scans = [r for r in platform.audit("residue.reported") if r.subject == job]
    assert scans and scans[-1].outcome == "claims-clean"
    report = epilog_report(base, job)
    assert report["killed"] == [] and report["unmounted"] == []


def test_four_jobs_at_once(cluster: SlurmCluster, platform: RunningPlatform, base: Path) -> None:
    """A barrier: each job, once it has read through its mount, waits until all four have, so all four run
    at once however far apart Slurm starts them (bounded: a job alone gives up after a few minutes)."""
    barrier = platform.root / "barrier"
    barrier.mkdir()
    command = (
        f'cat "$MEDBRIDGE_MOUNT/datasets/chest/scan-001.bin" > /dev/null && touch {barrier}/$SLURM_JOB_ID && n=0; '
        f'while [ "$(ls {barrier} | wc -l)" -lt 4 ]; do n=$((n+1)); [ $n -lt 3000 ] || exit 3; sleep 0.1; done; '
        f'ls {barrier} > "$MEDBRIDGE_RESULTS/seen.txt"'
    )
    jobs = [submit(cluster, platform, base, command, "--mount", str(platform.root / "mnt-{job}")) for _ in range(4)]
    for job in jobs:
        assert cluster.wait_done(job, timeout=600)["JobState"] == "COMPLETED", (base / f"slurm-{job}.out").read_text()
        seen = (platform.home.results / "alice" / job / "seen.txt").read_text().split()
        assert sorted(seen) == sorted(jobs), f"job {job} went on before all four were running: {seen}"
    logins = {r.detail for r in platform.audit("login") if r.subject == "certificate"}
    assert all(any(f'"job":"{job}"' in d for d in logins) for job in jobs)


def test_user_outside_the_partition_group_is_refused(cluster: SlurmCluster, base: Path) -> None:
    refused = cluster.as_user(OUTSIDER, "sbatch", "--parsable", "--partition=bridge", "--wrap=true", cwd="/")
    assert refused.returncode != 0
    assert "not permitted to use this partition" in refused.stderr
    admitted = cluster.as_user(
        JOB_USER, "sbatch", "--parsable", "--partition=bridge", "--wrap=true", "--output=/dev/null", cwd="/"
    )
    assert admitted.returncode == 0, admitted.stderr
    assert cluster.wait_done(admitted.stdout.strip())["JobState"] == "COMPLETED"


def test_copies_left_by_a_job_are_found_and_purged(
    cluster: SlurmCluster, platform: RunningPlatform, base: Path
) -> None:
    dcm = dicom().hex()
    command = (
        'cp "$MEDBRIDGE_MOUNT/datasets/chest/scan-001.bin" ./stolen.bin && '
        'cp "$MEDBRIDGE_MOUNT/datasets/chest/scan-002.bin" /tmp/stolen-tmp.bin && ls /tmp > tmp-listing.txt && '
        f"{cluster.python} -c \"import sys; [open(p, 'wb').write(bytes.fromhex('{dcm}')) for p in sys.argv[1:]]\" "
        "slice.dcm /tmp/slice-tmp.dcm"
    )
    job = submit(cluster, platform, base, command, "--mount", str(platform.root / "mnt-{job}"))
    assert cluster.wait_done(job)["JobState"] == "COMPLETED", (base / f"slurm-{job}.out").read_text()
    listing = workdir(platform, job) / "tmp-listing.txt"
    assert listing.exists(), (base / f"slurm-{job}.out").read_text()
    assert "stolen-tmp.bin" in listing.read_text()
    assert not (workdir(platform, job) / "stolen.bin").exists()
    assert not (workdir(platform, job) / "slice.dcm").exists()
    scan = [r for r in platform.audit("residue.reported") if r.subject == job][-1]
    claim = json.loads(scan.detail)["claim"]
    found = {Path(f["path"]).name: f["purged"] for f in claim["findings"]}
    # The working folder is the one the batch script made for the job; /tmp is job_container/tmpfs's.
    assert found == {"stolen.bin": True, "stolen-tmp.bin": True, "slice.dcm": True, "slice-tmp.dcm": True}
    assert scan.outcome == "claims-purged"


def _killed_job(cluster: SlurmCluster, platform: RunningPlatform, base: Path, *extra: str) -> str:
    command = 'cp "$MEDBRIDGE_MOUNT/datasets/chest/scan-001.bin" ./stolen.bin && touch running && sleep 600'
    job = submit(cluster, platform, base, command, "--mount", str(platform.root / "mnt-{job}"), *extra)
    until(lambda: (workdir(platform, job) / "running").exists() or cluster.job_state(job).get("JobState") in DONE,
          f"job {job} to run its payload")  # fmt: skip
    assert (workdir(platform, job) / "running").exists(), (base / f"slurm-{job}.out").read_text()
    return job


def test_sigkilled_wrapper_is_cleaned_up_by_the_epilog(
    cluster: SlurmCluster, platform: RunningPlatform, base: Path
) -> None:
    """The wrapper dies by SIGKILL (as by the OOM killer): no teardown of its own; the epilog does it."""
    job = _killed_job(cluster, platform, base)
    state = json.loads((base / "state" / str(os.getuid()) / f"{job}.json").read_text())
    helpers = [state["agent_pid"], state["sshfs_pid"]]
    # $MEDBRIDGE_SCRATCH is the epilog's to scan too (here inside job_container/tmpfs's /tmp, which Slurm wipes)
    assert [p for p in state["scan"] if p.endswith("/scratch")] == [
        p for p in state["scratch"] if p.endswith("/scratch")
    ]
    assert len([p for p in state["scan"] if p.endswith("/scratch")]) == 1
    os.kill(state["wrapper_pid"], 9)
    assert cluster.wait_done(job)["JobState"] in {"FAILED", "CANCELLED", "COMPLETED"}
    report = epilog_report(base, job)
    residue = report["residue"]
    assert isinstance(residue, dict) and "findings" in residue, report
    assert [Path(f["path"]).name for f in residue["findings"] if f["purged"]] == ["stolen.bin"]
    assert not (workdir(platform, job) / "stolen.bin").exists()
    assert all(_gone(pid) for pid in helpers), f"agent and sshfs must be gone: {report['killed']}"
    # The node's credential: the platform ended the job as soon as the epilog ran.
    assert report["platform"] == {"slurm_job_id": job, "jobs": [{"user": "alice", "job_id": job, "revoked": 1}]}
    assert [c.revoked for c in platform.store.certificates("alice") if c.job_id == job] == [True]
    assert not os.path.ismount(platform.root / f"mnt-{job}")
    assert not (base / "state" / str(os.getuid()) / f"{job}.json").exists()
    assert not [r for r in platform.audit("residue.reported") if r.subject == job], "the wrapper could not report"


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie waiting for a parent that is not ours to be reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state == "Z"


def test_timed_out_job_is_torn_down(cluster: SlurmCluster, platform: RunningPlatform, base: Path) -> None:
    job = _killed_job(cluster, platform, base, "--sbatch=--time=1")
    state = cluster.wait_done(job, timeout=240)
    assert state["JobState"] == "TIMEOUT"
    assert not (workdir(platform, job) / "stolen.bin").exists()
    assert not os.path.ismount(platform.root / f"mnt-{job}")
    scans = [r for r in platform.audit("residue.reported") if r.subject == job]
    report = epilog_report(base, job)
    purged_by_job = bool(scans) and '"purged":1' in scans[-1].detail
    residue = report.get("residue") or {}
    purged_by_epilog = any(f["purged"] for f in residue.get("findings", []))  # type: ignore[union-attr]
    assert purged_by_job or purged_by_epilog


def test_an_epilog_scan_that_runs_too_long_is_reported_unfinished_not_clean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scan's own process is stopped at the bound (no interpreter starts within it); never an uncaught timeout."""
    monkeypatch.setattr(slurm, "SCAN_SECONDS", 0.001)
    found = slurm._scan_as(os.geteuid(), [str(tmp_path)], [], [], residue.JobContext(started=None, scratch=[]))
    assert found["clean"] is False and found["findings"] == []
    assert found["errors"] == [f"scan as uid {os.geteuid()} did not finish within 0.001 s and was stopped"]
