"""``bench catalogue``: what each catalogue step costs as a dataset grows, and whether jobs starve meanwhile.

Per size N: N small files (2 KiB, a society/patient/series tree) are generated, then
each step runs in a process of its own, timed from outside and its peak memory read
from ``wait4``: ``dataset-add`` (the CLI), ``manifest`` (one build of the version's
manifest and index, what a server does at most once per version), ``job-start``
(``job run -- true`` with the dataset granted), ``residue-scan`` (10,000 unrelated
files checked through the platform's lookup), ``audit-verify`` (after N audit entries
were appended) and ``audit-query`` (the last 100 entries of one action).  A fitted
growth exponent per step says how the cost grows (1 = linear).  ``--concurrent K``
adds the starvation test: K jobs start reading random files of the largest dataset at
once (verified against its manifest); it reports each job's first-file latency and the
longest window, once reads are served, in which none was.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medbridge.config import Home
from medbridge.control.audit import AuditEvent
from medbridge.control.store import Store
from medbridge.errors import InvalidInput, MedbridgeError, PlatformUnavailable
from medbridge.platform.keys import fingerprint, public_line

STEPS = ("dataset-add", "manifest", "job-start", "residue-scan", "audit-verify", "audit-query")
FILE_BYTES = 2048
UNRELATED = 10_000
#: Targets from the issue: memory flat within 2x, dataset add exponent, job start against 10 files, starvation.
FLAT_MEMORY = 2.0
ADD_EXPONENT = 1.05
JOB_START_RATIO = 2.0
FIRST_FILE_S = 5.0
LONGEST_GAP_S = 2.0


@dataclass(frozen=True, kw_only=True)
class Plan:
    sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000)
    database: str = ""  # '' SQLite in the home; a URL; "postgresql" a private server started for the run
    concurrent: int = 0
    #: Which dataset the concurrent jobs read (the largest measured if this size is not).
    concurrent_size: int = 100_000
    seconds: float = 20.0
    workdir: Path | None = None
    unrelated: int = UNRELATED

    def check(self) -> None:
        if not self.sizes or any(n < 1 or n > 100_000_000 for n in self.sizes):
            raise InvalidInput("--sizes must be counts between 1 and 10^8")
        if self.concurrent < 0 or self.concurrent > 64:
            raise InvalidInput("--concurrent must be between 0 and 64")


@dataclass(frozen=True)
class Measured:
    seconds: float
    peak_rss_mb: float
    out: str


#: Runs a step and writes the step's own peak RSS (KiB) to argv[1].  A forked child starts with its
#: parent's high-water mark (the kernel carries it across exec), so the step is started from this
#: small process, not from the benchmark: its figure is then the step's own.
_PEAK = (
    "import os, sys\n"
    "pid = os.spawnvp(os.P_NOWAIT, sys.argv[2], sys.argv[2:])\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "open(sys.argv[1], 'w').write(str(usage.ru_maxrss))\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def measure(cmd: Sequence[str], cwd: Path | None = None, timeout: float = 7200) -> Measured:
    """Run ``cmd``; its wall time and its own peak resident memory."""
    start = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile() as peak:
        wrapped = [sys.executable, "-S", "-c", _PEAK, peak.name, *cmd]
        proc = subprocess.Popen(wrapped, stdout=out, stderr=err, cwd=cwd, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        seconds = time.monotonic() - start
        out.seek(0)
        err.seek(0)
        text, said = out.read().decode(errors="replace"), err.read().decode(errors="replace")
        kib = peak.read().decode() or "0"
    if proc.returncode != 0:
        last = (said.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        raise MedbridgeError(f"{' '.join(cmd)[:160]} failed: {last}")
    return Measured(seconds, int(kib) / 1024, text)


def generate(root: Path, count: int, *, seed: int = 0) -> None:
    """``count`` files of FILE_BYTES in society/patient/series folders (100 files a series, 10 series a patient)."""
    rng = random.Random(seed)
    made: set[Path] = set()
    for i in range(count):
        series, patient = i // 100, i // 1000
        folder = root / f"society-{patient // 1000:03}" / f"patient-{patient:06}" / f"series-{series % 10:02}"
        if folder not in made:
            folder.mkdir(parents=True, exist_ok=True)
            made.add(folder)
        (folder / f"img-{i:08}.bin").write_bytes(rng.randbytes(FILE_BYTES))
        if len(made) > 4096:
            made.clear()


def exponent(rows: Sequence[dict[str, Any]]) -> float | None:
    """Least-squares slope of log(seconds) on log(files): how the cost grows (1 linear, 0 flat)."""
    pts = [(math.log(r["files"]), math.log(max(r["seconds"], 1e-4))) for r in rows if r["files"] > 0]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    den = sum((x - mx) ** 2 for x, _ in pts)
    return None if den == 0 else round(sum((x - mx) * (y - my) for x, y in pts) / den, 3)


@dataclass
class World:
    """A platform home (SQLite or PostgreSQL), served by ``platform serve`` as its own process."""

    root: Path
    database_url: str
    home: Home = field(init=False)
    port: int = 0
    server: subprocess.Popen[str] | None = None
    key: Path = field(init=False)
    fingerprint: str = ""

    def __post_init__(self) -> None:
        from medbridge.platform.storage import init_home
        from medbridge.testing import write_key

        self.home = Home(self.root / "home")
        init_home(self.home, "bench", self.database_url)
        self.key = self.root / "bench_enrolment"
        key = write_key(self.key)
        store = self.store()
        try:
            store.add_user("bench", [(public_line(key), fingerprint(key))], [], datetime.now(UTC), "bench")
        finally:
            store.close()

    def store(self) -> Store:
        return Store(self.home.database_url(self.home.settings()))

    def cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "medbridge", *args]

    def serve(self) -> None:
        cmd = self.cli("platform", "serve", "--home", str(self.home.root), "--listen", "127.0.0.1:0", "--workers", "1")
        with open(self.root / "platform.log", "wb") as log:
            self.server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True,
                                           start_new_session=True)  # fmt: skip
        assert self.server.stdout is not None
        line = self.server.stdout.readline()
        if "listening on" not in line:
            self.stop()
            raise PlatformUnavailable(f"the benchmark's platform did not start: {line.strip()}")
        words = line.split()
        self.port = int(words[words.index("on") + 1].rpartition(":")[2])
        self.fingerprint = words[words.index("key") + 1]

    def stop(self) -> None:
        if self.server is not None and self.server.poll() is None:
            os.killpg(self.server.pid, signal.SIGTERM)
            try:
                self.server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.server.pid, signal.SIGKILL)
                self.server.wait()
        if self.server is not None and self.server.stdout is not None:
            self.server.stdout.close()
        self.server = None

    def start_job(self, job_id: str, dataset: str) -> Measured:
        """``job run -- true`` from an empty folder of its own (a job scans its folder for residue)."""
        work = self.root / "jobs" / job_id
        work.mkdir(parents=True)
        return measure(["env", "-u", "TMPDIR", *self.job(job_id, dataset, "true")], cwd=work)

    def job(self, job_id: str, dataset: str, *command: str) -> list[str]:
        return self.cli("job", "run", "--platform", f"127.0.0.1:{self.port}", "--key", str(self.key), "--user",
                        "bench", "--host-key-fingerprint", self.fingerprint, "--job-id", job_id,
                        "--dataset", dataset, "--", *command)  # fmt: skip


def run(plan: Plan, say: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Every step at every size; rows, exponents, verdicts."""
    plan.check()
    base = Path(tempfile.mkdtemp(prefix="medbridge-bench-catalogue-", dir=plan.workdir))
    server = None
    try:
        url = plan.database
        if url == "postgresql":
            from medbridge.testing.postgres import PostgresServer

            server = PostgresServer().start()
            url = server.database()
        world = World(base, url)
        world.serve()
        try:
            return _ladder(world, plan, base, say)
        except MedbridgeError as exc:
            if world.server is not None and world.server.poll() is not None:
                said = (base / "platform.log").read_text(errors="replace").strip().splitlines()
                raise PlatformUnavailable(f"{exc} (the platform died: {said[-1] if said else 'no log'})") from exc
            raise
        finally:
            world.stop()
    finally:
        if server is not None:
            server.stop()
        _remove(base)


