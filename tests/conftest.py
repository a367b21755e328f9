"""Shared fixtures: a real platform on loopback, with users, datasets and grants."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from medbridge.testing import RunningPlatform

CHEST = {"scan-001.bin": os.urandom(200_000), "scan-002.bin": os.urandom(1_000), "labels/readme.txt": b"lungs\n"}
KNEE = {"knee-001.bin": os.urandom(5_000)}


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[RunningPlatform]:
    """alice may read ``chest``; bob has an account and no grants; ``knee`` is granted to nobody."""
    p = RunningPlatform(tmp_path, enforcement_interval=0.25)
    p.add_user("alice")
    p.add_user("bob")
    p.add_dataset("chest", CHEST)
    p.add_dataset("knee", KNEE)
    p.grant("alice", "chest")
    with p:
        yield p
