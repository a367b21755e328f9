"""Platform storage: datasets added by streaming, and updated with only what changed."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from medbridge.config import Home
from medbridge.control.store import Store
from medbridge.errors import AlreadyExists, InvalidInput, NotAnonymised
from medbridge.platform import storage
from medbridge.platform.catalogue import Catalogue
from medbridge.platform.storage import add_dataset, init_home, update_dataset, walk_source
from medbridge.policy.manifest import format_manifest
from tests.ingest.samples import sample


@pytest.fixture
def home(tmp_path: Path) -> Home:
    h = Home(tmp_path / "home")
    init_home(h, "test")
    return h


@pytest.fixture
def store(home: Home) -> Store:
    s = Store(home.database_url(home.settings()))
    yield s  # type: ignore[misc]
    s.close()


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_the_walk_yields_paths_in_manifest_order_and_refuses_what_a_manifest_cannot_hold(tmp_path: Path) -> None:
    names = ["a/b", "a-b", "a.b", "a b/c", "ab", "a/b0/c", "ü/x", "Z", "a/b-", "a/b.c"]
    src = _tree(tmp_path / "src", {n: n.encode() for n in names})
    assert [rel for rel, _ in walk_source(src)] == sorted(names)
    (src / "bad\nname").write_bytes(b"x")
    with pytest.raises(InvalidInput, match="line breaks"):
        list(walk_source(src))
    (src / "bad\nname").unlink()
    os.symlink("/etc/passwd", src / "a" / "link")
    with pytest.raises(InvalidInput, match="symbolic links"):
        list(walk_source(src))
    (src / "a" / "link").unlink()
    (src / ".manifest.index").write_bytes(b"")
    with pytest.raises(InvalidInput, match="reserved"):
        list(walk_source(src))


def test_update_hashes_only_what_changed_and_keeps_what_the_source_lost(
    home: Home, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = {f"p{i}/s/f{i}.bin": os.urandom(100 + i) for i in range(20)}
    src = _tree(tmp_path / "src", files)
    info, _ = add_dataset(home, store, "ct", src, "society", "test")
    assert (info.files, info.version) == (20, 1)

    (src / "p3/s/f3.bin").write_bytes(b"new content")  # changed
    os.utime(src / "p4/s/f4.bin", ns=(1, 1))  # touched: same bytes, another time
    (src / "p5/s/f5.bin").unlink()  # missing from this delivery
    (src / "p9/s/new.bin").write_bytes(b"added")
    copied: list[str] = []
    real_copy = storage._copy

    def counting(s: Path, rel: str, staging: Path) -> storage.ManifestEntry:
        copied.append(rel)
        return real_copy(s, rel, staging)

    monkeypatch.setattr(storage, "_copy", counting)
    done = update_dataset(home, store, "ct", src, "test")
    assert sorted(copied) == ["p3/s/f3.bin", "p4/s/f4.bin", "p9/s/new.bin"], "only new or changed files are read"
    assert (done.added, done.changed, done.unchanged, done.missing) == (1, 1, 18, 1)
    assert done.missing_examples == ["p5/s/f5.bin"]
    assert (done.info.version, done.info.files) == (2, 21)

    stored = Path(done.info.storage_path)
    assert (stored / "p3/s/f3.bin").read_bytes() == b"new content"
    assert (stored / "p5/s/f5.bin").read_bytes() == files["p5/s/f5.bin"], "an update never removes archived data"
    expected = {**files, "p3/s/f3.bin": b"new content", "p9/s/new.bin": b"added"}
    _, manifest, _ = Catalogue(store, home.manifests).build("ct")
    assert manifest.name == "v2.sha256"
    assert manifest.read_text() == format_manifest((hashlib.sha256(d).hexdigest(), p) for p, d in expected.items())
    assert not (home.manifests / "ct" / "v1.sha256").exists()

    copied.clear()
    again = update_dataset(home, store, "ct", src, "test")
    assert copied == [] and (again.added, again.changed) == (0, 0) and again.info.version == 3


def test_an_update_the_gate_refuses_changes_nothing(home: Home, store: Store, tmp_path: Path) -> None:
    src = _tree(tmp_path / "src", {"a.bin": b"a"})
    add_dataset(home, store, "ct", src, "society", "test")
    shutil.copy(sample("CT_small.dcm"), src / "identified.dcm")  # carries a patient's name
    with pytest.raises(NotAnonymised):
        update_dataset(home, store, "ct", src, "test")
    info = store.dataset("ct")
    assert (info.version, info.files) == (1, 1)
    assert not (Path(info.storage_path) / "identified.dcm").exists()
    assert not list(home.datasets.glob(".updating-*"))
    store.claim("ct")  # the claim was given back


def test_an_add_left_by_a_dead_process_is_taken_over_and_a_live_one_refused(store: Store) -> None:
    from datetime import UTC, datetime

    from sqlalchemy import update

    from medbridge.control.models import Dataset

    now = datetime.now(UTC)
    ds_id = store.begin_dataset("ct", "", "/nowhere", now)
    with pytest.raises(AlreadyExists, match="being added"):
        store.begin_dataset("ct", "", "/nowhere", now)
    assert not store.dataset_exists("ct") and store.datasets() == []
    with store.engine.begin() as conn:
        conn.execute(update(Dataset).where(Dataset.id == ds_id).values(writer=f"{os.uname().nodename}:999999999"))
    store.begin_dataset("ct", "", "/nowhere", now)
