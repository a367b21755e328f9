"""The demo: a synthetic CT, a correct segmentation, and the whole job story on loopback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from medbridge.demo import phantom
from medbridge.demo.segment import components, lungs
from medbridge.ingest import nifti


def test_phantom_has_hounsfield_tissues() -> None:
    vol, truth = phantom.chest_with_truth(3)
    assert vol.dtype == np.int16 and vol.shape == phantom.SHAPE
    assert (vol < -900).mean() > 0.2, "air around the body"
    assert ((vol > -950) & (vol < -700)).sum() >= truth.sum() * 0.9, "lung parenchyma"
    assert ((vol > -100) & (vol < 150)).mean() > 0.2, "soft tissue"
    assert (vol > 400).sum() > 100, "bone"


def test_segmentation_finds_the_lungs() -> None:
    for seed in (1, 5):
        vol, truth = phantom.chest_with_truth(seed)
        mask = lungs(vol).astype(bool)
        dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
        assert dice > 0.95
        labels = components(mask)
        assert len(np.unique(labels[mask])) == 2, "two lungs"


def test_components_on_a_known_mask() -> None:
    m = np.zeros((3, 4, 5), dtype=bool)
    m[0, 0, 0:2] = True
    m[2, 3, 4] = True
    m[1, 1:3, 2] = True
    labels = components(m)
    assert len(np.unique(labels[m])) == 3 and (labels[~m] == 0).all()


def test_nifti_round_trip() -> None:
    vol = phantom.chest(2)
    back, spacing = nifti.decode(nifti.encode(vol, phantom.SPACING))
    assert (back == vol).all() and spacing == phantom.SPACING


@pytest.mark.parametrize("mount", [True, False], ids=["sshfs", "sftp"])
def test_demo_tells_the_whole_story(mount: bool) -> None:
    if mount and (not os.path.exists("/dev/fuse") or shutil.which("sshfs") is None):
        pytest.skip("needs /dev/fuse and sshfs (apt-get install sshfs)")
    args = [sys.executable, "-m", "medbridge", "demo", "--volumes", "2", "--json"] + ([] if mount else ["--no-mount"])
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    job = result["job"]
    assert job["exit_code"] == 0 and job["read_bytes"] == result["dataset"]["bytes"]
    assert job["read_via"] == ("sshfs mount" if mount else "the native loader (no FUSE here)")
    assert all(1500 < v["lung_ml"] < 4500 for v in job["volumes"])
    assert result["outputs"]["manifest_committed"]
    assert "ct-001_lungs.nii" in result["outputs"]["on_platform"]
    findings = result["teardown"]["residue"]["findings"]
    assert [f["purged"] for f in findings] == [True] and "cached-ct-001.nii" in findings[0]["path"]
    actions = {e["action"] for e in result["audit"]}
    assert {"certificate.issue", "login", "sftp.open", "results.commit", "residue.reported"} <= actions
    assert result["seconds"] > 0, "the demo reports how long it took (a figure, not a test of speed)"
