"""Training experiments as real jobs: a platform of the benchmark's own, and jobs sent through Slurm or run as
plain processes, each under ``medbridge job run`` so its outputs are committed to the platform.

``Bench`` makes the platform home (user ``bench``, the datasets, grants), serves it on
loopback (behind a delay relay for an emulated round trip), and knows the arguments
``job run`` needs.  ``launch`` starts a set of :class:`JobRequest` at once — ``sbatch``
through ``medbridge job submit``'s batch script when a Slurm cluster answers (``sinfo``),
``job run`` processes otherwise — chains the ones that depend on another (Slurm
``afterok``, or one after the other), waits for all of them, and says how each ended and
where its committed results are.  Everything lives under one folder outside ``/tmp``
(a Slurm job with ``job_container/tmpfs`` sees its own ``/tmp``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from medbridge import processes
from medbridge.bench.network import Loopback, relay, serve
from medbridge.compute.slurm import Submission, submit
from medbridge.config import Home
from medbridge.control.store import Store
from medbridge.errors import InvalidInput, MedbridgeError
from medbridge.platform.keys import fingerprint, public_line
from medbridge.platform.storage import add_dataset, init_home

USER = "bench"
SCHEDULERS = ("auto", "slurm", "local")
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
         "DEADLINE"}  # fmt: skip
DEFAULT_BASE = Path("/var/tmp")


def slurm_answers(environ: Mapping[str, str] = os.environ) -> str | None:
    """Why jobs cannot go through Slurm here (no ``sinfo``, or no node answers), or None when they can."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "no Slurm client here (sinfo, sbatch)"
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20, env=dict(environ))
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 20 s"
    states = {s.strip().rstrip("*~#") for s in r.stdout.split()}
    if r.returncode != 0 or not states & {"idle", "mixed", "allocated", "completing"}:
        return "no Slurm controller or node answers here"
    return None


def scheduler(name: str) -> str:
    """``auto`` takes Slurm where a cluster answers, else local processes."""
    if name not in SCHEDULERS:
        raise InvalidInput(f"--scheduler {name!r}: choose from {', '.join(SCHEDULERS)}")
    why = slurm_answers() if name != "local" else None
    if name == "slurm" and why is not None:
        raise InvalidInput(f"--scheduler slurm: {why}")
    return "local" if name == "local" or why is not None else "slurm"


@dataclass(frozen=True)
class JobRequest:
    """One job: a name to find it by, its payload, whether it gets the sshfs mount, and the job it must follow."""

    name: str
    command: Sequence[str]
    mount: bool = False
    after: str | None = None  # the name of a job that must complete first (its id is given to the payload)


@dataclass
class JobDone:
    name: str
    job_id: str
    state: str
    results: Path  # where the platform holds what the job committed
    log: str = ""  # the last lines it wrote, when it failed

    @property
    def ok(self) -> bool:
        return self.state == "COMPLETED"


