"""The gateway's configuration: routes (listen port → backends), allowlists, PROXY v2, metrics.

    [[route]]
    name = "production"
    listen = "0.0.0.0:2201"
    backends = ["10.0.0.5:2222"]
    allow = ["10.1.0.0/24"]
    proxy_protocol = true
    idle_timeout = 3600
    banner_timeout = 5
    max_per_source = 256

    [metrics]
    listen = "127.0.0.1:9101"

Parsing is pure: text in, a frozen :class:`GatewayConfig` out, or one clear error naming the key.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from medbridge.config import check_keys
from medbridge.errors import InvalidInput
from medbridge.net import Network, format_address, in_networks, parse_address, parse_networks


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return format_address(self.host, self.port)


#: The longest span of seconds a setting takes (30 days): past it, or nan or inf, a value is a typo.
MAX_SECONDS = 30 * 86400.0
#: How long a relayed connection may stay silent, seconds, unless a route says otherwise (longer than any job's
#: outage tolerance by default: the job decides, the gateway does not).
IDLE_TIMEOUT = 3600.0


@dataclass(frozen=True, kw_only=True)
class RouteConfig:
    name: str
    listen: Address
    backends: tuple[Address, ...]
    allow: tuple[Network, ...]
    proxy_protocol: bool = False
    idle_timeout: float = IDLE_TIMEOUT
    connect_timeout: float = 5.0
    require_ssh: bool = True
    #: Seconds a client has to send its whole SSH identification line before it is dropped.
    banner_timeout: float = 5.0
    #: Connections at once from one source address (waiting for their banner or relayed).
    max_per_source: int = 256

    def admits(self, host: str) -> bool:
        return in_networks(host, self.allow)


@dataclass(frozen=True)
class GatewayConfig:
    routes: tuple[RouteConfig, ...]
    metrics: Address | None


_ROUTE_KEYS = {"name", "listen", "backends", "allow", "proxy_protocol", "idle_timeout", "connect_timeout",
               "require_ssh", "banner_timeout", "max_per_source"}  # fmt: skip
_METRICS_KEYS = {"listen"}


def _address(value: object, where: str) -> Address:
    return Address(*parse_address(value, where, ip_only=True))


def _number(table: Mapping[str, Any], key: str, default: float, where: str) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_SECONDS:
        raise InvalidInput(f"{where}.{key}: must be a positive number of seconds, at most {MAX_SECONDS:.0f}")
    return float(value)


def _count(table: Mapping[str, Any], key: str, default: int, where: str) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidInput(f"{where}.{key}: must be a positive whole number")
    return value


def _route(table: object, index: int) -> RouteConfig:
    where = f"route[{index}]"
    if not isinstance(table, dict):
        raise InvalidInput(f"{where}: must be a table")
    check_keys(table, _ROUTE_KEYS, where)
    for required in ("listen", "backends", "allow"):
        if required not in table:
            raise InvalidInput(f"{where}: missing key {required!r}")
    listen = _address(table["listen"], f"{where}.listen")
    backends = table["backends"]
    if not isinstance(backends, list) or not backends:
        raise InvalidInput(f"{where}.backends: must be a non-empty list of HOST:PORT")
    allow = table["allow"]
    if not isinstance(allow, list) or not all(isinstance(a, str) for a in allow):
        raise InvalidInput(f"{where}.allow: must be a list of CIDRs")
    networks = parse_networks(allow, f"{where}.allow")
    for flag in ("proxy_protocol", "require_ssh"):
        if flag in table and not isinstance(table[flag], bool):
            raise InvalidInput(f"{where}.{flag}: must be true or false")
    name = table.get("name", str(listen))
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"{where}.name: must be a non-empty string")
    return RouteConfig(
        name=name,
        listen=listen,
        backends=tuple(_address(b, f"{where}.backends[{i}]") for i, b in enumerate(backends)),
        allow=networks,
        proxy_protocol=bool(table.get("proxy_protocol", False)),
        idle_timeout=_number(table, "idle_timeout", IDLE_TIMEOUT, where),
        connect_timeout=_number(table, "connect_timeout", 5.0, where),
        require_ssh=bool(table.get("require_ssh", True)),
        banner_timeout=_number(table, "banner_timeout", 5.0, where),
        max_per_source=_count(table, "max_per_source", 256, where),
    )


def _overlap(a: Address, b: Address) -> bool:
    if a.port != b.port or a.port == 0:
        return False
    wild = {"0.0.0.0", "::"}
    return a.host == b.host or a.host in wild or b.host in wild


def parse(text: str, origin: str = "gateway config") -> GatewayConfig:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"{origin}: {exc}") from exc
    check_keys(data, {"route", "metrics"}, origin)
    routes_raw = data.get("route")
    if not isinstance(routes_raw, list) or not routes_raw:
        raise InvalidInput(f"{origin}: needs at least one [[route]]")
    routes = tuple(_route(t, i) for i, t in enumerate(routes_raw))
    for i, r in enumerate(routes):
        for other in routes[i + 1 :]:
            if _overlap(r.listen, other.listen):
                raise InvalidInput(
                    f"{origin}: routes {r.name!r} and {other.name!r} both listen on port {r.listen.port}"
                )
        if len({x.name for x in routes}) != len(routes):
            raise InvalidInput(f"{origin}: route names must be unique")
    metrics = None
    if "metrics" in data:
        m = data["metrics"]
        if not isinstance(m, dict):
            raise InvalidInput(f"{origin}: [metrics] must be a table")
        check_keys(m, _METRICS_KEYS, "metrics")
        metrics = _address(m.get("listen"), "metrics.listen")
        if any(_overlap(metrics, r.listen) for r in routes):
            raise InvalidInput(f"{origin}: metrics.listen overlaps a route's port")
    return GatewayConfig(routes, metrics)
