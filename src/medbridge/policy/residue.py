"""Whose is a medical-looking file a residue scan found: what a purge may delete, and why.

A purge deletes only what is proven to be platform data brought by the job:

- a file whose SHA-256 is in the manifest of a dataset the job could read (platform
  data wherever it lies), if it is at least :data:`MIN_COPY_BYTES` long (a small or
  empty file equal to a dataset file proves nothing: an empty ``__init__.py``, a
  one-line readme) and was not there before the job started;
- a file with a medical-image signature that was created or changed (its ``ctime``,
  which no user can set back) at or after the job started, inside one of the job's
  own folders (folders that exist for this job alone), and whose content was written
  then too (its ``mtime``: a user's file moved or chmodded there keeps its old one).

A file that was there before the job started (its ``ctime`` says so, or the job saw
the same file, by device and inode, when it began) is never deleted, whatever it holds.
Anything else that looks medical is left in place and reported: written during the
job elsewhere (likely residue, not proven: the scan is not clean), there before the
job started (not this job's: reported, the scan stays clean), or found with no job
to tie it to (a scan by hand: not clean).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum

#: A dataset copy smaller than this is reported, never purged: equal bytes prove nothing in a few bytes.
MIN_COPY_BYTES = 512


class Kind(Enum):
    OURS = "ours"  # proven platform data brought by the job: a purge deletes it
    UNPROVEN = "unproven"  # looks medical, cannot be tied to the job: left, counts as residue
    PREEXISTING = "preexisting"  # was there before the job started: left, not this job's residue


@dataclass(frozen=True)
class Verdict:
    kind: Kind
    why: str


def judge(
    *,
    copy_of: str | None,
    signature: str | None,
    changed: float,
    started: float | None,
    own_folder: str | None,
    size: int = MIN_COPY_BYTES,
    existed: bool = False,
    modified: float | None = None,
) -> Verdict | None:
    """Decide about one file: ``copy_of`` names the dataset file its hash matched, ``signature``
    the medical format its bytes carry, ``changed`` its ctime, ``started`` the job's start on
    the same clock (None: no job), ``own_folder`` the job's own folder that holds it, if any,
    ``size`` its length, ``existed`` whether the job saw this very file (device, inode) when it began,
    ``modified`` its mtime (a file moved or chmodded into the job's folder keeps its old one).
    None when the file is neither.
    """
    if copy_of is not None and size == 0:
        copy_of = None  # an empty file holds no data, whatever it equals
    if copy_of is None and signature is None:
        return None
    if started is not None and changed < started:
        return Verdict(
            Kind.PREEXISTING,
            f"pre-existing {_what(copy_of, signature)}, not ours: left in place (last changed {_when(changed)}, "
            f"before the job started {_when(started)})",
        )
    if existed:
        return Verdict(
            Kind.UNPROVEN,
            f"{_what(copy_of, signature)} that was there before the job started and changed during it: "
            "not proven the job's, left in place",
        )
    if copy_of is not None and size >= MIN_COPY_BYTES:
        return Verdict(Kind.OURS, f"platform data: the manifest of a dataset the job could read lists it ({copy_of})")
    if signature is None:
        return Verdict(
            Kind.UNPROVEN,
            f"equal to a small dataset file ({copy_of}, under {MIN_COPY_BYTES} bytes): proves nothing, left in place",
        )
    if started is None:
        return Verdict(Kind.UNPROVEN, "medical file with no job to tie it to: not proven platform data, left in place")
    if own_folder is not None and modified is not None and modified < started:
        return Verdict(
            Kind.UNPROVEN,
            f"medical file last written {_when(modified)}, before the job started, and moved or changed into "
            f"its own folder {own_folder} during it: not proven the job's, left in place",
        )
    if own_folder is not None:
        return Verdict(Kind.OURS, f"written during the job in its own folder {own_folder}")
    return Verdict(
        Kind.UNPROVEN,
        "medical file written or changed during the job outside the job's own folders: "
        "not proven the job's, left in place",
    )


def _what(copy_of: str | None, signature: str | None) -> str:
    return "medical file" if signature is not None else f"copy of dataset file {copy_of}"


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")
