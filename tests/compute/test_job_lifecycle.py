"""The whole job: mount, compute, write back, and leave nothing behind — also when it fails."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import asyncssh
import pydicom
import pytest

from medbridge.compute.residue import scan
from medbridge.compute.session import MAX_FRUITLESS
from medbridge.platform.sftp import JobSFTPServer, OpenFile
from medbridge.policy.sessions import CertificateFact
from medbridge.testing import RunningPlatform
from medbridge.testing.wait import HANG, Lines, until
from tests.compute.test_job_run import job_cmd, job_env, job_run
from tests.compute.test_residue import dicom, nifti1
from tests.conftest import CHEST

needs_fuse = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or shutil.which("sshfs") is None,
    reason="needs /dev/fuse and sshfs (apt-get install sshfs)",
)


def report(p: RunningPlatform) -> dict[str, object]:
    return json.loads((p.root / "job" / "report.json").read_text())  # type: ignore[no-any-return]


def results(p: RunningPlatform, job: str) -> Path:
    return p.home.results / "alice" / job


@needs_fuse
def test_mount_compute_write_back_and_teardown(platform: RunningPlatform) -> None:
    mnt = platform.root / "job" / "mnt"
    script = (
        'test "$MEDBRIDGE_MOUNT" = ' + str(mnt) + " && "
        'sha256sum "$MEDBRIDGE_MOUNT/datasets/chest/scan-001.bin" | cut -d" " -f1 > "$MEDBRIDGE_RESULTS/sum.txt" && '
        'ls -A "$MEDBRIDGE_MOUNT/datasets/chest" > listing.txt && echo "$SSH_AUTH_SOCK" > sock.txt'
    )
    platform.root.joinpath("job").mkdir(exist_ok=True)
    r = job_run(
        platform, script, "--job-id", "m1", "--mount", str(mnt), "--report", str(platform.root / "job" / "report.json")
    )
    assert r.returncode == 0, r.stderr
    digest = hashlib.sha256(CHEST["scan-001.bin"]).hexdigest()
    assert (results(platform, "m1") / "sum.txt").read_text().strip() == digest
    work = platform.root / "job" / "work"
    assert (work / "listing.txt").read_text().split() == [
        ".manifest",
        ".manifest.index",
        "labels",
        "scan-001.bin",
        "scan-002.bin",
    ]
    assert not os.path.ismount(mnt) and not mnt.exists()
    assert not Path((work / "sock.txt").read_text().strip()).exists()
    rep = report(platform)
    assert rep["unmounted"] is True and rep["agent_stopped"] is True
    assert rep["residue"]["clean"] is True  # type: ignore[index]
    scans = platform.audit("residue.reported")
    assert scans and scans[-1].subject == "m1" and scans[-1].outcome == "claims-clean"


def test_outputs_are_uploaded_committed_and_wiped(platform: RunningPlatform) -> None:
    outputs = platform.root / "job" / "outputs"
    script = f'mkdir -p {outputs}/masks && printf lung > {outputs}/masks/m1.bin && printf "x" > {outputs}/log.txt'
    platform.root.joinpath("job").mkdir(exist_ok=True)
    r = job_run(platform, script, "--job-id", "o1", "--outputs", str(outputs))
    assert r.returncode == 0, r.stderr
    res = results(platform, "o1")
    assert (res / "masks" / "m1.bin").read_bytes() == b"lung"
    manifest = (res / "MANIFEST.sha256").read_text()
    check = subprocess.run(["sha256sum", "-c"], input=manifest, text=True, capture_output=True, cwd=res)
    assert check.returncode == 0, check.stdout
    assert not [p for p in res.rglob("*") if p.name.endswith(".medbridge-part")]
    assert list(outputs.iterdir()) == []
    commits = platform.audit("results.commit")
    assert commits and commits[-1].outcome == "ok" and '"files":2' in commits[-1].detail


class DropAfterFirstFile(JobSFTPServer):
    """Fault: the connection drops while the second output file is being written."""

    writes = 0

    def write(self, file_obj: object, offset: int, data: bytes) -> int:
        assert isinstance(file_obj, OpenFile)
        if "b.bin" in file_obj.path:
            DropAfterFirstFile.writes += 1
            self.connection.abort()
            raise asyncssh.SFTPConnectionLost("dropped by the test")
        return super().write(file_obj, offset, data)


def test_interrupted_upload_never_looks_complete_and_a_retry_finishes_it(platform: RunningPlatform) -> None:
    outputs = platform.root / "job" / "outputs"
    make = f"mkdir -p {outputs} && printf aaa > {outputs}/a.bin && head -c 100000 /dev/zero > {outputs}/b.bin"
    platform.root.joinpath("job").mkdir(exist_ok=True)
    assert platform.platform is not None
    platform.platform.sftp_class = DropAfterFirstFile
    r = job_run(platform, make, "--job-id", "u1", "--outputs", str(outputs))
    # the first attempt placed a.bin; then MAX_FRUITLESS attempts that moved nothing before it gave up
    assert DropAfterFirstFile.writes == 1 + MAX_FRUITLESS
    assert r.returncode == 9, r.stderr
    assert "outputs NOT uploaded" in r.stderr and "--job-id u1" in r.stderr
    res = results(platform, "u1")
    assert not (res / "MANIFEST.sha256").exists()
    assert not (res / "b.bin").exists()
    assert sorted(p.name for p in outputs.iterdir()) == ["a.bin", "b.bin"], "outputs are kept for the retry"

    platform.platform.sftp_class = JobSFTPServer
    r = job_run(platform, "true", "--job-id", "u1", "--outputs", str(outputs))
    assert r.returncode == 0, r.stderr
    assert (res / "b.bin").read_bytes() == b"\0" * 100000
    assert "b.bin" in (res / "MANIFEST.sha256").read_text()


class WriteDuringUpload(JobSFTPServer):
    """The payload's leftovers at work while the upload runs: a new output appears, an uploaded one grows."""

    outputs: Path

    def write(self, file_obj: object, offset: int, data: bytes) -> int:
        assert isinstance(file_obj, OpenFile)
        late = self.outputs / "late" / "new.txt"
        if "b.bin" in file_obj.path and not late.exists():
            late.parent.mkdir()
            late.write_text("written after the upload began")
            with open(self.outputs / "a.bin", "ab") as f:
                f.write(b" and more")
        return super().write(file_obj, offset, data)


