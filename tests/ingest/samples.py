"""pydicom's own sample files, as shipped and as cleaned with a profile."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import FileDataset

from medbridge.ingest.profile import Profile, clean


def sample(name: str) -> Path:
    """A file shipped in pydicom's wheel (never one it would download)."""
    found = get_testdata_file(name, download=False)
    assert isinstance(found, str), name
    return Path(found)


def read(name: str) -> FileDataset:
    return pydicom.dcmread(sample(name))


def cleaned(name: str, profile: Profile, dest: Path) -> Path:
    """Write a copy of a sample, cleaned with ``profile``, to ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean(read(name), profile).save_as(dest)
    return dest
