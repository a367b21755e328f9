"""``medbridge://`` against fsspec's own local file system over the same dataset: same answers, same errors."""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fsspec.implementations.local import LocalFileSystem

from medbridge.compute.session import Endpoint
from medbridge.loader import Loader
from medbridge.loader.filesystem import MedbridgeFileSystem, platform_path
from medbridge.testing import RunningPlatform
from tests.loader.conftest import alice_reads

FILES = {f"img/{i:03d}.bin": os.urandom(3_000 + 7 * i) for i in range(12)}
FILES["vol/ct-001.raw"] = os.urandom(3 << 20)
FILES["vol/deep/readme.txt"] = b"lungs\n"


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningPlatform]:
    p = alice_reads(tmp_path_factory.mktemp("fs"), "ct", FILES, 64 << 10, enforcement_interval=0.25)
    p.add_dataset("secret", {"a.bin": b"no"})
    with p:
        yield p


@pytest.fixture(scope="module")
def fs(endpoint: Endpoint, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MedbridgeFileSystem]:
    folder = tmp_path_factory.mktemp("job")
    (folder / "scratch").mkdir()
    with Loader(endpoint) as loader:
        yield MedbridgeFileSystem(
            loader, ledger=str(folder / "ledger"), scratch=str(folder / "scratch"),
            environ={"MEDBRIDGE_JOB_ID": "job-1"}, skip_instance_cache=True,
        )  # fmt: skip


@pytest.fixture(scope="module")
def local(platform: RunningPlatform) -> tuple[LocalFileSystem, Path]:
    return LocalFileSystem(), platform.home.datasets / "ct"


def _rel(entry: dict[str, Any], root: str) -> tuple[str, str, int]:
    return entry["name"].removeprefix(root).lstrip("/"), entry["type"], entry["size"] if entry["type"] == "file" else 0


def test_url_forms_name_the_platform_path() -> None:
    for url in ("medbridge://datasets/ct/a.nii", "medbridge:///datasets/ct/a.nii", "medbridge:/datasets/ct/a.nii",
                "/datasets/ct/a.nii", "datasets/ct//./a.nii"):  # fmt: skip
        assert platform_path(url) == "/datasets/ct/a.nii"
    with pytest.raises(ValueError, match="climbs above"):
        platform_path("medbridge://../etc/passwd")


def test_ls_detail_and_names_match_the_local_file_system(fs: MedbridgeFileSystem, local: tuple[Any, Path]) -> None:
    lfs, root = local
    for sub in ("vol", "img", "vol/deep"):
        ours = sorted(_rel(e, "/datasets/ct") for e in fs.ls(f"medbridge://datasets/ct/{sub}", detail=True))
        theirs = sorted(_rel(e, str(root)) for e in lfs.ls(str(root / sub), detail=True))
        assert ours == theirs
        assert sorted(fs.ls(f"/datasets/ct/{sub}", detail=False)) == sorted(e[0] and f"/datasets/ct/{e[0]}"
                                                                            for e in ours)  # fmt: skip
    # a file lists as itself, as in the local file system
    [entry] = fs.ls("/datasets/ct/vol/ct-001.raw")
    assert (entry["name"], entry["type"], entry["size"]) == ("/datasets/ct/vol/ct-001.raw", "file", 3 << 20)


def test_info_find_and_walk(fs: MedbridgeFileSystem, local: tuple[Any, Path]) -> None:
    lfs, root = local
    assert fs.info("medbridge://datasets/ct/vol")["type"] == "directory"
    assert fs.info("medbridge://datasets/ct/img/003.bin")["size"] == len(FILES["img/003.bin"])
    ours = {p.removeprefix("/datasets/ct/") for p in fs.find("medbridge://datasets/ct")}
    theirs = {Path(p).relative_to(root).as_posix() for p in lfs.find(str(root))}
    assert set(FILES) <= ours
    extra = ours - theirs
    assert ".manifest" in extra and all(p.startswith(".manifest") for p in extra), "only the platform's manifest"
    assert fs.isdir("/datasets/ct/img") and fs.isfile("/datasets/ct/img/000.bin")
    assert fs.exists("/datasets/ct/img/000.bin") and not fs.exists("/datasets/ct/img/none.bin")


@pytest.mark.parametrize(
    ("start", "end"), [(None, None), (0, 10), (100, None), (2_990, 5_000), (10_000, 20_000), (-10, None), (5, -5)]
)
def test_cat_file_ranges_match_the_local_file_system(
    fs: MedbridgeFileSystem, local: tuple[Any, Path], start: int | None, end: int | None
) -> None:
    lfs, root = local
    assert fs.cat_file("medbridge://datasets/ct/img/000.bin", start, end) == lfs.cat_file(
        str(root / "img/000.bin"), start, end
    )


