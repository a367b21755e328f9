"""Volumes from DICOM series built in the test from CT_small: order, rescale, spacing, refusals, output."""

from __future__ import annotations

import gzip
import os
import random
import struct
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import FileDataset
from pydicom.uid import generate_uid

from medbridge.errors import AlreadyExists, InvalidInput
from medbridge.ingest import nifti
from medbridge.ingest.series import Volume, build_volume, build_volumes, find_series, write_volume
from tests.ingest.samples import read, sample

BASE = read("CT_small.dcm").pixel_array  # int16, 128×128, values 128…2191; rescale intercept -1024


def ct_series(
    folder: Path,
    count: int,
    *,
    gap: float = 2.5,
    orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
    series_uid: str | None = None,
    slope: str = "1",
    seed: int = 1,
) -> str:
    """Write ``count`` slices whose pixels are BASE + 10·k at k·gap along the normal, under shuffled names."""
    uid = series_uid or generate_uid()
    row, col = np.array(orientation[:3], dtype=float), np.array(orientation[3:], dtype=float)
    normal = np.cross(row, col)
    folder.mkdir(parents=True, exist_ok=True)
    order = list(range(count))
    random.Random(seed).shuffle(order)
    for n, k in enumerate(order):
        ds = slice_of(uid, k)
        ds.ImageOrientationPatient = [f"{v:g}" for v in orientation]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in np.array([-158.1, -179.0, -75.7]) + k * gap * normal]
        ds.InstanceNumber = k + 1
        ds.RescaleSlope = slope
        ds.save_as(folder / f"IM{n:04d}")
    return uid


def slice_of(uid: str, k: int) -> FileDataset:
    ds = read("CT_small.dcm")
    ds.SeriesInstanceUID = uid
    ds.SOPInstanceUID = generate_uid()
    ds.PixelData = (BASE + 10 * k).astype("<i2").tobytes()
    return ds


def expected(k: int, slope: float = 1.0) -> np.ndarray:
    return BASE.astype(np.float64) * slope + 10 * k * slope - 1024


def test_slices_are_ordered_by_position_and_rescaled(tmp_path: Path) -> None:
    uid = ct_series(tmp_path / "ct", 6)
    [volume] = build_volumes(tmp_path)
    assert volume.series_uid == uid and volume.modality == "CT"
    assert volume.voxels.shape == (6, 128, 128) and volume.voxels.dtype == np.int16
    for k in range(6):
        assert np.array_equal(volume.voxels[k], expected(k)), k
    assert volume.spacing == pytest.approx((2.5, 0.661468, 0.661468))
    assert volume.origin == pytest.approx((-158.1, -179.0, -75.7))
    assert volume.slice_step == pytest.approx((0, 0, 2.5))
    assert sorted(volume.files) == [f"ct/IM{n:04d}" for n in range(6)] and volume.files != tuple(sorted(volume.files))


def test_order_follows_the_slice_normal_not_the_file_order(tmp_path: Path) -> None:
    # Sagittal slices: rows along +y, columns along -z, so the normal is -x; slice k sits at x = -3k.
    ct_series(tmp_path, 5, gap=3.0, orientation=(0, 1, 0, 0, 0, -1))
    [volume] = build_volumes(tmp_path)
    assert [int(volume.voxels[i, 0, 0]) for i in range(5)] == [int(expected(k)[0, 0]) for k in range(5)]
    assert volume.spacing[0] == pytest.approx(3.0)
    affine = volume.affine()
    assert affine is not None
    # voxel (0, 0, 1) is one slice step along -x in LPS, which is +x in RAS
    assert affine[:3, 2] == pytest.approx((3.0, 0, 0))
    assert affine[:3, 0] == pytest.approx((0, -0.661468, 0))


def test_fractional_rescale_gives_float32(tmp_path: Path) -> None:
    ct_series(tmp_path, 3, slope="0.5")
    [volume] = build_volumes(tmp_path)
    assert volume.voxels.dtype == np.float32
    assert np.allclose(volume.voxels[2], expected(2, 0.5))


def test_values_beyond_int16_give_float32(tmp_path: Path) -> None:
    ct_series(tmp_path, 3, slope="20")
    [volume] = build_volumes(tmp_path)
    assert volume.voxels.dtype == np.float32 and volume.voxels.max() > 32767
    assert np.array_equal(volume.voxels[1], expected(1, 20))


def test_mixed_series_give_two_volumes(tmp_path: Path) -> None:
    one = ct_series(tmp_path, 4, seed=2)
    two = ct_series(tmp_path / "sub", 2, gap=5.0, seed=3)
    for n in range(2):  # move the second series' files in among the first's
        os.rename(tmp_path / "sub" / f"IM{n:04d}", tmp_path / f"other{n}")
    (tmp_path / "notes.txt").write_text("not DICOM\n")
    volumes = build_volumes(tmp_path)
    assert {v.series_uid: v.voxels.shape[0] for v in volumes} == {one: 4, two: 2}
    assert {v.series_uid: v.spacing[0] for v in volumes} == pytest.approx({one: 2.5, two: 5.0})
    assert sorted(find_series(tmp_path)) == sorted([one, two])


def test_one_slice_is_a_volume(tmp_path: Path) -> None:
    ct_series(tmp_path, 1)
    [volume] = build_volumes(tmp_path)
    assert volume.voxels.shape == (1, 128, 128)
    assert volume.spacing[0] == pytest.approx(5.0)  # SpacingBetweenSlices from the header


