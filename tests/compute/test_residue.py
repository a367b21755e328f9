"""Residue scan: signatures of medical images, dataset copies by SHA-256, purge, and the CLI."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

from medbridge.compute.residue import load_manifests, purge, scan, signature


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


def test_scan_finds_signatures_and_copies_and_purges(tmp_path: Path) -> None:
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
    assert report.files_scanned == len(SAMPLES) + 2
    assert not report.clean
    purge(report)
    assert report.clean
    assert sorted(p.name for p in work.rglob("*") if p.is_file() or p.is_symlink()) == ["link", "model.pt"]


def test_scan_skips_excluded_and_foreign_files(tmp_path: Path) -> None:
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "a.dcm").write_bytes(dicom())
    (tmp_path / "b.dcm").write_bytes(dicom())
    report = scan([tmp_path], {}, exclude=[tmp_path / "keep"])
    assert [Path(f.path).name for f in report.findings] == ["b.dcm"]
    assert scan([tmp_path], {}, owner=os.getuid() + 1).findings == []


def test_cli_exit_codes_and_json(tmp_path: Path) -> None:
    (tmp_path / "a.dcm").write_bytes(dicom())
    secret = os.urandom(100)
    (tmp_path / "x.raw").write_bytes(secret)
    manifest = tmp_path / "m.sha256"
    manifest.write_text(f"{hashlib.sha256(secret).hexdigest()}  x.raw\n")
    cmd = [sys.executable, "-m", "medbridge", "residue", "scan", str(tmp_path), "--manifest", str(manifest)]
    r = subprocess.run([*cmd, "--json"], capture_output=True, text=True)
    assert r.returncode == 10
    report = json.loads(r.stdout)
    assert sorted(Path(f["path"]).name for f in report["findings"]) == ["a.dcm", "x.raw"]
    r = subprocess.run([*cmd, "--purge"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "purged" in r.stdout
    r = subprocess.run([*cmd], capture_output=True, text=True)
    assert r.returncode == 0 and "clean" in r.stdout
    bad = subprocess.run([*cmd[:-1], str(tmp_path / "missing")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("medbridge: error: cannot read manifest")
