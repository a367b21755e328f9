"""Anonymisation profiles: the built-in PS3.15 profile, profile files and their errors, and clean."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from medbridge.errors import InvalidInput
from medbridge.ingest.gate import check_dataset
from medbridge.ingest.profile import Profile, Requirement, TagPattern, clean, load_profile, parse_profile
from tests.ingest.samples import read

MINIMAL = 'name = "strict"\n'


def test_built_in_profile_encodes_ps3_15(profile: Profile) -> None:
    assert profile.name == "ps3-15-basic"
    assert profile.forbid_private_tags and profile.require_pixel_data
    by_keyword = {r.keyword: r for r in profile.rules}
    expected = {
        "PatientName": Requirement.PSEUDONYM,
        "PatientID": Requirement.PSEUDONYM,
        "PatientBirthDate": Requirement.EMPTY,
        "ReferringPhysicianName": Requirement.EMPTY,
        "InstitutionName": Requirement.EMPTY,
        "OperatorsName": Requirement.EMPTY,
        "StudyDate": Requirement.EMPTY,
        "PatientAddress": Requirement.ABSENT,
        "InstitutionAddress": Requirement.ABSENT,
        "PerformingPhysicianName": Requirement.ABSENT,
        "OtherPatientIDs": Requirement.ABSENT,
        "OtherPatientIDsSequence": Requirement.ABSENT,
        "PatientTelephoneNumbers": Requirement.ABSENT,
        "PatientBirthTime": Requirement.ABSENT,
        "PatientIdentityRemoved": Requirement.EQUAL,
        "BurnedInAnnotation": Requirement.NOT_EQUAL,
    }
    assert {k: by_keyword[k].require for k in expected} == expected
    assert by_keyword["PatientIdentityRemoved"].value == "YES"
    assert profile.rule_for(0x60023000) is not None  # Overlay Data in group 6002
    assert profile.rule_for(0x00200013) is None  # InstanceNumber is kept


def test_a_stricter_profile_file(tmp_path: Path) -> None:
    path = tmp_path / "strict.toml"
    path.write_text(
        MINIMAL
        + 'pseudonym_pattern = "S-[0-9]{6}"\n'
        + "rules = [\n"
        + '  { keyword = "Manufacturer", require = "absent" },\n'
        + '  { tag = "(0010,0020)", require = "pseudonym" },\n'
        + '  { tag = "0010,0010", keyword = "PatientName", require = "pseudonym", pattern = "P[0-9]+" },\n'
        + "]\n"
    )
    strict = load_profile(path)
    assert strict.source == str(path)
    assert [r.keyword for r in strict.rules] == ["Manufacturer", "PatientID", "PatientName"]
    ds = Dataset()
    ds.Manufacturer = "ACME"
    ds.PatientID = "S-123456"
    ds.PatientName = "P7"
    assert [i.keyword for i in check_dataset(ds, strict)] == ["Manufacturer"]
    ds.PatientID = "123456"
    assert [i.keyword for i in check_dataset(ds, strict)] == ["Manufacturer", "PatientID"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name = ", "not valid TOML"),
        ('description = "x"\n', "missing key 'name'"),
        (MINIMAL + "colour = 1\n", "unknown key 'colour'; valid keys: deidentification_method, description"),
        (MINIMAL + 'private_tags = "some"\n', "private_tags must be 'forbidden' or 'allowed'"),
        (MINIMAL + 'require_pixel_data = "yes"\n', "require_pixel_data must be true or false"),
        (MINIMAL + 'pseudonym_pattern = "("\n', "bad pattern '('"),
        (MINIMAL + "rules = 3\n", "rules must be an array of tables"),
        (MINIMAL + 'rules = [{ require = "absent" }]\n', "rule 1: needs a tag or a keyword"),
        (MINIMAL + 'rules = [{ keyword = "PatientName", require = "absent", why = "x" }]\n', "unknown key 'why'"),
        (MINIMAL + 'rules = [{ keyword = "PatientNom", require = "absent" }]\n', "'PatientNom' is not in the DICOM"),
        (MINIMAL + 'rules = [{ tag = "(0010,001G)", require = "absent" }]\n', "is not '(gggg,eeee)'"),
        (MINIMAL + 'rules = [{ tag = "(0010,0020)", keyword = "PatientName", require = "absent" }]\n', "is not tag"),
        (MINIMAL + 'rules = [{ tag = "(60xx,3000)", keyword = "PatientName", require = "absent" }]\n', "is not tag"),
        (MINIMAL + 'rules = [{ keyword = "PatientName", require = "gone" }]\n', "require must be one of absent, empty"),
        (MINIMAL + 'rules = [{ keyword = "PatientName", require = "equal" }]\n', "needs a string value"),
        (MINIMAL + 'rules = [{ keyword = "PatientName", require = "empty", value = "x" }]\n', "value is only for"),
        (MINIMAL + 'rules = [{ keyword = "PatientName", require = "empty", pattern = "x" }]\n', "pattern is only for"),
        (
            MINIMAL
            + 'rules = [{ keyword = "PatientID", require = "absent" }, { tag = "(0010,0020)", require = "empty" }]\n',
            "rule 2: (0010,0020) already has rule 1",
        ),
    ],
)
def test_bad_profiles_name_the_bad_key(text: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=r"profile strict\.toml") as caught:
        parse_profile(text, "strict.toml")
    assert message in str(caught.value)


def test_missing_profile_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="cannot read profile"):
        load_profile(tmp_path / "absent.toml")


def test_tag_patterns() -> None:
    overlay = TagPattern.parse("(60xx,3000)")
    assert str(overlay) == "(60xx,3000)" and not overlay.exact
    assert overlay.matches(0x60003000) and overlay.matches(0x601E3000) and not overlay.matches(0x60004000)
    name = TagPattern.parse(" 0010,0010 ")
    assert name.exact and name.matches(0x00100010) and str(name) == "(0010,0010)"


def test_rule_requirements(profile: Profile) -> None:
    rules = {r.keyword: r for r in profile.rules}
    absent, empty, pseudonym = rules["PatientAddress"], rules["PatientBirthDate"], rules["PatientID"]
    equal, not_equal = rules["PatientIdentityRemoved"], rules["BurnedInAnnotation"]
    assert absent.problem(False, True, None) is None
    assert absent.problem(True, True, "") == "must be absent; it is present and empty"
    assert empty.problem(True, True, "") is None
    assert empty.problem(True, False, "19700101") == "must be absent or empty"
    assert pseudonym.problem(True, False, "ANON-12ab") is None
    assert pseudonym.problem(True, False, "12345") is not None
    assert pseudonym.problem(True, False, None) is not None  # too large to read: refused
    assert equal.problem(False, True, None) == "must be 'YES'; it is missing"
    assert equal.problem(True, False, "yes ") is None
    assert equal.problem(True, False, "NO") == "must be 'YES'"
    assert not_equal.problem(False, True, None) is None
    assert not_equal.problem(True, False, "NO") is None
    assert not_equal.problem(True, False, "YES") == "must not be 'YES'"


def test_clean_makes_a_passing_copy_and_leaves_the_original(profile: Profile) -> None:
    for name in ("CT_small.dcm", "MR_small.dcm"):
        original = read(name)
        assert check_dataset(original, profile)
        copy = clean(original, profile)
        assert check_dataset(copy, profile) == []
        assert str(original.PatientName).startswith("CompressedSamples")
        assert copy.PatientName == "" and copy.PatientID == ""
        assert copy.PatientIdentityRemoved == "YES"
        assert copy.DeidentificationMethod == profile.deidentification_method
        assert not any(elem.tag.is_private for elem in copy)
        assert "OtherPatientIDsSequence" not in copy
        assert copy.pixel_array.tobytes() == original.pixel_array.tobytes()


def test_clean_writes_pseudonyms_that_match(profile: Profile) -> None:
    copy = clean(read("CT_small.dcm"), profile, pseudonyms={"PatientID": "ANON-0042", "PatientName": "ANON-0042"})
    assert (copy.PatientID, str(copy.PatientName)) == ("ANON-0042", "ANON-0042")
    assert check_dataset(copy, profile) == []
    assert clean(copy, profile).PatientID == "ANON-0042"  # a pseudonym that already matches is kept
    with pytest.raises(InvalidInput, match="pseudonym for PatientID does not match"):
        clean(read("CT_small.dcm"), profile, pseudonyms={"PatientID": "1CT1"})
    with pytest.raises(InvalidInput, match="no pseudonym rule for StudyID"):
        clean(read("CT_small.dcm"), profile, pseudonyms={"StudyID": "ANON-0042"})


def test_clean_reaches_into_sequences_but_not_pixels(profile: Profile) -> None:
    ds = read("CT_small.dcm")
    item = Dataset()
    item.PatientName = "Doe^Jane"
    item.PatientAddress = "1 Main Street"
    item.ReferencedSOPInstanceUID = "1.2.3"
    ds.SourceImageSequence = Sequence([item])
    ds.BurnedInAnnotation = "YES"
    issues = {(i.keyword, i.reason) for i in check_dataset(ds, profile)}
    assert ("PatientAddress", "must be absent (in SourceImageSequence item 1)") in issues
    copy = clean(ds, profile)
    nested = copy.SourceImageSequence[0]
    assert nested.PatientName == "" and "PatientAddress" not in nested and nested.ReferencedSOPInstanceUID == "1.2.3"
    assert [(i.keyword, i.reason) for i in check_dataset(copy, profile)] == [
        ("BurnedInAnnotation", "must not be 'YES'")
    ]
