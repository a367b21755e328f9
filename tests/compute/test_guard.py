"""A killed ``job run`` takes everything down with it (issue 14, item 9b).

The wrapper is SIGKILLed (as by the OOM killer) while its payload reads through the
mount: its ssh-agent, sshfs (with its ssh) and the payload's whole process group must
end by themselves, so nothing keeps reading with the job's credentials under init.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest

from medbridge.testing import RunningPlatform
from medbridge.testing.wait import until
from tests.compute.test_job_lifecycle import needs_fuse
from tests.compute.test_job_run import job_cmd, job_env


def _stat(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (state, ppid, pgrp, session, …)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def job_processes(wrapper: int) -> dict[int, str]:
    """The wrapper's children and every process in their process groups (a payload's escaped ones too)."""
    table = {int(p.name): _stat(int(p.name)) for p in Path("/proc").iterdir() if p.name.isdigit()}
    children = {pid for pid, f in table.items() if f and int(f[1]) == wrapper}
    found = {pid for pid, f in table.items() if f and (pid in children or int(f[2]) in children)}
    return {pid: Path(f"/proc/{pid}/comm").read_text().strip() for pid in found}


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


@needs_fuse
def test_a_killed_wrapper_takes_its_agent_sshfs_and_payload_down(platform: RunningPlatform, tmp_path: Path) -> None:
    mnt, running = tmp_path / "mnt", tmp_path / "running"
    work = platform.root / "job" / "work"
    work.mkdir(parents=True)
    script = (
        f"(sleep 600 &); touch {running}; "
        'while cat "$MEDBRIDGE_MOUNT/datasets/chest/scan-001.bin" > /dev/null; do :; done'
    )
    cmd = job_cmd(platform, script, "--job-id", "killed", "--mount", str(mnt))
    env = job_env(platform.root / "job")
    with subprocess.Popen(cmd, env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as wrapper:
        try:
            until(lambda: running.exists() or wrapper.poll() is not None, "the payload to start")
            assert wrapper.poll() is None, wrapper.communicate()[1]
            procs = job_processes(wrapper.pid)
            assert {"ssh-agent", "sshfs", "sleep"} <= set(procs.values()), procs
            pidfds = {pid: os.pidfd_open(pid) for pid in procs}
            wrapper.send_signal(signal.SIGKILL)
            wrapper.wait()
            left = wait_all_gone(pidfds, timeout=30)
            assert left == [], f"still running after the wrapper died: {[procs[p] for p in left]}"
        finally:
            if wrapper.poll() is None:
                wrapper.kill()
            for fd in locals().get("pidfds", {}).values():
                os.close(fd)
            if os.path.ismount(mnt):
                subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    with pytest.raises(OSError):
        (mnt / "datasets" / "chest" / "scan-001.bin").read_bytes()
