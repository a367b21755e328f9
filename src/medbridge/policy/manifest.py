"""Manifests in ``sha256sum`` format: one ``<sha256>  <relative path>`` line per file, and their index.

A dataset's manifest is sorted by path (code-point order) and cut into pieces of
:data:`PIECE_LINES` lines.  The index names each piece's byte range, its SHA-256 and
its first path, so a reader finds the one piece that can hold a path (a bisection)
and fetches that range alone: what it holds grows with what it reads, not with the
dataset.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from medbridge.errors import InvalidInput

#: Name of the virtual file in each dataset root that serves the dataset's manifest.
DATASET_MANIFEST = ".manifest"
#: Beside it, the manifest's index: one line per piece (see :func:`parse_index`).
MANIFEST_INDEX = ".manifest.index"
#: Lines per manifest piece: a lookup fetches about this many lines (~100 KB).
PIECE_LINES = 1024
#: Name under which a job's results manifest commits its outputs.
RESULTS_MANIFEST = "MANIFEST.sha256"
#: Suffix of files still being uploaded; never a final name.
PARTIAL_SUFFIX = ".medbridge-part"

_LINE = re.compile(r"([0-9a-f]{64}) [ *](.+)")
_INDEX_LINE = re.compile(r"(\d{1,18}) (\d{1,18}) ([0-9a-f]{64})  (.+)")


@dataclass(frozen=True)
class Piece:
    """A range of the manifest: ``length`` bytes from ``offset``, hashing to ``sha256``, from path ``first``."""

    offset: int
    length: int
    sha256: str
    first: str

    def line(self) -> str:
        return f"{self.offset} {self.length} {self.sha256}  {self.first}\n"


def manifest_line(sha256: str, path: str) -> str:
    return f"{sha256}  {path}\n"


def parse_index(text: str) -> list[Piece]:
    """An index's pieces, checked: contiguous from offset 0, first paths strictly ascending."""
    pieces: list[Piece] = []
    for number, line in enumerate(text.splitlines(), 1):
        m = _INDEX_LINE.fullmatch(line)
        if not m:
            raise InvalidInput(f"manifest index line {number} is not '<offset> <length> <sha256>  <first path>'")
        piece = Piece(int(m[1]), int(m[2]), m[3], m[4])
        end = pieces[-1].offset + pieces[-1].length if pieces else 0
        if piece.offset != end or (pieces and piece.first <= pieces[-1].first):
            raise InvalidInput(f"manifest index line {number}: pieces must follow each other in path order")
        pieces.append(piece)
    return pieces


def find_piece(pieces: Sequence[Piece], path: str) -> Piece | None:
    """The piece whose range of paths can hold ``path``; None if it sorts before the first."""
    lo, hi = 0, len(pieces)
    while lo < hi:
        mid = (lo + hi) // 2
        if path < pieces[mid].first:
            hi = mid
        else:
            lo = mid + 1
    return pieces[lo - 1] if lo else None


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
