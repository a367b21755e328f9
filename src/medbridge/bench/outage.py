"""``medbridge bench outage``: the original system's figure — the link cut mid-inference, and the job carries on.

On the three sites (:mod:`medbridge.testing.deployment`): the demo's chest-CT phantoms
are a dataset at ``platform``; the demo's lung segmentation runs as a job at ``hpc``
under ``medbridge job run``, reading each volume as it goes through the sshfs mount or
the native loader; ``cut_at`` seconds after the job starts, every packet on the hpc
link is dropped at ``gw`` in both directions (a silent cut, not a reset) for
``cut_for`` seconds.  The gateway's own byte counters are sampled twice a second for
the timeline.  Every mask the job commits is compared (SHA-256) with an uncut run of
the same segmentation over the same volumes, computed here at a lower CPU priority
while the job runs.

With ``keep`` the run's folder stays (the sites' logs, the job's log and outputs, the
committed and the reference masks) and the TCP state of every connection at the three
sites is written to ``tcp.log`` every :data:`TCP_EVERY` seconds (``ss -tnoi``): what a
failed long cut needs to be understood.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from medbridge import outage, processes
from medbridge.demo import phantom, segment
from medbridge.errors import InvalidInput, PlatformUnavailable
from medbridge.ingest import nifti
from medbridge.platform.storage import add_dataset
from medbridge.testing import netns
from medbridge.testing.deployment import METRICS_PORT, Deployment

PATHS = ("mount", "native")
USER, DATASET = "radiologist", "chest-ct"
#: How often the gateway's counters are read, seconds (the issue asks at least once a second).
SAMPLE_EVERY = 0.5
#: The job runs this much longer than the cut's start (uncut), so there is work left when the link returns.
AFTER_CUT = 1.3
#: How long an interrupted run gives its job to tear down (unmount, stop its payload) before killing it, seconds:
#: well inside Slurm's default KillWait (30 s), after which the whole run is SIGKILLed.
JOB_STOP = 15.0
#: How often a kept run records the TCP state of its connections, seconds.
TCP_EVERY = 10.0

_SAMPLER = (
    "import sys, time, urllib.request\n"
    "url, every = sys.argv[1], float(sys.argv[2])\n"
    "while True:\n"
    "    try:\n"
    "        text = urllib.request.urlopen(url, timeout=5).read().decode()\n"
    "        rows = [l for l in text.splitlines() if l.startswith('medbridge_gateway_bytes_total{')]\n"
    "        down = sum(float(l.rsplit(' ', 1)[1]) for l in rows if 'direction=\"down\"' in l)\n"
    "        up = sum(float(l.rsplit(' ', 1)[1]) for l in rows if 'direction=\"up\"' in l)\n"
    "        print(f'{time.time():.3f} {down:.0f} {up:.0f}', flush=True)\n"
    "    except OSError:\n"
    "        pass\n"
    "    time.sleep(every)\n"
)


@dataclass(frozen=True, kw_only=True)
class Plan:
    path: str = "mount"
    cut_at: float = 500.0
    cut_for: float = 300.0
    #: Volumes in the dataset; None: enough that the uncut job runs well past the cut's start.
    volumes: int | None = None
    #: The platform's outage tolerance (the job takes it); None: the default.
    tolerance: float | None = None
    shape: tuple[int, int, int] = phantom.SHAPE
    #: Cut once this many volumes have been read instead of at ``cut_at`` (a test cuts on the event, not the clock).
    cut_after_reads: int | None = None

    @classmethod
    def quick(cls, path: str = "mount") -> Plan:
        return cls(path=path, cut_at=20.0, cut_for=30.0, volumes=None)

    def check(self) -> None:
        if self.path not in PATHS:
            raise InvalidInput(f"--path {self.path!r}: choose from {', '.join(PATHS)}")
        if self.cut_at < 0 or self.cut_for <= 0:
            raise InvalidInput("--cut-at must be 0 or more and --cut-for more than 0 seconds")
        if self.volumes is not None and not 1 <= self.volumes <= 10_000:
            raise InvalidInput("--volumes must be 1 to 10000")
        if self.tolerance is not None:
            try:
                outage.check(self.tolerance, "--tolerance")
            except ValueError as exc:
                raise InvalidInput(str(exc)) from exc


def volumes_for(plan: Plan, seconds_per_volume: float) -> int:
    """Enough volumes that the uncut job is still reading well after the cut begins."""
    if plan.volumes is not None:
        return plan.volumes
    return max(8, math.ceil((plan.cut_at * AFTER_CUT + 20) / max(seconds_per_volume, 0.05)))


def reference(folder: Path, out: Path, keep: bool = False) -> dict[str, str]:
    """The uncut run: every volume in ``folder`` segmented as the job does it; mask name -> SHA-256."""
    out.mkdir(parents=True, exist_ok=True)
    digests = {}
    for src in sorted(folder.glob("*.nii")):
        segment.segment_one(src.name, src.read_bytes(), out)
        mask = out / segment.mask_name(src.name)
        digests[mask.name] = processes.sha256_file(mask)
        if not keep:
            mask.unlink()
    return digests


def misread(reads: list[dict[str, Any]], source: dict[str, str]) -> list[str]:
    """The volumes whose bytes, as the payload got them, are not the dataset's (a read that returned wrong data)."""
    return sorted({r["volume"] for r in reads if "sha256" in r and source.get(r["volume"]) != r["sha256"]})


