"""A real Slurm for tests: munge, slurmctld and slurmd, and the Unix users jobs run as.

One node by default: this machine, its slurmd beside slurmctld on 127.0.0.1.  With
``nodes=2`` (or more) each compute node is a slurmd of its own (``slurmd -N NAME``) in a
network namespace of its own, with its own address, spool and private-/tmp base; the
nodes, and the root namespace where slurmctld (and a test's platform) listen, share one
network segment (a bridge in a namespace of its own).  Nodes share this machine's file
systems and mount table, as compute nodes share a cluster file system.

Everything it starts it stops by PID, every namespace and link it makes it removes,
and every user and group it creates it removes.  Needs root and Debian's ``slurmctld
slurmd slurm-client munge`` (``scripts/setup`` installs them).  See
shared/reference/slurm-single-node.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
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


#: The compute nodes of a cluster of several (one node is this machine under its own name).
NODE_NAMES = ("mbnode1", "mbnode2", "mbnode3", "mbnode4")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _unused_net() -> str:
    """``10.X.250``, a /24 that no route or address of the root namespace touches."""
    taken = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True).stdout
    taken += subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    for _ in range(200):
        net = f"10.{100 + secrets.randbelow(150)}.250"
        if f"{net}." not in taken and f"{net}.0/" not in taken:
            return net
    raise RuntimeError("no free 10.X.250.0/24 for the test cluster's nodes")


class NodeNetwork:
    """Compute nodes as network namespaces on one segment, the root namespace on it too.

    root namespace: slurmctld, a test's platform   10.X.250.1  ─┐
    mbnode1 (slurmd -N mbnode1)                     10.X.250.11 ─┼─ bridge (a namespace of its own)
    mbnode2 (slurmd -N mbnode2)                     10.X.250.12 ─┘
    """

    def __init__(self, nodes: Sequence[str]):
        tag = secrets.token_hex(2)
        net = _unused_net()
        self.hub = f"mbs{tag}-net"
        self.ns = {n: f"mbs{tag}-{n}" for n in nodes}
        self.root_dev = f"mbs{tag}r"
        #: The root namespace's address on the segment: slurmctld's, and where a test's platform listens.
        self.controller = f"{net}.1"
        self.address = {n: f"{net}.{10 + i}" for i, n in enumerate(nodes, 1)}
        self._made: list[str] = []
        self._root_link = False

    def start(self) -> NodeNetwork:
        try:
            _ip("netns", "add", self.hub)
            self._made.append(self.hub)
            _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.hub, "link", "set", "br0", "up")
            _ip("link", "add", self.root_dev, "type", "veth", "peer", "name", "root", "netns", self.hub)
            self._root_link = True
            _ip("-n", self.hub, "link", "set", "root", "master", "br0", "up")
            _ip("addr", "add", f"{self.controller}/24", "dev", self.root_dev)
            _ip("link", "set", self.root_dev, "up")
            for i, (node, ns) in enumerate(self.ns.items(), 1):
                _ip("netns", "add", ns)
                self._made.append(ns)
                _ip("-n", self.hub, "link", "add", f"n{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
                _ip("-n", self.hub, "link", "set", f"n{i}", "master", "br0", "up")
                _ip("-n", ns, "addr", "add", f"{self.address[node]}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.stop()
            raise
        return self

    def enter(self, node: str) -> list[str]:
        """A command prefix that runs in the node's network namespace only (its mounts stay the machine's)."""
        return ["nsenter", f"--net=/run/netns/{self.ns[node]}"]

    def stop(self) -> None:
        if self._root_link:  # at once: a namespace's links go with it only later
            subprocess.run(["ip", "link", "del", self.root_dev], capture_output=True)
            self._root_link = False
        for name in reversed(self._made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self._made.clear()


class SlurmCluster:
    """Partitions ``debug`` and ``bridge`` (AllowGroups=mbbridge) over every node, an epilog, private /tmp.

    ``task_prolog``: Slurm's TaskProlog (its ``export NAME=value`` lines reach each task's
    environment), for what differs per node, such as a node-local state folder.
    """

    def __init__(self, root: Path, epilog: str, state_dir: Path, *, nodes: int = 1, task_prolog: str | None = None):
        if not 1 <= nodes <= len(NODE_NAMES):
            raise ValueError(f"1 to {len(NODE_NAMES)} nodes")
        self.root = root
        self.epilog = epilog
        self.task_prolog = task_prolog
        self.state_dir = state_dir
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        #: The interpreter jobs run medbridge with (see :func:`job_python`).
        self.python = sys.executable
        self.network = NodeNetwork(NODE_NAMES[:nodes]) if nodes > 1 else None
        #: Where slurmctld listens, and where a platform must listen for every node to reach it.
        self.controller = self.network.controller if self.network else "127.0.0.1"
        #: The node names (a one-node cluster's is this machine's, known once configured).
        self.nodes: list[str] = list(NODE_NAMES[:nodes]) if nodes > 1 else []
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

    def container_base(self, node: str) -> Path:
        """job_container/tmpfs's BasePath on ``node`` (each job's private /tmp is made below it)."""
        return self.root / "containers" / (node if self.network else "")

    def write_config(self) -> None:
        node = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
        for d in ("state", "spool", "containers", "munge"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        many = self.network is not None
        if many:
            containers = ""
            for n in self.nodes:
                for folder in (self.root / "spool" / n, self.container_base(n)):
                    folder.mkdir(parents=True, exist_ok=True)
                containers += f"NodeName={n} BasePath={self.container_base(n)}\n"
        else:
            self.nodes = [node.split()[0].removeprefix("NodeName=")]
            containers = f"BasePath={self.root / 'containers'}\n"
        (self.root / "job_container.conf").write_text(f"AutoBasePath=true\n{containers}")
        per_node = "/%n" if many else ""
        lines = {
            "ClusterName": "medbridge-test",
            "SlurmctldHost": f"{socket.gethostname()}({self.controller})",
            "SlurmUser": "root",
            "SlurmdUser": "root",
            "AuthType": "auth/munge",
            "AuthInfo": f"socket={self.root / 'munge' / 'munge.socket'}",
            "CredType": "cred/munge",
            "SlurmctldPort": str(_free_port()),
            "SlurmdPort": str(_free_port()),
            "StateSaveLocation": str(self.root / "state"),
            "SlurmdSpoolDir": f"{self.root / 'spool'}{per_node}",
            "SlurmctldPidFile": str(self.root / "slurmctld.pid"),
            "SlurmdPidFile": str(self.root / f"slurmd{'-%n' if many else ''}.pid"),
            "SlurmctldLogFile": str(self.root / "slurmctld.log"),
            "SlurmdLogFile": str(self.root / f"slurmd{'-%n' if many else ''}.log"),
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
            **({"TaskProlog": self.task_prolog} if self.task_prolog else {}),
        }
        text = "".join(f"{k}={v}\n" for k, v in lines.items())
        if self.network is None:
            text += f"{node} NodeAddr=127.0.0.1 State=UNKNOWN\n"
        else:
            hardware = node.split(maxsplit=1)[1]  # CPUs=… RealMemory=…, without the machine's NodeName
            for n in self.nodes:
                text += (f"NodeName={n} NodeHostname={socket.gethostname()} NodeAddr={self.network.address[n]} "
                         f"{hardware} State=UNKNOWN\n")  # fmt: skip
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

    def _start(self, name: str, *args: str, prefix: Sequence[str] = ()) -> None:
        proc = subprocess.Popen(
            [*prefix, name, "-D", "-f", str(self.conf), *args],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._pids[" ".join([name, *args])] = proc.pid
        self._procs.append(proc)

    def start(self) -> SlurmCluster:
        LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
        self._lock = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._lock, fcntl.LOCK_EX)  # waits for another checkout's cluster on this machine
        try:
            self._ensure_group(ALLOWED_GROUP)
            self._ensure_user(JOB_USER, [ALLOWED_GROUP])
            self._ensure_user(OUTSIDER, [])
            if self.network is not None:
                self.network.start()
            self.write_config()
            self._start_munge()
            self._start("slurmctld")
            network = self.network
            if network is None:
                self._start("slurmd")
            else:
                for node in self.nodes:
                    self._start("slurmd", "-N", node, prefix=network.enter(node))
            until(self.node_idle, "every node to become idle", 60)
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
        if self.network is not None:
            self.network.stop()
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