class Bench:
    """The benchmark's platform: a home under ``root``, user ``bench`` granted every dataset, served on loopback."""

    def __init__(self, root: Path, rtt_ms: float, say: Callable[[str], None]):
        import asyncssh

        self.root, self.say, self.rtt_ms = root, say, rtt_ms
        self.home = Home(root / "platform")
        init_home(self.home, "bench")
        self.key_file = root / "bench_enrolment"
        key = asyncssh.generate_private_key("ssh-ed25519")
        self.key_file.write_bytes(key.export_private_key())
        self.key_file.chmod(0o600)
        self.store: Store | None = Store(self.home.database_url(self.home.settings()))
        self.store.add_user(USER, [(public_line(key), fingerprint(key))], [], datetime.now(UTC), "bench")
        self._stack = contextlib.ExitStack()
        self.address = ""
        self.fingerprint = ""

    def add_dataset(self, name: str, src: Path) -> None:
        self.say(f"ingesting {name}")
        assert self.store is not None, "datasets are added before the platform starts"
        add_dataset(self.home, self.store, name, src, "bench", "bench")
        self.store.grant(USER, name, None, datetime.now(UTC), "bench")

    def start(self, workers: int) -> None:
        self._close_store()
        net = Loopback()
        server, port, self.fingerprint = serve(self.home.root, net, workers, self.root / "platform.log")
        self._stack.callback(_stop, server)
        relay_port, _ = self._stack.enter_context(relay(port, self.rtt_ms))
        self.address = f"127.0.0.1:{relay_port}"

    def job_run_args(self, mount: bool) -> list[str]:
        args = ["--platform", self.address, "--key", str(self.key_file), "--user", USER, "--host-key-fingerprint",
                self.fingerprint, "--outputs", "outputs"]  # fmt: skip
        return args + (["--mount", str(self.root / "mnt-{job}")] if mount else [])

    def results(self, job_id: str) -> Path:
        return self.home.results / USER / job_id

    def _close_store(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None

    def close(self) -> None:
        self._stack.close()
        self._close_store()


def _stop(proc: subprocess.Popen[str]) -> None:
    processes.stop(proc, timeout=30)
    if proc.stdout:
        proc.stdout.close()


@contextlib.contextmanager
def workspace(prefix: str, base: Path | None = None) -> Iterator[Path]:
    """A folder every job can see (not under /tmp), removed at the end."""
    where = base or (DEFAULT_BASE if DEFAULT_BASE.is_dir() else None)
    root = Path(tempfile.mkdtemp(prefix=prefix, dir=where))
    root.chmod(0o755)
    try:
        yield root
    finally:
        for point in sorted(root.glob("mnt-*")):  # a job killed hard may leave its mount: the epilog's job here
            if os.path.ismount(point):
                from medbridge.compute.mount import unmount

                unmount(point)
        shutil.rmtree(root, ignore_errors=True)


def launch(bench: Bench, requests: Sequence[JobRequest], how: str, timeout: float,
           say: Callable[[str], None]) -> list[JobDone]:  # fmt: skip
    """Start the jobs (all at once, except those that follow another) and wait for every one to end."""
    names = {r.name for r in requests}
    for r in requests:
        if r.after is not None and r.after not in names:
            raise InvalidInput(f"job {r.name} follows {r.after}, which is not among the jobs")
    work = bench.root / "work"
    work.mkdir(exist_ok=True)
    if how == "slurm":
        return _slurm(bench, requests, work, timeout, say)
    return _local(bench, requests, work, timeout, say)


def _with_predecessor(command: Sequence[str], after_id: str | None) -> list[str]:
    """The payload's command with ``{after}`` replaced by the id of the job it follows."""
    return [c.replace("{after}", after_id or "") for c in command]


def _slurm(bench: Bench, requests: Sequence[JobRequest], work: Path, timeout: float,
           say: Callable[[str], None]) -> list[JobDone]:  # fmt: skip
    env = {**os.environ, "MEDBRIDGE_WORKDIR": str(work)}
    ids: dict[str, str] = {}
    for r in _ordered(requests):
        sbatch = [f"--output={work}/slurm-%j.out", f"--job-name=mb-{r.name}"]
        if r.after is not None:
            sbatch.append(f"--dependency=afterok:{ids[r.after]}")
        sub = Submission(command=_with_predecessor(r.command, ids.get(r.after or "")),
                         job_run_args=bench.job_run_args(r.mount), sbatch_args=sbatch)  # fmt: skip
        ids[r.name], _ = submit(sub, env)
        say(f"submitted {r.name} as Slurm job {ids[r.name]}")
    states = _wait_slurm(list(ids.values()), timeout, env)
    out = []
    for r in requests:
        job = ids[r.name]
        log = work / f"slurm-{job}.out"
        tail = log.read_text(errors="replace").strip().splitlines()[-5:] if log.exists() else []
        out.append(JobDone(r.name, job, states[job], bench.results(job), "\n".join(tail)))
    return out


def _wait_slurm(ids: list[str], timeout: float, env: Mapping[str, str]) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    states: dict[str, str] = {}
    while True:
        for job in ids:
            if states.get(job) in FINAL:
                continue
            r = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, env=dict(env))
            fields = dict(t.partition("=")[::2] for t in r.stdout.split())
            states[job] = fields.get("JobState", "UNKNOWN") if r.returncode == 0 else "UNKNOWN"
            if fields.get("Reason") == "DependencyNeverSatisfied":
                subprocess.run(["scancel", job], capture_output=True, env=dict(env))
                states[job] = "CANCELLED"
        if all(s in FINAL for s in states.values()):
            return states
        if time.monotonic() > deadline:
            for job in ids:
                if states[job] not in FINAL:
                    subprocess.run(["scancel", job], capture_output=True, env=dict(env))
            raise MedbridgeError(f"the benchmark's Slurm jobs did not finish in {timeout:.0f} s (cancelled)")
        time.sleep(1)


