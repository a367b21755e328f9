"""The gateway's lifecycle: listeners per route, backend choice, counters, metrics, reload on SIGHUP."""

from __future__ import annotations

import contextlib
import itertools
import logging
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from medbridge.errors import AddressInUse, PlatformUnavailable
from medbridge.gateway import proxy
from medbridge.gateway.config import Address, GatewayConfig, RouteConfig
from medbridge.gateway.relay import Link

log = logging.getLogger("medbridge.gateway")

#: How long a backend that refused a connection is skipped.
UNHEALTHY_FOR = 5.0
#: How long a client may take to send its SSH identification before it is dropped.
BANNER_WAIT = 10.0


class Metrics:
    """Per-route counters, in a registry of their own (one gateway, one registry)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.connections = Counter("medbridge_gateway_connections", "Connections by outcome",
                                   ["route", "outcome"], registry=self.registry)  # fmt: skip
        self.bytes = Counter("medbridge_gateway_bytes", "Bytes relayed", ["route", "direction"], registry=self.registry)
        self.active = Gauge("medbridge_gateway_active_connections", "Open relayed connections", ["route"],
                            registry=self.registry)  # fmt: skip

    def value(self, name: str, **labels: str) -> float:
        v = self.registry.get_sample_value(name, labels)
        return 0.0 if v is None else v


@dataclass
class _Backends:
    """Round-robin over backends, skipping those that recently refused."""

    addresses: tuple[Address, ...]
    _next: itertools.count[int] = field(default_factory=itertools.count)
    _down_until: dict[Address, float] = field(default_factory=dict)

    def order(self) -> list[Address]:
        start = next(self._next) % len(self.addresses)
        rotated = list(self.addresses[start:] + self.addresses[:start])
        now = time.monotonic()
        healthy = [a for a in rotated if self._down_until.get(a, 0.0) <= now]
        return healthy + [a for a in rotated if a not in healthy]

    def failed(self, a: Address) -> None:
        self._down_until[a] = time.monotonic() + UNHEALTHY_FOR


class Listener:
    """One route's listening socket and accept thread; its route can be swapped live."""

    def __init__(self, route: RouteConfig, gateway: Gateway):
        self.route = route
        self.backends = _Backends(route.backends)
        self.gateway = gateway
        family = socket.AF_INET6 if ":" in route.listen.host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((route.listen.host, route.listen.port))
        except OSError as exc:
            self.sock.close()
            if exc.errno == 98:
                raise AddressInUse(f"route {route.name!r}: {route.listen} is already in use") from exc
            raise PlatformUnavailable(f"route {route.name!r}: cannot listen on {route.listen}: {exc.strerror}") from exc
        self.sock.listen(512)
        self.sock.settimeout(0.5)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._accept_loop, daemon=True, name=f"accept-{route.name}")

    def update(self, route: RouteConfig) -> None:
        if route.backends != self.route.backends:
            self.backends = _Backends(route.backends)
        self.route = route

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)
        self.sock.close()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, peer = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                raise
            threading.Thread(target=self._handle, args=(client, peer), daemon=True).start()

    def _handle(self, client: socket.socket, peer: tuple[str, int]) -> None:
        route, m = self.route, self.gateway.metrics
        client.settimeout(None)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not route.admits(peer[0]):
            m.connections.labels(route.name, "refused_source").inc()
            log.warning("route %s: refused %s:%s (not in allow list)", route.name, *peer[:2])
            client.close()
            return
        if route.require_ssh and not _looks_like_ssh(client):
            m.connections.labels(route.name, "protocol_error").inc()
            log.warning("route %s: dropped %s:%s (not SSH)", route.name, *peer[:2])
            client.close()
            return
        backend = self._connect(route)
        if backend is None:
            m.connections.labels(route.name, "backend_unavailable").inc()
            log.error("route %s: no backend reachable for %s:%s", route.name, *peer[:2])
            client.close()
            return
        try:
            if route.proxy_protocol:
                local = client.getsockname()
                backend.sendall(proxy.encode((peer[0], peer[1]), (local[0], local[1])))
        except OSError:
            client.close()
            backend.close()
            return
        m.connections.labels(route.name, "accepted").inc()
        m.active.labels(route.name).inc()
        name = route.name

        def count(direction: str, n: int) -> None:
            m.bytes.labels(name, direction).inc(n)

        def done(link: Link) -> None:
            m.active.labels(name).dec()
            self.gateway.forget(link)

        link = Link(client, backend, route.idle_timeout, count, done)
        self.gateway.remember(link)
        link.start()

    def _connect(self, route: RouteConfig) -> socket.socket | None:
        for address in self.backends.order():
            try:
                s = socket.create_connection((address.host, address.port), timeout=route.connect_timeout)
            except OSError:
                self.backends.failed(address)
                continue
            s.settimeout(None)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return s
        return None


