"""Shared by the loader's tests: a platform where alice reads one packed dataset, and her job endpoint."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from medbridge.compute.session import Endpoint
from medbridge.platform.storage import pack_dataset
from medbridge.testing import RunningPlatform


def alice_reads(
    root: Path, dataset: str, files: Mapping[str, bytes], shard_bytes: int, **settings: Any
) -> RunningPlatform:
    """A platform (not started yet) where alice may read ``dataset``, also packed into shards."""
    p = RunningPlatform(root, **settings)
    p.add_user("alice")
    p.add_dataset(dataset, files)
    p.grant("alice", dataset)
    pack_dataset(p.home, p.store, dataset, shard_bytes, "test")
    return p


@pytest.fixture(scope="module")
def endpoint(platform: RunningPlatform) -> Iterator[Endpoint]:
    with platform.job_endpoint("alice") as ep:
        yield ep