def _ladder(world: World, plan: Plan, base: Path, say: Callable[[str], None]) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    unrelated = base / "unrelated"
    generate(unrelated, plan.unrelated, seed=99)
    small = base / "src-10"
    generate(small, 10, seed=7)
    _grant(world, "ds-10", small)
    start10 = world.start_job("bench-10", "ds-10")
    rows.append(_row("job-start", 10, start10))
    for n in sorted(plan.sizes):
        name, src = f"ds-{n}", base / f"src-{n}"
        say(f"{n} files: generating")
        generate(src, n, seed=n)
        say(f"{n} files: dataset add")
        add = measure(world.cli("dataset", "add", name, "--from", str(src), "--home", str(world.home.root)))
        rows.append(_row("dataset-add", n, add))
        _remove(src)
        _grant(world, name, None)
        say(f"{n} files: manifest build")
        shutil.rmtree(world.home.manifests / name)
        code = f"from medbridge.bench.catalogue import build; build({str(world.home.root)!r}, {name!r})"
        rows.append(_row("manifest", n, measure([sys.executable, "-c", code])))
        say(f"{n} files: job start")
        rows.append(_row("job-start", n, world.start_job(f"bench-{n}", name)))
        say(f"{n} files: residue scan of {plan.unrelated} unrelated files")
        scan = world.cli("residue", "scan", str(unrelated), "--json", "--platform", f"127.0.0.1:{world.port}",
                         "--key", str(world.key), "--user", "bench", "--host-key-fingerprint", world.fingerprint,
                         "--job-id", f"bench-{n}")  # fmt: skip
        rows.append(_row("residue-scan", n, measure(scan)))
        say(f"{n} files: {n} audit entries")
        _fill_audit(world, n)
        rows.append(_row("audit-verify", n, measure(world.cli("audit", "verify", "--home", str(world.home.root)))))
        query = world.cli("audit", "--home", str(world.home.root), "--action", "residue.lookup", "--last", "100")
        rows.append(_row("audit-query", n, measure(query)))
    result: dict[str, Any] = {
        "database": "sqlite" if not world.database_url else "postgresql",
        "machine": _machine(),
        "rows": rows,
        "exponents": {s: exponent([r for r in rows if r["step"] == s and r["files"] > 10]) for s in STEPS},
    }
    if plan.concurrent:
        target = f"ds-{plan.concurrent_size if plan.concurrent_size in plan.sizes else max(plan.sizes)}"
        say(f"{plan.concurrent} jobs reading {target} at once")
        result["concurrent"] = concurrent(world, target, plan.concurrent, plan.seconds)
    result["verdicts"] = verdicts(result)
    return result