def _two_outputs_served_by(
    platform: RunningPlatform, server: type[WriteDuringUpload | ReplaceDuringUpload], job_id: str
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """A job that writes a.bin and b.bin to its outputs, its upload served by ``server`` (which acts mid-upload)."""
    outputs = platform.root / "job" / "outputs"
    platform.root.joinpath("job").mkdir(exist_ok=True)
    assert platform.platform is not None
    server.outputs = outputs
    platform.platform.sftp_class = server
    r = job_run(platform, f"mkdir -p {outputs} && printf aaa > {outputs}/a.bin && printf bbb > {outputs}/b.bin",
                "--job-id", job_id, "--outputs", str(outputs))  # fmt: skip
    return r, outputs


def test_outputs_written_during_the_upload_are_kept_not_wiped(platform: RunningPlatform) -> None:
    r, outputs = _two_outputs_served_by(platform, WriteDuringUpload, "w1")
    assert r.returncode == 0, r.stderr
    assert "2 files appeared or changed in --outputs" in r.stderr and "not uploaded, kept" in r.stderr
    assert (results(platform, "w1") / "MANIFEST.sha256").exists()
    assert (outputs / "late" / "new.txt").read_text() == "written after the upload began"
    assert (outputs / "a.bin").read_bytes() == b"aaa and more", "changed after it was uploaded: kept"
    assert not (outputs / "b.bin").exists(), "uploaded and unchanged: wiped"


class ReplaceDuringUpload(JobSFTPServer):
    """The payload's leftovers at work while the upload runs: an output not yet uploaded is removed or replaced."""

    outputs: Path
    by = "nothing"

    def write(self, file_obj: object, offset: int, data: bytes) -> int:
        assert isinstance(file_obj, OpenFile)
        b = self.outputs / "b.bin"
        if self.by == "a FIFO, during its own upload":
            if "b.bin" in file_obj.path and b.is_file():
                b.unlink()
                os.mkfifo(b)  # reading or hashing it by name afterwards would block for good
        elif "a.bin" in file_obj.path and b.is_file() and not b.is_symlink():
            b.unlink()
            if self.by == "a FIFO":  # opening it to read would block the upload for good
                os.mkfifo(b)
            elif self.by == "a folder":
                b.mkdir()
            elif self.by == "a link":
                b.symlink_to("/etc/hostname")
        return super().write(file_obj, offset, data)


@pytest.mark.parametrize(
    ("by", "words"),
    [("nothing", "the output 'b.bin' could not be read (No such file or directory) (removed or replaced"),
     ("a FIFO", "the output 'b.bin' is no longer a regular file"),
     ("a folder", "the output 'b.bin' is no longer a regular file"),
     ("a link", "the output 'b.bin' is no longer a regular file")],
)  # fmt: skip
def test_an_output_removed_or_replaced_during_the_upload_fails_it_at_once_naming_it(
    platform: RunningPlatform, by: str, words: str
) -> None:
    """Before, a removed file was taken for a dropped link (three attempts, then an error that named none), a FIFO
    hung the upload for good, and a folder or link was reported as the platform's refusal."""
    ReplaceDuringUpload.by = by
    r, outputs = _two_outputs_served_by(platform, ReplaceDuringUpload, "d1")
    assert r.returncode == 9, r.stderr
    assert words in r.stderr, r.stderr
    assert "attempts" not in r.stderr and "the platform refused" not in r.stderr
    assert "Traceback" not in r.stderr
    assert not (results(platform, "d1") / "MANIFEST.sha256").exists(), "nothing looks complete"
    assert (outputs / "a.bin").read_bytes() == b"aaa", "kept for the retry"


def test_an_output_replaced_by_a_fifo_during_its_own_upload_is_committed_as_sent_and_the_fifo_kept(
    platform: RunningPlatform,
) -> None:
    """The upload sends and hashes the file it opened, not whatever the name points to later (asyncssh's put
    reopened it by name, and the hash was taken by name: a FIFO put there blocked the upload for good)."""
    ReplaceDuringUpload.by = "a FIFO, during its own upload"
    r, outputs = _two_outputs_served_by(platform, ReplaceDuringUpload, "f1")
    assert r.returncode == 0, r.stderr
    manifest = (results(platform, "f1") / "MANIFEST.sha256").read_text()
    assert f"{hashlib.sha256(b'bbb').hexdigest()}  b.bin" in manifest, manifest
    assert (results(platform, "f1") / "b.bin").read_bytes() == b"bbb"
    assert stat.S_ISFIFO((outputs / "b.bin").lstat().st_mode), "changed after it was read: kept, not wiped"


def test_an_output_with_a_name_that_is_not_utf8_is_refused_and_the_teardown_completes(
    platform: RunningPlatform,
) -> None:
    tmp = platform.root / "job"
    outputs = tmp / "outputs"
    script = f"mkdir -p {outputs}; printf ok > {outputs}/ok.txt; printf bad > {outputs}/$(printf '\\377').bin"
    code, rep = _teardown_after(platform, script, "--job-id", "nu1", "--outputs", str(outputs), "--purge")
    assert code == 9
    assert "is not UTF-8" in rep["upload_error"] and rep["committed"] is None
    assert sorted(os.listdir(os.fsencode(outputs))) == [b"ok.txt", b"\xff.bin"], "outputs kept"
    assert not (results(platform, "nu1") / "MANIFEST.sha256").exists()
    assert rep["agent_stopped"] is True and rep["teardown_errors"] == []
    assert rep["residue"]["files_scanned"] >= 1
    assert not list((tmp / "jobtmp").glob("medbridge-*")), "the job's folders are removed"
    assert platform.audit("residue.reported", until=lambda r: r.subject == "nu1"), "the platform is told it ended"


def test_platform_refuses_a_manifest_that_does_not_match(platform: RunningPlatform) -> None:
    async def go() -> None:
        key, cred = await platform.credential("alice", job_id="t1")
        async with await platform.connect("alice", [(key, cred.certificate)]) as conn:
            sftp = await conn.start_sftp_client()
            async with sftp.open("/results/alice/t1/out.bin", "wb") as f:
                await f.write(b"real")
            wrong = hashlib.sha256(b"fake").hexdigest()
            async with sftp.open("/results/alice/t1/m.part", "wb") as f:
                await f.write(f"{wrong}  out.bin\n".encode())
            with pytest.raises(asyncssh.SFTPFailure, match="does not match"):
                await sftp.posix_rename("/results/alice/t1/m.part", "/results/alice/t1/MANIFEST.sha256")

    asyncio.run(go())
    assert not (results(platform, "t1") / "MANIFEST.sha256").exists()
    refused = [r for r in platform.audit("results.commit") if r.outcome == "refused"]
    assert refused and "out.bin does not match" in refused[-1].detail


#: A payload waits for a file the test makes (``{0}``), doing ``{1}`` meanwhile; bounded: a failed test leaves no job.
_WAIT = "n=0; while [ ! -e {0} ]; do {1}n=$((n+1)); [ $n -lt 3000 ] || exit 99; sleep 0.1; done; "


@contextlib.contextmanager
def _ended_if_failed(proc: subprocess.Popen[str]) -> Iterator[None]:
    """A test that fails while its job runs ends the job (job run tears down on SIGTERM) instead of waiting for it."""
    try:
        yield
    except BaseException:
        proc.terminate()
        raise


def _teardown_after(
    platform: RunningPlatform,
    script: str,
    *extra: str,
    sig: int | None = None,
    during: Callable[[], None] | None = None,
) -> tuple[int, dict]:
    """Run a job; once its payload runs, call ``during`` and send ``sig`` if given; return its exit code and report."""
    tmp = platform.root / "job"
    (tmp / "work").mkdir(parents=True, exist_ok=True)
    marker = tmp / "started"
    # harmless.txt first: the marker lets the test signal the job, whose residue scan must find a file
    cmd = job_cmd(platform, f"touch harmless.txt {marker}; {script}", "--report", str(tmp / "report.json"), *extra)
    with (
        subprocess.Popen(cmd, env=job_env(tmp), cwd=tmp / "work", stderr=subprocess.PIPE, text=True) as proc,
        _ended_if_failed(proc),
    ):
        assert proc.stderr is not None
        said = Lines(proc.stderr)
        if sig is not None or during is not None:
            until(lambda: marker.exists() or proc.poll() is not None, "the payload to start")
            assert marker.exists(), f"the job ended before its payload ran:\n{said.join()}"
            if during is not None:
                during()
            if sig is not None:
                proc.send_signal(sig)
        proc.wait(timeout=HANG)
        err = said.join()
    assert (tmp / "report.json").exists(), err
    return proc.returncode, json.loads((tmp / "report.json").read_text())


@pytest.fixture
def clean_sockets(platform: RunningPlatform) -> Iterator[None]:
    """The job's private folder and its emptied $TMPDIR are gone after it (both live in the job's TMPDIR)."""
    yield
    left = list((platform.root / "job" / "jobtmp").glob("medbridge-*"))
    assert left == [], "job folders must be removed"


@needs_fuse
@pytest.mark.parametrize(
    ("script", "sig", "expected"),
    [
        ("sleep 60", signal.SIGTERM, 128 + 15),
        ("sleep 60", signal.SIGINT, 128 + 2),
        ("kill -SEGV $$", None, 128 + 11),
        ("exit 4", None, 4),
    ],
    ids=["sigterm", "sigint", "crash", "failure"],
)
def test_teardown_always_runs(
    platform: RunningPlatform, clean_sockets: None, script: str, sig: int | None, expected: int
) -> None:
    mnt = platform.root / "job" / "mnt"
    code, rep = _teardown_after(platform, script, "--mount", str(mnt), "--purge", sig=sig)
    assert code == expected
    assert rep["unmounted"] is True and not os.path.ismount(mnt)
    assert rep["agent_stopped"] is True
    assert rep["residue"]["clean"] is True and rep["residue"]["files_scanned"] >= 1
    assert platform.audit("residue.reported")


def test_copied_dataset_files_are_found_purged_and_reported(platform: RunningPlatform) -> None:
    tmpdir = platform.root / "job" / "jobtmp"
    script = (
        'sftp -q -b - -F "$MEDBRIDGE_SSH_CONFIG" "$MEDBRIDGE_SSH_HOST" <<EOF\n'
        "get /datasets/chest/scan-001.bin copy-in-workdir.bin\n"
        f"get /datasets/chest/scan-002.bin {tmpdir}/copy-in-tmp.bin\n"
        "EOF\n"
        "mkdir -p cache && cp copy-in-workdir.bin cache/renamed.tmp && "
        f"printf '%s' '{dicom().hex()}' | xxd -r -p > slice.dcm 2>/dev/null || python3 -c "
        f"\"open('slice.dcm','wb').write(bytes.fromhex('{dicom().hex()}'))\""
    )
    code, rep = _teardown_after(platform, script, "--purge", "--scratch", ".")
    assert code == 0
    found = {Path(f["path"]).name: (f["reason"], f["purged"]) for f in rep["residue"]["findings"]}
    assert found == {
        "copy-in-workdir.bin": ("copy of dataset file chest/scan-001.bin", True),
        "renamed.tmp": ("copy of dataset file chest/scan-001.bin", True),
        "copy-in-tmp.bin": ("copy of dataset file chest/scan-002.bin", True),
        "slice.dcm": ("DICOM preamble", True),
    }
    work = platform.root / "job" / "work"
    assert not (work / "copy-in-workdir.bin").exists() and not (tmpdir / "copy-in-tmp.bin").exists()
    scans = platform.audit("residue.reported")
    assert scans[-1].outcome == "claims-purged" and '"found":4' in scans[-1].detail and '"purged":4' in scans[-1].detail


def _venv_with_pydicom(folder: Path) -> list[Path]:
    """A virtual environment with pydicom installed, as a user keeps in a working folder; its DICOM files.

    pydicom is copied in from this environment, package and metadata, as pip would lay it
    out (there is no package index to install from here); it ships DICOM test files.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, capture_output=True)
    site = next((folder / "lib").glob("python3*/site-packages"))
    package = Path(pydicom.__file__).parent
    shutil.copytree(package, site / "pydicom")
    for meta in package.parent.glob("pydicom-*.dist-info"):
        shutil.copytree(meta, site / meta.name)
    return [Path(f.path) for f in scan([site / "pydicom"], {}).findings]


def _contents(folder: Path) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def test_a_purge_deletes_only_what_the_job_brought(platform: RunningPlatform) -> None:
    """The working folder is the user's (a virtual environment with pydicom's DICOM files, their own
    NIfTI atlas): nothing of theirs is deleted, all of it reported as pre-existing.  The job's copy of a
    dataset file is deleted wherever it is; the medical files it wrote in its own folders ($TMPDIR, a
    --scratch folder) are deleted; one it wrote in the user's folder is left and reported, not proven ours.
    The user's files equal to dataset files are not deleted: an empty ``__init__.py`` and a note equal to a
    dataset's one-line readme prove nothing; a copy of a dataset file that was there before the job (which
    the payload chmods, so only its inode says so) is the user's."""
    tmp = platform.root / "job"
    work, scratch = tmp / "work", tmp / "scratch"
    work.mkdir(parents=True, exist_ok=True)
    scratch.mkdir()
    bundled = _venv_with_pydicom(work / ".venv")
    assert len(bundled) > 100
    (work / "atlas.nii").write_bytes(nifti1())
    (scratch / "old.dcm").write_bytes(dicom())
    (work / "pkg").mkdir()
    (work / "pkg" / "__init__.py").write_bytes(b"")
    (work / "notes.txt").write_bytes(CHEST["labels/readme.txt"])
    (work / "mine.bin").write_bytes(CHEST["scan-001.bin"])
    before = {**_contents(work), **_contents(scratch)}
    dcm = dicom().hex()
    script = (
        'sftp -q -b - -F "$MEDBRIDGE_SSH_CONFIG" "$MEDBRIDGE_SSH_HOST" <<EOF\n'
        "get /datasets/chest/scan-001.bin copy.bin\n"
        "EOF\n"
        "chmod 600 mine.bin\n"
        f"{sys.executable} -c \"import os, sys; [open(p, 'wb').write(bytes.fromhex('{dcm}')) for p in sys.argv[1:]]\" "
        f'"$TMPDIR/slice.dcm" {scratch}/new.dcm made.dcm'
    )
    code, rep = _teardown_after(platform, script, "--purge", "--scratch", str(scratch))
    assert code == 0
    residue = rep["residue"]
    found = {str(Path(f["path"]).relative_to(tmp)): f["purged"] for f in residue["findings"]}
    slice_ = next(k for k in found if k.endswith("/slice.dcm"))
    assert slice_.startswith("jobtmp/medbridge-tmp-")
    assert found == {"work/copy.bin": True, "scratch/new.dcm": True, slice_: True, "work/made.dcm": False,
                     "work/mine.bin": False}  # fmt: skip
    why = {Path(f["path"]).name: f["why"] for f in residue["findings"]}
    assert "outside the job's own folders" in why["made.dcm"] and "own folder" in why["new.dcm"]
    assert "there before the job started" in why["mine.bin"]
    after = {**_contents(work), **_contents(scratch)}
    assert {p: after.get(p) for p in before} == before, "nothing that was there before the job is deleted or changed"
    assert sorted(p.relative_to(tmp) for p in set(after) - set(before)) == [Path("work/harmless.txt"),
                                                                           Path("work/made.dcm")]  # fmt: skip
    old = {Path(f["path"]) for f in residue["preexisting"]}
    assert old == {*bundled, work / "atlas.nii", scratch / "old.dcm", work / "notes.txt"}
    assert all(f["why"].startswith("pre-existing ") and "not ours" in f["why"] for f in residue["preexisting"])
    assert residue["clean"] is False, "a medical file the job left unproven is residue"
    assert not list((tmp / "jobtmp").glob("medbridge-tmp-*")), "the job's emptied $TMPDIR is removed"
    scans = platform.audit("residue.reported", until=lambda r: True)  # the report may be recorded after job run exits
    assert scans, f"the job's end was not recorded: {rep['end_error']}"
    claim = json.loads(scans[-1].detail)["claim"]
    assert scans[-1].outcome == "claims-residue" and claim["found"] == 5 and claim["purged"] == 3
    assert claim["preexisting"] == len(old)


