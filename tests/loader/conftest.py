"""Shared by the loader's tests: a job endpoint for alice on the module's own ``platform``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from medbridge.compute.session import Endpoint
from medbridge.testing import RunningPlatform


@pytest.fixture(scope="module")
def endpoint(platform: RunningPlatform) -> Iterator[Endpoint]:
    with platform.job_endpoint("alice") as ep:
        yield ep
