"""A stock MONAI pipeline reading NIfTI and DICOM from a real platform; MONAI's disk caches kept off the node."""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from monai.data import CacheDataset, Dataset, LMDBDataset, PersistentDataset
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, RandCropByPosNegLabeld, Spacingd
from monai.utils import set_determinism
from pydicom.uid import generate_uid

from medbridge.compute.session import Endpoint
from medbridge.ingest.profile import clean, load_profile
from medbridge.loader import Loader
from medbridge.loader.monai import MedbridgeReader, check_cache_dir, scratch_cache
from medbridge.testing import RunningPlatform
from tests.ingest.samples import read
from tests.loader.conftest import alice_reads


def nifti(array: np.ndarray, spacing: float) -> bytes:
    return nib.Nifti1Image(array, np.diag([spacing, spacing, spacing, 1.0])).to_bytes()  # type: ignore[no-any-return]


def dicom_series(count: int) -> dict[str, bytes]:
    """Slices of CT_small along z, cleaned by the built-in profile so that the gate lets them in."""
    series, profile, out = generate_uid(), load_profile(), {}
    for k in range(count):
        ds = read("CT_small.dcm")
        ds.SeriesInstanceUID, ds.InstanceNumber = series, k + 1
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ImagePositionPatient = [-158.1, -179.0, -75.7 + 2.5 * k]
        buf = io.BytesIO()
        clean(ds, profile).save_as(buf)
        out[f"series/IM{k:04d}.dcm"] = buf.getvalue()
    return out


rng = np.random.default_rng(7)
IMAGES = {f"case-{i}": rng.integers(0, 1000, (20, 18, 16)).astype(np.int16) for i in range(2)}
LABELS = {k: (v > 600).astype(np.uint8) for k, v in IMAGES.items()}
FILES = {f"{k}/image.nii": nifti(v, 1.5) for k, v in IMAGES.items()}
FILES |= {f"{k}/label.nii.gz": __import__("gzip").compress(nifti(v, 1.5)) for k, v in LABELS.items()}
FILES |= dicom_series(3)


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningPlatform]:
    p = alice_reads(tmp_path_factory.mktemp("monai"), "ct", FILES, 1 << 20, enforcement_interval=0.25)
    with p:
        yield p


@pytest.fixture(scope="module")
def loader(endpoint: Endpoint) -> Iterator[Loader]:
    with Loader(endpoint) as ld:
        yield ld


def items(root: str) -> list[dict[str, str]]:
    return [{"image": f"{root}/{k}/image.nii", "label": f"{root}/{k}/label.nii.gz"} for k in sorted(IMAGES)]


def test_load_imaged_gives_what_monai_gives_for_local_files(platform: RunningPlatform, loader: Loader) -> None:
    local = platform.home.datasets / "ct"
    ours = LoadImaged(keys=["image", "label"], reader=MedbridgeReader(loader))
    stock = LoadImaged(keys=["image", "label"])
    for remote, here in zip(items("medbridge://datasets/ct"), items(str(local)), strict=True):
        a, b = ours(remote), stock(here)
        for key in ("image", "label"):
            assert np.array_equal(a[key].numpy(), b[key].numpy())
            assert np.allclose(a[key].affine.numpy(), b[key].affine.numpy())
        assert a["image"].meta["filename_or_obj"].startswith("medbridge:")


def test_stock_pipeline_with_cache_dataset_reads_nifti_from_the_platform(loader: Loader) -> None:
    set_determinism(seed=0)
    keys = ["image", "label"]
    transform = Compose([
        LoadImaged(keys=keys, reader=MedbridgeReader(loader)),
        EnsureChannelFirstd(keys=keys),
        Spacingd(keys=keys, pixdim=(3.0, 3.0, 3.0), mode=("bilinear", "nearest")),
        RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=(4, 4, 4), num_samples=2),
    ])  # fmt: skip
    for ds in (Dataset(items("medbridge://datasets/ct"), transform),
               CacheDataset(items("medbridge://datasets/ct"), transform, num_workers=0, progress=False)):  # fmt: skip
        crops = ds[1]
        assert len(crops) == 2
        for crop in crops:
            assert tuple(crop["image"].shape) == (1, 4, 4, 4)
            assert tuple(crop["label"].shape) == (1, 4, 4, 4)
        assert tuple(crops[0]["image"].pixdim.tolist()) == (3.0, 3.0, 3.0)
    set_determinism(seed=None)