def test_instance_number_orders_slices_without_positions(tmp_path: Path) -> None:
    uid = generate_uid()
    for n, k in enumerate([2, 0, 3, 1]):
        ds = slice_of(uid, k)
        del ds.ImagePositionPatient
        ds.InstanceNumber = k + 1
        ds.save_as(tmp_path / f"IM{n}")
    [volume] = build_volumes(tmp_path)
    assert [int(volume.voxels[k, 0, 0]) for k in range(4)] == [int(expected(k)[0, 0]) for k in range(4)]
    assert volume.spacing[0] == pytest.approx(5.0) and volume.affine() is None


def refused(tmp_path: Path, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        build_volumes(tmp_path)


def test_missing_pixel_data_is_refused(tmp_path: Path) -> None:
    uid = ct_series(tmp_path, 3)
    ds = slice_of(uid, 9)
    del ds.PixelData
    ds.save_as(tmp_path / "header-only")
    refused(tmp_path, "header-only has no pixel data")


def test_inconsistent_shapes_are_refused(tmp_path: Path) -> None:
    uid = ct_series(tmp_path, 3)
    ds = slice_of(uid, 7)
    ds.Rows = ds.Columns = 64
    ds.PixelData = BASE[:64, :64].astype("<i2").tobytes()
    ds.ImagePositionPatient = [0, 0, 100]
    ds.save_as(tmp_path / "small")
    refused(tmp_path, r"slices have different shapes \(64×64, 128×128\)")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("duplicate", "are at the same position"),
        ("gap", "uneven slice spacing, from 2.5 to 5 mm"),
        ("orientation", "different orientations"),
        ("spacing", "different PixelSpacing"),
        ("frames", r"multi-frame \(2 frames\)"),
    ],
)
def test_series_that_are_not_one_volume_are_refused(change: str, message: str, tmp_path: Path) -> None:
    uid = ct_series(tmp_path, 4)
    ds = slice_of(uid, 0)
    ds.ImagePositionPatient = [-158.1, -179.0, -75.7 + (12.5 if change == "gap" else 0)]
    if change == "orientation":
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    if change == "spacing":
        ds.ImagePositionPatient = [-158.1, -179.0, -75.7 + 10]
        ds.PixelSpacing = [0.5, 0.5]
    if change == "frames":
        ds.ImagePositionPatient = [-158.1, -179.0, -75.7 + 10]
        ds.NumberOfFrames = 2
    ds.save_as(tmp_path / "odd")
    refused(tmp_path, message)


def test_every_refused_series_is_named(tmp_path: Path) -> None:
    good = ct_series(tmp_path / "good", 2)
    bad = ct_series(tmp_path / "bad", 2)
    ds = slice_of(bad, 5)
    del ds.PixelData
    ds.save_as(tmp_path / "bad" / "empty")
    with pytest.raises(InvalidInput) as caught:
        build_volumes(tmp_path)
    assert f"series {bad}" in str(caught.value) and good not in str(caught.value)
    assert build_volume(sorted((tmp_path / "good").iterdir())).series_uid == good


def test_links_and_unreadable_dicom_are_refused(tmp_path: Path) -> None:
    ct_series(tmp_path / "a", 2)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff")
    refused(tmp_path, "broken.dcm")
    os.remove(tmp_path / "b" / "broken.dcm")
    os.symlink(tmp_path / "a" / "IM0000", tmp_path / "b" / "link")
    refused(tmp_path, "symbolic links are not followed")


def test_pixels_without_a_decoder_are_refused_clearly(tmp_path: Path) -> None:
    data = sample("JPEG2000.dcm").read_bytes()
    unknown = data.replace(b"1.2.840.10008.1.2.4.91", b"1.2.840.10008.1.2.4.99")  # a transfer syntax no one decodes
    (tmp_path / "odd.dcm").write_bytes(unknown)
    refused(tmp_path, "odd.dcm: pixel data cannot be decoded")


def volume(tmp_path: Path, slope: str = "1") -> Volume:
    ct_series(tmp_path / "src", 3, slope=slope)
    [v] = build_volumes(tmp_path / "src")
    return v


def test_write_nifti(tmp_path: Path) -> None:
    for slope, dtype in (("1", np.int16), ("0.5", np.float32)):
        v = volume(tmp_path / slope, slope)
        path = write_volume(v, tmp_path / f"ct-{slope}.nii", "nifti")
        voxels, spacing = nifti.read(path)
        assert voxels.dtype == dtype and np.array_equal(voxels, v.voxels)
        assert spacing == pytest.approx(v.spacing)
        data = path.read_bytes()
        assert struct.unpack_from("<h", data, 254)[0] == 1  # sform written
        srow = np.array(struct.unpack_from("<12f", data, 280)).reshape(3, 4)
        affine = v.affine()
        assert affine is not None and np.allclose(srow, affine[:3], atol=1e-3)


def test_write_gzipped_nifti_and_npy(tmp_path: Path) -> None:
    v = volume(tmp_path)
    gz = write_volume(v, tmp_path / "ct.nii.gz", "nifti")
    voxels, _ = nifti.decode(gzip.decompress(gz.read_bytes()))
    assert np.array_equal(voxels, v.voxels)
    npy = write_volume(v, tmp_path / "ct.npy", "npy")
    loaded = np.load(npy, allow_pickle=False)
    assert loaded.dtype == v.voxels.dtype and np.array_equal(loaded, v.voxels)
    assert v.metadata()["spacing"] == pytest.approx(list(v.spacing))
    with pytest.raises(AlreadyExists):
        write_volume(v, npy, "npy")
    with pytest.raises(InvalidInput, match="'nifti' or 'npy'"):
        write_volume(v, tmp_path / "ct.mha", "mha")  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["ct.nii.gz", "ct.npy"]
