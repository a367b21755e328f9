"""Declared pseudonyms at the gate, and ``ingest anonymise``: on pydicom's own files and on generated series."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from medbridge.errors import AlreadyExists, InvalidInput
from medbridge.ingest.anonymise import anonymise
from medbridge.ingest.gate import check_tree
from medbridge.ingest.profile import Profile, clean, parse_declarations, with_pseudonyms
from tests.cli.test_cli import mb, one_line_error
from tests.ingest.samples import read, sample

LIDC = {"PatientID": "LIDC-IDRI-[0-9]{4}", "PatientName": "LIDC-IDRI-[0-9]{4}"}
PATIENTS = {"MRN-448812": "Smith^John", "MRN-771203": "Müller^Anna"}


def series(folder: Path, patient: str, name: str, slices: int = 3, *, private: bool = True) -> str:
    """One study of one patient, from CT_small: fresh UIDs, the patient's ID and name, a private tag."""
    study, series_uid, frame = generate_uid(), generate_uid(), generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(slices):
        ds = read("CT_small.dcm")
        ds.PatientID, ds.PatientName = patient, name
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.FrameOfReferenceUID = frame
        ds.InstanceNumber = k + 1
        if private:
            ds.add_new(0x00311010, "LO", "PRIVATE CREATOR")
            ds.add_new(0x00311011, "LO", name)
        ds.save_as(folder / f"IM{k:04d}.dcm")
    return study