def test_dicom_file_and_series(platform: RunningPlatform, loader: Loader) -> None:
    local = platform.home.datasets / "ct" / "series"
    ours = LoadImaged(keys=["image"], reader=MedbridgeReader(loader))
    stock = LoadImaged(keys=["image"], reader="PydicomReader")
    one = ours({"image": "medbridge://datasets/ct/series/IM0001.dcm"})["image"]
    assert np.array_equal(one.numpy(), stock({"image": str(local / "IM0001.dcm")})["image"].numpy())
    volume = ours({"image": "medbridge://datasets/ct/series/"})["image"]
    expected = stock({"image": str(local)})["image"]
    assert volume.shape == expected.shape and volume.shape[-1] == 3
    assert np.array_equal(volume.numpy(), expected.numpy())
    assert np.allclose(volume.affine.numpy(), expected.affine.numpy())
    first = pydicom.dcmread(local / "IM0000.dcm")
    hounsfield = first.pixel_array.T * float(first.RescaleSlope) + float(first.RescaleIntercept)
    assert np.array_equal(volume.numpy()[..., 0], hounsfield), "slices stacked by instance number, rescaled"


def test_public_path_through_the_job_scratch_gives_the_same_and_leaves_nothing(
    loader: Loader, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("MEDBRIDGE_SCRATCH", str(scratch))
    fast = LoadImaged(keys=["image", "label"], reader=MedbridgeReader(loader, in_memory=True))
    public = LoadImaged(keys=["image", "label"], reader=MedbridgeReader(loader, in_memory=False))
    [item] = items("medbridge://datasets/ct")[:1]
    a, b = fast(item), public(item)
    assert np.array_equal(a["image"].numpy(), b["image"].numpy())
    assert np.array_equal(a["label"].numpy(), b["label"].numpy())
    series = public({"image": "medbridge://datasets/ct/series/", "label": "medbridge://datasets/ct/series/"})
    assert series["image"].shape[-1] == 3
    assert list(scratch.iterdir()) == [], "the copies are removed once MONAI has read them"


def test_disk_caches_only_in_the_job_scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    data = [{"x": np.ones(3)}]
    PersistentDataset(data, transform=None, cache_dir=tmp_path / "outside-a-job")  # no job: nothing to guard
    monkeypatch.setenv("MEDBRIDGE_SCRATCH", str(scratch))
    with pytest.raises(PermissionError, match=r"PersistentDataset\(cache_dir=.*MEDBRIDGE_SCRATCH"):
        PersistentDataset(data, transform=None, cache_dir=tmp_path / "cache")
    with pytest.raises(PermissionError, match="LMDBDataset"):
        LMDBDataset(data, transform=None)  # its default cache_dir, "cache", is in the working folder
    assert not (tmp_path / "cache").exists() and not Path("cache").exists()
    cached = PersistentDataset(data, transform=lambda d: {"x": d["x"] * 2}, cache_dir=scratch_cache("persistent"))
    assert np.array_equal(cached[0]["x"], np.full(3, 2.0))
    assert list((scratch / "persistent").iterdir()), "the cache is written in the scratch"
    PersistentDataset(data, transform=None, cache_dir=None)  # no disk cache at all: fine
    with pytest.raises(PermissionError, match="would leave"):
        check_cache_dir("X", os.path.join(str(scratch), "..", "escape"))


JOB_PAYLOAD = """
import os
from monai.data import CacheDataset, PersistentDataset
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, RandCropByPosNegLabeld, Spacingd
from medbridge.loader.monai import MedbridgeReader, scratch_cache

keys = ["image", "label"]
items = [{"image": "medbridge://datasets/ct/case-0/image.nii", "label": "medbridge://datasets/ct/case-0/label.nii.gz"}]
pre = Compose([LoadImaged(keys=keys, reader=MedbridgeReader()), EnsureChannelFirstd(keys=keys),
               Spacingd(keys=keys, pixdim=(3.0, 3.0, 3.0), mode=("bilinear", "nearest"))])
crop = RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=(4, 4, 4), num_samples=2)
print("crops", [tuple(c["image"].shape) for c in crop(CacheDataset(items, pre, progress=False)[0])])
try:
    PersistentDataset(items, pre, cache_dir="monai-cache")
    print("not refused")
except PermissionError as exc:
    print("refused:", exc)
cached = PersistentDataset(items, pre, cache_dir=scratch_cache("persistent"))
cached[0]
scratch = os.environ["MEDBRIDGE_SCRATCH"]
print("scratch", scratch, len(os.listdir(os.path.join(scratch, "persistent"))))
"""


def test_monai_pipeline_inside_job_run(platform: RunningPlatform, tmp_path: Path) -> None:
    from tests.compute.test_job_run import job_run

    script = tmp_path / "train.py"
    script.write_text(JOB_PAYLOAD)
    r = job_run(platform, f"{sys.executable} {script}", "--job-id", "j-monai")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "crops [(1, 4, 4, 4), (1, 4, 4, 4)]" in lines
    assert any(line.startswith("refused: PersistentDataset(cache_dir='monai-cache')") for line in lines)
    [scratch] = [line.split()[1:] for line in lines if line.startswith("scratch ")]
    assert scratch[1] == "1", "the disk cache is written in the scratch"
    assert not Path(scratch[0]).exists(), "teardown removes the scratch and the cache in it"
    assert "residue scan clean" in r.stderr
