"""Path policy: canonical paths, the namespace map and who may do what where."""

from __future__ import annotations

import pytest

from medbridge.policy.paths import Action, Kind, PathEscape, Refusal, View, decide, normalise, parse, within

VIEW = View(user="alice", job="j1", datasets=frozenset({"chest"}))


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("/", "/"),
        ("", "/"),
        ("datasets", "/datasets"),
        ("/datasets//chest/./a", "/datasets/chest/a"),
        ("/datasets/chest/sub/../a", "/datasets/chest/a"),
        ("/datasets/chest/../../etc", "/etc"),
    ],
)
def test_normalise(raw: str, canonical: str) -> None:
    assert normalise(raw) == canonical


@pytest.mark.parametrize("raw", ["/..", "/datasets/../../x", "../../../etc/passwd", "/a\x00b"])
def test_normalise_refuses_climbing_above_root(raw: str) -> None:
    with pytest.raises(PathEscape):
        normalise(raw)


@pytest.mark.parametrize(
    ("path", "kind", "name", "job", "rest"),
    [
        ("/", Kind.ROOT, None, None, ()),
        ("/datasets", Kind.DATASETS, None, None, ()),
        ("/datasets/chest/a/b", Kind.DATASET, "chest", None, ("a", "b")),
        ("/results", Kind.RESULTS, None, None, ()),
        ("/results/alice", Kind.RESULTS_USER, "alice", None, ()),
        ("/results/alice/j1/out", Kind.RESULT, "alice", "j1", ("out",)),
        ("/etc/passwd", Kind.OUTSIDE, None, None, ()),
    ],
)
def test_parse(path: str, kind: Kind, name: str | None, job: str | None, rest: tuple[str, ...]) -> None:
    t = parse(path)
    assert (t.kind, t.name, t.job, t.rest) == (kind, name, job, rest)


@pytest.mark.parametrize(
    ("path", "action", "allowed", "refusal"),
    [
        ("/", Action.LIST, True, None),
        ("/", Action.WRITE, False, Refusal.DENIED),
        ("/datasets/chest/a", Action.READ, True, None),
        ("/datasets/chest/a", Action.WRITE, False, Refusal.DENIED),
        ("/datasets/knee", Action.READ, False, Refusal.NOT_FOUND),
        ("/datasets/knee/a", Action.LIST, False, Refusal.NOT_FOUND),
        ("/results/alice", Action.LIST, True, None),
        ("/results/alice", Action.WRITE, False, Refusal.DENIED),
        ("/results/alice/j1", Action.WRITE, False, Refusal.DENIED),
        ("/results/alice/j1/out.nii", Action.WRITE, True, None),
        ("/results/alice/j0/old.nii", Action.READ, True, None),
        ("/results/alice/j0/old.nii", Action.WRITE, False, Refusal.DENIED),
        ("/results/bob", Action.LIST, False, Refusal.DENIED),
        ("/results/bob/j1/x", Action.READ, False, Refusal.DENIED),
        ("/etc/passwd", Action.READ, False, Refusal.NOT_FOUND),
    ],
)
def test_decide(path: str, action: Action, allowed: bool, refusal: Refusal | None) -> None:
    d = decide(VIEW, parse(path), action)
    assert (d.allowed, d.refusal) == (allowed, refusal)
    assert d.allowed or d.reason


@pytest.mark.parametrize(
    ("root", "candidate", "inside"),
    [
        ("/s/chest", "/s/chest", True),
        ("/s/chest", "/s/chest/a", True),
        ("/s/chest", "/s/chest2/a", False),
        ("/s/chest", "/s", False),
        ("/s/chest/", "/s/chest/a", True),
    ],
)
def test_within(root: str, candidate: str, inside: bool) -> None:
    assert within(root, candidate) is inside
