"""Settings: unknown keys fail loudly and list the valid ones."""

from __future__ import annotations

import pytest

from medbridge.config import PlatformSettings, check_keys, metrics_address
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


def test_metrics_and_log_format_settings_are_checked() -> None:
    s = PlatformSettings.from_mapping({"metrics": "127.0.0.1:9102", "log_format": "json"})
    assert (s.metrics, s.log_format) == ("127.0.0.1:9102", "json")
    assert PlatformSettings().metrics == "", "no endpoint unless the operator names one"
    for port_only in ("9102", ":9102"):
        assert metrics_address(PlatformSettings.from_mapping({"metrics": port_only}).metrics, "metrics") == (
            "127.0.0.1",
            9102,
        ), "a port alone is loopback, never every interface"
    with pytest.raises(InvalidInput, match="metrics: 'localhost' is not HOST:PORT"):
        PlatformSettings.from_mapping({"metrics": "localhost"})
    with pytest.raises(InvalidInput, match="log_format: 'xml' is not a log format"):
        PlatformSettings.from_mapping({"log_format": "xml"})