def _ordered(requests: Sequence[JobRequest]) -> list[JobRequest]:
    """Predecessors first (and no cycles)."""
    done: list[JobRequest] = []
    left = list(requests)
    while left:
        ready = [r for r in left if r.after is None or r.after in {d.name for d in done}]
        if not ready:
            raise InvalidInput("the jobs' order has a cycle")
        done += ready
        left = [r for r in left if r not in ready]
    return done


def _local(bench: Bench, requests: Sequence[JobRequest], work: Path, timeout: float,
           say: Callable[[str], None]) -> list[JobDone]:  # fmt: skip
    """Each job a ``job run`` process in a folder of its own; those with no predecessor start together."""
    deadline = time.monotonic() + timeout
    results: dict[str, JobDone] = {}
    running: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    pending = list(_ordered(requests))
    stamp = f"{os.getpid()}-{int(time.time())}"
    try:
        while pending or running:
            for r in [r for r in pending if r.after is None or r.after in results]:
                pending.remove(r)
                before = results.get(r.after or "")
                if before is not None and not before.ok:
                    results[r.name] = JobDone(
                        r.name, "", "CANCELLED", bench.results("-"), f"{r.after} did not complete"
                    )
                    continue
                job_id = f"{r.name}-{stamp}"
                folder = work / job_id
                folder.mkdir()
                cmd = [sys.executable, "-m", "medbridge", "job", "run", *bench.job_run_args(r.mount), "--job-id",
                       job_id, "--", *_with_predecessor(r.command, before.job_id if before else None)]  # fmt: skip
                log = folder / "job.log"
                with open(log, "wb") as out:
                    running[r.name] = (subprocess.Popen(cmd, cwd=folder, stdout=out, stderr=subprocess.STDOUT), log)
                say(f"started {r.name} as job {job_id}")
            for name, (proc, log) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                job_id = log.parent.name
                tail = log.read_text(errors="replace").strip().splitlines()[-5:]
                state = "COMPLETED" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
                results[name] = JobDone(name, job_id, state, bench.results(job_id), "\n".join(tail))
            if time.monotonic() > deadline:
                raise MedbridgeError(f"the benchmark's jobs did not finish in {timeout:.0f} s (stopped)")
            time.sleep(0.2)
    finally:
        for proc, _ in running.values():
            processes.stop(proc, timeout=30)
    return [results[r.name] for r in requests]


def require_ok(done: Sequence[JobDone]) -> None:
    """A clear error naming the first job that did not complete, with its last words."""
    for d in done:
        if not d.ok:
            last = d.log.strip().splitlines()[-1] if d.log.strip() else "no output"
            raise MedbridgeError(f"benchmark job {d.name} ({d.job_id or 'not started'}) ended {d.state}: {last}")
