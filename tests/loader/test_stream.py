"""Shards as WebDataset reads them, and ShardStream: shuffled, split by rank and worker, resumed mid-epoch."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import webdataset as wds
from torch.utils.data import DataLoader

from medbridge.compute.session import Endpoint
from medbridge.errors import IntegrityError, InvalidInput
from medbridge.loader import Loader
from medbridge.loader.stream import ShardStream, shuffle_buffer
from medbridge.loader.wds import shard_urls
from medbridge.testing import RunningPlatform
from tests.loader.conftest import alice_reads

PAIRS = {f"case-{i:03d}.{field}": os.urandom(1_500 + i) for i in range(24) for field in ("image.bin", "label.bin")}
FILES = {f"img/{i:03d}.bin": os.urandom(1_000 + 3 * i) for i in range(60)} | PAIRS


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningPlatform]:
    p = alice_reads(tmp_path_factory.mktemp("stream"), "ds", FILES, 16 << 10, enforcement_interval=0.25)
    with p:
        yield p


@pytest.fixture(scope="module")
def loader(endpoint: Endpoint) -> Iterator[Loader]:
    with Loader(endpoint) as ld:
        yield ld


def collate(items: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return {k: [item[k] for item in items] for k in items[0]}


def test_webdataset_reads_the_shards_as_they_are(loader: Loader) -> None:
    urls = shard_urls("ds", loader)
    assert len(urls) > 3 and all(u.startswith("medbridge://datasets/ds/.shards/shard-") for u in urls)
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    by_key = {s["__key__"]: s for s in samples}
    assert len(samples) == len(by_key) == 60 + 24, "a file per sample, or an image and its label together"
    for i in range(60):
        assert by_key[f"img/{i:03d}"]["bin"] == FILES[f"img/{i:03d}.bin"]
    for i in range(24):
        pair = by_key[f"case-{i:03d}"]
        assert (pair["image.bin"], pair["label.bin"]) == (PAIRS[f"case-{i:03d}.image.bin"],
                                                          PAIRS[f"case-{i:03d}.label.bin"])  # fmt: skip


def test_a_changed_shard_is_an_integrity_error(platform: RunningPlatform, loader: Loader) -> None:
    shard = sorted((platform.home.datasets / "ds" / ".shards").glob("*.tar"))[-1]
    original = shard.read_bytes()
    folder = shard.parent
    folder.chmod(0o750)
    shard.chmod(0o644)
    try:
        changed = bytearray(original)
        changed[700] ^= 0xFF
        shard.write_bytes(bytes(changed))
        url = shard_urls("ds", loader)[-1]
        with pytest.raises(IntegrityError, match="does not match its index"):
            list(wds.WebDataset([url], shardshuffle=False, empty_check=False))
    finally:
        shard.write_bytes(original)
        shard.chmod(0o444)
        folder.chmod(0o550)


def test_shuffle_buffer_is_a_permutation_that_stays_local() -> None:
    import random

    order = shuffle_buffer(range(1000), 10, random.Random(1))
    assert sorted(order) == list(range(1000)) and order != list(range(1000))
    assert max(item - pos for pos, item in enumerate(order)) <= 10, "no item leaves more than a buffer early"
    assert shuffle_buffer(range(5), 0, random.Random(1)) == list(range(5))


def consume(stream: ShardStream, workers: int, stop: int | None = None) -> list[str]:
    """The paths a training loop sees through a DataLoader, recording them; ``stop`` batches then a 'crash'."""
    seen: list[str] = []
    loader = DataLoader(stream, batch_size=4, num_workers=workers, collate_fn=collate)
    for n, batch in enumerate(loader):
        if stop is not None and n == stop:
            break
        stream.seen(batch)
        seen += batch["path"]
    return seen


def test_every_sample_once_per_epoch_across_ranks_and_workers(loader: Loader) -> None:
    samples = loader.shard_samples("ds")
    streams = [ShardStream(samples, loader, shuffle_buffer=8, seed=3, rank=r, world_size=2) for r in range(2)]
    epoch0 = [consume(s, workers=2) for s in streams]
    everything = sorted(s.path for s in samples)
    assert sorted(epoch0[0] + epoch0[1]) == everything, "every sample once, none twice"
    assert not set(epoch0[0]) & set(epoch0[1]), "the ranks see disjoint halves"
    assert abs(len(epoch0[0]) - len(epoch0[1])) <= 1 and len(streams[0]) == len(epoch0[0])
    for s in streams:
        s.set_epoch(1)
    epoch1 = [consume(s, workers=2) for s in streams]
    assert sorted(epoch1[0] + epoch1[1]) == everything
    assert epoch1[0] != epoch0[0], "a new order each epoch"
    again = ShardStream(samples, loader, shuffle_buffer=8, seed=3, rank=0, world_size=2)
    assert consume(again, workers=2) == epoch0[0], "the same seed and epoch give the same order"


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_loses_and_repeats_nothing(loader: Loader, workers: int) -> None:
    samples = loader.shard_samples("ds")
    whole = consume(ShardStream(samples, loader, shuffle_buffer=16, seed=5), workers)
    first = ShardStream(samples, loader, shuffle_buffer=16, seed=5)
    before = consume(first, workers, stop=7)
    state = first.state_dict()
    resumed = ShardStream(samples, loader, shuffle_buffer=16, seed=5)  # a requeued job: a new process, the state
    resumed.load_state_dict(state)
    after = consume(resumed, workers)
    assert len(before) == 28 and sorted(before + after) == sorted(whole), "nothing lost, nothing repeated"
    assert len(set(before + after)) == len(whole)
    if workers == 0:
        assert before + after == whole, "in one process the resumed order is the uninterrupted one"
    wrong = ShardStream(samples, loader, shuffle_buffer=16, seed=6)
    with pytest.raises(InvalidInput, match="seed 5"):
        wrong.load_state_dict(state)


def test_from_platform_needs_shards(platform: RunningPlatform, loader: Loader, tmp_path: Path) -> None:
    stream = ShardStream.from_platform("ds", loader=loader, shuffle_buffer=4)
    assert len(stream) == 60 + 48
    with pytest.raises(InvalidInput, match="rank 2 is not in a world of 2"):
        ShardStream(stream.samples, loader, rank=2, world_size=2)
