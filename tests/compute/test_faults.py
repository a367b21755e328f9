"""The fault matrix on the three sites: each fault made where it happens in life, mid-read or mid-upload.

Each test ends one of two ways, and says which it expects: the job finished with
outputs byte-identical to a fault-free run, or it failed with a clear error and nothing
committed that looks complete.  Either way the residue scan is clean and the platform's
audit log records what happened.  Jobs wait on markers their payload writes (never on
a fixed time); the only fixed times are the faults' own lengths.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from medbridge.control.audit import Record
from medbridge.testing import RunningPlatform
from medbridge.testing.deployment import Deployment, wait_for
from medbridge.testing.netns import Sites, available
from tests.compute.test_job_run import job_run
from tests.conftest import CHEST

needs_fuse = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or shutil.which("sshfs") is None, reason="needs /dev/fuse and sshfs"
)

#: The platform's tolerance in these tests: long enough for the 60 s cut, short enough to see a dead session end.
TOLERANCE = 120
BIG = os.urandom(6 << 20)
EXPECTED = hashlib.sha256(BIG).hexdigest()

#: The payload: reads /datasets/ct/big.bin by each way asked (mount, native) in two halves, waiting between
#: them for the test's "go" (the fault goes there), and writes what it read's SHA-256 as its output.
READER = """
import hashlib, os, pathlib, sys, threading, time
path, flags, ways = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3].split(",")
out = pathlib.Path(os.environ["OUT"]); out.mkdir(parents=True, exist_ok=True)
(out / "started.txt").write_text("partial\\n")  # what a job that fails midway leaves: it must not look complete
half, digests, failed = 1 << 20, {}, {}

def go():
    while not (flags / "go").exists():
        time.sleep(0.05)

def mount():
    with open(os.environ["MEDBRIDGE_MOUNT"] + path, "rb") as f:
        first = f.read(half)
        (flags / "ready-mount").touch(); go()
        digests["mount"] = hashlib.sha256(first + f.read()).hexdigest()

def native():
    from medbridge.loader import Loader
    with Loader() as loader:
        size = len(loader.read(path))
        first = loader.read_range(path, 0, half)
        (flags / "ready-native").touch(); go()
        def watch():
            while "native" not in digests and "native" not in failed:
                if loader.stats.reconnects:
                    (flags / "reconnecting-native").touch(); return
                time.sleep(0.05)
        threading.Thread(target=watch, daemon=True).start()
        digests["native"] = hashlib.sha256(first + loader.read_range(path, half, size - half)).hexdigest()

def run(way):
    try:
        {"mount": mount, "native": native}[way]()
    except Exception as exc:
        failed[way] = exc
        (flags / f"failed-{way}").write_text(f"{type(exc).__name__}: {exc}")

threads = [threading.Thread(target=run, args=(w,)) for w in ways]
for t in threads: t.start()
for t in threads: t.join()
if failed:
    sys.exit(f"read failed: {failed}")
for way, digest in digests.items():
    (out / f"{way}.sha256").write_text(digest + "\\n")
