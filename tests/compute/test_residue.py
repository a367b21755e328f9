"""Residue scan: signatures of medical images, dataset copies by SHA-256, purge, and the CLI."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import struct
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from medbridge.compute.residue import JobContext, inventory, load_manifests, purge, scan, signature
from medbridge.errors import InvalidInput


def dicom() -> bytes:
    return b"\0" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00" + b"\0" * 200


def nifti1() -> bytes:
    hdr = bytearray(352)
    struct.pack_into("<i", hdr, 0, 348)
    hdr[344:348] = b"n+1\0"
    return bytes(hdr)


def nifti2() -> bytes:
    hdr = bytearray(544)
    struct.pack_into("<i", hdr, 0, 540)
    hdr[4:12] = b"n+2\0\r\n\x1a\n"
    return bytes(hdr)


SAMPLES = {
    "a.dcm": (dicom(), "DICOM preamble"),
    "b.nii": (nifti1(), "NIfTI-1 header"),
    "c.nii": (nifti2(), "NIfTI-2 header"),
    "d.nrrd": (b"NRRD0004\ntype: short\ndimension: 3\n", "NRRD header"),
    "e.mha": (b"ObjectType = Image\nNDims = 3\nElementType = MET_SHORT\n", "MetaImage header"),
    "f.nii.gz": (gzip.compress(nifti1()), "NIfTI-1 header"),
}


def test_signatures() -> None:
    for name, (data, reason) in SAMPLES.items():
        head = gzip.decompress(data) if name.endswith(".gz") else data
        assert signature(head) == reason, name
    for harmless in (b"", b"hello world\n", b"\0" * 2000, b"ObjectType = Image\n", b"DICM" + b"\0" * 200):
        assert signature(harmless) is None


def changed_after(folder: Path, t: float) -> float:
    """The file-system clock's first tick after ``t`` (ctimes move in ticks of a few ms): wait on the clock itself."""
    probe = folder / ".clock"
    for _ in range(100_000):
        probe.write_bytes(b"")
        now = probe.stat().st_ctime
        if now > t:
            probe.unlink()
            return now
    raise AssertionError("the file-system clock did not move")


def test_scan_by_hand_finds_everything_and_purges_only_dataset_copies(tmp_path: Path) -> None:
    work = tmp_path / "work"
    (work / "deep" / "er").mkdir(parents=True)
    for name, (data, _) in SAMPLES.items():
        (work / name).write_bytes(data)
    secret = os.urandom(5000)
    (work / "deep" / "er" / "copy.bin").write_bytes(secret)
    (work / "model.pt").write_bytes(os.urandom(3000))
    (work / "link").symlink_to(work / "a.dcm")
    known = load_manifests([f"{hashlib.sha256(secret).hexdigest()}  scans/ct-7.raw\n"])
    report = scan([work], known)
    found = {Path(f.path).name: f.reason for f in report.findings}
    assert found == {**{n: r for n, (_, r) in SAMPLES.items()}, "copy.bin": "copy of dataset file scans/ct-7.raw"}
    assert {Path(f.path).name for f in report.findings if f.ours} == {"copy.bin"}
    assert all("no job to tie it to" in f.why for f in report.findings if not f.ours)
    assert report.files_scanned == len(SAMPLES) + 2
    assert not report.clean
    purge(report)
    assert [Path(f.path).name for f in report.findings if f.purged] == ["copy.bin"]
    assert not report.clean, "medical files not proven platform data are left, and said so"
    assert sorted(p.name for p in work.rglob("*") if p.is_file() or p.is_symlink()) == sorted(
        [*SAMPLES, "link", "model.pt"]
    )