def pseudonymised(folder: Path, declared: dict[str, str], values: list[str], profile: Profile) -> Path:
    """A pseudonymised archive as public collections publish it: one case per value."""
    rule = with_pseudonyms(profile, declared)
    for n, value in enumerate(values):
        series(folder / f"case-{n}", f"raw-{n}", "raw", slices=2, private=False)
        for f in (folder / f"case-{n}").iterdir():
            clean(pydicom.dcmread(f), rule, pseudonyms={"PatientID": value, "PatientName": value}).save_as(f)
    return folder


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(p.relative_to(root).as_posix().encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def issues_of(report: object) -> set[tuple[str | None, str | None]]:
    return {(i.tag, i.keyword) for f in report.failed for i in f.issues}  # type: ignore[attr-defined]


# -- declared pseudonyms ------------------------------------------------------------------


def test_declared_pseudonyms_pass_and_a_real_name_is_refused_with_its_tag(profile: Profile, tmp_path: Path) -> None:
    archive = pseudonymised(tmp_path / "lidc", LIDC, ["LIDC-IDRI-0001", "LIDC-IDRI-0002"], profile)
    assert check_tree(archive, with_pseudonyms(profile, LIDC)).passed
    plain = check_tree(archive, profile)
    assert not plain.passed and ("(0010,0020)", "PatientID") in issues_of(plain), "undeclared: refused as before"
    one = next((archive / "case-1").iterdir())
    ds = pydicom.dcmread(one)
    ds.PatientName = "Smith^John"
    ds.save_as(one)
    report = check_tree(archive, with_pseudonyms(profile, LIDC))
    assert [f.path for f in report.failed] == [one.relative_to(archive).as_posix()]
    assert issues_of(report) == {("(0010,0010)", "PatientName")}
    assert "LIDC-IDRI-[0-9]{4}" in report.failed[0].issues[0].reason
    assert "Smith" not in json.dumps(report.as_dict()), "reports never quote the value"


def test_declared_pseudonyms_still_need_identity_removed_and_a_method(profile: Profile, tmp_path: Path) -> None:
    archive = pseudonymised(tmp_path / "lidc", LIDC, ["LIDC-IDRI-0007"], profile)
    first, second = sorted((archive / "case-0").iterdir())
    ds = pydicom.dcmread(first)
    del ds.DeidentificationMethod
    ds.save_as(first)
    ds = pydicom.dcmread(second)
    ds.PatientIdentityRemoved = "NO"
    ds.StudyDate = "20240101"
    ds.save_as(second)
    report = check_tree(archive, with_pseudonyms(profile, LIDC))
    assert issues_of(report) == {("(0012,0063)", "DeidentificationMethod"), ("(0012,0062)", "PatientIdentityRemoved"),
                                 ("(0008,0020)", "StudyDate")}  # fmt: skip


@pytest.mark.parametrize(
    ("items", "why"),
    [
        (["PatientID=.*"], "real-looking value"),
        (["PatientName=[A-Za-z^ ]+"], "real-looking value 'Smith^John'"),
        (["PatientID=[0-9]+"], "real-looking value '123456'"),
        (["StudyDescription=X-[0-9]{4}"], "does not let StudyDescription hold a pseudonym"),
        (["PatientID=(unclosed"], "bad pattern"),
    ],
)
def test_declarations_that_would_let_identities_in_are_refused(profile: Profile, items: list[str], why: str) -> None:
    with pytest.raises(InvalidInput, match=why.replace("^", r"\^").replace("(", r"\(")):
        with_pseudonyms(profile, parse_declarations(items))


def test_ingest_check_and_dataset_add_take_declared_pseudonyms(profile: Profile, tmp_path: Path) -> None:
    archive = pseudonymised(tmp_path / "lidc", LIDC, ["LIDC-IDRI-0003"], profile)
    flags = [f"--pseudonym={k}={v}" for k, v in LIDC.items()]
    assert mb("ingest", "check", str(archive)).returncode == 11
    ok = mb("ingest", "check", str(archive), *flags)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = mb("ingest", "check", str(archive), "--pseudonym", "PatientID=.*")
    assert bad.returncode == 2 and "real-looking" in one_line_error(bad)
    home = tmp_path / "home"
    assert mb("platform", "init", "--home", str(home)).returncode == 0
    added = mb("dataset", "add", "lidc", "--from", str(archive), *flags, home=home)
    assert added.returncode == 0, added.stderr
    audit = mb("audit", "--json", "--action", "dataset.add", home=home)
    assert '"pseudonyms"' in audit.stdout and "LIDC-IDRI" in audit.stdout, "the declaration is audited"


# -- anonymise ------------------------------------------------------------------------


@pytest.fixture
def source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    studies = [series(src / f"p{n}" / "study", pid, name) for n, (pid, name) in enumerate(PATIENTS.items())]
    series(src / "p0" / "second-study", "MRN-448812", "Smith^John", slices=2)
    (src / "samples").mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(sample(name), src / "samples" / name)
    (src / "notes.csv").write_text("case,label\n1,nodule\n")
    assert len(set(studies)) == 2
    return src


def test_anonymise_output_passes_the_gate_with_pixels_byte_identical(
    source: Path, profile: Profile, tmp_path: Path
) -> None:
    before = tree_digest(source)
    out, mapping = tmp_path / "out", tmp_path / "provider" / "mapping.json"
    mapping.parent.mkdir()
    done = anonymise(source, out, mapping, profile)
    assert tree_digest(source) == before, "the source is never changed"
    assert (done.rewritten, done.copied, done.patients) == (10, 1, 4)
    assert check_tree(out, profile).passed
    assert (out / "notes.csv").read_bytes() == (source / "notes.csv").read_bytes()
    for f in sorted(source.rglob("*.dcm")):
        rel = f.relative_to(source)
        old, new = pydicom.dcmread(f), pydicom.dcmread(out / rel)
        assert new.PixelData == old.PixelData, f"{rel}: pixel data must be byte-identical"
        assert new.SOPClassUID == old.SOPClassUID, "registered UIDs are kept"
        assert new.SOPInstanceUID != old.SOPInstanceUID
        assert new.file_meta.MediaStorageSOPInstanceUID == new.SOPInstanceUID
        assert not any(elem.tag.is_private for elem in new)
        assert new.PatientIdentityRemoved == "YES" and new.DeidentificationMethod
        raw = (out / rel).read_bytes()
        assert b"Smith" not in raw and b"MRN-" not in raw


def test_anonymise_keeps_studies_and_patients_consistent(source: Path, profile: Profile, tmp_path: Path) -> None:
    mapping = tmp_path / "mapping.json"
    anonymise(source, tmp_path / "out", mapping, profile)
    out = tmp_path / "out"

    def seen(folder: str) -> set[tuple[str, str, str]]:
        return {(str(d.PatientID), str(d.PatientName), d.StudyInstanceUID)
                for d in map(pydicom.dcmread, sorted((out / folder).iterdir()))}  # fmt: skip

    [(pid0, name0, study0)] = seen("p0/study")
    [(pid0b, _, study0b)] = seen("p0/second-study")
    [(pid1, _, study1)] = seen("p1/study")
    assert pid0 == name0 == pid0b and pid0 != pid1 and pid0.startswith("ANON-")
    assert len({study0, study0b, study1}) == 3
    frame = {d.FrameOfReferenceUID for d in map(pydicom.dcmread, (out / "p0/study").iterdir())}
    assert len(frame) == 1
    kept = json.loads(mapping.read_text())
    assert kept["patients"]["MRN-448812"] == pid0 and oct(mapping.stat().st_mode & 0o777) == "0o600"
    # a second run with the same mapping gives the same pseudonyms and the same UIDs
    again = anonymise(source, tmp_path / "again", mapping, profile)
    assert again.new_pseudonyms == 0
    first = pydicom.dcmread(next((out / "p1/study").iterdir()))
    second = pydicom.dcmread(tmp_path / "again" / "p1/study" / next((out / "p1/study").iterdir()).name)
    assert (first.PatientID, first.StudyInstanceUID) == (second.PatientID, second.StudyInstanceUID)


def test_anonymise_with_a_prefix_declares_its_pseudonyms(source: Path, profile: Profile, tmp_path: Path) -> None:
    done = anonymise(source, tmp_path / "out", tmp_path / "m.json", profile, prefix="SOC-CT")
    assert done.declared == {"PatientID": "SOC\\-CT-[0-9]{4,}", "PatientName": "SOC\\-CT-[0-9]{4,}"}
    assert not check_tree(tmp_path / "out", profile).passed
    assert check_tree(tmp_path / "out", with_pseudonyms(profile, done.declared)).passed


def test_anonymise_refuses_what_would_lose_or_leak_something(source: Path, profile: Profile, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(AlreadyExists, match="not empty; use --force"):
        anonymise(source, out, tmp_path / "m.json", profile)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    with pytest.raises(InvalidInput, match="outside the source and the output"):
        anonymise(source, tmp_path / "o2", tmp_path / "o2" / "m.json", profile)
    with pytest.raises(InvalidInput, match="outside the source and the output"):
        anonymise(source, tmp_path / "o3", source / "m.json", profile)
    with pytest.raises(InvalidInput, match="contain one another"):
        anonymise(source, source / "out", tmp_path / "m.json", profile)
    anonymise(source, out, tmp_path / "m.json", profile, force=True)
    assert (out / "keep.txt").read_text() == "mine" and (out / "notes.csv").exists()
    assert not (tmp_path / "m.json").with_name("o2").exists() and not list(tmp_path.glob(".*anonymise-*"))


def test_anonymise_a_broken_file_leaves_no_output(source: Path, profile: Profile, tmp_path: Path) -> None:
    broken = source / "zz-broken.dcm"
    broken.write_bytes(b"\0" * 128 + b"DICM" + os.urandom(64))
    r = mb("ingest", "anonymise", str(source), "--out", str(tmp_path / "out"), "--mapping", str(tmp_path / "m.json"))
    assert r.returncode == 2 and "zz-broken.dcm" in one_line_error(r)
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.json").exists()
    assert not list(tmp_path.glob(".*anonymise-*"))


def test_anonymise_cli_reports_and_gates(source: Path, tmp_path: Path) -> None:
    r = mb("ingest", "anonymise", str(source), "--out", str(tmp_path / "out"), "--mapping", str(tmp_path / "m.json"),
           "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["gate_passed"] and result["rewritten"] == 10 and result["patients"] == 4
    again = mb(
        "ingest", "anonymise", str(source), "--out", str(tmp_path / "out"), "--mapping", str(tmp_path / "m.json")
    )
    assert again.returncode == 5 and "not empty" in one_line_error(again)