@pytest.fixture
def short_platform(tmp_path: Path) -> Iterator[RunningPlatform]:
    """Certificates live 4 s at most: a job renews every few seconds."""
    p = RunningPlatform(tmp_path, enforcement_interval=0.25, max_certificate_lifetime=4)
    p.add_user("alice")
    p.add_dataset("chest", CHEST)
    p.grant("alice", "chest")
    with p:
        yield p


@needs_fuse
def test_long_job_renews_its_certificate_and_keeps_its_mount(short_platform: RunningPlatform) -> None:
    """The payload reads through the mount until two renewals have happened and its first certificate
    has ended, then reads once more: every read must work."""
    p = short_platform
    mnt, stop = p.root / "job" / "mnt", p.root / "job" / "stop"
    read = 'cat "$MEDBRIDGE_MOUNT/datasets/chest/scan-002.bin" > /dev/null || exit 7'
    script = f"{_WAIT.format(stop, read + '; ')}{read}"

    def renewed_twice() -> list[CertificateFact]:
        issued = [c for c in p.store.certificates("alice") if c.job_id == "renew"]
        return issued if len(issued) >= 3 else []

    def after_two_renewals() -> None:
        first = min(c.valid_before for c in until(renewed_twice, "two renewals"))
        until(lambda: datetime.now(UTC) > first, "the first certificate to end")
        stop.touch()

    code, rep = _teardown_after(p, script, "--mount", str(mnt), "--job-id", "renew", during=after_two_renewals)
    assert code == 0
    assert rep["renewals"] >= 2
    issued = [c for c in p.store.certificates("alice") if c.job_id == rep["job_id"]]
    assert len(issued) == 1 + rep["renewals"]
    ended = [r for r in p.audit("session.end") if "expired" in r.detail]
    assert ended == [], "a renewed job's sessions must not be cut at the first certificate's end"


