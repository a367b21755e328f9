"""The rule that decides what a purge may delete: pure, so each case is one call."""

from __future__ import annotations

from medbridge.policy.residue import Kind, judge

STARTED = 1_800_000_000.0


def test_only_dataset_copies_and_new_files_in_the_jobs_own_folders_are_ours() -> None:
    def kind(**facts: object) -> Kind | None:
        base: dict[str, object] = {
            "copy_of": None, "signature": "DICOM preamble", "changed": STARTED, "started": STARTED, "own_folder": None
        }  # fmt: skip
        verdict = judge(**{**base, **facts})  # type: ignore[arg-type]
        return verdict.kind if verdict else None

    assert kind(copy_of="ct/1.dcm", changed=0.0, started=None) is Kind.OURS, "platform data, wherever, whenever"
    assert kind(signature=None) is None
    assert kind(own_folder="/w") is Kind.OURS, "written as the job started, in its own folder"
    assert kind(own_folder="/w", changed=STARTED - 0.001) is Kind.PREEXISTING
    assert kind() is Kind.UNPROVEN, "written during the job, but not in a folder of its own"
    assert kind(changed=STARTED - 3600) is Kind.PREEXISTING
    assert kind(started=None, own_folder="/w") is Kind.UNPROVEN, "no job start: nothing but copies is proven"
    assert kind(own_folder="/w", modified=STARTED - 1) is Kind.UNPROVEN, "a user's file moved into the job's folder"
    assert kind(copy_of="ct/1.raw", signature=None, size=511) is Kind.UNPROVEN, "a small copy proves nothing"
    assert kind(copy_of="ct/1.raw", signature=None, size=0) is None, "an empty file holds no data"
    assert kind(copy_of="ct/1.raw", signature=None, existed=True) is Kind.UNPROVEN, "the job found it there"
    assert kind(copy_of="ct/1.raw", signature=None, changed=STARTED - 1) is Kind.PREEXISTING


def test_each_verdict_says_why() -> None:
    old = judge(copy_of=None, signature="NIfTI-1 header", changed=0.0, started=STARTED, own_folder=None)
    assert old is not None
    assert old.why == (
        "pre-existing medical file, not ours: left in place "
        "(last changed 1970-01-01T00:00:00+00:00, before the job started 2027-01-15T08:00:00+00:00)"
    )
    copy = judge(copy_of="ct/7.raw", signature=None, changed=0.0, started=None, own_folder=None)
    assert copy is not None and "ct/7.raw" in copy.why