"""

#: A payload whose output is one large file (so its upload can be cut or its platform killed midway).
WRITER = """
import os, pathlib, random
out = pathlib.Path(os.environ["OUT"]); out.mkdir(parents=True, exist_ok=True)
(out / "mask.bin").write_bytes(random.Random(7).randbytes(12 << 20))
"""
MASK_SHA = hashlib.sha256(__import__("random").Random(7).randbytes(12 << 20)).hexdigest()


@pytest.fixture(scope="module")
def world() -> Iterator[Deployment]:
    why = available()
    if why is not None:
        pytest.skip(f"no network namespaces here: {why}")
    root = Path(tempfile.mkdtemp(prefix="medbridge-faults-", dir="/var/tmp"))
    sites = Sites().start()
    d = Deployment(sites, root, outage_tolerance=TOLERANCE, enforcement_interval=0.25)
    try:
        d.home.add_user("alice")
        d.home.add_dataset("ct", {"big.bin": BIG})
        d.home.grant("alice", "ct")
        (root / "reader.py").write_text(READER)
        (root / "writer.py").write_text(WRITER)
        d.start()
        yield d
    finally:
        d.stop()
        sites.stop()
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class Run:
    """One ``job run`` at hpc, and where its payload leaves its markers."""

    d: Deployment
    job_id: str
    work: Path
    proc: subprocess.Popen[str]

    @property
    def flags(self) -> Path:
        return self.work / "flags"

    def wait(self, *markers: str, timeout: float = 120) -> None:
        wait_for(lambda: all((self.flags / m).exists() for m in markers), f"{self.job_id}: {markers}", timeout,
                 self.proc)  # fmt: skip

    def go(self) -> None:
        (self.flags / "go").touch()

    def finish(self, timeout: float = 300) -> str:
        """Wait for the job to end; what it said (its exit code is ``proc.returncode``)."""
        _, err = self.proc.communicate(timeout=timeout)
        return err

    def report(self) -> dict[str, Any]:
        return json.loads((self.work / "report.json").read_text())  # type: ignore[no-any-return]

    @property
    def results(self) -> Path:
        return self.d.home.home.results / "alice" / self.job_id

    def committed(self) -> dict[str, str]:
        """The job's committed outputs (name -> content), checked against the manifest the platform verified."""
        manifest = (self.results / "MANIFEST.sha256").read_text()
        check = subprocess.run(["sha256sum", "--quiet", "-c"], input=manifest, text=True, capture_output=True,
                               cwd=self.results)  # fmt: skip
        assert check.returncode == 0, check.stdout
        return {line.split("  ", 1)[1]: (self.results / line.split("  ", 1)[1]).read_text()
                for line in manifest.splitlines()}  # fmt: skip

    def audit(self, action: str, outcome: str | None = None) -> list[Record]:
        def mine(r: Record) -> bool:
            ours = r.subject == self.job_id or r.subject.startswith(f"/results/alice/{self.job_id}/")
            return ours and (outcome is None or r.outcome == outcome)

        return [r for r in self.d.home.audit(action, until=mine, timeout=30) if mine(r)]


def start(d: Deployment, job_id: str, payload: str, *args: str, mount: bool = False,
          tolerance: float | None = None) -> Run:  # fmt: skip
    work = d.root / job_id
    (work / "flags").mkdir(parents=True)
    options = ["--job-id", job_id, "--report", str(work / "report.json"), "--outputs", str(work / "outputs")]
    if mount:
        options += ["--mount", str(work / "mnt")]
    if tolerance is not None:
        options += ["--outage-tolerance", str(tolerance)]
    env = {**d.job_environment(work), "OUT": str(work / "outputs")}
    cmd = d.job_command("alice", [sys.executable, str(d.root / payload), *args], *options)
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return Run(d, job_id, work, proc)


def reader(d: Deployment, job_id: str, ways: str, tolerance: float | None = None) -> Run:
    run = start(d, job_id, "reader.py", "/datasets/ct/big.bin", str(d.root / job_id / "flags"), ways,
                mount="mount" in ways, tolerance=tolerance)  # fmt: skip
    run.wait(*(f"ready-{w}" for w in ways.split(",")))
    return run


def assert_whole(run: Run, err: str, ways: str) -> None:
    """Finished, outputs byte-identical to a fault-free run, nothing left behind."""
    assert run.proc.returncode == 0, err
    assert run.committed() == {"started.txt": "partial\n", **{f"{w}.sha256": EXPECTED + "\n" for w in ways.split(",")}}
    rep = run.report()
    assert rep["residue"]["clean"] is True and rep["unmounted"] in (True, None)


def assert_failed_clearly(run: Run, err: str, words: str) -> None:
    """Failed with a line naming why; uploaded but not committed as complete; nothing left behind."""
    assert run.proc.returncode == 1, err
    summary = [line for line in err.splitlines() if line.startswith(f"medbridge: job {run.job_id}")]
    assert summary and re.search(words, summary[-1]), err
    assert not (run.results / "MANIFEST.sha256").exists(), "a failed job's outputs must not look complete"
    assert (run.results / "started.txt").exists(), "what it wrote is on the platform, not left on the node"
    rep = run.report()
    assert rep["committed"] is False and rep["residue"]["clean"] is True and rep["unmounted"] is True


def cut_for(d: Deployment, seconds: float, *runs: Run, reads_after: float = 0.0) -> None:
    """A silent cut of ``seconds``; the payloads go on reading (their next reads sent) ``reads_after`` into it."""
    d.sites.cut("hpc")
    try:
        time.sleep(reads_after)
        for run in runs:
            run.go()
        time.sleep(seconds - reads_after)  # the fault itself: a silent cut this long
    finally:
        d.sites.restore("hpc")