def test_refused_renewal_ends_data_access_and_says_why(short_platform: RunningPlatform) -> None:
    """The grant is revoked while the job runs: its next renewal is refused, said on its standard error,
    and once its certificate has ended the payload's next listing fails."""
    p = short_platform
    tmp = p.root / "job"
    (tmp / "work").mkdir(parents=True, exist_ok=True)
    listed, go = tmp / "listed", tmp / "go"
    ls = 'sftp -q -b - -F "$MEDBRIDGE_SSH_CONFIG" "$MEDBRIDGE_SSH_HOST" <<EOF\nls /datasets\nEOF\n'
    script = f"{ls}[ $? = 0 ] || exit 9\ntouch {listed}\n{_WAIT.format(go, '')}\n{ls}"
    with (
        subprocess.Popen(
            job_cmd(p, script, "--report", str(tmp / "report.json"), "--job-id", "refused"),
            env=job_env(tmp),
            cwd=tmp / "work",
            stderr=subprocess.PIPE,
            text=True,
        ) as proc,
        _ended_if_failed(proc),
    ):
        assert proc.stderr is not None
        said = Lines(proc.stderr)
        until(lambda: listed.exists() or proc.poll() is not None, "the payload's first listing")
        assert listed.exists(), said.join()
        p.store.revoke("alice", "chest", datetime.now(UTC), "test")
        said.wait_for("certificate renewal refused")
        last = max(c.valid_before for c in p.store.certificates("alice") if c.job_id == "refused")
        until(lambda: datetime.now(UTC) > last, "the job's last certificate to end")
        go.touch()
        proc.wait(timeout=HANG)
        err = said.join()
    assert proc.returncode != 0, "the second listing must fail once the certificate lapsed"
    assert "certificate renewal refused" in err and "no live grant" in err
    assert json.loads((tmp / "report.json").read_text())["renewal_refused"]


