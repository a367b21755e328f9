"""Slurm: the batch script ``job submit`` writes, and the epilog that cleans up after any job end.

The epilog runs as root on the node after every job, whatever ended it (completion,
``scancel``, a time limit, SIGKILL).  ``job run`` tears down by itself when it can;
the epilog is the safety net for when it could not: it kills the job's leftover
processes, lazily unmounts its sshfs mount, and scans for residue, asking the platform
(with the user's enrolment key, as the user) which candidate hashes are dataset files.
What ``job run`` left for it is read from the user's own state folder, never through
a link and never a file another user made (:mod:`medbridge.compute.state`).  Nothing
a user wrote is trusted beyond their own files: PIDs, mounts and files are acted on
only if the job's uid owns them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import pwd
import re
import select
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medbridge.compute import residue
from medbridge.compute.mount import unmount
from medbridge.compute.node import NodeSettings, end_slurm_job
from medbridge.compute.state import MAX_STATE_BYTES, StateReader
from medbridge.errors import InvalidInput, JobFailed, MedbridgeError
from medbridge.policy.names import check_name

DEFAULT_PARTITION = "bridge"
#: Shared system temporary folders: only the job's private copy (job_container/tmpfs) is scanned.
SHARED_TEMP = ("/tmp", "/var/tmp", "/dev/shm")


def private_temp(mountinfo: str, slurm_job_id: str) -> list[str]:
    """The temporary folders that job_container/tmpfs made this job's alone, read from ``/proc/self/mountinfo``.

    Proof for /tmp: the mount on it is a bind of the plugin's per-job folder, whose path
    ends in (or passes through) ``<job id>/.<job id>``.  /dev/shm counts when /tmp does and
    either its mount is such a folder too or it is a fresh file system stacked on the
    host's /dev/shm (what the plugin does before Slurm 23.02).
    """
    if not slurm_job_id.isdigit():
        return []
    top: dict[str, tuple[str, str, str]] = {}  # mount point -> (mount id, parent id, root), the last one wins
    points: dict[str, str] = {}  # mount id -> mount point
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        mount_id, parent, root, point = fields[0], fields[1], _unescape(fields[3]), _unescape(fields[4])
        points[mount_id] = point
        top[point] = (mount_id, parent, root)

    def per_job(point: str) -> bool:
        parts = top[point][2].split("/") if point in top else []
        return any(a == slurm_job_id and b == f".{slurm_job_id}" for a, b in itertools.pairwise(parts))

    if not per_job("/tmp"):
        return []
    out = ["/tmp"]
    if per_job("/dev/shm") or ("/dev/shm" in top and points.get(top["/dev/shm"][1]) == "/dev/shm"):
        out.append("/dev/shm")
    return out


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True, kw_only=True)
class Submission:
    """What ``job submit`` turns into a batch script."""

    command: Sequence[str]
    job_run_args: Sequence[str]
    partition: str = DEFAULT_PARTITION
    sbatch_args: Sequence[str] = ()
    job_name: str = "medbridge"
    #: Nodes of the job: on more than one, ``srun`` starts a ``job run`` on each.
    nodes: int = 1


def batch_script(sub: Submission, python: str = sys.executable) -> str:
    """The batch script: a per-job working folder (the job's own: ``--scratch .``), then ``job run``.

    On several nodes each node gets a ``job run`` of its own (``srun``, one task per
    node), in a working folder of its own named like its platform job,
    ``<Slurm job id>-n<node index>`` (see :func:`medbridge.compute.job.default_job_id`).
    """
    check_name("partition", sub.partition)
    if sub.nodes < 1:
        raise InvalidInput(f"--nodes {sub.nodes}: a job needs at least one node")
    run = [python, "-m", "medbridge", "job", "run", *sub.job_run_args, "--scan", "/tmp", "--scan", "/dev/shm",
           "--scratch", ".", "--purge", "--", *sub.command]  # fmt: skip
    job = "$SLURM_JOB_ID" if sub.nodes == 1 else "$SLURM_JOB_ID-n$SLURM_NODEID"
    steps = [
        f'workdir="${{MEDBRIDGE_WORKDIR:-$SLURM_SUBMIT_DIR}}/medbridge-job-{job}"',
        'mkdir -p "$workdir" && cd "$workdir" || exit 9',
        f"exec {shlex.join(run)}",
    ]
    head = [
        "#!/bin/bash",
        f"#SBATCH --partition={sub.partition}",
        f"#SBATCH --job-name={shlex.quote(sub.job_name)}",
    ]
    if sub.nodes > 1:
        head += [f"#SBATCH --nodes={sub.nodes}", "#SBATCH --ntasks-per-node=1"]
        steps = [
            "# On each node a job run of its own: its own certificate, mount, working folder and platform job.",
            f"exec srun --ntasks-per-node=1 /bin/bash -c {shlex.quote(chr(10).join(steps))}",
        ]
    comment = "# Written by 'medbridge job submit': job run holds the job's platform access and always tears down."
    return "\n".join([*head, comment, "umask 077  # what the job writes is its user's alone", *steps, ""])


def submit(sub: Submission, environ: Mapping[str, str]) -> tuple[str, str]:
    """Submit the batch script on sbatch's standard input; return the job id and the script."""
    script = batch_script(sub)
    try:
        r = subprocess.run(
            ["sbatch", "--parsable", *sub.sbatch_args],
            input=script,
            text=True,
            capture_output=True,
            env=dict(environ),
            timeout=120,
        )
    except FileNotFoundError as exc:
        raise JobFailed("sbatch is not installed here (this is not a Slurm submit host)") from exc
    if r.returncode != 0:
        msg = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"sbatch exited {r.returncode}"
        raise JobFailed(f"Slurm refused the job: {msg.removeprefix('sbatch: error: ')}")
    return r.stdout.strip().split(";")[0], script


# -- the epilog ---------------------------------------------------------------------------


@dataclass
class EpilogReport:
    slurm_job_id: str
    uid: int
    #: What the platform said to the node's end call: the jobs it ended, with their revoked certificates.
    platform: dict[str, Any] = field(default_factory=dict)
    killed: list[dict[str, Any]] = field(default_factory=list)
    unmounted: list[str] = field(default_factory=list)
    still_mounted: list[str] = field(default_factory=list)
    residue: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _proc_uid(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def _proc_env(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    env = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env


def _ancestors() -> set[int]:
    pids, pid = {os.getpid()}, os.getpid()
    while pid > 1:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            break
        pid = int(fields[1])
        pids.add(pid)
    return pids


def leftover_processes(slurm_job_id: str, uid: int, node: str | None = None) -> list[tuple[int, int]]:
    """``(pid, pidfd)`` of processes of this job's uid that still carry its SLURM_JOB_ID.

    With ``node`` (the epilog's ``SLURMD_NODENAME``), a process that names another node
    is not this node's: where several slurmd share one process table (Slurm's
    multiple-slurmd setups, the test cluster's nodes) a job's epilogs run side by side
    and each must leave the others, and the other nodes' tasks, alone.  A process that
    names no node is still taken.  The pidfd is opened before the process is checked,
    so the signal later reaches that very process even if its PID is reused meanwhile.
    """
    mine = _ancestors()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid in mine:
            continue
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            continue
        env = _proc_env(pid) if _proc_uid(pid) == uid else {}
        if env.get("SLURM_JOB_ID") == slurm_job_id and (node is None or env.get("SLURMD_NODENAME", node) == node):
            found.append((pid, pidfd))
        else:
            os.close(pidfd)
    return sorted(found)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def kill_all(procs: Sequence[tuple[int, int]], grace: float = 3.0) -> list[dict[str, Any]]:
    """SIGTERM, then SIGKILL after ``grace`` to those still alive; by pidfd, never by a bare PID."""
    out = [{"pid": pid, "comm": _comm(pid)} for pid, _ in procs]
    for _, fd in procs:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(fd, signal.SIGTERM)
    poller = select.poll()
    for _, fd in procs:
        poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + grace
    alive = {fd for _, fd in procs}
    while alive and time.monotonic() < deadline:
        for fd, _ in poller.poll(100):
            alive.discard(fd)
    for fd in alive:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
    for _, fd in procs:
        os.close(fd)
    return out


def sshfs_mounts(uid: int) -> list[tuple[str, bool]]:
    """The uid's sshfs mounts of the platform: ``(mount point, alive)``."""
    out = []
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) < 4 or parts[2] != "fuse.sshfs" or not parts[0].startswith("medbridge:"):
            continue
        if f"user_id={uid}" not in parts[3].split(","):
            continue
        point = parts[1].encode().decode("unicode_escape")
        try:
            os.stat(point)
            alive = True
        except OSError:
            alive = False
        out.append((point, alive))
    return out


def _as_user(uid: int) -> dict[str, Any]:
    """subprocess arguments that drop to ``uid`` (and its primary group) unless it is root already."""
    if uid == os.geteuid():
        return {}
    return {"user": uid, "group": pwd.getpwuid(uid).pw_gid, "extra_groups": []}


def _unmount_as(uid: int, point: str) -> bool:
    """Lazily unmount as the mount's owner, so fusermount itself checks the mount is theirs."""
    if uid == os.geteuid():
        return unmount(Path(point))
    subprocess.run(["fusermount3", "-u", "-z", "-q", point], capture_output=True, timeout=30, **_as_user(uid))
    return not os.path.ismount(point)


def _lookup_args(lookup: Any) -> list[str]:
    """``residue scan --platform …`` arguments from the state's lookup (strings only, else nothing)."""
    names = ("platform", "key", "host_fingerprint", "user", "job_id")
    if not isinstance(lookup, dict) or not all(isinstance(lookup.get(n), str) for n in names):
        return []
    return ["--platform", lookup["platform"], "--key", lookup["key"], "--host-key-fingerprint",
            lookup["host_fingerprint"], "--user", lookup["user"], "--job-id", lookup["job_id"]]  # fmt: skip


#: Longest the epilog's residue scan may run (Slurm's EpilogMsgTime and the node's next job wait on it).
SCAN_SECONDS = 3600


def _scan_as(
    uid: int, roots: Sequence[str], lookup: list[str], exclude: Sequence[str], job: residue.JobContext
) -> dict[str, Any]:
    """Scan and purge as the job's user: root never deletes by a path a user could have re-pointed.

    Always in a process of the user's own, which reads the user's enrolment key to ask the
    platform which hashes are dataset files (root never reads it).
    """
    cmd = [sys.executable, "-m", "medbridge", "residue", "scan", *roots, "--purge", "--json", *lookup]
    for path in exclude:
        cmd += ["--exclude", path]
    if job.started is not None:
        cmd += ["--since", repr(job.started), *(a for p in job.scratch for a in ("--scratch", str(p)))]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=SCAN_SECONDS, **_as_user(uid))
    except subprocess.TimeoutExpired:  # the scan was killed: nothing it found is known, nothing is called clean
        why = f"scan as uid {uid} did not finish within {SCAN_SECONDS} s and was stopped"
        return {"clean": False, "findings": [], "errors": [why]}
    try:
        result: dict[str, Any] = json.loads(r.stdout)
    except json.JSONDecodeError:
        return {"clean": False, "findings": [], "errors": [f"scan as uid {uid} failed: {r.stderr.strip()[-300:]}"]}
    return result


def _user_folders(paths: object, uid: int) -> list[str]:
    """The folders of a state file's list that are the job's user's own, never a shared temporary folder."""
    if not isinstance(paths, list):
        return []
    out = []
    for p in paths:
        if isinstance(p, str) and p not in SHARED_TEMP and os.path.isdir(p) and os.lstat(p).st_uid == uid:
            out.append(p)
    return out


def _state(raw: bytes | None) -> dict[str, Any]:
    """The job's state file as JSON data; anything unreadable is no state."""
    try:
        data = json.loads(raw) if raw else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def epilog(
    environ: Mapping[str, str],
    state_dir: Path,
    container_base: Path | None = None,
    *,
    node: NodeSettings | None = None,
    mounts: Callable[[int], list[tuple[str, bool]]] = sshfs_mounts,
) -> EpilogReport:
    """Clean up after one job, as the Slurm epilog, from its environment.

    With the node's credential (``node``) it first tells the platform the job ended, so
    the job's certificates are revoked at once, whether or not ``job run`` could say so
    itself.  ``mounts`` lists a uid's sshfs mounts (the mount table, unless a test narrows it).
    """
    job = environ.get("SLURM_JOB_ID", "")
    uid_text = environ.get("SLURM_JOB_UID", "")
    if not job.isdigit() or not uid_text.isdigit():
        raise InvalidInput("the epilog needs SLURM_JOB_ID and SLURM_JOB_UID (run it from Slurm's Epilog=)")
    uid = int(uid_text)
    report = EpilogReport(job, uid)
    if node is not None:
        try:
            report.platform = asyncio.run(end_slurm_job(node, job))
        except MedbridgeError as exc:
            report.notes.append(f"could not end the job on the platform: {exc}")
    reader = StateReader(state_dir, uid)
    try:
        state = _state(reader.read(f"{job}.json", MAX_STATE_BYTES))
        reader.remove(f"{job}.json")
    finally:
        reader.close()
    report.notes += reader.notes

    report.killed = kill_all(leftover_processes(job, uid, environ.get("SLURMD_NODENAME") or None))

    recorded = state.get("mount")
    for point, alive in mounts(uid):
        if point == recorded or not alive:
            (report.unmounted if _unmount_as(uid, point) else report.still_mounted).append(point)

    roots = _user_folders(state.get("scan"), uid)
    # What ties a file to the job: when it started and the folders that were its alone, as
    # job run recorded them (a user can only mislead a scan that runs as that user), and
    # the job's private /tmp that Slurm made for it (where Slurm has not wiped it already).
    scratch = _user_folders(state.get("scratch"), uid)
    started = state.get("started")
    started = float(started) if isinstance(started, int | float) and not isinstance(started, bool) else None
    if container_base is not None and (container_base / job).is_dir():
        container = container_base / job
        roots.append(str(container))
        scratch.append(str(container))
        if started is None:
            started = container.stat().st_ctime
    job_context = residue.JobContext(started=started, scratch=scratch if started is not None else [])
    if roots:
        exclude = [p for p, _ in mounts(uid)]
        report.residue = _scan_as(uid, roots, _lookup_args(state.get("lookup")), exclude, job_context)
    return report
