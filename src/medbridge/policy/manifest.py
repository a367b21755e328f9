"""Manifests in ``sha256sum`` format: one ``<sha256>  <relative path>`` line per file."""

from __future__ import annotations

import re
from collections.abc import Iterable

from medbridge.errors import InvalidInput

#: Name of the virtual file in each dataset root that serves the dataset's manifest.
DATASET_MANIFEST = ".manifest"
#: Name under which a job's results manifest commits its outputs.
RESULTS_MANIFEST = "MANIFEST.sha256"
#: Suffix of files still being uploaded; never a final name.
PARTIAL_SUFFIX = ".medbridge-part"

_LINE = re.compile(r"([0-9a-f]{64}) [ *](.+)")


def format_manifest(entries: Iterable[tuple[str, str]]) -> str:
    """``(sha256, path)`` pairs as sha256sum lines, sorted by path."""
    return "".join(f"{sha}  {path}\n" for sha, path in sorted(entries, key=lambda e: e[1]))


def parse_manifest(text: str) -> list[tuple[str, str]]:
    """Parse sha256sum lines; refuse absolute paths, ``..`` and anything malformed."""
    out: list[tuple[str, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _LINE.fullmatch(line)
        if not m:
            raise InvalidInput(f"manifest line {number} is not '<sha256>  <path>'")
        sha, path = m.groups()
        parts = path.split("/")
        if path.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise InvalidInput(f"manifest line {number}: path {path!r} must be relative and plain")
        out.append((sha, path))
    return out