def differences(committed: dict[str, str] | None, expected: dict[str, str]) -> dict[str, list[str]]:
    """Which masks differ from the uncut run's, which it made and the job did not commit, and the reverse."""
    got = committed or {}
    return {
        "differ": sorted(n for n in got.keys() & expected.keys() if got[n] != expected[n]),
        "missing": sorted(expected.keys() - got.keys()),
        "extra": sorted(got.keys() - expected.keys()),
    }


class _TcpLog:
    """Every TCP connection at the three sites with its timers and back-off (``ss -tnoi``), now and then."""

    def __init__(self, d: Deployment, path: Path):
        self._d, self._path = d, path
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="tcp-log")
        self._thread.start()

    def _run(self) -> None:
        with open(self._path, "a") as out:
            while not self._stop.is_set():
                for site in ("hpc", "gw", "platform"):
                    r = subprocess.run([*self._d.sites_prefix(site), "ss", "-tnoi"], capture_output=True, text=True,
                                       timeout=30, check=False)  # fmt: skip
                    out.write(f"=== {time.time():.3f} {site}\n{r.stdout}")
                out.flush()
                self._stop.wait(TCP_EVERY)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


class _Sampler:
    """The gateway's byte counters, read in its namespace twice a second: (time, total bytes) pairs."""

    def __init__(self, d: Deployment):
        url = f"http://127.0.0.1:{METRICS_PORT}/metrics"
        cmd = [*d.sites_prefix("gw"), sys.executable, "-c", _SAMPLER, url, str(SAMPLE_EVERY)]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.samples: list[tuple[float, float, float]] = []  # time, bytes to the compute nodes, bytes from them
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            at, down, up = line.split()
            self.samples.append((float(at), float(down), float(up)))

    def stop(self) -> None:
        processes.stop(self._proc, timeout=5)
        self._thread.join(timeout=5)
        if self._proc.stdout is not None:
            self._proc.stdout.close()


def timeline(samples: list[tuple[float, float, float]], t0: float) -> list[list[float]]:
    """``[t, bytes_per_s, to_nodes_per_s, from_nodes_per_s]`` between consecutive samples, ``t`` in seconds since
    ``t0`` (a counter that went back — a restarted gateway — counts again from zero)."""
    rows = []
    for (a, *x), (b, *y) in itertools.pairwise(samples):
        if b > a:
            rates = [(new - old if new >= old else new) / (b - a) for old, new in zip(x, y, strict=True)]
            rows.append([round(b - t0, 2), round(sum(rates), 1), *(round(r, 1) for r in rates)])
    return rows


def stall(reads: list[dict[str, float]]) -> tuple[float, float | None]:
    """The longest the job waited for one volume, and the read that waited longest (its end), from its timings."""
    if not reads:
        return 0.0, None
    worst = max(reads, key=lambda r: r["got"] - r["asked"])
    return worst["got"] - worst["asked"], worst["got"]


def pending(reads: list[dict[str, float]], asking: float | None, count: int) -> float | None:
    """When the payload asked for the volume it never got (it failed, or was stopped, waiting), else None.

    A failed run's longest wait is often that one: counting only reads that finished
    made a job that died waiting out a cut look as if it had never stalled.
    """
    last = max((r["got"] for r in reads), default=0.0)
    return asking if asking is not None and len(reads) < count and asking >= last else None


