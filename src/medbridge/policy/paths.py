"""The virtual namespace a job sees, and who may do what where in it.

    /                              the root: ``datasets`` and ``results``
    /datasets/<name>/...           read-only; only datasets the session may read exist
    /results/<user>/<job>/...      the session's own job folder is the one writable place;
                                   its user's other job folders are readable

Paths are parsed lexically here.  Resolving symlinks against the real storage is
the server's job (``medbridge.platform.sftp``, ``JobSFTPServer._resolve``), and it must use the same
rule: whatever a name resolves to must stay inside the root it was parsed under.
"""

from __future__ import annotations

import enum
import posixpath
from dataclasses import dataclass


class Action(enum.Enum):
    """What a request wants to do with a path."""

    READ = "read"
    LIST = "list"
    WRITE = "write"


class Refusal(enum.Enum):
    """Why a request is refused; the server maps each to an SFTP status."""

    NOT_FOUND = "no such file"
    DENIED = "permission denied"
    LIMIT = "limit reached"
    UNSUPPORTED = "not supported"


class Kind(enum.Enum):
    ROOT = "root"
    DATASETS = "datasets"
    DATASET = "dataset"
    RESULTS = "results"
    RESULTS_USER = "results-user"
    RESULT = "result"
    OUTSIDE = "outside"


@dataclass(frozen=True)
class Target:
    """A parsed virtual path: which area, which name, which job, and the rest."""

    kind: Kind
    path: str
    name: str | None = None
    job: str | None = None
    rest: tuple[str, ...] = ()


@dataclass(frozen=True)
class View:
    """What one session may see, fixed by the server from its certificate and grants."""

    user: str
    job: str
    datasets: frozenset[str]


@dataclass(frozen=True)
class Decision:
    allowed: bool
    refusal: Refusal | None = None
    reason: str = ""


ALLOW = Decision(True)


class PathEscape(ValueError):
    """A path climbs above the namespace root."""


def normalise(path: str, cwd: str = "/") -> str:
    """Make ``path`` absolute and canonical; refuse to climb above ``/``."""
    if "\x00" in path:
        raise PathEscape("path contains NUL")
    full = path if path.startswith("/") else posixpath.join(cwd, path)
    parts: list[str] = []
    for part in full.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise PathEscape(f"{path!r} climbs above the root")
            parts.pop()
            continue
        parts.append(part)
    return "/" + "/".join(parts)


def parse(path: str) -> Target:
    """Place a canonical path in the namespace."""
    parts = [p for p in path.split("/") if p]
    if not parts:
        return Target(Kind.ROOT, path)
    top, rest = parts[0], parts[1:]
    if top == "datasets":
        if not rest:
            return Target(Kind.DATASETS, path)
        return Target(Kind.DATASET, path, name=rest[0], rest=tuple(rest[1:]))
    if top == "results":
        if not rest:
            return Target(Kind.RESULTS, path)
        if len(rest) == 1:
            return Target(Kind.RESULTS_USER, path, name=rest[0])
        return Target(Kind.RESULT, path, name=rest[0], job=rest[1], rest=tuple(rest[2:]))
    return Target(Kind.OUTSIDE, path)


def decide(view: View, target: Target, action: Action) -> Decision:
    """May this session do ``action`` on ``target``?  Pure; the server audits refusals."""
    kind = target.kind
    if kind is Kind.OUTSIDE:
        return Decision(False, Refusal.NOT_FOUND, "outside the namespace")
    if kind in (Kind.ROOT, Kind.DATASETS, Kind.RESULTS):
        if action is Action.WRITE:
            return Decision(False, Refusal.DENIED, "the namespace skeleton is read-only")
        return ALLOW
    if kind is Kind.DATASET:
        if target.name not in view.datasets:
            return Decision(False, Refusal.NOT_FOUND, f"dataset {target.name!r} not granted")
        if action is Action.WRITE:
            return Decision(False, Refusal.DENIED, "datasets are read-only")
        return ALLOW
    if target.name != view.user:
        return Decision(False, Refusal.DENIED, f"results of user {target.name!r} belong to another account")
    if kind is Kind.RESULTS_USER:
        if action is Action.WRITE:
            return Decision(False, Refusal.DENIED, "only the job's own results folder is writable")
        return ALLOW
    if action is Action.WRITE and (target.job != view.job or not target.rest):
        return Decision(False, Refusal.DENIED, "only the job's own results folder is writable")
    return ALLOW


def within(root: str, candidate: str) -> bool:
    """Is real path ``candidate`` the real path ``root`` or below it?"""
    return candidate == root or candidate.startswith(root.rstrip("/") + "/")