def test_a_job_purges_only_what_it_brought(tmp_path: Path) -> None:
    """Pre-existing medical files are reported and kept, even in the job's own folder; new ones
    are purged in its own folder and left (not clean) elsewhere; dataset copies go wherever they are."""
    own, shared = tmp_path / "own", tmp_path / "shared"
    own.mkdir()
    shared.mkdir()
    for folder in (own, shared):
        (folder / "theirs.nii").write_bytes(nifti1())
        (folder / "theirs.dcm").write_bytes(dicom())
    started = changed_after(tmp_path, max((f / "theirs.dcm").stat().st_ctime for f in (own, shared)))
    secret = os.urandom(4000)
    for folder in (own, shared):
        (folder / "new.dcm").write_bytes(dicom())
        (folder / "copy.raw").write_bytes(secret)
    (own / "theirs.dcm").write_bytes(dicom() + b"changed by the job")
    known = load_manifests([f"{hashlib.sha256(secret).hexdigest()}  ct/1.raw\n"])
    report = purge(scan([shared], known, job=JobContext(started=started, scratch=[own])))
    purged = {str(Path(f.path).relative_to(tmp_path)) for f in report.findings if f.purged}
    assert purged == {"own/new.dcm", "own/copy.raw", "shared/copy.raw", "own/theirs.dcm"}
    left = {str(Path(f.path).relative_to(tmp_path)): f.why for f in report.findings if not f.purged}
    assert list(left) == ["shared/new.dcm"] and "outside the job's own folders" in left["shared/new.dcm"]
    old = {str(Path(f.path).relative_to(tmp_path)): f.why for f in report.preexisting}
    assert sorted(old) == ["own/theirs.nii", "shared/theirs.dcm", "shared/theirs.nii"]
    assert all(w.startswith("pre-existing medical file, not ours: left in place") for w in old.values())
    assert sorted(p.name for p in own.iterdir()) == ["theirs.nii"]
    assert sorted(p.name for p in shared.iterdir()) == ["new.dcm", "theirs.dcm", "theirs.nii"]
    assert not report.clean
    (shared / "new.dcm").unlink()
    assert purge(scan([shared], known, job=JobContext(started=started, scratch=[own]))).clean, (
        "pre-existing files are not residue of this job"
    )


def test_purge_leaves_a_file_replaced_after_the_scan(tmp_path: Path) -> None:
    started = changed_after(tmp_path, 0)
    (tmp_path / "new.dcm").write_bytes(dicom())
    report = scan([tmp_path], {}, job=JobContext(started=started, scratch=[tmp_path]))
    assert [f.ours for f in report.findings] == [True]
    (tmp_path / "new.dcm").unlink()
    (tmp_path / "new.dcm").write_bytes(b"the user's own file, written after the scan")
    purge(report)
    assert (tmp_path / "new.dcm").read_bytes().startswith(b"the user's")
    assert report.findings[0].purged is False and "changed since it was scanned" in report.errors[0]


def test_report_for_the_platform_fits_its_bound(tmp_path: Path) -> None:
    for i in range(300):
        (tmp_path / f"{'x' * 200}-{i}.dcm").write_bytes(dicom())
    report = scan([tmp_path], {})
    full = report.as_dict()
    assert len(full["findings"]) == 300 and len(json.dumps(full)) > 60_000
    cut = report.bounded(16 * 1024)
    assert len(json.dumps(cut)) <= 16 * 1024
    assert cut["found"] == 300 and 0 < len(cut["findings"]) < 300 and cut["clean"] is False


def test_scan_skips_excluded_and_foreign_files(tmp_path: Path) -> None:
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "a.dcm").write_bytes(dicom())
    (tmp_path / "b.dcm").write_bytes(dicom())
    report = scan([tmp_path], {}, exclude=[tmp_path / "keep"])
    assert [Path(f.path).name for f in report.findings] == ["b.dcm"]
    assert scan([tmp_path], {}, owner=os.getuid() + 1).findings == []


