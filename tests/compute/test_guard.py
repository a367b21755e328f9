"""A killed ``job run`` takes everything down with it (issue 14, item 9b).

The wrapper is SIGKILLed (as by the OOM killer) while its payload reads through the
mount: its ssh-agent, sshfs (with its ssh) and the payload's whole process group must
end by themselves, so nothing keeps reading with the job's credentials under init;
then the epilog, with the node's credential, has the platform revoke the job's
certificates, so none of them logs in again.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import select
import signal
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from medbridge.compute.node import NodeSettings
from medbridge.compute.slurm import epilog, sshfs_mounts
from medbridge.platform.keys import fingerprint, public_line
from medbridge.testing import RunningPlatform, write_key
from medbridge.testing.wait import until
from tests.compute.test_job_lifecycle import needs_fuse
from tests.compute.test_job_run import job_cmd, job_env
from tests.platform.test_nodes import logs_in


def _stat(pid: int) -> tuple[str, list[str]]:
    """A process's name and the fields of /proc/PID/stat after it (state, ppid, pgrp, …); empty once it is gone."""
    try:
        head, _, tail = Path(f"/proc/{pid}/stat").read_text().rpartition(")")
    except OSError:
        return "", []
    return head.partition("(")[2], tail.split()


def job_processes(wrapper: int) -> dict[int, tuple[str, int]]:
    """The wrapper's children and every process in their process groups (a payload's escaped ones too).

    Each as ``pid: (name, pidfd)``; the pidfd is opened at once, so a PID reused later is never waited on.
    """
    table = {int(p.name): _stat(int(p.name)) for p in Path("/proc").iterdir() if p.name.isdigit()}
    children = {pid for pid, (_, f) in table.items() if f and int(f[1]) == wrapper}
    found = {}
    for pid, (name, f) in table.items():
        if f and (pid in children or int(f[2]) in children):
            try:
                found[pid] = (name, os.pidfd_open(pid))
            except ProcessLookupError:
                continue  # a short-lived one (a payload's cat) that ended meanwhile
    return found


def wait_all_gone(pidfds: dict[int, int], timeout: float) -> list[int]:
    """Wait on each process's pidfd until it exits; the PIDs still running after ``timeout``."""
    poller = select.poll()
    for fd in pidfds.values():
        poller.register(fd, select.POLLIN)
    alive = set(pidfds.values())
    deadline = time.monotonic() + timeout
    while alive and time.monotonic() < deadline:
        for fd, _ in poller.poll(100):
            alive.discard(fd)
            poller.unregister(fd)
    return [pid for pid, fd in pidfds.items() if fd in alive]


def enrol_node(p: RunningPlatform, folder: Path) -> NodeSettings:
    """This machine as compute node ``n1`` (it reaches the platform from 127.0.0.1), with its node.toml."""
    key = write_key(folder / "node_ed25519")
    p.store.add_node("n1", (public_line(key), fingerprint(key)), ["127.0.0.1"], datetime.now(UTC), "test")
    conf = folder / "node.toml"
    conf.write_text(f'platform = "{p.address}"\nhost_key_fingerprint = "{p.fingerprint}"\nnode = "n1"\n'
                    f'key = "{folder / "node_ed25519"}"\n')  # fmt: skip
    return NodeSettings.load(conf)


@needs_fuse
def test_a_killed_wrapper_takes_its_agent_sshfs_and_payload_down(platform: RunningPlatform, tmp_path: Path) -> None:
    mnt, running, state = tmp_path / "mnt", tmp_path / "running", tmp_path / "state"
    state.mkdir(mode=0o755)
    work = platform.root / "job" / "work"
    work.mkdir(parents=True)
    slurm_job = str(secrets.randbelow(10**9) + 10**9)  # a Slurm job id no other test on this machine uses
    script = (
        f"(sleep 600 &); touch {running}; "
        # Reads on whatever one read says: a payload that ended by itself is not what this test kills.
        'while :; do cat "$MEDBRIDGE_MOUNT/datasets/chest/scan-001.bin" > /dev/null 2>&1; done'
    )
    cmd = job_cmd(platform, script, "--job-id", "killed", "--mount", str(mnt))
    env = job_env(platform.root / "job", {"SLURM_JOB_ID": slurm_job, "MEDBRIDGE_STATE_DIR": str(state)})
    with subprocess.Popen(cmd, env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as wrapper:
        try:
            until(lambda: running.exists() or wrapper.poll() is not None, "the payload to start")
            assert wrapper.poll() is None, wrapper.communicate()[1]
            procs = job_processes(wrapper.pid)
            assert {"ssh-agent", "sshfs", "sleep"} <= {name for name, _ in procs.values()}, procs
            wrapper.send_signal(signal.SIGKILL)
            wrapper.wait()
            left = wait_all_gone({pid: fd for pid, (_, fd) in procs.items()}, timeout=30)
            assert left == [], f"still running after the wrapper died: {[procs[p][0] for p in left]}"
        finally:
            if wrapper.poll() is None:
                wrapper.kill()
            for _, fd in locals().get("procs", {}).values():
                os.close(fd)
    with pytest.raises(OSError):
        (mnt / "datasets" / "chest" / "scan-001.bin").read_bytes()

    # Another certificate of the same job (the wrapper's own died with its agent): the epilog ends them all.
    key, cred = asyncio.run(platform.credential("alice", job_id="killed", slurm_job_id=slurm_job))
    assert asyncio.run(logs_in(platform, key, cred.certificate))
    ours = str(tmp_path)
    try:
        report = epilog({"SLURM_JOB_ID": slurm_job, "SLURM_JOB_UID": str(os.getuid())}, state,
                        node=enrol_node(platform, tmp_path),
                        mounts=lambda uid: [m for m in sshfs_mounts(uid) if m[0].startswith(ours)])  # fmt: skip
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    assert report.platform["jobs"] == [{"user": "alice", "job_id": "killed", "revoked": 2}], report
    assert not asyncio.run(logs_in(platform, key, cred.certificate)), "the job's certificates end with the epilog"
    assert report.killed == [] and report.still_mounted == [], "nothing was left for the epilog to kill"
    assert not os.path.ismount(mnt)
