"""Shared fixtures: a real platform on loopback, with users, datasets and grants."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from medbridge import fastpath
from medbridge.testing import RunningPlatform
from medbridge.testing.postgres import PostgresServer

CHEST = {"scan-001.bin": os.urandom(200_000), "scan-002.bin": os.urandom(1_000), "labels/readme.txt": b"lungs\n"}
KNEE = {"knee-001.bin": os.urandom(5_000)}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--database",
        choices=("sqlite", "postgresql"),
        default="sqlite",
        help="Control database of the control- and data-plane tests (postgresql: a private server the tests start).",
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    """``@pytest.mark.fastpath``: a test of what only the fast path has (read-file, corked replies, sealing)."""
    if item.get_closest_marker("fastpath") is not None and not fastpath.enabled():
        pytest.skip("the fast path is off here (MEDBRIDGE_FASTPATH or the asyncssh release): it has no such feature")


@pytest.fixture(scope="session")
def postgres(request: pytest.FixtureRequest) -> Iterator[PostgresServer | None]:
    """The session's PostgreSQL server (started once, stopped by PID at the end), under --database postgresql."""
    if request.config.getoption("--database") != "postgresql":
        yield None
        return
    with PostgresServer() as server:
        yield server


@pytest.fixture
def database_url(postgres: PostgresServer | None) -> str:
    """A fresh control database: '' (SQLite in the home) or a new PostgreSQL database."""
    return postgres.database() if postgres is not None else ""


@pytest.fixture
def platform(tmp_path: Path, database_url: str) -> Iterator[RunningPlatform]:
    """alice may read ``chest``; bob has an account and no grants; ``knee`` is granted to nobody."""
    p = RunningPlatform(tmp_path, database_url, enforcement_interval=0.25)
    p.add_user("alice")
    p.add_user("bob")
    p.add_dataset("chest", CHEST)
    p.add_dataset("knee", KNEE)
    p.grant("alice", "chest")
    with p:
        yield p
