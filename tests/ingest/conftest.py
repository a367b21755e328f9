"""Fixtures for the ingest tests."""

from __future__ import annotations

import pytest

from medbridge.ingest.profile import Profile, load_profile


@pytest.fixture(scope="session")
def profile() -> Profile:
    """The built-in PS3.15 basic profile."""
    return load_profile()
