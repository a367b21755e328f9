"""The gate: named DICOM refused with the right tags, cleaned copies pass, odd files get reports, never crashes."""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset

from medbridge.errors import InvalidInput
from medbridge.ingest import nifti
from medbridge.ingest.gate import FileReport, check_file, check_tree
from medbridge.ingest.profile import Profile, clean
from tests.ingest.samples import cleaned, read, sample


def tags(report: FileReport) -> set[tuple[str | None, str | None]]:
    return {(i.tag, i.keyword) for i in report.issues}


def reasons(report: FileReport) -> list[str]:
    return [i.reason for i in report.issues]


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm"])
def test_files_that_name_patients_are_refused_with_the_tags(name: str, profile: Profile) -> None:
    report = check_file(sample(name), profile)
    assert report.media_type == "application/dicom" and not report.passed
    assert {
        ("(0010,0010)", "PatientName"),
        ("(0010,0020)", "PatientID"),
        ("(0008,0020)", "StudyDate"),
        ("(0012,0062)", "PatientIdentityRemoved"),
    } <= tags(report)
    text = json.dumps(report.as_dict())
    assert "CompressedSamples" not in text and "Last^First" not in text  # reports never quote values


def test_ct_small_details(profile: Profile) -> None:
    report = check_file(sample("CT_small.dcm"), profile)
    found = tags(report)
    assert ("(0009,xxxx)", None) in found and ("(0043,xxxx)", None) in found  # GE private groups, once each
    assert ("(0010,1002)", "OtherPatientIDsSequence") in found
    assert ("(0008,0080)", "InstitutionName") in found
    assert ("(0010,0030)", "PatientBirthDate") not in found  # present but empty: PS3.15 action Z
    assert "must be 'YES'; it is missing" in reasons(report)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_cleaned_copies_pass(name: str, profile: Profile, tmp_path: Path) -> None:
    report = check_file(cleaned(name, profile, tmp_path / name), profile)
    assert report.passed, report.issues
    assert report.media_type == "application/dicom" and report.size == (tmp_path / name).stat().st_size


def test_burned_in_annotation_and_original_ids_are_refused(profile: Profile, tmp_path: Path) -> None:
    ds = clean(read("CT_small.dcm"), profile)
    ds.BurnedInAnnotation = "YES"
    ds.PatientID = "1CT1"
    ds.save_as(tmp_path / "x.dcm")
    report = check_file(tmp_path / "x.dcm", profile)
    assert tags(report) == {("(0010,0020)", "PatientID"), ("(0028,0301)", "BurnedInAnnotation")}
    ds.PatientID = "ANON-00017"
    ds.BurnedInAnnotation = "NO"
    ds.save_as(tmp_path / "y.dcm")
    assert check_file(tmp_path / "y.dcm", profile).passed


def test_dicom_without_preamble_is_still_judged(profile: Profile, tmp_path: Path) -> None:
    for name, ds in (("named", read("CT_small.dcm")), ("clean", clean(read("CT_small.dcm"), profile))):
        ds.preamble = None
        ds.file_meta = FileMetaDataset()
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, ds, implicit_vr=True, little_endian=True)
        (tmp_path / name).write_bytes(buffer.getvalue())
    named, clean_one = check_file(tmp_path / "named", profile), check_file(tmp_path / "clean", profile)
    assert named.media_type == clean_one.media_type == "application/dicom"
    assert ("(0010,0010)", "PatientName") in tags(named)
    assert clean_one.passed, clean_one.issues


def test_truncated_dicom(profile: Profile, tmp_path: Path) -> None:
    report = check_file(sample("MR_truncated.dcm"), profile)
    assert reasons(report)[0] == "truncated: the file ends inside a data element"
    data = cleaned("CT_small.dcm", profile, tmp_path / "whole.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) - 5000])
    report = check_file(tmp_path / "cut.dcm", profile)
    assert reasons(report) == ["truncated: the file ends inside a data element"]


def test_every_cut_of_a_dicom_file_is_refused_never_crashes(profile: Profile, tmp_path: Path) -> None:
    data = cleaned("MR_small.dcm", profile, tmp_path / "whole.dcm").read_bytes()
    for cut in [*range(132, 600, 5), *range(600, len(data) - 1, 97)]:
        path = tmp_path / f"cut-{cut}.dcm"
        path.write_bytes(data[:cut])
        report = check_file(path, profile)
        assert not report.passed, cut


def test_garbage_after_dicm_is_unreadable_not_a_crash(profile: Profile, tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    for n in range(20):
        path = tmp_path / f"junk-{n}.dcm"
        path.write_bytes(b"\0" * 128 + b"DICM" + rng.integers(0, 256, 300 + 50 * n, dtype=np.uint8).tobytes())
        report = check_file(path, profile)
        assert report.media_type == "application/dicom" and not report.passed
    (tmp_path / "fake.dcm").write_bytes(b"\x00\x01\x02\xff" * 10)
    report = check_file(tmp_path / "fake.dcm", profile)
    assert report.media_type == "application/dicom" and not report.passed


def test_dicom_without_pixel_data(profile: Profile, tmp_path: Path) -> None:
    ds = clean(read("CT_small.dcm"), profile)
    del ds.PixelData
    ds.save_as(tmp_path / "header-only.dcm")
    report = check_file(tmp_path / "header-only.dcm", profile)
    assert [i.as_dict() for i in report.issues] == [
        {"tag": "(7FE0,0010)", "keyword": "PixelData", "reason": "no pixel data: not an image"}
    ]


def test_pixel_data_shorter_than_the_image(profile: Profile, tmp_path: Path) -> None:
    ds = clean(read("CT_small.dcm"), profile)
    ds.PixelData = ds.PixelData[:1000]
    ds.save_as(tmp_path / "short.dcm")
    report = check_file(tmp_path / "short.dcm", profile)
    assert reasons(report) == ["holds 1000 bytes; Rows, Columns and frames need 32768"]


def test_huge_dicom_is_judged_from_its_header(profile: Profile, tmp_path: Path) -> None:
    """A 2 GiB image (a sparse file) costs a header read: no pixel bytes are loaded."""
    ds = clean(read("CT_small.dcm"), profile)
    del ds.PixelData
    ds.Rows = ds.Columns = 32768
    path = tmp_path / "huge.dcm"
    ds.save_as(path)
    length = 32768 * 32768 * 2
    with open(path, "ab") as f:
        f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length))
        f.truncate(f.tell() + length)
    tracemalloc.start()
    before = _bytes_read()
    report = check_file(path, profile)
    taken = _bytes_read() - before
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert report.passed, report.issues
    assert report.size is not None and report.size > length
    assert taken < 16 << 20, f"read {taken} bytes of a 2 GiB file: only its header should be"
    assert peak < 32 << 20


