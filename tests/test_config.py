"""Settings: unknown keys fail loudly and list the valid ones."""

from __future__ import annotations

import pytest

from medbridge.config import PlatformSettings, check_keys
from medbridge.errors import InvalidInput


def test_unknown_keys_are_named_with_the_valid_ones() -> None:
    check_keys({"a": 1}, {"a", "b"}, "x")
    with pytest.raises(InvalidInput, match=r"^x: unknown key 'c'; valid keys: a, b$"):
        check_keys({"a": 1, "c": 2}, {"a", "b"}, "x")
    with pytest.raises(InvalidInput, match=r"^x: unknown keys 'c', 'd'; valid keys: a, b$"):
        check_keys({"d": 1, "c": 2}, ["b", "a"], "x")


def test_platform_settings_refuse_unknown_keys_and_bad_networks() -> None:
    with pytest.raises(InvalidInput, match=r"unknown key 'enforcement_intervall'; valid keys: .*enforcement_interval"):
        PlatformSettings.from_mapping({"enforcement_intervall": 1.0}, origin="platform.toml")
    with pytest.raises(InvalidInput, match=r"platform.toml: trusted_proxies: '10\.0\.0\.300' is not a network"):
        PlatformSettings.from_mapping({"trusted_proxies": ["10.0.0.300"]}, origin="platform.toml")
    assert PlatformSettings.from_mapping({"trusted_proxies": ["10.0.0.1"]}).trusted_proxies == ("10.0.0.1",)