def test_errors_are_the_ones_fsspec_users_catch(fs: MedbridgeFileSystem) -> None:
    with pytest.raises(FileNotFoundError):
        fs.cat_file("medbridge://datasets/ct/img/missing.bin")
    with pytest.raises(FileNotFoundError):
        fs.info("medbridge://datasets/ct/missing")
    with pytest.raises(FileNotFoundError):
        fs.ls("medbridge://datasets/ct/missing")
    with pytest.raises(PermissionError, match="dataset 'secret' is not granted"):
        fs.cat_file("medbridge://datasets/secret/a.bin")
    with pytest.raises(PermissionError, match="read-only"):
        fs.open("medbridge://datasets/ct/new.bin", "wb")
    with pytest.raises(PermissionError, match="never deletes"):
        fs.rm("medbridge://datasets/ct/img/000.bin")
    with pytest.raises(ValueError, match="mode"):
        fs.open("medbridge://datasets/ct/img/000.bin", "ab")


def test_cat_ranges_keeps_order_and_errors_in_place(fs: MedbridgeFileSystem) -> None:
    paths = [f"medbridge://datasets/ct/{n}" for n in FILES if n.startswith("img/")]
    paths.insert(3, "medbridge://datasets/ct/img/missing.bin")
    out = fs.cat_ranges(paths, 10, 20)
    assert isinstance(out[3], FileNotFoundError)
    assert [o for i, o in enumerate(out) if i != 3] == [FILES[n][10:20] for n in FILES if n.startswith("img/")]
    with pytest.raises(FileNotFoundError):
        fs.cat_ranges(paths, 0, None, on_error="raise")
    whole = fs.cat_ranges(["/datasets/ct/vol/ct-001.raw", "/datasets/ct/img/001.bin"], None, None)
    assert whole == [FILES["vol/ct-001.raw"], FILES["img/001.bin"]]


def test_open_seeks_reads_past_the_end_and_reads_ahead(fs: MedbridgeFileSystem) -> None:
    data = FILES["vol/ct-001.raw"]
    with fs.open("medbridge://datasets/ct/vol/ct-001.raw", "rb", block_size=1 << 20) as f:
        assert f.size == len(data)
        assert f.read(348) == data[:348]
        assert f.read(1000) == data[348:1348]
        assert (f.cache.hit_count, f.cache.miss_count) == (1, 1), "the second read is served from the read-ahead"
        f.seek(-10, 2)
        assert f.read(100) == data[-10:]
        assert f.read() == b""
    with fs.open("medbridge://datasets/ct/img/000.bin", "rt", encoding="latin-1") as text:
        assert text.read(5) == FILES["img/000.bin"][:5].decode("latin-1")
    with pytest.raises(FileNotFoundError):
        fs.open("medbridge://datasets/ct/vol/none.nii", "rb")


def test_results_are_written_whole_and_recorded_for_the_commit(
    fs: MedbridgeFileSystem, platform: RunningPlatform
) -> None:
    results = platform.home.results / "alice" / "job-1"
    with fs.open("medbridge://results/alice/job-1/masks/m-001.bin", "wb", block_size=1 << 16) as f:
        for _ in range(5):
            f.write(b"m" * 50_000)  # several chunks streamed before the close
        assert not (results / "masks" / "m-001.bin").exists(), "nothing under the final name before it is whole"
    assert (results / "masks" / "m-001.bin").read_bytes() == b"m" * 250_000
    fs.pipe_file("medbridge://results/alice/job-1/summary.json", b"{}")
    with pytest.raises(RuntimeError), fs.open("medbridge://results/alice/job-1/broken.bin", "wb") as f:
        f.write(b"half")
        f.flush(force=False)
        raise RuntimeError("the payload failed mid-write")
    assert not list(results.rglob("broken.bin*")), "a writer that raised leaves nothing, not even its part file"
    assert fs.ledger is not None
    ledger = Path(fs.ledger).read_text().splitlines()
    assert [line.split("  ")[1] for line in ledger] == ["masks/m-001.bin", "summary.json"]
    with pytest.raises(PermissionError, match="writes only under medbridge://results/alice/job-1/"):
        fs.pipe_file("medbridge://results/alice/other-job/x.bin", b"x")


def test_get_copies_only_into_the_job_scratch(fs: MedbridgeFileSystem, tmp_path: Path) -> None:
    assert fs.scratch is not None
    fs.get("medbridge://datasets/ct/vol/", fs.scratch + "/vol/", recursive=True)
    assert (Path(fs.scratch) / "vol" / "deep" / "readme.txt").read_bytes() == FILES["vol/deep/readme.txt"]
    assert (Path(fs.scratch) / "vol" / "ct-001.raw").read_bytes() == FILES["vol/ct-001.raw"]
    with pytest.raises(PermissionError, match="only into the job's scratch"):
        fs.get("medbridge://datasets/ct/img/000.bin", str(tmp_path / "copy.bin"))
    assert not (tmp_path / "copy.bin").exists()


def test_fsspec_finds_the_protocol_through_the_installed_entry_point() -> None:
    [ep] = [e for e in importlib.metadata.entry_points(group="fsspec.specs") if e.name == "medbridge"]
    assert ep.load() is MedbridgeFileSystem