def _looks_like_ssh(client: socket.socket) -> bool:
    """Peek (without consuming) at the client's first bytes: an SSH client starts with ``SSH-``."""
    deadline = time.monotonic() + BANNER_WAIT
    while time.monotonic() < deadline:
        ready, _, _ = select.select([client], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            return False
        try:
            head = client.recv(4, socket.MSG_PEEK)
        except OSError:
            return False
        if len(head) == 4 or not head or not b"SSH-".startswith(head):
            return head == b"SSH-"
        time.sleep(0.01)
    return False


def _key(route: RouteConfig) -> tuple[Address, str]:
    """Listeners are kept by address across reloads; port 0 (any free port) is distinct per route."""
    return route.listen, route.name if route.listen.port == 0 else ""


class Gateway:
    """All listeners of a configuration; :meth:`apply` swaps configurations without dropping links."""

    def __init__(self) -> None:
        self.metrics = Metrics()
        self.listeners: dict[tuple[Address, str], Listener] = {}
        self._links: set[Link] = set()
        self._lock = threading.Lock()
        self._metrics_server: tuple[object, threading.Thread] | None = None
        self.metrics_address: tuple[str, int] | None = None

    def remember(self, link: Link) -> None:
        with self._lock:
            self._links.add(link)

    def forget(self, link: Link) -> None:
        with self._lock:
            self._links.discard(link)

    @property
    def open_links(self) -> int:
        with self._lock:
            return len(self._links)

    def apply(self, config: GatewayConfig) -> None:
        """Start new routes, update changed ones in place, stop removed ones; live links carry on."""
        wanted = {_key(r): r for r in config.routes}
        started: list[Listener] = []
        try:
            for address, route in wanted.items():
                if address not in self.listeners:
                    started.append(Listener(route, self))
        except BaseException:
            for listener in started:
                listener.sock.close()
            raise
        for address in list(self.listeners):
            if address not in wanted:
                self.listeners.pop(address).stop()
        for address, route in wanted.items():
            if address in self.listeners:
                self.listeners[address].update(route)
        for listener in started:
            self.listeners[_key(listener.route)] = listener
            listener.start()
        if config.metrics is not None and self._metrics_server is None:
            httpd, thread = start_http_server(config.metrics.port, config.metrics.host, self.metrics.registry)
            self._metrics_server = (httpd, thread)
            self.metrics_address = httpd.server_address[:2]  # type: ignore[assignment]

    def port(self, route_name: str) -> int:
        for listener in self.listeners.values():
            if listener.route.name == route_name:
                return int(listener.sock.getsockname()[1])
        raise KeyError(route_name)

    def stop(self) -> None:
        for listener in self.listeners.values():
            listener.stop()
        self.listeners.clear()
        with self._lock:
            links = list(self._links)
        for link in links:
            link.close("gateway stopping")
        for link in links:
            for t in link.threads:
                t.join(timeout=5)
        if self._metrics_server is not None:
            httpd, thread = self._metrics_server
            with contextlib.suppress(Exception):
                httpd.shutdown()  # type: ignore[attr-defined]
                httpd.server_close()  # type: ignore[attr-defined]
            thread.join(timeout=5)
            self._metrics_server = None


def serve(
    load: Callable[[], GatewayConfig], ready: Callable[[Gateway], None], stop: threading.Event, reload: threading.Event
) -> None:
    """Run until ``stop``; on ``reload`` re-read the configuration (a bad one is logged and ignored)."""
    gateway = Gateway()
    gateway.apply(load())
    ready(gateway)
    try:
        while not stop.is_set():
            if reload.wait(0.2):
                reload.clear()
                try:
                    gateway.apply(load())
                    log.warning("configuration reloaded")
                except Exception as exc:  # a bad reload must not take the running gateway down
                    log.error("reload refused, keeping the running configuration: %s", exc)
    finally:
        gateway.stop()