def test_cli_exit_codes_and_json(tmp_path: Path) -> None:
    (tmp_path / "a.dcm").write_bytes(dicom())
    secret = os.urandom(1000)
    (tmp_path / "x.raw").write_bytes(secret)
    manifest = tmp_path / "m.sha256"
    manifest.write_text(f"{hashlib.sha256(secret).hexdigest()}  x.raw\n")
    cmd = [sys.executable, "-m", "medbridge", "residue", "scan", str(tmp_path), "--manifest", str(manifest)]
    r = subprocess.run([*cmd, "--json"], capture_output=True, text=True)
    assert r.returncode == 10
    report = json.loads(r.stdout)
    assert sorted(Path(f["path"]).name for f in report["findings"]) == ["a.dcm", "x.raw"]
    r = subprocess.run([*cmd, "--purge"], capture_output=True, text=True)
    assert r.returncode == 10, "with no job, a DICOM file is not proven platform data: left, and not clean"
    assert "purged" in r.stdout and "no job to tie it to" in r.stdout
    assert not (tmp_path / "x.raw").exists() and (tmp_path / "a.dcm").exists()
    since = changed_after(tmp_path, (tmp_path / "a.dcm").stat().st_ctime)
    (tmp_path / "b.dcm").write_bytes(dicom())
    scratch = [*cmd, "--since", repr(since), "--scratch", str(tmp_path), "--json"]
    r = subprocess.run([*scratch, "--purge"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert [(Path(f["path"]).name, f["purged"]) for f in report["findings"]] == [("b.dcm", True)]
    assert [Path(f["path"]).name for f in report["preexisting"]] == ["a.dcm"]
    assert (tmp_path / "a.dcm").exists() and not (tmp_path / "b.dcm").exists()
    bad = subprocess.run([*cmd, "--scratch", str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 2 and "--scratch needs --since" in bad.stderr
    bad = subprocess.run([*cmd[:-1], str(tmp_path / "missing")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("medbridge: error: cannot read manifest")


def test_manifest_files_are_streamed_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Candidates are looked up CHUNK at a time; the manifest is read per chunk, never held whole."""
    import medbridge.compute.residue as residue

    secrets_ = [os.urandom(64) for _ in range(7)]
    for i, data in enumerate(secrets_):
        (tmp_path / f"c{i}.raw").write_bytes(data)
    (tmp_path / "unrelated.raw").write_bytes(b"not a dataset file")
    manifest = tmp_path.parent / f"{tmp_path.name}.sha256"
    manifest.write_text("".join(f"{hashlib.sha256(d).hexdigest()}  ds/f{i}\n" for i, d in enumerate(secrets_)))
    asked: list[int] = []
    files = residue.ManifestFiles([manifest])

    def counting(hashes: Sequence[str]) -> dict[str, str]:
        asked.append(len(hashes))
        return files(hashes)

    monkeypatch.setattr(residue, "CHUNK", 3)
    report = residue.scan([tmp_path], counting)
    assert sorted(f.reason for f in report.findings) == [f"copy of dataset file ds/f{i}" for i in range(7)]
    assert asked == [3, 3, 2]
    manifest.write_text("not a manifest\n")
    with pytest.raises(InvalidInput, match="line 1"):
        residue.ManifestFiles([manifest])


def test_small_or_preexisting_files_equal_to_dataset_files_are_reported_never_purged(tmp_path: Path) -> None:
    """A user's empty ``__init__.py`` and a one-line note equal to a dataset's readme prove nothing; a copy
    that was there when the job began (the same inode, even moved or chmodded since) is not the job's."""
    work = tmp_path / "work"
    (work / "pkg").mkdir(parents=True)
    (work / "pkg" / "__init__.py").write_bytes(b"")
    (work / "notes.txt").write_bytes(b"lungs\n")
    big = os.urandom(4000)
    (work / "old-copy.raw").write_bytes(big)
    existed = inventory([work])
    started = changed_after(tmp_path, (work / "old-copy.raw").stat().st_ctime)
    (work / "old-copy.raw").chmod(0o600)  # the payload touched it: its ctime is now after the start
    (work / "new-copy.raw").write_bytes(big)
    (work / "new-note.txt").write_bytes(b"lungs\n")
    sums = {"chest/empty.txt": b"", "chest/labels/readme.txt": b"lungs\n", "chest/scan.raw": big}
    known = load_manifests([f"{hashlib.sha256(data).hexdigest()}  {name}\n" for name, data in sums.items()])
    report = purge(scan([work], known, job=JobContext(started=started, scratch=[work], existed=existed)))
    assert {Path(f.path).name for f in report.findings if f.purged} == {"new-copy.raw"}
    assert sorted(p.name for p in work.rglob("*") if p.is_file()) == [
        "__init__.py", "new-note.txt", "notes.txt", "old-copy.raw"
    ]  # fmt: skip
    left = {Path(f.path).name: f.why for f in report.findings if not f.purged}
    assert set(left) == {"old-copy.raw", "new-note.txt"}
    assert "there before the job started" in left["old-copy.raw"] and "proves nothing" in left["new-note.txt"]
    assert [Path(f.path).name for f in report.preexisting] == ["notes.txt"], "reported, not residue"
    assert "__init__.py" not in {Path(f.path).name for f in [*report.findings, *report.preexisting]}


def test_a_sparse_file_is_reported_unchecked_not_hashed_for_hours(tmp_path: Path) -> None:
    """One byte at 64 GiB: hashing it read 64 GiB of zeros; it is reported (the scan is not clean), never read."""
    sparse = tmp_path / "huge.bin"
    with sparse.open("wb") as f:
        f.seek(64 << 30)
        f.write(b"x")
    (tmp_path / "copy.dcm").write_bytes(dicom())
    asked: list[str] = []

    def lookup(hashes: Sequence[str]) -> dict[str, str]:
        asked.extend(hashes)
        return {}

    report = scan([tmp_path], lookup)
    assert report.bytes_hashed == len(dicom()) and len(asked) == 1
    assert [e for e in report.errors if "huge.bin: not hashed: sparse" in e], report.errors
