"""Shards: pack and extract byte for byte, one ranged read per member, corruption and escapes refused."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from medbridge.errors import AlreadyExists, IntegrityError, InvalidInput
from medbridge.ingest.shards import Member, extract, index_path, load_index, pack, parse_size, read_member

SIZES = {
    "a.dcm": 1000,
    "series/1/b.dcm": 512,
    "series/1/c.dcm": 0,
    "big.bin": 25_000,
    "ünïcødé name.csv": 3000,
    "with\nnewline.txt": 700,
    "deep/" + "d" * 120 + "/long-name.npy": 4096,
    "last.dcm": 9000,
}


@pytest.fixture
def files(tmp_path: Path) -> list[tuple[str, Path]]:
    src = tmp_path / "src"
    out = []
    for n, (name, size) in enumerate(SIZES.items()):
        path = src / f"f{n}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))
        out.append((name, path))
    return out


def test_pack_groups_files_without_splitting_them(files: list[tuple[str, Path]], tmp_path: Path) -> None:
    shards = pack(files, tmp_path / "out", shard_size=10_000)
    groups = [[m.name for m in s.members] for s in shards]
    names = list(SIZES)
    assert groups == [names[0:3], [names[3]], names[4:7], [names[7]]]  # big.bin (25 kB) gets its own shard
    assert [s.path.name for s in shards] == [f"shard-0000{n}.tar" for n in range(4)]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [s.path.name for s in shards] + [s.index_path.name for s in shards]
    )  # no temporary files left
    for s in shards:
        data = s.path.read_bytes()
        assert len(data) == s.size and hashlib.sha256(data).hexdigest() == s.sha256
        index = json.loads(s.index_path.read_text())
        assert index["format"] == "medbridge-shard/1" and index["shard"] == s.path.name
        assert load_index(s.path) == list(s.members)


def test_offsets_are_where_tar_puts_the_data(files: list[tuple[str, Path]], tmp_path: Path) -> None:
    shards = pack(files, tmp_path / "out", shard_size=10_000)
    for s in shards:
        with tarfile.open(s.path) as tar:
            infos = tar.getmembers()
            assert [(i.name, i.offset_data, i.size) for i in infos] == [(m.name, m.offset, m.size) for m in s.members]
            for info, m in zip(infos, s.members, strict=True):
                f = tar.extractfile(info)
                assert f is not None and hashlib.sha256(f.read()).hexdigest() == m.sha256
                assert (info.mode, info.mtime, info.uid) == (0o444, 0, 0)


def test_round_trip_is_byte_identical(files: list[tuple[str, Path]], tmp_path: Path) -> None:
    shards = pack(files, tmp_path / "out", shard_size=10_000)
    dest = tmp_path / "dest"
    written = [p for s in shards for p in extract(s.path, dest)]
    assert len(written) == len(files)
    for name, path in files:
        assert (dest / name).read_bytes() == path.read_bytes(), name
    members = {m.name: (s.path, m) for s in shards for m in s.members}
    for name, path in files:
        shard, member = members[name]
        assert read_member(shard, member) == path.read_bytes()


def test_packing_is_reproducible(files: list[tuple[str, Path]], tmp_path: Path) -> None:
    one = pack(files, tmp_path / "one", shard_size=10_000)
    two = pack(files, tmp_path / "two", shard_size=10_000)
    assert [s.sha256 for s in one] == [s.sha256 for s in two]


def test_a_corrupted_byte_is_an_integrity_error(files: list[tuple[str, Path]], tmp_path: Path) -> None:
    shard = pack(files, tmp_path / "out", shard_size=10_000)[0]
    victim = shard.members[0]
    with open(shard.path, "r+b") as f:
        f.seek(victim.offset + victim.size // 2)
        byte = f.read(1)
        f.seek(-1, io.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(IntegrityError, match="does not match its SHA-256"):
        read_member(shard.path, victim)
    assert read_member(shard.path, shard.members[1])  # the others still read
    with pytest.raises(IntegrityError, match=r"a\.dcm"):
        extract(shard.path, tmp_path / "dest")
    assert not (tmp_path / "dest" / "a.dcm").exists()
    assert not [p for p in (tmp_path / "dest").rglob("*") if p.is_file()]


def test_a_truncated_shard_is_an_integrity_error(files: list[tuple[str, Path]], tmp_path: Path) -> None:
    shard = pack(files, tmp_path / "out", shard_size=10_000)[0]
    last = shard.members[1]
    os.truncate(shard.path, last.offset + 10)
    with pytest.raises(IntegrityError, match="runs past the end"):
        read_member(shard.path, last)


def write_index(shard: Path, members: list[dict[str, object]]) -> None:
    index_path(shard).write_text(json.dumps({"format": "medbridge-shard/1", "members": members}))


def test_an_index_naming_parent_folders_is_refused(tmp_path: Path) -> None:
    shard = tmp_path / "evil.tar"
    with tarfile.open(shard, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("../x")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with tarfile.open(shard) as tar:
        offset = tar.getmembers()[0].offset_data
    sha = hashlib.sha256(b"bad").hexdigest()
    for name in ("../x", "/etc/x", "a/../../x", "./x", "a//x"):
        write_index(shard, [{"name": name, "offset": offset, "size": 3, "sha256": sha}])
        with pytest.raises(InvalidInput, match="must be a relative path"):
            extract(shard, tmp_path / "dest")
    assert not (tmp_path / "x").exists()
    write_index(shard, [{"name": "x", "offset": offset, "size": 3, "sha256": sha}])
    with pytest.raises(InvalidInput, match="must be a relative path"):  # the tar header itself says ../x
        extract(shard, tmp_path / "dest")
    assert not (tmp_path / "x").exists() and not (tmp_path / "dest" / "x").exists()


def test_link_members_are_refused(tmp_path: Path) -> None:
    shard = tmp_path / "links.tar"
    with tarfile.open(shard, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("passwd")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    write_index(shard, [{"name": "passwd", "offset": 512, "size": 0, "sha256": hashlib.sha256(b"").hexdigest()}])
    with pytest.raises(InvalidInput, match="not a regular file"):
        extract(shard, tmp_path / "dest")
    assert not os.path.lexists(tmp_path / "dest" / "passwd")


def test_extract_does_not_follow_links_in_the_destination(files: list[tuple[str, Path]], tmp_path: Path) -> None:
    shard = pack(files, tmp_path / "out", shard_size=10_000)[0]
    dest = tmp_path / "dest"
    dest.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, dest / "series")
    with pytest.raises(InvalidInput, match="not a folder"):
        extract(shard.path, dest)
    assert list(outside.iterdir()) == []


def test_extract_does_not_overwrite(files: list[tuple[str, Path]], tmp_path: Path) -> None:
    shard = pack(files, tmp_path / "out", shard_size=10_000)[0]
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "a.dcm").write_text("mine")
    with pytest.raises(AlreadyExists):
        extract(shard.path, tmp_path / "dest")
    assert (tmp_path / "dest" / "a.dcm").read_text() == "mine"


def test_index_and_tar_must_agree(files: list[tuple[str, Path]], tmp_path: Path) -> None:
    shard = pack(files, tmp_path / "out", shard_size=10_000)[0]
    index = json.loads(shard.index_path.read_text())
    index["members"][1]["offset"] += 512
    shard.index_path.write_text(json.dumps(index))
    with pytest.raises(IntegrityError, match="does not match the index"):
        extract(shard.path, tmp_path / "dest")
    del index["members"][1]
    shard.index_path.write_text(json.dumps(index))
    with pytest.raises(IntegrityError, match="does not match the index"):
        extract(shard.path, tmp_path / "dest")


@pytest.mark.parametrize(
    "index",
    [
        "not json",
        json.dumps({"format": "other", "members": []}),
        json.dumps({"format": "medbridge-shard/1", "members": [{"name": "a"}]}),
        json.dumps({"format": "medbridge-shard/1", "members": [{"name": "a", "offset": -1, "size": 1, "sha256": "0"}]}),
    ],
)
def test_malformed_indexes_are_refused(index: str, tmp_path: Path) -> None:
    (tmp_path / "s.tar").write_bytes(b"\0" * 1024)
    (tmp_path / "s.tar.index.json").write_text(index)
    with pytest.raises(InvalidInput):
        load_index(tmp_path / "s.tar")


def test_pack_refuses_bad_input(files: list[tuple[str, Path]], tmp_path: Path) -> None:
    out = tmp_path / "out"
    a = files[0][1]
    os.symlink(a, tmp_path / "link")
    cases: list[tuple[list[tuple[str, Path]], int, str]] = [
        ([("a", a)], 0, "must be positive"),
        ([("../a", a)], 100, "must be a relative path"),
        ([("/a", a)], 100, "must be a relative path"),
        ([("a", a), ("a", a)], 100, "given twice"),
        ([("a", a), ("a/b", a)], 100, "is a file and also the folder"),
        ([("a", tmp_path / "link")], 100, "not a regular file"),
        ([("a", tmp_path)], 100, "not a regular file"),
        ([("a", tmp_path / "missing")], 100, "No such file"),
        ([("bad\udcff", a)], 100, "not valid UTF-8"),
    ]
    for given, size, message in cases:
        with pytest.raises(InvalidInput, match=message):
            pack(given, out, shard_size=size)
    with pytest.raises(InvalidInput, match="shard prefix"):
        pack([("a", a)], out, shard_size=100, prefix="../x")
    assert not out.exists() or list(out.iterdir()) == []
    pack([("a", a)], out, shard_size=100)
    with pytest.raises(AlreadyExists):
        pack([("a", a)], out, shard_size=100)
    assert pack([], tmp_path / "none", shard_size=100) == []


def test_read_member_of_a_hand_made_member(files: list[tuple[str, Path]], tmp_path: Path) -> None:
    shard = pack(files[:1], tmp_path / "out", shard_size=10_000)[0]
    m = shard.members[0]
    assert read_member(shard.path, Member(m.name, m.offset, m.size, m.sha256)) == files[0][1].read_bytes()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("0", 0),
        ("256MB", 256_000_000),
        ("256 MiB", 256 << 20),
        ("1.5GB", 1_500_000_000),
        ("2GiB", 2 << 30),
        ("10kb", 10_000),
        ("3 KiB", 3072),
        ("1TB", 10**12),
        ("7B", 7),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "MB", "-1MB", "1.5", "1.0000001KB", "12 parsecs", "1e6"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(InvalidInput):
        parse_size(text)