def build(home: str, name: str) -> None:
    """The manifest step's process: one build of a dataset's current version."""
    from medbridge.platform.catalogue import Catalogue

    h = Home(Path(home))
    store = Store(h.database_url(h.settings()))
    try:
        Catalogue(store, h.manifests).build(name)
    finally:
        store.close()


def _grant(world: World, name: str, src: Path | None) -> None:
    if src is not None:
        measure(world.cli("dataset", "add", name, "--from", str(src), "--home", str(world.home.root)))
    store = world.store()
    try:
        store.grant("bench", name, None, datetime.now(UTC), "bench")
    finally:
        store.close()


def _fill_audit(world: World, n: int) -> None:
    """Bring the audit chain to at least ``n`` entries, as data-plane reads would."""
    store = world.store()
    try:
        last = store.audit_records(last=1)
        have = last[0].seq if last else 0
        for start in range(have, n, 5000):
            events = [
                AuditEvent(actor="bench", action="sftp.read", outcome="ok", subject=f"/datasets/x/{i}",
                           detail={"bytes_read": FILE_BYTES})
                for i in range(start, min(n, start + 5000))
            ]  # fmt: skip
            store.audit(events, datetime.now(UTC))
    finally:
        store.close()


def _row(step: str, files: int, m: Measured) -> dict[str, Any]:
    return {"step": step, "files": files, "seconds": round(m.seconds, 3), "peak_rss_mb": round(m.peak_rss_mb, 1),
            "files_per_s": round(files / m.seconds, 1) if step == "dataset-add" else None}  # fmt: skip


