"""A real single-node Slurm for tests: munge, slurmctld and slurmd, and the Unix users jobs run as.

Everything it starts it stops by PID, and every user and group it creates it
removes.  Needs root and Debian's ``slurmctld slurmd slurm-client munge``
(``scripts/setup`` installs them).  See shared/reference/slurm-single-node.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import os
import pwd
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from medbridge import processes
from medbridge.testing.wait import until

PARTITION = "bridge"
ALLOWED_GROUP = "mbbridge"
JOB_USER = "mbjob"
OUTSIDER = "mboutsider"
#: The states of a job that has ended, however.
DONE = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"})
#: Held while a cluster runs: its Unix users and node name are machine-wide, so two test
#: runs on one machine (parallel checkouts) take turns instead of deleting each other's users.
LOCK_FILE = Path("/run/lock/medbridge-test-slurm.lock")


def available() -> str | None:
    """Why a cluster cannot be started here, or None if it can."""
    if os.geteuid() != 0:
        return "needs root to start munge, slurmctld and slurmd"
    for tool in ("slurmctld", "slurmd", "munged", "sbatch", "useradd"):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            return f"{tool} is missing (scripts/setup installs slurmctld slurmd slurm-client munge)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SlurmCluster:
    """One node, partitions ``debug`` and ``bridge`` (AllowGroups=mbbridge), an epilog, private /tmp."""

    def __init__(self, root: Path, epilog: str, state_dir: Path):
        self.root = root
        self.epilog = epilog
        self.state_dir = state_dir
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        #: The interpreter jobs run medbridge with (see :func:`job_python`).
        self.python = sys.executable
        self._pids: dict[str, int] = {}
        self._created_users: list[str] = []
        self._created_groups: list[str] = []
        self._lock: int | None = None

    # -- users ------------------------------------------------------------------------

    def _ensure_group(self, name: str) -> None:
        try:
            grp.getgrnam(name)
        except KeyError:
            subprocess.run(["groupadd", name], check=True)
            self._created_groups.append(name)

    def _ensure_user(self, name: str, groups: list[str]) -> None:
        try:
            pwd.getpwnam(name)
        except KeyError:
            cmd = ["useradd", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/bin/sh", name]
            if groups:
                cmd[1:1] = ["--groups", ",".join(groups)]
            subprocess.run(cmd, check=True)
            self._created_users.append(name)

    # -- daemons ----------------------------------------------------------------------

    def write_config(self) -> None:
        node = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
        for d in ("state", "spool", "containers", "munge"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        (self.root / "job_container.conf").write_text(f"AutoBasePath=true\nBasePath={self.root / 'containers'}\n")
        lines = {
            "ClusterName": "medbridge-test",
            "SlurmctldHost": f"{socket.gethostname()}(127.0.0.1)",
            "SlurmUser": "root",
            "SlurmdUser": "root",
            "AuthType": "auth/munge",
            "AuthInfo": f"socket={self.root / 'munge' / 'munge.socket'}",
            "CredType": "cred/munge",
            "SlurmctldPort": str(_free_port()),
            "SlurmdPort": str(_free_port()),
            "StateSaveLocation": str(self.root / "state"),
            "SlurmdSpoolDir": str(self.root / "spool"),
            "SlurmctldPidFile": str(self.root / "slurmctld.pid"),
            "SlurmdPidFile": str(self.root / "slurmd.pid"),
            "SlurmctldLogFile": str(self.root / "slurmctld.log"),
            "SlurmdLogFile": str(self.root / "slurmd.log"),
            "ProctrackType": "proctrack/linuxproc",
            "TaskPlugin": "task/none",
            "JobContainerType": "job_container/tmpfs",
            "PrologFlags": "Contain",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_Core",
            "SchedulerType": "sched/backfill",
            "SchedulerParameters": "batch_sched_delay=0",
            "JobAcctGatherType": "jobacct_gather/none",
            "AccountingStorageType": "accounting_storage/none",
            "MpiDefault": "none",
            "ReturnToService": "2",
            "MailProg": "/bin/true",
            "KillWait": "5",
            "MinJobAge": "300",
            "Epilog": self.epilog,
        }
        text = "".join(f"{k}={v}\n" for k, v in lines.items())
        text += f"{node} NodeAddr=127.0.0.1 State=UNKNOWN\n"
        text += "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n"
        text += (
            f"PartitionName={PARTITION} Nodes=ALL MaxTime=INFINITE State=UP "
            f"AllowGroups={ALLOWED_GROUP},root OverSubscribe=FORCE:4\n"
        )
        self.conf.write_text(text)

    def _start_munge(self) -> None:
        sock = self.root / "munge" / "munge.socket"
        shutil.chown(self.root / "munge", "munge", "munge")
        proc = subprocess.Popen(
            ["/usr/sbin/munged", "--foreground", f"--socket={sock}",
             f"--pid-file={self.root / 'munge' / 'munged.pid'}", f"--log-file={self.root / 'munge' / 'munged.log'}",
             "--force"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, user="munge", group="munge", extra_groups=[],
        )  # fmt: skip
        self._pids["munge"] = proc.pid
        self._procs = [proc]
        until(sock.exists, "munged's socket", 15)

    def _start(self, name: str, *args: str) -> None:
        proc = subprocess.Popen(
            [name, "-D", "-f", str(self.conf), *args],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._pids[name] = proc.pid
        self._procs.append(proc)

    def start(self) -> SlurmCluster:
        LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
        self._lock = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._lock, fcntl.LOCK_EX)  # waits for another checkout's cluster on this machine
        try:
            self._ensure_group(ALLOWED_GROUP)
            self._ensure_user(JOB_USER, [ALLOWED_GROUP])
            self._ensure_user(OUTSIDER, [])
            self.write_config()
            self._start_munge()
            self._start("slurmctld")
            self._start("slurmd")
            until(self.node_idle, "the node to become idle", 60)
        except BaseException:
            self.stop()
            raise
        return self

    def node_idle(self) -> bool:
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True, text=True)
        states = {line.strip().rstrip("*") for line in r.stdout.splitlines() if line.strip()}
        return r.returncode == 0 and states == {"idle"}

    def stop(self) -> None:
        """Cancel jobs and wait for an empty queue, then stop each daemon by its PID."""
        if "slurmctld" in self._pids:
            subprocess.run(["scancel", "--full", "--user=root"], env=self.env, capture_output=True)
            for user in (JOB_USER, OUTSIDER):
                subprocess.run(["scancel", "--full", f"--user={user}"], env=self.env, capture_output=True)
            with contextlib.suppress(TimeoutError):
                until(lambda: not self.queue(), "the queue to drain", 60)
        for proc in reversed(getattr(self, "_procs", [])):
            processes.stop(proc, timeout=20)
        self._pids.clear()
        for user in self._created_users:
            subprocess.run(["userdel", user], capture_output=True)
        for group in self._created_groups:
            subprocess.run(["groupdel", group], capture_output=True)
        self._created_users.clear()
        self._created_groups.clear()
        if self._lock is not None:
            os.close(self._lock)  # closing releases the flock
            self._lock = None

    # -- jobs -------------------------------------------------------------------------

    def queue(self) -> list[str]:
        r = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True)
        return r.stdout.split()

    def job_state(self, job_id: str) -> dict[str, str]:
        r = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=self.env, capture_output=True, text=True)
        fields = {}
        for token in r.stdout.split():
            key, _, value = token.partition("=")
            fields[key] = value
        return fields

    def wait_done(self, job_id: str, timeout: float = 300) -> dict[str, str]:
        state: dict[str, str] = {}

        def finished() -> bool:
            nonlocal state
            state = self.job_state(job_id)
            return state.get("JobState", "") in DONE

        until(finished, f"job {job_id}", timeout)
        return state

    def as_user(self, user: str, *cmd: str, **kw: object) -> subprocess.CompletedProcess[str]:
        run = ["runuser", "-u", user, "--", *cmd] if user != "root" else list(cmd)
        return subprocess.run(run, env=self.env, capture_output=True, text=True, timeout=60, **kw)  # type: ignore[call-overload, no-any-return]

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def python_for(user: str) -> bool:
    """Can ``user`` run this interpreter and import medbridge (is the checkout readable to them)?"""
    if user == "root":
        return True
    r = subprocess.run(["runuser", "-u", user, "--", sys.executable, "-c", "import medbridge"], capture_output=True)
    return r.returncode == 0


def _hidden_from_jobs(path: Path) -> bool:
    """Is ``path`` under a folder that job_container/tmpfs replaces with the job's own copy?"""
    return any(path == Path(t) or Path(t) in path.parents for t in ("/tmp", "/dev/shm"))


@contextlib.contextmanager
def job_python(base: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """An interpreter path and environment that jobs can use, wherever the checkout lives.

    With job_container/tmpfs a job sees a private /tmp, so a checkout (and its virtual
    environment) under /tmp is invisible to it.  Such a checkout is bind-mounted under
    ``base`` for the test's duration (and unmounted after), and jobs find medbridge there.
    """
    import medbridge

    src = Path(medbridge.__file__).resolve().parents[1]
    checkout = src.parent
    exe = Path(sys.executable)
    if not _hidden_from_jobs(checkout) and not _hidden_from_jobs(exe):
        yield sys.executable, {"PYTHONPATH": str(src)}  # this checkout's code, even beside another's install
        return
    if checkout not in exe.parents:
        raise RuntimeError(f"{exe} is under /tmp outside the checkout; jobs in a private /tmp cannot run it")
    target = base / "checkout"
    target.mkdir()
    subprocess.run(["mount", "--bind", str(checkout), str(target)], check=True, capture_output=True)
    try:
        yield str(target / exe.relative_to(checkout)), {"PYTHONPATH": str(target / src.relative_to(checkout))}
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)
        target.rmdir()