def test_committed_results_are_frozen_and_the_manifest_cannot_be_forged(platform: RunningPlatform) -> None:
    async def go() -> None:
        key, cred = await platform.credential("alice", job_id="f1")
        async with await platform.connect("alice", [(key, cred.certificate)]) as conn:
            sftp = await conn.start_sftp_client()
            with pytest.raises(asyncssh.SFTPPermissionDenied, match="only by committing"):
                async with sftp.open("/results/alice/f1/MANIFEST.sha256", "wb") as f:
                    await f.write(b"0" * 64 + b"  ghost.bin\n")
            async with sftp.open("/results/alice/f1/out.bin", "wb") as f:
                await f.write(b"real")
            digest = hashlib.sha256(b"real").hexdigest()
            async with sftp.open("/results/alice/f1/twice.part", "wb") as f:
                await f.write(f"{digest}  out.bin\n{digest}  out.bin\n".encode())
            with pytest.raises(asyncssh.SFTPFailure, match="names a file twice"):
                await sftp.posix_rename("/results/alice/f1/twice.part", "/results/alice/f1/MANIFEST.sha256")
            async with sftp.open("/results/alice/f1/m.part", "wb") as f:
                await f.write(f"{digest}  out.bin\n".encode())
            await sftp.posix_rename("/results/alice/f1/m.part", "/results/alice/f1/MANIFEST.sha256")
            with pytest.raises(asyncssh.SFTPPermissionDenied, match="committed"):
                async with sftp.open("/results/alice/f1/out.bin", "wb") as f:
                    await f.write(b"fake")
            with pytest.raises(asyncssh.SFTPPermissionDenied, match="committed"):
                await sftp.remove("/results/alice/f1/out.bin")
            with pytest.raises(asyncssh.SFTPPermissionDenied):
                await sftp.remove("/results/alice/f1/MANIFEST.sha256")

    asyncio.run(go())
    assert (results(platform, "f1") / "out.bin").read_bytes() == b"real"
    commits = [r for r in platform.audit("results.commit") if r.outcome == "ok"]
    assert commits and "manifest_sha256" in commits[-1].detail


