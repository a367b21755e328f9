"""Gateway configuration: one clear error naming the key, and refused overlaps."""

from __future__ import annotations

import pytest

from medbridge.errors import InvalidInput
from medbridge.gateway.config import parse

GOOD = """
[[route]]
name = "production"
listen = "0.0.0.0:2201"
backends = ["10.0.0.5:2222", "10.0.0.6:2222"]
allow = ["10.1.0.0/24"]
proxy_protocol = true

[[route]]
name = "experimental"
listen = "0.0.0.0:2202"
backends = ["10.0.0.9:2222"]
allow = ["10.1.0.0/24", "fd00::/64"]
idle_timeout = 60

[metrics]
listen = "127.0.0.1:9101"
"""


def test_good_config() -> None:
    cfg = parse(GOOD)
    prod, exp = cfg.routes
    assert prod.name == "production" and prod.proxy_protocol and len(prod.backends) == 2
    assert prod.admits("10.1.0.7") and not prod.admits("10.2.0.7") and not prod.admits("not-an-ip")
    assert exp.idle_timeout == 60 and not exp.proxy_protocol and exp.admits("fd00::7")
    assert prod.banner_timeout == 5.0 and prod.max_per_source == 256, "the documented defaults"
    assert cfg.metrics is not None and cfg.metrics.port == 9101


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (GOOD.replace("proxy_protocol = true", "proxy_protocl = true"), "unknown key 'proxy_protocl'"),
        (GOOD.replace('"0.0.0.0:2202"', '"10.0.0.1:2201"'), "both listen on port 2201"),
        (GOOD.replace('"10.1.0.0/24"]\nproxy', '"10.1.0.0/33"]\nproxy'), "route[0].allow"),
        (GOOD.replace('backends = ["10.0.0.9:2222"]', "backends = []"), "route[1].backends"),
        (GOOD.replace('listen = "0.0.0.0:2201"', 'listen = "gw:2201"'), "is not an IP address"),
        (GOOD.replace("idle_timeout = 60", "idle_timeout = -1"), "idle_timeout"),
        (GOOD.replace("idle_timeout = 60", "idle_timeout = nan"), "idle_timeout: must be a positive number"),
        (GOOD.replace("idle_timeout = 60", "idle_timeout = inf"), "idle_timeout: must be a positive number"),
        (GOOD.replace("idle_timeout = 60", "idle_timeout = 1e300"), "at most 2592000"),
        (GOOD.replace('"127.0.0.1:9101"', '"127.0.0.1:2201"'), "metrics.listen overlaps"),
        ("[metrics]\nlisten = '127.0.0.1:1'\n", "at least one [[route]]"),
        ("[[route]\n", "gateway config"),
        (GOOD + "\n[extra]\n", "unknown key 'extra'"),
        (GOOD.replace("idle_timeout = 60", "max_per_source = 0"), "route[1].max_per_source: must be a positive"),
        (GOOD.replace("idle_timeout = 60", "max_per_source = 2.5"), "route[1].max_per_source: must be a positive"),
        (GOOD.replace("idle_timeout = 60", "banner_timeout = 0"), "route[1].banner_timeout"),
    ],
    ids=[
        "typo",
        "overlap",
        "cidr",
        "no-backends",
        "hostname",
        "timeout",
        "timeout-nan",
        "timeout-inf",
        "timeout-huge",
        "metrics-overlap",
        "no-routes",
        "toml",
        "extra-table",
        "per-source-zero",
        "per-source-fraction",
        "banner-timeout",
    ],
)
def test_bad_config_names_the_key(text: str, words: str) -> None:
    with pytest.raises(InvalidInput, match=None) as info:
        parse(text)
    assert words in str(info.value)
