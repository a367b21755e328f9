"""PyTorch: DataLoader workers read every sample exactly once; prefetching overlaps compute."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

torch = pytest.importorskip("torch", reason="torch is an optional extra; scripts/setup installs torch==2.13.0")

from torch.utils.data import DataLoader  # noqa: E402

from medbridge.compute.session import Endpoint  # noqa: E402
from medbridge.errors import AccessRevoked  # noqa: E402
from medbridge.loader import Loader  # noqa: E402
from medbridge.loader.torch import MedbridgeDataset, MedbridgeIterableDataset  # noqa: E402
from medbridge.testing import RunningPlatform  # noqa: E402
from medbridge.testing.wait import until  # noqa: E402
from tests.loader.conftest import alice_reads  # noqa: E402

FILES = {f"cxr/{i:03d}.bin": os.urandom(4096 + i) for i in range(48)}


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningPlatform]:
    p = alice_reads(tmp_path_factory.mktemp("torch"), "cxr", FILES, 64 << 10, enforcement_interval=0.25)
    p.add_user("carol")  # whose grant the revocation test ends
    p.grant("carol", "cxr")
    with p:
        yield p


def collate(batch: list[dict[str, object]]) -> list[dict[str, object]]:
    return batch


@pytest.mark.parametrize("shards", [False, True], ids=["files", "shards"])
def test_map_style_with_two_workers_reads_each_sample_once(endpoint: Endpoint, shards: bool) -> None:
    with Loader(endpoint) as loader:
        ds = MedbridgeDataset.from_platform("cxr", shards=shards, loader=loader,
                                            transform=lambda item: {**item, "n": len(item["image"])})  # fmt: skip
        seen = []
        for batch in DataLoader(ds, batch_size=5, num_workers=2, shuffle=True, collate_fn=collate):
            for item in batch:
                assert item["image"] == FILES[item["path"].removeprefix("/datasets/cxr/")]
                assert item["n"] == len(item["image"]), "dictionary transforms apply to items"
                seen.append(item["path"])
    assert sorted(seen) == sorted(f"/datasets/cxr/{k}" for k in FILES)


def test_iterable_with_two_workers_reads_each_sample_once(endpoint: Endpoint) -> None:
    with Loader(endpoint) as loader:
        ds = MedbridgeIterableDataset(loader.files("cxr"), loader, window=8)
        seen = [item["path"] for batch in DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate)
                for item in batch]  # fmt: skip
    assert len(seen) == len(FILES) and set(seen) == {f"/datasets/cxr/{k}" for k in FILES}


def test_prefetching_reads_ahead_while_the_consumer_computes(endpoint: Endpoint) -> None:
    """While the consumer holds its first sample (as if computing on it), the other 23 are read in the
    background: counted by the loader, not timed (a busy machine stretches the time, not the count)."""
    with Loader(endpoint) as loader:
        paths = loader.files("cxr")[:24]
        items = iter(MedbridgeIterableDataset(paths, loader, window=24))
        first = next(items)
        until(lambda: loader.stats.files >= 24, "the samples after the first, read while the consumer holds it")
        rest = list(items)
    assert [first["path"], *(item["path"] for item in rest)] == paths


#: Sessions the platform ends say so; a connection opened after the revocation is refused with why.
REVOKED = r"access revoked: grant ended for dataset\(s\) cxr|no live grant left for user 'carol'"


def test_a_grant_revoked_mid_epoch_ends_the_dataloader_with_the_revocation(platform: RunningPlatform) -> None:
    """From a DataLoader worker, the loader's refusal arrives as the same type, naming why: within seconds."""
    with platform.job_endpoint("carol", job_id="revoked-mid-epoch") as ep, Loader(ep, patience=120) as loader:
        ds = MedbridgeIterableDataset(loader.files("cxr") * 2000, loader, window=8)  # far longer than the test
        batches = iter(DataLoader(ds, batch_size=4, num_workers=1, collate_fn=collate))
        assert len(next(batches)) == 4, "the epoch is under way"
        platform.store.revoke("carol", "cxr", datetime.now(UTC), "test")
        start = time.monotonic()
        with pytest.raises(AccessRevoked, match=REVOKED):
            for _ in batches:
                pass
        assert time.monotonic() - start < 5