# -- silent cuts ----------------------------------------------------------------------


@needs_fuse
@pytest.mark.parametrize("seconds", [10, 60])
def test_a_silent_cut_mid_read_is_waited_out_on_the_mount_and_the_loader(world: Deployment, seconds: int) -> None:
    run = reader(world, f"cut-{seconds}", "mount,native")
    # The long cut's reads go out 20 s into it, as a job reading on would send them: TCP's back-off then brings
    # them through a few seconds after the link returns (sent at once, the first retry after 60 s comes at ~100 s;
    # recovery after long cuts is what bench outage measures).
    cut_for(world, seconds, run, reads_after=20 if seconds > 30 else 0)
    err = run.finish()
    assert_whole(run, err, "mount,native")
    outages = run.report()["outages"]
    assert any(o["seconds"] >= seconds - 1 and not o["beyond"] for o in outages), outages
    assert f"waited out {len(outages)} outage(s)" in err
    assert any(json.loads(r.detail)["seconds"] >= seconds - 1 for r in run.audit("job.outage", "survived"))


@needs_fuse
def test_a_cut_longer_than_the_tolerance_ends_the_job_with_a_line_naming_it(world: Deployment) -> None:
    run = reader(world, "cut-long", "mount,native", tolerance=8)
    world.sites.cut("hpc")
    try:
        run.go()
        run.wait("failed-mount", "failed-native")  # both readers gave up, after the tolerance
    finally:
        world.sites.restore("hpc")
    err = run.finish()
    assert_failed_clearly(run, err, r"failed: the link to the platform was down for \d+ s from .*, longer than the "
                                    r"outage tolerance of 8 s; payload exit 1")  # fmt: skip
    assert "Input/output error" in (run.flags / "failed-mount").read_text()
    assert "unreachable for" in (run.flags / "failed-native").read_text()
    assert run.audit("job.outage", "beyond_tolerance")


# -- connections that end: reset, gateway restarted, platform restarted -------------------


def _connection_ends(world: Deployment, name: str, fault: Any, recover: Any) -> tuple[Run, Run]:
    """A mount job and a loader job hold a file half read; ``fault()`` ends their connections, ``recover()``
    brings the way back once both have seen it: the loader's read resumes, the mount's open file fails."""
    mount, native = reader(world, f"{name}-m", "mount"), reader(world, f"{name}-n", "native")
    fault()
    try:
        mount.go()
        native.go()
        mount.wait("failed-mount")
        native.wait("reconnecting-native")
    finally:
        recover()
    err = native.finish()
    assert_whole(native, err, "native")
    err = mount.finish()
    assert_failed_clearly(mount, err, r"failed: (the link to the platform was (reset|down) for \d+ s from .*|the "
                                      r"mount's link to the platform broke at .*); payload exit 1")  # fmt: skip
    assert "Input/output error" in (mount.flags / "failed-mount").read_text()
    return mount, native


@needs_fuse
def test_a_reset_mid_read_resumes_the_loader_and_fails_the_mounts_open_file_clearly(world: Deployment) -> None:
    _connection_ends(world, "rst", lambda: world.reset(True), lambda: world.reset(False))


@needs_fuse
def test_gateway_restarted_mid_job(world: Deployment) -> None:
    _connection_ends(world, "gwr", world.stop_gateway, world.start_gateway)


@needs_fuse
def test_platform_restarted_mid_job_sessions_come_back_with_a_valid_certificate(world: Deployment) -> None:
    _connection_ends(world, "plr", world.stop_platform, world.start_platform)
    ended = [
        r
        for r in world.home.audit("session.end")
        if "the platform is stopping" in r.detail and '"job":"plr-n"' in r.detail
    ]
    assert ended, "the stopping platform ended the loader's sessions, and said so"
    serials = {c.serial for c in world.home.store.certificates("alice") if c.job_id == "plr-n"}
    logins = [json.loads(r.detail) for r in world.home.audit("login") if '"job":"plr-n"' in r.detail]
    stop = max(r.seq for r in ended)
    after = [r for r in world.home.audit("login") if '"job":"plr-n"' in r.detail and r.seq > stop]
    assert after, "the loader logged in again after the restart"
    assert all(d["serial"] in serials for d in logins), "with the job's own (still valid or renewed) certificate"


# -- outputs: the upload cut, the platform killed, results storage full ------------------