def concurrent(world: World, dataset: str, jobs: int, seconds: float) -> dict[str, Any]:
    """``jobs`` readers start at once on ``dataset``; each job's first-file latency and the longest silence."""
    import asyncio

    import asyncssh

    from medbridge.compute.credentials import Enrolment, request_certificate
    from medbridge.compute.job import Agent
    from medbridge.platform.keys import KEY_ALG

    key = asyncssh.read_private_key(str(world.key))
    folder = Path(tempfile.mkdtemp(prefix="medbridge-bench-agents-"))
    agents, procs = [], []
    try:
        specs = []
        for j in range(jobs):
            ephemeral = asyncssh.generate_private_key(KEY_ALG)
            enrolment = Enrolment("127.0.0.1", world.port, "bench", key, world.fingerprint)
            cred = asyncio.run(request_certificate(enrolment, ephemeral, f"reader-{j}", 3600, [dataset]))
            (folder / str(j)).mkdir()
            agent = Agent(folder / str(j))
            agents.append(agent)
            asyncio.run(agent.load(ephemeral, cred.certificate, 3600))
            specs.append({"port": world.port, "agent": str(agent.socket), "user": "bench",
                          "host_key": cred.host_key.export_public_key().decode(), "dataset": dataset,
                          "seed": j, "seconds": seconds})  # fmt: skip
        start = time.monotonic()
        for spec in specs:
            p = subprocess.Popen([sys.executable, "-m", "medbridge.bench.catalogue"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
            assert p.stdin is not None
            p.stdin.write(json.dumps({**spec, "start": start}) + "\n")
            p.stdin.close()
            procs.append(p)
        results: list[dict[str, Any]] = []
        for p in procs:
            assert p.stdout is not None
            out = p.stdout.read()
            p.wait(timeout=seconds + 600)
            p.stdout.close()
            results.append(json.loads(out.strip().splitlines()[-1]) if out.strip() else {"error": "no answer"})
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for agent in agents:
            agent.stop()
        shutil.rmtree(folder, ignore_errors=True)
    firsts = [None if r.get("first") is None else float(r["first"]) - float(r["began"]) for r in results]
    began = [float(r["began"]) for r in results if "began" in r]
    times: list[float] = sorted(float(t) for r in results for t in r.get("times", []))
    gaps = [b - a for a, b in itertools.pairwise(times)]  # once reads are served: starts are first_file_s
    return {"jobs": jobs, "dataset": dataset, "seconds": seconds,
            "first_file_s": [None if f is None else round(f, 3) for f in firsts],
            "until_first_read_s": round(times[0] - min(began), 3) if times and began else None,
            "reads": len(times), "longest_gap_s": round(max(gaps), 3) if gaps else None,
            "errors": [r["error"] for r in results if "error" in r]}  # fmt: skip


def _reader(spec: dict[str, Any]) -> dict[str, Any]:
    """One job of the starvation test: read random files of the dataset, verified, for ``seconds``."""
    import asyncssh

    from medbridge.compute.session import Endpoint
    from medbridge.loader import Loader

    ep = Endpoint("127.0.0.1", spec["port"], spec["user"], asyncssh.import_public_key(spec["host_key"]),
                  spec["agent"])  # fmt: skip
    n = int(spec["dataset"].rpartition("-")[2])
    rng = random.Random(spec["seed"])
    times: list[float] = []
    began = time.monotonic()  # the job starts reading now (its interpreter is up)
    end = began + spec["seconds"]

    def paths() -> Iterator[str]:
        while time.monotonic() < end:
            i = rng.randrange(n)
            patient, series = i // 1000, (i // 100) % 10
            yield (f"/datasets/{spec['dataset']}/society-{patient // 1000:03}/patient-{patient:06}/"
                   f"series-{series:02}/img-{i:08}.bin")  # fmt: skip

    try:
        with Loader(ep, window=8, connections=1) as loader:
            for _ in loader.read_many(paths()):
                times.append(time.monotonic())
    except (OSError, MedbridgeError) as exc:
        return {"began": began, "first": times[0] if times else None, "times": times, "error": str(exc)}
    return {"began": began, "first": times[0] if times else None, "times": times}


def verdicts(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets against this run."""
    rows = result["rows"]
    out = []
    sized = [r for r in rows if r["files"] > 10]
    for step in ("dataset-add", "manifest", "residue-scan"):
        mem = [r["peak_rss_mb"] for r in sized if r["step"] == step]
        if len(mem) >= 2:
            ratio = max(mem) / min(mem)
            out.append({"target": f"{step} peak memory flat within {FLAT_MEMORY}x", "value": round(ratio, 2),
                        "met": ratio <= FLAT_MEMORY})  # fmt: skip
    e = result["exponents"].get("dataset-add")
    if e is not None:
        out.append({"target": f"dataset-add exponent <= {ADD_EXPONENT}", "value": e, "met": e <= ADD_EXPONENT})
    starts = {r["files"]: r["seconds"] for r in rows if r["step"] == "job-start"}
    if 10 in starts and len(starts) > 1:
        ratio = starts[max(starts)] / starts[10]
        out.append({"target": f"job start at {max(starts)} files within {JOB_START_RATIO}x of 10 files",
                    "value": round(ratio, 2), "met": ratio <= JOB_START_RATIO})  # fmt: skip
    c = result.get("concurrent")
    if c:
        firsts = [f for f in c["first_file_s"] if f is not None]
        worst = max(firsts) if len(firsts) == c["jobs"] else None
        out.append({"target": f"every job's first file within {FIRST_FILE_S} s", "value": worst,
                    "met": worst is not None and worst <= FIRST_FILE_S})  # fmt: skip
        gap = c["longest_gap_s"]
        out.append({"target": f"no window over {LONGEST_GAP_S} s with no read served", "value": gap,
                    "met": gap is not None and gap <= LONGEST_GAP_S})  # fmt: skip
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    """Seconds and peak memory per step against files, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for step in STEPS:
        rows = sorted((r for r in result["rows"] if r["step"] == step and r["files"] > 10), key=lambda r: r["files"])
        if not rows:
            continue
        xs = [r["files"] for r in rows]
        e = result["exponents"].get(step)
        ax1.plot(xs, [r["seconds"] for r in rows], marker="o", label=f"{step} (exp {e})")
        ax2.plot(xs, [r["peak_rss_mb"] for r in rows], marker="o", label=step)
    for ax, label in ((ax1, "seconds"), (ax2, "peak RSS (MB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("files in the dataset")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=7)
    fig.suptitle(f"bench catalogue on {result['database']} ({result['machine']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _machine() -> str:
    return f"{os.cpu_count()} cores, {os.uname().machine}, {os.uname().nodename}"


def _remove(path: Path) -> None:
    for dirpath, _, _ in os.walk(path):
        os.chmod(dirpath, 0o755)
    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    print(json.dumps(_reader(json.loads(sys.stdin.readline()))))
