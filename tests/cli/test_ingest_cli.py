"""Ingest from the command line: the gate in `dataset add`, `ingest check`, manifests, packing, shards."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medbridge.ingest.profile import load_profile
from medbridge.testing import RunningPlatform
from tests.cli.test_cli import mb, one_line_error
from tests.ingest.samples import cleaned, sample


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    assert mb("platform", "init", "--home", str(h)).returncode == 0
    return h


def study(tmp_path: Path, *, clean: bool) -> Path:
    src = tmp_path / ("clean" if clean else "raw")
    src.mkdir()
    if clean:
        cleaned("CT_small.dcm", load_profile(), src / "ct.dcm")
    else:
        shutil.copy(sample("CT_small.dcm"), src / "ct.dcm")
    (src / "labels.csv").write_text("id,label\n1,lung\n")
    np.save(src / "mask.npy", np.zeros((4, 4), dtype=np.uint8))
    return src


def test_dataset_naming_a_patient_is_refused_with_the_tags(home: Path, tmp_path: Path) -> None:
    r = mb("dataset", "add", "ct", "--from", str(study(tmp_path, clean=False)), home=home)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("medbridge: error: dataset 'ct' refused")
    assert any("PatientName" in line for line in lines[:-1]) and any("PatientID" in line for line in lines[:-1])
    assert list((home / "storage" / "datasets").iterdir()) == []
    refused = [e for e in json.loads(mb("audit", "--json", home=home).stdout)["entries"]
               if e["action"] == "dataset.refused"]  # fmt: skip
    assert refused and refused[0]["subject"] == "ct"


def test_administrator_may_accept_the_report(home: Path, tmp_path: Path) -> None:
    r = mb("dataset", "add", "ct", "--from", str(study(tmp_path, clean=False)), "--allow-report", home=home)
    assert r.returncode == 0, r.stderr
    assert "accepted by an administrator" in r.stderr
    added = [e for e in json.loads(mb("audit", "--json", home=home).stdout)["entries"] if e["action"] == "dataset.add"]
    assert added[0]["detail"]["accepted_with_report"] is True


def test_cleaned_study_passes_and_the_manifest_types_every_file(home: Path, tmp_path: Path) -> None:
    src = study(tmp_path, clean=True)
    check = subprocess.run([sys.executable, "-m", "medbridge", "ingest", "check", str(src), "--json"],
                           capture_output=True, text=True)  # fmt: skip
    assert check.returncode == 0, check.stdout
    r = mb("dataset", "add", "ct", "--from", str(src), home=home)
    assert r.returncode == 0, r.stderr
    files = {f["path"]: f for f in json.loads(mb("dataset", "manifest", "ct", "--json", home=home).stdout)["files"]}
    assert files["ct.dcm"]["media_type"] == "application/dicom"
    assert files["labels.csv"]["media_type"] == "text/csv"
    assert files["mask.npy"]["media_type"] == "application/x-npy"
    text = mb("dataset", "manifest", "ct", home=home).stdout
    assert subprocess.run(["sha256sum", "-c"], input=text, text=True, capture_output=True, cwd=src).returncode == 0


def test_ingest_check_exit_codes(tmp_path: Path) -> None:
    src = study(tmp_path, clean=False)
    r = subprocess.run([sys.executable, "-m", "medbridge", "ingest", "check", str(src)], capture_output=True, text=True)
    assert r.returncode == 11 and "FAIL" in r.stdout and "PatientName" in r.stdout
    missing = subprocess.run([sys.executable, "-m", "medbridge", "ingest", "check", str(tmp_path / "nope")],
                             capture_output=True, text=True)  # fmt: skip
    assert missing.returncode == 2
    one_line_error(missing)


def test_pack_serve_list_and_extract_shards(tmp_path: Path) -> None:
    p = RunningPlatform(tmp_path / "p")
    p.add_user("alice")
    files = {f"slices/img-{i:03d}.bin": os.urandom(3000 + i) for i in range(40)}
    p.add_dataset("xr", files)
    p.grant("alice", "xr")
    r = mb("dataset", "pack", "xr", "--shard-size", "40KB", home=p.home.root)
    assert r.returncode == 0, r.stderr
    shards = sorted((p.home.datasets / "xr" / ".shards").glob("*.tar"))
    assert len(shards) >= 3
    listing = json.loads(subprocess.run([sys.executable, "-m", "medbridge", "shard", "list", str(shards[0]), "--json"],
                                        capture_output=True, text=True).stdout)  # fmt: skip
    member = listing["members"][0]
    with open(shards[0], "rb") as f:
        f.seek(member["offset"])
        assert f.read(member["size"]) == files[member["name"]], "one ranged read is one sample"
    out = tmp_path / "out"
    for s in shards:
        assert subprocess.run([sys.executable, "-m", "medbridge", "shard", "extract", str(s), str(out)],
                              capture_output=True).returncode == 0  # fmt: skip
    assert {str(q.relative_to(out)): q.read_bytes() for q in out.rglob("*") if q.is_file()} == files
    assert mb("dataset", "pack", "xr", home=p.home.root).returncode == 5

    async def served() -> tuple[str, bytes]:
        key, cred = await p.credential("alice")
        async with await p.connect("alice", [(key, cred.certificate)]) as conn:
            sftp = await conn.start_sftp_client()
            async with sftp.open("/datasets/xr/.manifest", "rb") as f:
                manifest = (await f.read()).decode()
            async with sftp.open(f"/datasets/xr/.shards/{shards[0].name}", "rb") as f:
                return manifest, await f.read()

    with p:
        manifest, first = asyncio.run(served())
    assert first == shards[0].read_bytes()
    assert f"{hashlib.sha256(first).hexdigest()}  .shards/{shards[0].name}" in manifest, "residue scans know shards"


def test_ingest_series_builds_a_volume(tmp_path: Path) -> None:
    src = tmp_path / "series"
    src.mkdir()
    shutil.copy(sample("CT_small.dcm"), src / "a.dcm")
    out = tmp_path / "vol"
    r = subprocess.run([sys.executable, "-m", "medbridge", "ingest", "series", str(src), "--to", "npy", "--out",
                        str(out), "--json"], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    (vol,) = json.loads(r.stdout)["volumes"]
    assert np.load(vol["file"]).ndim == 3