def test_a_session_that_escapes_the_job_is_ended_when_the_job_ends(platform: RunningPlatform) -> None:
    """A payload leaves a process holding an SFTP session; ending the job revokes its certificates."""
    log = platform.root / "escaped.log"
    holder = platform.root / "holder.py"
    holder.write_text(
        "import asyncio, os, pathlib\n"
        "from medbridge.compute.session import connect, endpoint_from_job\n"
        "async def main():\n"
        "    async with await connect(endpoint_from_job(os.environ)) as conn:\n"
        "        sftp = await conn.start_sftp_client()\n"
        f"        pathlib.Path('{log}').write_text('holding\\n')\n"
        "        for _ in range(600):\n"
        "            try:\n"
        "                await sftp.stat('/datasets/chest')\n"
        "            except Exception as exc:\n"
        f"                pathlib.Path('{log}').write_text('cut off\\n'); return\n"
        "            await asyncio.sleep(0.1)\n"
        "asyncio.run(main())\n"
    )
    script = f"setsid {sys.executable} {holder} </dev/null >/dev/null 2>&1 & while [ ! -s {log} ]; do sleep 0.1; done"
    r = job_run(platform, script, "--job-id", "esc")
    assert r.returncode == 0, r.stderr
    until(lambda: log.read_text() == "cut off\n", "the escaped session to be cut off when the job ends")
    ends = [e for e in platform.audit("session.end") if '"job":"esc"' in e.detail]
    assert any("certificate revoked" in e.detail for e in ends)
    assert [e for e in platform.audit("job.end") if e.subject == "esc"]


