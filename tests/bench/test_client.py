"""Benchmark clients: a client that cannot run is reported with its last words, and nothing is left running."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import asyncssh
import pytest

from medbridge.bench.client import clients
from medbridge.compute.session import Endpoint
from medbridge.errors import MedbridgeError


def _children() -> set[str]:
    return set(Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split())


def test_a_client_that_dies_is_reported_with_its_last_words_and_reaped() -> None:
    ep = Endpoint("127.0.0.1", 1, "nobody", asyncssh.generate_private_key("ssh-ed25519"), "/nonexistent/agent")
    dies = [sys.executable, "-c", "import sys; sys.exit('no route to the platform from here')"]
    before = _children()
    with (
        pytest.raises(MedbridgeError, match=r"^a benchmark client (gave no answer|has gone): no route to the platform"),
        clients(ep, 2, connections=1, window=1, data=["small"], prefix=dies),
    ):
        pytest.fail("the clients cannot get ready")
    assert _children() <= before
