"""``medbridge ingest anonymise``: a folder rewritten per the PS3.15 basic profile, so that the gate takes it.

Every DICOM file is rewritten with :func:`medbridge.ingest.profile.clean` (each attribute
removed, emptied or replaced as the profile says, private tags removed, Patient Identity
Removed = YES and the De-identification Method written), after its UIDs are remapped:
every UID that is not one the standard registers (SOP classes, transfer syntaxes) gets a
new one derived from it and a secret salt, so the same study keeps one Study Instance
UID across files and runs.  Patient ID and Patient Name become the patient's pseudonym,
taken from (or added to) a mapping file that holds the originals: it stays with the
provider, so it may lie neither in the source nor in the output.  Pixel data is copied
byte for byte.  Other files are copied unchanged (the gate judges them as they are).

The source is only read.  The output is built in a staging folder beside it and moved
into place when whole, so a failed run leaves no output that looks complete.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import UID, generate_uid

from medbridge.errors import AlreadyExists, InvalidInput
from medbridge.ingest.gate import check_file
from medbridge.ingest.media import DICOM, media_type
from medbridge.ingest.profile import Profile, clean, with_pseudonyms

MAPPING_FORMAT = "medbridge-pseudonyms/1"
_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,40}")
_HEAD = 1024


class Pseudonyms:
    """The provider's mapping: original Patient ID → pseudonym, and the salt that derives new UIDs."""

    def __init__(self, path: Path, prefix: str):
        if not _PREFIX.fullmatch(prefix):
            raise InvalidInput(f"--prefix {prefix!r}: use letters, digits and '-' (at most 41)")
        self.path = path
        self.prefix = prefix
        self.added = 0
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raw = {"format": MAPPING_FORMAT, "salt": secrets.token_hex(32), "prefix": prefix, "patients": {}}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidInput(f"cannot read the pseudonym mapping {path}: {exc}") from exc
        if not (isinstance(raw, dict) and raw.get("format") == MAPPING_FORMAT and isinstance(raw.get("salt"), str)
                and isinstance(raw.get("patients"), dict)):  # fmt: skip
            raise InvalidInput(f"{path}: not a {MAPPING_FORMAT} mapping file")
        if raw.get("prefix") != prefix:
            raise InvalidInput(f"{path} assigns pseudonyms with prefix {raw.get('prefix')!r}, not {prefix!r}")
        self.salt: str = raw["salt"]
        self.patients: dict[str, str] = {str(k): str(v) for k, v in raw["patients"].items()}
        self._used = set(self.patients.values())

    def of(self, patient_id: str) -> str:
        """The patient's pseudonym, assigned now if the patient is new."""
        if patient_id in self.patients:
            return self.patients[patient_id]
        n = len(self.patients) + 1
        while f"{self.prefix}-{n:04d}" in self._used:
            n += 1
        name = self.patients[patient_id] = f"{self.prefix}-{n:04d}"
        self._used.add(name)
        self.added += 1
        return name

    def uid(self, old: str) -> str:
        """A new UID for ``old``: the same for the same UID and salt, unguessable without the salt."""
        return str(generate_uid(entropy_srcs=[self.salt, old]))

    def save(self) -> None:
        """Write the mapping (0600) under a temporary name, then rename it into place."""
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        data = {"format": MAPPING_FORMAT, "salt": self.salt, "prefix": self.prefix, "patients": self.patients}
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, ensure_ascii=False)
                f.write("\n")
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)


@dataclass
class Outcome:
    """What a run did, for the summary and ``--json``."""

    rewritten: int = 0
    copied: int = 0
    skipped: list[str] = field(default_factory=list)
    patients: int = 0
    new_pseudonyms: int = 0
    uids_remapped: int = 0
    declared: dict[str, str] = field(default_factory=dict)