@needs_fuse
def test_a_revoked_grant_is_an_access_error_on_the_mount_and_job_run_says_why(platform: RunningPlatform) -> None:
    """Issue 14, item 9a: the grant is revoked mid-job; the mount's next read must not say "no such file"."""
    tmp = platform.root / "job"
    work, mnt = tmp / "work", tmp / "mnt"
    work.mkdir(parents=True)
    script = (
        'cat "$MEDBRIDGE_MOUNT/datasets/chest/scan-001.bin" > /dev/null && touch read; '
        "while [ ! -e revoked ]; do sleep 0.05; done; "
        'cat "$MEDBRIDGE_MOUNT/datasets/chest/scan-002.bin" > /dev/null 2> err.txt'
    )
    cmd = job_cmd(platform, script, "--job-id", "rv", "--mount", str(mnt))
    with subprocess.Popen(cmd, env=job_env(tmp), cwd=work, stderr=subprocess.PIPE, text=True) as proc:
        until(lambda: (work / "read").exists() or proc.poll() is not None, "the payload's first read")
        assert proc.poll() is None, proc.communicate()[1]
        platform.store.revoke("alice", "chest", datetime.now(UTC), "test")
        platform.audit("session.end", until=lambda r: "grant ended" in r.detail)
        (work / "revoked").touch()
        _, err = proc.communicate(timeout=120)
    seen = (work / "err.txt").read_text()
    assert proc.returncode == 1 and seen, err
    assert "No such file or directory" not in seen, "a revoked grant looked like a missing file"
    said = [line for line in err.splitlines() if "data access ended during the job" in line]
    assert said and "no live grant left for user 'alice'" in said[0], err