def run(plan: Plan, progress: Callable[[str], None] | None = None, keep: Path | None = None) -> dict[str, Any]:
    """Build the sites, run the job with its link cut, and compare its outputs with an uncut run.

    ``keep``: a folder, not yet there, to move the run's folder to when it ends (else removed).
    """
    if keep is not None:
        try:
            keep.mkdir()  # claimed now, so the run's end cannot meet a folder someone else made meanwhile
        except FileExistsError:
            raise InvalidInput(f"--keep {str(keep)!r} already exists: name a folder that does not") from None
        except OSError as exc:
            raise InvalidInput(f"--keep {str(keep)!r} cannot be made: {exc.strerror}") from None
    plan.check()
    say = progress or (lambda _m: None)
    why = netns.available()
    if why is not None:
        raise InvalidInput(f"bench outage runs on the three sites (network namespaces): {why}")
    if plan.path == "mount" and (not os.path.exists("/dev/fuse") or shutil.which("sshfs") is None):
        raise InvalidInput("--path mount needs /dev/fuse and sshfs (apt-get install sshfs); try --path native")
    root = Path(tempfile.mkdtemp(prefix="medbridge-bench-outage-", dir="/var/tmp"))
    sites: netns.Sites | None = None
    d: Deployment | None = None
    sampler: _Sampler | None = None
    ref: subprocess.Popen[bytes] | None = None
    tcp: _TcpLog | None = None
    job: _Job | None = None
    try:
        source = root / "volumes"
        source.mkdir()
        started = time.perf_counter()
        segment.segment_one("probe.nii", nifti.encode(phantom.chest(0, plan.shape), phantom.SPACING), root)
        count = volumes_for(plan, time.perf_counter() - started)
        say(f"{count} chest CT volumes {'x'.join(map(str, plan.shape))}: the uncut job would take "
            f"~{count * (time.perf_counter() - started):.0f} s on one core")  # fmt: skip
        for i in range(count):
            nifti.write(source / f"ct-{i + 1:04d}.nii", phantom.chest(i + 1, plan.shape), phantom.SPACING)
        ref = subprocess.Popen(
            ["nice", "-n", "10", sys.executable, "-c", "import json, sys; from pathlib import Path; "
             "from medbridge.bench.outage import reference; "
             "print(json.dumps(reference(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == 'keep')))",
             str(source), str(root / "ref"), "keep" if keep else "drop"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            sites = netns.Sites().start()
        except subprocess.CalledProcessError as exc:
            raise PlatformUnavailable(f"the three sites could not be built: {exc}") from exc
        settings: dict[str, Any] = {"enforcement_interval": 1.0}
        if plan.tolerance is not None:
            settings["outage_tolerance"] = plan.tolerance
        d = Deployment(sites, root / "world", **settings)
        d.home.add_user(USER)
        add_dataset(d.home.home, d.home.store, DATASET, source, "Synthetic Chest Society", "bench")
        d.home.grant(USER, DATASET)
        d.start()
        sampler = _Sampler(d)
        if keep is not None:
            tcp = _TcpLog(d, root / "tcp.log")
        job = _Job(d, plan, root)
        when = f"at {plan.cut_at:.0f} s" if plan.cut_after_reads is None else f"after {plan.cut_after_reads} volumes"
        say(f"job started ({plan.path}); the link will be cut {when} for {plan.cut_for:.0f} s")
        cut = job.cut_and_wait(say)
        sampler.stop()
        assert ref.stdout is not None
        expected: dict[str, str] = json.loads(ref.communicate()[0] or b"{}")
        source_digests = {p.name: processes.sha256_file(p) for p in sorted(source.glob("*.nii"))}
        return _result(plan, job, cut, sampler, expected, count, source_digests)
    finally:
        with _uninterrupted():
            _end(job, tcp, sampler, ref, d, sites)
            _keep(root, keep, say)


@contextlib.contextmanager
def _uninterrupted() -> Iterator[None]:
    """A cleanup that a second SIGTERM or ^C must not cut short: it would leave the job, namespaces and folder."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def _end(job: _Job | None, tcp: _TcpLog | None, sampler: _Sampler | None, ref: subprocess.Popen[bytes] | None,
         d: Deployment | None, sites: netns.Sites | None) -> None:  # fmt: skip
    """Stop what a run started, the job first (interrupted, it tears down while its platform is still there)."""
    if job is not None and job.proc.poll() is None:
        processes.stop(job.proc, timeout=JOB_STOP)
    if tcp is not None:
        tcp.stop()
    if sampler is not None:
        sampler.stop()
    if ref is not None and ref.poll() is None:
        processes.stop(ref, timeout=5)
    if ref is not None and ref.stdout is not None:
        ref.stdout.close()
    if d is not None:
        d.stop()
    if sites is not None:
        sites.stop()


def _keep(root: Path, keep: Path | None, say: Callable[[str], None]) -> None:
    """Move the run's files into ``keep`` (made at the start), or remove them; a move that fails leaves them."""
    if keep is None:
        shutil.rmtree(root, ignore_errors=True)
        return
    try:
        if keep.is_symlink() or not keep.is_dir():
            raise OSError(f"{keep} is no longer the folder this run made")
        for entry in root.iterdir():
            shutil.move(entry, keep / entry.name)
        root.rmdir()
        say(f"the run's folder is kept: {keep}")
    except OSError as exc:
        say(f"the run could not be kept in {keep} ({exc}); what it made is still in {root}")


class _Job:
    """The segmentation job at hpc, started now; its timings, report and committed masks."""

    def __init__(self, d: Deployment, plan: Plan, root: Path):
        self.d, self.plan = d, plan
        self.work = root / "job"
        self.work.mkdir()
        self.timings = self.work / "timings.jsonl"
        self.report_file = root / "report.json"
        options = ["--job-id", "outage-1", "--outputs", str(self.work / "outputs"), "--report", str(self.report_file)]
        if plan.path == "mount":
            options += ["--mount", str(self.work / "mnt")]
        env = {**d.job_environment(self.work), "MEDBRIDGE_DEMO_OUTPUTS": str(self.work / "outputs"),
               "MEDBRIDGE_DEMO_DATASET": DATASET, "MEDBRIDGE_DEMO_TIMINGS": str(self.timings)}  # fmt: skip
        cmd = d.job_command(USER, [sys.executable, "-m", "medbridge.demo.segment"], *options)
        self.log = root / "job.log"
        self.ended = 0.0
        with open(self.log, "wb") as err:
            self.launched = self.t0 = time.time()  # t0: until the payload asks for its first volume
            self.proc = subprocess.Popen(cmd, cwd=self.work, env=env, stdout=subprocess.DEVNULL, stderr=err)

    def reads(self) -> list[dict[str, float]]:
        if not self.timings.exists():
            return []
        return [json.loads(line) for line in self.timings.read_text().splitlines() if line.strip()]

    def asking(self) -> float | None:
        """When the payload asked for the volume it is reading now, or last asked for (a file of its own)."""
        with contextlib.suppress(OSError, ValueError):
            return float(self.timings.with_suffix(".asking").read_text())
        return None

    def cut_and_wait(self, say: Callable[[str], None]) -> tuple[float, float] | None:
        """Cut the link ``cut_at`` seconds after the payload asked for its first volume (if the job still runs),
        restore it ``cut_for`` later, wait for the end."""
        plan, sites = self.plan, self.d.sites
        cut: tuple[float, float] | None = None
        next_word = time.monotonic() + 30
        started = False
        while self.proc.poll() is None:
            if not started:
                reads = self.reads()
                first = reads[0]["asked"] if reads else self.asking()  # asked, not yet answered
                if first is None:
                    time.sleep(0.1)
                    continue
                started, self.t0 = True, first
                say(f"the job set up in {self.t0 - self.launched:.1f} s; inference started (t=0)")
            now = time.time() - self.t0
            due = now >= plan.cut_at if plan.cut_after_reads is None else len(self.reads()) >= plan.cut_after_reads
            if cut is None and due:
                sites.cut("hpc")
                cut = (time.time(), time.time())
                say(f"t={now:.0f} s: link cut at gw (both directions dropped), {len(self.reads())} volumes read")
                try:
                    self._sleep_until(cut[0] + plan.cut_for)
                finally:
                    sites.restore("hpc")
                    cut = (cut[0], time.time())
                say(f"t={time.time() - self.t0:.0f} s: link restored after {cut[1] - cut[0]:.0f} s")
            if time.monotonic() > next_word:
                say(f"t={now:.0f} s: {len(self.reads())} volumes read")
                next_word = time.monotonic() + 30
            time.sleep(0.2)
        self.ended = time.time()
        say(f"t={self.ended - self.t0:.0f} s: job ended (exit {self.proc.returncode})")
        return cut

    def _sleep_until(self, until: float) -> None:
        while time.time() < until:
            time.sleep(min(0.5, max(0.0, until - time.time())))

    def report(self) -> dict[str, Any]:
        with contextlib.suppress(OSError, ValueError):
            return json.loads(self.report_file.read_text())  # type: ignore[no-any-return]
        return {}

    def committed(self) -> dict[str, str] | None:
        """The masks the platform accepted (name -> SHA-256), or None when nothing was committed."""
        results = self.d.home.home.results / USER / "outage-1"
        if not (results / "MANIFEST.sha256").exists():
            return None
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in results.glob("*_lungs.nii")}

    def said(self) -> str:
        lines = [x for x in self.log.read_text(errors="replace").splitlines() if x.startswith("medbridge: job")]
        return lines[-1] if lines else ""


def _result(plan: Plan, job: _Job, cut: tuple[float, float] | None, sampler: _Sampler, expected: dict[str, str],
            count: int, source: dict[str, str]) -> dict[str, Any]:  # fmt: skip
    reads = job.reads()
    committed = job.committed()
    report = job.report()
    stall_s, stall_end = stall(reads)
    ended = max((r["got"] for r in reads), default=job.t0)
    asked = pending(reads, job.asking(), count)
    if asked is not None:  # it waited until the payload gave up, at most until the job ended
        ended = job.ended
        if job.ended - asked > stall_s:
            stall_s, stall_end = job.ended - asked, job.ended
    restored = cut[1] if cut else None
    after = [r["got"] for r in reads if restored is not None and r["got"] >= restored]
    return {
        "path": plan.path,
        "completed": job.proc.returncode == 0 and committed is not None and len(committed) == count,
        "outputs_match": committed is not None and committed == expected and len(expected) == count,
        "outputs": {**differences(committed, expected), "reference_volumes": len(expected)},
        "reads_differ": misread(reads, source),
        "cut_at_s": round(cut[0] - job.t0, 1) if cut else None,
        "cut_s": round(cut[1] - cut[0], 1) if cut else 0.0,
        "stall_s": round(stall_s, 1),
        "stall_ended_at_s": round(stall_end - job.t0, 1) if stall_end else None,
        "first_read_after_cut_s": round(min(after) - restored, 1) if after and restored else None,
        "cut_landed": cut is not None and cut[0] < ended,
        "unfinished_read": asked is not None,
        "setup_s": round(job.t0 - job.launched, 1),
        "volumes": count,
        "volumes_read": len(reads),
        "bytes_read": sum(int(r["bytes"]) for r in reads),
        "job_seconds": round(job.ended - job.t0, 1),
        "exit_code": job.proc.returncode,
        "job_said": job.said(),
        "outage_tolerance_s": report.get("outage_tolerance"),
        "outages": report.get("outages", []),
        "plan": {**asdict(plan), "shape": list(plan.shape)},
        "machine": f"{platform.node()} ({os.cpu_count()} cores)",
        "timeline": timeline(sampler.samples, job.t0),
    }


def whole(result: dict[str, Any]) -> bool:
    """The run's verdict: the job completed, every mask matches the uncut run's, every read was the dataset's."""
    return bool(result["completed"] and result["outputs_match"] and not result.get("reads_differ"))


def plot(result: dict[str, Any], path: Path) -> None:
    """Bytes per second through the gateway over the job's life, the cut shaded (the original's figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.6))
    rows = result["timeline"]
    if rows:
        ts = [r[0] for r in rows]
        down = [r[2] / 1e6 for r in rows]
        both = [(r[2] + r[3]) / 1e6 for r in rows]
        ax.fill_between(ts, down, step="pre", color="#4c72b0", linewidth=0, label="to the job (volumes)")
        ax.fill_between(ts, down, both, step="pre", color="#dd8452", linewidth=0, label="from the job (outputs)")
    if result["cut_at_s"] is not None:
        ax.axvspan(result["cut_at_s"], result["cut_at_s"] + result["cut_s"], color="#c44e52", alpha=0.18,
                   label=f"link cut at gw ({result['cut_s']:.0f} s)")  # fmt: skip
    ax.legend(loc="upper left", fontsize=8)
    verdict = "completed, outputs identical" if whole(result) else "FAILED"
    ax.set_title(f"bench outage, {result['path']}: {verdict}; longest wait for a volume {result['stall_s']:.0f} s",
                 fontsize=10)  # fmt: skip
    ax.set_xlabel("seconds since the job asked for its first volume")
    ax.set_ylabel("MB/s through the gateway")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