def _part_uploading(run: Run) -> bool:
    parts = list(run.results.glob("*.medbridge-part")) if run.results.exists() else []
    return any(p.stat().st_size > (1 << 20) for p in parts)


def _nothing_final_is_partial(run: Run) -> None:
    finals = [p for p in run.results.iterdir() if not p.name.endswith(".medbridge-part")]
    assert not (run.results / "MANIFEST.sha256").exists()
    for p in finals:
        assert hashlib.sha256(p.read_bytes()).hexdigest() == MASK_SHA, f"{p.name} is under its final name, partial"


def test_a_cut_during_the_upload_never_commits_a_partial_file_and_the_upload_goes_on(world: Deployment) -> None:
    world.limit_uploads(40)  # about 3 s for the 12 MiB output: time to cut it midway
    try:
        run = start(world, "upcut", "writer.py")
        wait_for(lambda: _part_uploading(run), "the upload under way", proc=run.proc)
        world.sites.cut("hpc")
        try:
            _nothing_final_is_partial(run)
            time.sleep(5)  # the fault itself
            _nothing_final_is_partial(run)
        finally:
            world.sites.restore("hpc")
        err = run.finish()
    finally:
        world.limit_uploads(None)
    assert run.proc.returncode == 0, err
    assert hashlib.sha256((run.results / "mask.bin").read_bytes()).hexdigest() == MASK_SHA
    assert "mask.bin" in (run.results / "MANIFEST.sha256").read_text()
    assert run.report()["residue"]["clean"] is True
    assert run.audit("results.commit", "ok") and run.audit("job.outage", "survived")


def test_platform_killed_while_a_job_writes_leaves_nothing_half_written_as_a_result(world: Deployment) -> None:
    world.limit_uploads(40)
    try:
        run = start(world, "kill", "writer.py")
        wait_for(lambda: _part_uploading(run), "the upload under way", proc=run.proc)
        world.stop_platform(signal.SIGKILL)
        try:
            _nothing_final_is_partial(run)
        finally:
            world.start_platform()
        _nothing_final_is_partial(run)  # after the restart too, before the job finishes its upload
        err = run.finish()
    finally:
        world.limit_uploads(None)
    assert run.proc.returncode == 0, err
    assert hashlib.sha256((run.results / "mask.bin").read_bytes()).hexdigest() == MASK_SHA
    assert run.audit("results.commit", "ok")
    assert run.report()["residue"]["clean"] is True


@pytest.fixture
def full_results(platform: RunningPlatform) -> Iterator[RunningPlatform]:
    """The platform's results storage is a 512 KiB file system of its own (loopback: no network in play)."""
    results = platform.home.results
    results.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k,mode=0750", "medbridge-test-full", str(results)],
                   check=True)  # fmt: skip
    try:
        yield platform
    finally:
        subprocess.run(["umount", str(results)], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small results file system needs root")
def test_results_storage_full_is_a_clear_error_nothing_is_committed_and_others_are_served(
    full_results: RunningPlatform,
) -> None:
    p = full_results
    outputs = p.root / "job" / "outputs"
    r = job_run(p, f"mkdir -p {outputs} && head -c 2000000 /dev/urandom > {outputs}/mask.bin", "--job-id", "full",
                "--outputs", str(outputs))  # fmt: skip
    assert r.returncode == 9, r.stderr
    assert (
        "uploading outputs to /results/alice/full failed: the platform refused it: No space left on device" in r.stderr
    )
    res = p.home.results / "alice" / "full"
    # a write the file system cut short was once answered OK: the truncated file then took its final name
    assert not (res / "MANIFEST.sha256").exists() and not (res / "mask.bin").exists()
    assert (outputs / "mask.bin").stat().st_size == 2000000, "kept on the node for a retry"
    failed = [x for x in p.audit("sftp.write") if x.outcome == "failed"]
    assert failed and "No space left on device" in failed[-1].detail
    out = p.root / "copy.bin"
    other = job_run(p, f'sftp -q -b - -F "$MEDBRIDGE_SSH_CONFIG" medbridge <<EOF\nget /datasets/chest/scan-001.bin '
                       f'{out}\nEOF', "--job-id", "other")  # fmt: skip
    assert other.returncode == 0, other.stderr
    assert out.read_bytes() == CHEST["scan-001.bin"], "the platform keeps serving others"
    shutil.rmtree(outputs)