def _bytes_read() -> int:
    """Bytes this process has read through read(2) and friends so far (``rchar`` in /proc/self/io)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("/proc/self/io has no rchar")


def test_tree_reports_every_file(profile: Profile, tmp_path: Path) -> None:
    root = tmp_path / "incoming"
    cleaned("CT_small.dcm", profile, root / "series" / "ct.dcm")
    cleaned("MR_small.dcm", profile, root / "series" / "mr scan 1.dcm")  # two series in one folder: fine
    cleaned("CT_small.dcm", profile, root / "ünïcødé ct.dcm")
    (root / "named.dcm").write_bytes(sample("CT_small.dcm").read_bytes())
    (root / "labels.csv").write_text("id,label\n1,lung\n")
    np.save(root / "features.npy", np.arange(10))
    (root / "notes\nwith a newline.txt").write_text("hello\n")
    (root / "vol.nii.gz").write_bytes(gzip.compress(nifti.encode(np.zeros((2, 2, 2), np.int16), (1, 1, 1))))
    (root / "ct.dcm.gz").write_bytes(gzip.compress((root / "series" / "ct.dcm").read_bytes()))
    (root / "empty").write_bytes(b"")
    with open(os.path.join(os.fsencode(root), b"raw\xff.bin"), "wb") as f:
        f.write(os.urandom(100))
    os.symlink(root / "series" / "ct.dcm", root / "link.dcm")
    os.symlink(root / "series", root / "linked-folder")
    os.symlink(tmp_path / "nowhere", root / "dangling")
    os.mkfifo(root / "pipe")

    report = check_tree(root, profile)
    by_path = {f.path: f for f in report.files}
    assert set(by_path) == {
        "series/ct.dcm",
        "series/mr scan 1.dcm",
        "ünïcødé ct.dcm",
        "named.dcm",
        "labels.csv",
        "features.npy",
        "notes\nwith a newline.txt",
        "vol.nii.gz",
        "ct.dcm.gz",
        "empty",
        "raw\\xff.bin",
        "link.dcm",
        "linked-folder",
        "dangling",
        "pipe",
    }
    assert not report.passed
    assert {f.path for f in report.failed} == {
        "named.dcm",
        "ct.dcm.gz",
        "link.dcm",
        "linked-folder",
        "dangling",
        "pipe",
    }
    types = {path: f.media_type for path, f in by_path.items()}
    assert types["series/mr scan 1.dcm"] == "application/dicom"
    assert types["labels.csv"] == "text/csv"
    assert types["features.npy"] == "application/x-npy"
    assert types["notes\nwith a newline.txt"] == "text/plain"
    assert types["vol.nii.gz"] == "image/nifti"
    assert types["ct.dcm.gz"] == "application/gzip"
    assert types["empty"] == "application/x-empty"
    assert types["raw\\xff.bin"] == "application/octet-stream"
    assert types["link.dcm"] == types["linked-folder"] == types["dangling"] == "inode/symlink"
    assert types["pipe"] == "inode/fifo"
    assert reasons(by_path["link.dcm"]) == ["symbolic link: refused, not followed"]
    assert reasons(by_path["pipe"]) == ["not a regular file"]
    assert reasons(by_path["ct.dcm.gz"]) == ["gzip-compressed DICOM cannot be checked: store it uncompressed"]

    out = json.loads(json.dumps(report.as_dict()))
    assert out["passed"] is False and out["file_count"] == 15 and out["failed_count"] == 6
    assert out["media_types"]["application/dicom"] == 4
    assert [f["path"] for f in out["files"]] == sorted(by_path)


def test_a_clean_tree_passes(profile: Profile, tmp_path: Path) -> None:
    cleaned("CT_small.dcm", profile, tmp_path / "a" / "1.dcm")
    (tmp_path / "a" / "labels.csv").write_text("id\n1\n")
    report = check_tree(tmp_path, profile)
    assert report.passed and report.failed == () and len(report.files) == 2


def test_tree_root_must_be_a_real_folder(profile: Profile, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    os.symlink(tmp_path, tmp_path / "link")
    for root, message in (("missing", "No such file"), ("file", "not a directory"), ("link", "symbolic link")):
        with pytest.raises(InvalidInput, match=message):
            check_tree(tmp_path / root, profile)
