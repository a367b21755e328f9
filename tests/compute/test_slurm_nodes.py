"""A two-node Slurm: two slurmd, each in a network namespace of its own, one slurmctld; one job spans both.

``job submit --nodes 2`` runs ``job run`` on each node (``srun``): each a platform job of
its own (``<Slurm job id>-n<node index>``) with its own certificate, asked for and used
from its node's own address, its own mount and working folder; the epilog runs on each
node.  The nodes share this machine's file systems, as nodes share a cluster file system;
what a real node keeps locally (the state folder for the epilog, the private-/tmp base)
is a folder per node here, named by Slurm's TaskProlog and the epilog from
``$SLURMD_NODENAME``.  Jobs run as root, as in test_slurm.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from medbridge.compute.slurm import leftover_processes
from medbridge.testing import RunningPlatform
from medbridge.testing.netns import available as namespaces
from medbridge.testing.slurm import NODE_NAMES, SlurmCluster, available, job_python
from medbridge.testing.wait import until
from tests.compute.test_slurm import _gone, submit
from tests.conftest import CHEST

pytestmark = [
    pytest.mark.skipif(available() is not None, reason=f"no Slurm here: {available()}"),
    pytest.mark.skipif(namespaces() is not None, reason=f"no network namespaces here: {namespaces()}"),
]

NODES = NODE_NAMES[:2]


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    """Outside /tmp: with job_container/tmpfs a job cannot see the host's /tmp."""
    path = Path(tempfile.mkdtemp(prefix="medbridge-slurm2-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(base: Path) -> Iterator[SlurmCluster]:
    state = base / "state"
    for node in NODES:  # each node's own state folder, as /var/spool/medbridge is on a real node
        (state / node).mkdir(parents=True)
        (state / node).chmod(0o1733)
    with job_python(base) as (exe, extra_env):
        exports = "".join(f"export {k}={v}\n" for k, v in extra_env.items())
        epilog, prolog = base / "epilog.sh", base / "task-prolog.sh"
        epilog.write_text(
            "#!/bin/sh\n" + exports + f"{exe} -m medbridge slurm epilog --state-dir {state}/$SLURMD_NODENAME "
            f"--container-base {base / 'cluster' / 'containers'}/$SLURMD_NODENAME"
            f" > {base}/epilog-$SLURM_JOB_ID-$SLURMD_NODENAME.json 2>> {base}/epilog.err\n"
            "exit 0\n"
        )
        prolog.write_text(f'#!/bin/sh\necho "export MEDBRIDGE_STATE_DIR={state}/$SLURMD_NODENAME"\n')
        for script in (epilog, prolog):
            script.chmod(0o755)
        with SlurmCluster(base / "cluster", str(epilog), state, nodes=2, task_prolog=str(prolog)) as c:
            c.env.update(extra_env)
            c.python = exe
            yield c


@pytest.fixture
def platform(base: Path, cluster: SlurmCluster) -> Iterator[RunningPlatform]:
    """Listening where both nodes reach it: the root namespace's address on the nodes' segment."""
    root = Path(tempfile.mkdtemp(prefix="platform-", dir=base))
    p = RunningPlatform(root, host=cluster.controller, enforcement_interval=0.25)
    p.add_user("alice")
    p.add_dataset("chest", CHEST)
    p.grant("alice", "chest")
    with p:
        yield p


def epilog_report(base: Path, job: str, node: str) -> dict[str, object]:
    path = base / f"epilog-{job}-{node}.json"
    until(lambda: path.exists() and bool(path.read_text().strip()), f"the epilog of job {job} on {node}", 60)
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def test_a_two_node_job_runs_job_run_on_each_node(cluster: SlurmCluster, platform: RunningPlatform,
                                                  base: Path) -> None:  # fmt: skip
    command = ('mkdir -p out && sha256sum "$MEDBRIDGE_MOUNT/datasets/chest/scan-001.bin" | cut -c1-64 > out/sum.txt'
               ' && echo "$SLURMD_NODENAME" > out/node.txt')  # fmt: skip
    job = submit(cluster, platform, base, command, "--nodes", "2", "--mount", str(platform.root / "mnt-{job}"),
                 "--outputs", "out")  # fmt: skip
    state = cluster.wait_done(job)
    assert state["JobState"] == "COMPLETED", (base / f"slurm-{job}.out").read_text()
    assert state["NumNodes"] == "2"
    assert cluster.network is not None
    node_of = {}
    for i in range(2):
        results = platform.home.results / "alice" / f"{job}-n{i}"
        assert (results / "sum.txt").read_text().strip() == hashlib.sha256(CHEST["scan-001.bin"]).hexdigest()
        assert "sum.txt" in (results / "MANIFEST.sha256").read_text()
        node_of[f"{job}-n{i}"] = (results / "node.txt").read_text().strip()
        assert not os.path.ismount(platform.root / f"mnt-{job}-n{i}")
    assert sorted(node_of.values()) == list(NODES), "one job run on each node"
    issued = {r.subject: json.loads(r.detail) for r in platform.audit("certificate.issue") if r.outcome == "ok"}
    serials = set()
    for job_id, node in node_of.items():
        address = cluster.network.address[node]
        assert str(issued[job_id]["peer"]).startswith(f"{address}:"), "each node asked for its own certificate"
        serials.add(issued[job_id]["serial"])
        used = [json.loads(r.detail) for r in platform.audit("login") if r.subject == "certificate"]
        mine = [d for d in used if d["job"] == job_id]
        assert mine and all(str(d["peer"]).startswith(f"{address}:") for d in mine), "and used it from there"
        assert {d["serial"] for d in mine} == {issued[job_id]["serial"]}
    assert len(serials) == 2
    for node in NODES:
        report = epilog_report(base, job, node)
        assert report["slurm_job_id"] == job and report["unmounted"] == [] and report["still_mounted"] == []


def test_the_epilog_cleans_each_node(cluster: SlurmCluster, platform: RunningPlatform, base: Path) -> None:
    """Both nodes' wrappers die by SIGKILL: no teardown of their own; each node's epilog does it."""
    # The payload's output goes nowhere: a task's orphan holding it makes slurmstepd wait 60 s before it ends the step.
    command = ('exec >/dev/null 2>&1; cp "$MEDBRIDGE_MOUNT/datasets/chest/scan-001.bin" ./stolen.bin && touch running'
               ' && sleep 600')  # fmt: skip
    job = submit(cluster, platform, base, command, "--nodes", "2", "--mount", str(platform.root / "mnt-{job}"))
    workdirs = {i: platform.root / f"medbridge-job-{job}-n{i}" for i in range(2)}
    until(lambda: all((w / "running").exists() for w in workdirs.values()), "both nodes' payloads", 120)
    mine = str(os.getuid())  # each user's state is a folder of its own under the node's state folder
    states = {node: json.loads((base / "state" / node / mine / f"{job}.json").read_text()) for node in NODES}
    assert sorted(s["job_id"] for s in states.values()) == [f"{job}-n0", f"{job}-n1"]
    for s in states.values():
        os.kill(s["wrapper_pid"], signal.SIGKILL)
    assert cluster.wait_done(job)["JobState"] in {"FAILED", "CANCELLED", "COMPLETED"}
    for node, s in states.items():
        report = epilog_report(base, job, node)
        residue = report["residue"]
        assert isinstance(residue, dict), report
        # The wrapper's guard takes its agent and sshfs down with it; the epilog kills whatever is left.
        assert all(_gone(s[k]) for k in ("agent_pid", "sshfs_pid")), f"{node}'s own helpers: {report}"
        purged = [f["path"] for f in residue["findings"] if f["purged"]]
        own = platform.root / f"medbridge-job-{s['job_id']}" / "stolen.bin"
        assert purged == [str(own)], f"{node}'s epilog purged its own node's copy: {report}"
        assert not own.exists()
        assert not os.path.ismount(s["mount"])
        assert not (base / "state" / node / mine / f"{job}.json").exists()


def test_an_epilog_leaves_the_processes_of_the_jobs_other_nodes_alone() -> None:
    """Where nodes share one process table (here), one node's epilog must not kill another's epilog or tasks."""
    job = str(10**9 + secrets.randbelow(10**9))
    base = {k: v for k, v in os.environ.items() if k not in ("SLURM_JOB_ID", "SLURMD_NODENAME")}
    nodes = {"mine": {"SLURMD_NODENAME": "mbnode1"}, "other": {"SLURMD_NODENAME": "mbnode2"}, "unnamed": {}}
    read = [sys.executable, "-c", "import sys; sys.stdin.read()"]
    procs = {
        name: subprocess.Popen(read, stdin=subprocess.PIPE, env={**base, "SLURM_JOB_ID": job, **extra})
        for name, extra in nodes.items()
    }
    try:

        def found(node: str | None) -> set[str]:
            pairs = leftover_processes(job, os.geteuid(), node)
            for _, fd in pairs:
                os.close(fd)
            return {name for name, p in procs.items() if p.pid in {pid for pid, _ in pairs}}

        assert found("mbnode1") == {"mine", "unnamed"}
        assert found("mbnode2") == {"other", "unnamed"}
        assert found(None) == {"mine", "other", "unnamed"}
    finally:
        for p in procs.values():
            assert p.stdin is not None
            p.stdin.close()
            p.wait(timeout=30)