def anonymise(src: Path, dst: Path, mapping: Path, profile: Profile, *, prefix: str = "ANON",
              force: bool = False, progress: Callable[[int], None] | None = None) -> Outcome:  # fmt: skip
    """Rewrite ``src`` into ``dst``; see the module's docstring.  ``progress`` gets bytes read."""
    src, dst, mapping = Path(src), Path(dst), Path(mapping)
    if not src.is_dir():
        raise InvalidInput(f"{src}: not a folder")
    rsrc, rdst, rmap = (Path(os.path.realpath(p)) for p in (src, dst, mapping))
    if rdst.is_relative_to(rsrc) or rsrc.is_relative_to(rdst):
        raise InvalidInput(f"--out {dst} and {src} must not contain one another")
    if rmap.is_relative_to(rsrc) or rmap.is_relative_to(rdst):
        raise InvalidInput(f"--mapping {mapping}: the mapping holds the original identities; keep it outside "
                           "the source and the output (it stays with the provider, never uploaded)")  # fmt: skip
    if dst.exists() and not dst.is_dir():
        raise InvalidInput(f"--out {dst}: not a folder")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise AlreadyExists(f"--out {dst} is not empty; use --force to write into it (files of the same name "
                            "are replaced, no other file is touched)")  # fmt: skip
    names = Pseudonyms(mapping, prefix)
    probe = f"{prefix}-0001"
    declared: dict[str, str] = {}
    if not profile.pseudonym_pattern.fullmatch(probe):
        pattern = re.escape(prefix) + "-[0-9]{4,}"
        declared = {"PatientID": pattern, "PatientName": pattern}
        profile = with_pseudonyms(profile, declared)
    outcome = Outcome(declared=declared)
    stage = dst.parent / f".{dst.name}.anonymise-{os.getpid()}"
    stage.mkdir(parents=True)
    uids: dict[str, str] = {}
    try:
        for rel, path in _files(src, outcome):
            target = stage / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            size = path.stat().st_size
            if _is_dicom(path):
                _rewrite(path, target, profile, names, uids)
                outcome.rewritten += 1
            else:
                shutil.copyfile(path, target, follow_symlinks=False)
                outcome.copied += 1
            if progress is not None:
                progress(size)
        _move_into(stage, dst)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    names.save()
    outcome.patients, outcome.new_pseudonyms, outcome.uids_remapped = len(names.patients), names.added, len(uids)
    return outcome


def _files(src: Path, outcome: Outcome) -> Iterator[tuple[str, Path]]:
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(src).as_posix()
            mode = path.lstat().st_mode
            if not stat.S_ISREG(mode):
                outcome.skipped.append(rel)  # links and special files: never followed
                continue
            yield rel, path


def _is_dicom(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(_HEAD)
    return media_type(head, path.name) == DICOM


def _rewrite(path: Path, target: Path, profile: Profile, names: Pseudonyms, uids: dict[str, str]) -> None:
    whole = [i.reason for i in check_file(path, profile).issues if i.tag is None]
    if whole:  # truncated or unreadable: pydicom would read what it can, and the copy would look whole
        raise InvalidInput(f"{path}: {whole[0]}")
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise InvalidInput(f"{path}: not readable as DICOM ({exc})") from exc
    pseudonym = names.of(str(ds.get("PatientID", "") or ""))
    _remap(ds, names, uids)
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        _remap(meta, names, uids)
    try:
        out = clean(ds, profile, pseudonyms={"PatientID": pseudonym, "PatientName": pseudonym})
        out.save_as(target, enforce_file_format=False)
    except (ValueError, TypeError, OSError) as exc:
        raise InvalidInput(f"{path}: cannot be rewritten ({exc})") from exc


def _remap(ds: Dataset, names: Pseudonyms, uids: dict[str, str]) -> None:
    """Replace every UID the standard does not register, at every depth; the same UID maps the same everywhere."""
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _remap(item, names, uids)
        elif elem.VR == "UI" and not elem.is_empty:
            values = list(elem.value) if isinstance(elem.value, MultiValue) else [elem.value]
            new = [_new_uid(str(v), names, uids) for v in values]
            elem.value = new if len(new) > 1 else new[0]


def _new_uid(old: str, names: Pseudonyms, uids: dict[str, str]) -> str:
    old = old.rstrip("\0 ")
    if not old or UID(old).name != old:  # a registered UID (SOP class, transfer syntax, ...) names a kind, not a person
        return old
    if old not in uids:
        uids[old] = names.uid(old)
    return uids[old]


def _move_into(stage: Path, dst: Path) -> None:
    """Put the staged output in place: one rename into a new or empty folder, else file by file."""
    if not dst.exists() or (dst.is_dir() and not any(dst.iterdir())):
        if dst.exists():
            dst.rmdir()
        os.rename(stage, dst)
        return
    for dirpath, _, filenames in os.walk(stage):
        for name in filenames:
            rel = (Path(dirpath) / name).relative_to(stage)
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(Path(dirpath) / name, dst / rel)


def summary(outcome: Outcome) -> dict[str, Any]:
    return dict(outcome.__dict__)
