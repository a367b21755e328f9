"""The gateway's lifecycle: listeners per route, backend choice, counters, metrics, reload on SIGHUP."""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import select
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from medbridge import descriptors, outage
from medbridge.descriptors import EXHAUSTED, Reserve, error_name, next_backoff
from medbridge.gateway import proxy
from medbridge.gateway.config import Address, GatewayConfig, RouteConfig
from medbridge.gateway.relay import DESCRIPTORS, Link
from medbridge.net import bind

log = logging.getLogger("medbridge.gateway")

#: How long a backend that refused a connection is skipped.
UNHEALTHY_FOR = 5.0


class Metrics:
    """Per-route counters, in a registry of their own (one gateway, one registry)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.connections = Counter("medbridge_gateway_connections", "Connections by outcome",
                                   ["route", "outcome"], registry=self.registry)  # fmt: skip
        self.bytes = Counter("medbridge_gateway_bytes", "Bytes relayed", ["route", "direction"], registry=self.registry)
        self.active = Gauge("medbridge_gateway_active_connections", "Open relayed connections", ["route"],
                            registry=self.registry)  # fmt: skip
        self.pending = Gauge("medbridge_gateway_pending_connections", "Connections waiting for their SSH banner",
                             ["route"], registry=self.registry)  # fmt: skip
        self.descriptor_limit = Gauge("medbridge_gateway_descriptor_limit", "The process's soft descriptor limit",
                                      registry=self.registry)  # fmt: skip
        self.source_cap = Gauge("medbridge_gateway_max_per_source", "Connections one source may hold, on all "
                                "routes together, as the descriptor limit allows", registry=self.registry)  # fmt: skip
        self.accept_errors = Counter("medbridge_gateway_accept_errors", "Failed accept() calls by errno",
                                     ["route", "error"], registry=self.registry)  # fmt: skip

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


#: The longest identification line a client may send (RFC 4253 4.2: 255 bytes with CR LF).
MAX_BANNER = 255


class _Throttled:
    """Logs a recurring problem at most once per ``every`` seconds, with how often it happened since."""

    def __init__(self, every: float = 5.0):
        self._every = every
        self._last: dict[str, float] = {}
        self._since: dict[str, int] = {}
        self._lock = threading.Lock()

    def warn(self, key: str, message: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            self._since[key] = self._since.get(key, 0) + 1
            if now - self._last.get(key, -self._every) < self._every:
                return
            self._last[key], times = now, self._since.pop(key)
        log.warning(message + (f" ({times} times since the last such line)" if times > 1 else ""), *args)


class _Client:
    """An accepted connection, from accept to close: its source's place under ``max_per_source`` included."""

    def __init__(self, listener: Listener, sock: socket.socket, peer: tuple[str, int]):
        self.listener, self.sock, self.peer = listener, sock, peer
        self.head = bytearray()
        self.deadline = 0.0
        self._released = False

    def release(self) -> None:
        """Give the source's place back (once, whatever ended the connection)."""
        if not self._released:
            self._released = True
            self.listener.leave(self.peer[0])

    def drop(self, outcome: str, why: str) -> None:
        """Close before relaying: counted under ``outcome``, logged (throttled) with ``why``."""
        route = self.listener.route.name
        self.listener.gateway.metrics.connections.labels(route, outcome).inc()
        self.listener.gateway.throttled.warn(f"{route}/{outcome}", "route %s: dropped %s:%s (%s)", route,
                                             *self.peer[:2], why)  # fmt: skip
        self.sock.close()
        self.release()


class Listener:
    """One route's listening socket and accept thread; its route can be swapped live.

    Accepting never stops for good: out of descriptors (EMFILE/ENFILE), the waiting
    connections are refused with the descriptor held in reserve, counted, logged, and the
    thread backs off until descriptors free up; any other accept error is counted and
    skipped.  Each source address may hold at most ``max_per_source`` connections, and at
    most what the descriptor limit allows one source over all routes (:class:`_Sources`).
    """

    def __init__(self, route: RouteConfig, gateway: Gateway):
        self.route = route
        self.backends = _Backends(route.backends)
        self.gateway = gateway
        self.sock = bind(route.listen.host, route.listen.port, what=f"route {route.name!r}")
        self.sock.listen(512)
        self.sock.setblocking(False)
        self._stop = threading.Event()
        self._sources: dict[str, int] = {}
        self._sources_lock = threading.Lock()
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

    def enter(self, source: str) -> str | None:
        """Take a place for ``source``; why not, when it holds the route's or the gateway's most already."""
        with self._sources_lock:
            held = self._sources.get(source, 0)
            if held >= self.route.max_per_source:
                return f"it already holds max_per_source = {self.route.max_per_source} connections"
            if not self.gateway.sources.enter(source):
                return (f"it already holds {self.gateway.sources.limit} connections on all routes, what the "
                        f"descriptor limit of {self.gateway.descriptor_limit} allows one source")  # fmt: skip
            self._sources[source] = held + 1
            return None

    def leave(self, source: str) -> None:
        with self._sources_lock:
            _drop(self._sources, source)
        self.gateway.sources.leave(source)

    def _accept_loop(self) -> None:
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        backoff = 0.0
        while not self._stop.is_set():
            if not poller.poll(500):
                continue
            try:
                client, peer = self.sock.accept()
            except BlockingIOError:
                continue
            except OSError as exc:
                if self._stop.is_set():
                    return
                backoff = self._accept_failed(exc, backoff)
                continue
            backoff = 0.0
            self._admit(client, (peer[0], peer[1]))

    def _accept_failed(self, exc: OSError, backoff: float) -> float:
        """Count an accept error; out of descriptors, refuse what waits and back off.  The next wait."""
        m, name = self.gateway.metrics, self.route.name
        reason = error_name(exc)
        m.accept_errors.labels(name, reason).inc()
        if exc.errno not in EXHAUSTED:  # ECONNABORTED, EPERM (a firewall), EPROTO: that one client only
            self.gateway.throttled.warn(f"{name}/accept", "route %s: accept failed: %s", name, exc)
            return backoff
        refused = self.gateway.reserve.shed(self.sock)
        m.connections.labels(name, "refused_descriptors").inc(refused)
        wait = next_backoff(backoff)
        self.gateway.throttled.warn(f"{name}/exhausted", "route %s: out of descriptors (%s): refused %d waiting "
                                    "connection(s), accepting again in %.2f s",
                                    name, reason, refused, wait)  # fmt: skip
        self._stop.wait(wait)
        return wait

    def _admit(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        route, m = self.route, self.gateway.metrics
        if not route.admits(peer[0]):
            m.connections.labels(route.name, "refused_source").inc()
            self.gateway.throttled.warn(f"{route.name}/source", "route %s: refused %s:%s (not in allow list)",
                                        route.name, *peer[:2])  # fmt: skip
            sock.close()
            return
        why = self.enter(peer[0])
        if why is not None:
            m.connections.labels(route.name, "refused_per_source").inc()
            self.gateway.throttled.warn(f"{route.name}/per-source", "route %s: refused %s:%s (%s)", route.name,
                                        *peer[:2], why)  # fmt: skip
            sock.close()
            return
        client = _Client(self, sock, peer)
        if route.require_ssh:
            self.gateway.admission.wait_for_banner(client, route.banner_timeout)
        else:
            self.relay(client)

    def relay(self, client: _Client) -> None:
        """Connect the client to a backend in a thread of its own (reaching a backend may take a while)."""
        try:
            threading.Thread(target=self._relay, args=(client,), daemon=True, name="relay-connect").start()
        except RuntimeError:  # "can't start new thread"
            client.drop("refused_threads", "no thread left to relay it")

    def _relay(self, c: _Client) -> None:
        route, m, peer = self.route, self.gateway.metrics, c.peer
        client = c.sock
        try:
            client.setblocking(True)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            c.drop("protocol_error", "gone before it could be relayed")
            return
        try:
            backend = self._connect(route)
        except OSError as exc:  # out of descriptors here, not the backend's fault
            c.drop("refused_descriptors", f"no descriptor for the backend connection: {exc.strerror}")
            return
        if backend is None:
            m.connections.labels(route.name, "backend_unavailable").inc()
            log.error("route %s: no backend reachable for %s:%s", route.name, *peer[:2])
            client.close()
            c.release()
            return
        try:
            first = proxy.encode((peer[0], peer[1]), _local(client)) if route.proxy_protocol else b""
            backend.sendall(first + bytes(c.head))
        except OSError:
            client.close()
            backend.close()
            c.release()
            return
        for s in (client, backend):  # a silent link is held as long as the route's idle timeout, not TCP's ~15 min
            outage.tune(s, int(route.idle_timeout * 1000))
        name = route.name

        def count(direction: str, n: int) -> None:
            m.bytes.labels(name, direction).inc(n)

        def done(link: Link) -> None:
            m.active.labels(name).dec()
            self.gateway.forget(link)
            c.release()

        try:
            link = Link(client, backend, route.idle_timeout, count, done)
        except OSError as exc:
            backend.close()
            c.drop("refused_descriptors", f"no descriptors for the relay's pipes: {exc.strerror}")
            return
        m.connections.labels(route.name, "accepted").inc()
        m.active.labels(route.name).inc()
        self.gateway.remember(link)
        if not link.start():
            m.connections.labels(route.name, "refused_threads").inc()
            log.error("route %s: no thread left to relay %s:%s", route.name, *peer[:2])

    def _connect(self, route: RouteConfig) -> socket.socket | None:
        """A connection to the first backend that answers; None if none does.  OSError: out of descriptors."""
        for address in self.backends.order():
            try:
                s = socket.create_connection((address.host, address.port), timeout=route.connect_timeout)
            except OSError as exc:
                if exc.errno in EXHAUSTED:
                    raise
                self.backends.failed(address)
                continue
            s.settimeout(None)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return s
        return None


def _drop(counts: dict[str, int], key: str) -> None:
    held = counts.get(key, 0) - 1
    if held > 0:
        counts[key] = held
    else:
        counts.pop(key, None)


class _Sources:
    """Connections per source address over every route, at most ``limit`` each.

    ``limit`` comes from the descriptor limit (:func:`medbridge.descriptors.share`): one
    source's relayed connections, at :data:`~medbridge.gateway.relay.DESCRIPTORS` each, can
    take at most a quarter of what the process may open, so no node, and no three nodes,
    can leave the others without descriptors, whatever ``max_per_source`` says.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def enter(self, source: str) -> bool:
        with self._lock:
            held = self._held.get(source, 0)
            if held >= self.limit:
                return False
            self._held[source] = held + 1
            return True

    def leave(self, source: str) -> None:
        with self._lock:
            _drop(self._held, source)


def _local(sock: socket.socket) -> tuple[str, int]:
    local = sock.getsockname()
    return local[0], local[1]


class _Admission:
    """Clients that have not yet sent their whole SSH identification line: one thread, one epoll, for all routes.

    A client's bytes are read (at most :data:`MAX_BANNER`) until the line ends, then passed
    on to the backend ahead of the rest.  Not ``SSH-``, too long, closed, or not done by the
    route's ``banner_timeout``: dropped and counted.  Stalled clients cost one descriptor
    each and no thread, and descriptors of any number work (no ``select``).
    """

    def __init__(self, gateway: Gateway):
        self._gateway = gateway
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._inbox: list[_Client] = []
        self._waiting: list[tuple[float, int, _Client]] = []  # a heap by deadline
        self._order = itertools.count()
        self._lock = threading.Lock()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="gateway-banners")
        self._thread.start()

    def wait_for_banner(self, client: _Client, timeout: float) -> None:
        client.deadline = time.monotonic() + timeout
        with self._lock:
            self._inbox.append(client)
        with contextlib.suppress(BlockingIOError):  # already woken: the byte waiting does it
            self._wake_w.send(b"x")

    def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._thread.join(timeout=5)
        for key in list(self._selector.get_map().values()):
            if isinstance(key.data, _Client):
                key.data.sock.close()
                key.data.release()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def _pending(self, route: str, delta: int) -> None:
        self._gateway.metrics.pending.labels(route).inc(delta)

    def _run(self) -> None:
        while not self._stopping:
            timeout = max(0.0, self._waiting[0][0] - time.monotonic()) if self._waiting else None
            for key, _ in self._selector.select(timeout):
                if key.data is None:
                    self._take_inbox()
                else:
                    self._readable(key.data)
            now = time.monotonic()
            while self._waiting and self._waiting[0][0] <= now:
                _, _, client = heapq.heappop(self._waiting)
                if self._forget(client):
                    client.drop(
                        "banner_timeout", f"no SSH identification within {client.listener.route.banner_timeout:g} s"
                    )

    def _take_inbox(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(4096):
                pass
        with self._lock:
            arrived, self._inbox = self._inbox, []
        for client in arrived:
            try:
                client.sock.setblocking(False)
                self._selector.register(client.sock, selectors.EVENT_READ, client)
            except (OSError, ValueError) as exc:  # epoll itself out of memory or descriptors: refuse this one
                client.drop("refused_descriptors", f"cannot wait for its banner: {exc}")
                continue
            heapq.heappush(self._waiting, (client.deadline, next(self._order), client))
            self._pending(client.listener.route.name, 1)

    def _forget(self, client: _Client) -> bool:
        """Stop watching ``client``; False if it was no longer watched (already passed on or dropped)."""
        try:
            self._selector.unregister(client.sock)
        except (KeyError, ValueError):
            return False
        self._pending(client.listener.route.name, -1)
        return True

    def _readable(self, client: _Client) -> None:
        try:
            data = client.sock.recv(MAX_BANNER - len(client.head))
        except BlockingIOError:
            return
        except OSError as exc:
            self._forget(client)
            client.drop("protocol_error", f"failed before its SSH identification: {exc.strerror}")
            return
        client.head += data
        if not data or not b"SSH-".startswith(bytes(client.head[:4])):
            self._forget(client)
            client.drop("protocol_error", "closed before its SSH identification" if not data else "not SSH")
        elif b"\n" in client.head:
            self._forget(client)
            client.listener.relay(client)
        elif len(client.head) >= MAX_BANNER:
            self._forget(client)
            client.drop("protocol_error", f"SSH identification longer than {MAX_BANNER} bytes")


def _key(route: RouteConfig) -> tuple[Address, str]:
    """Listeners are kept by address across reloads; port 0 (any free port) is distinct per route."""
    return route.listen, route.name if route.listen.port == 0 else ""


class Gateway:
    """All listeners of a configuration; :meth:`apply` swaps configurations without dropping links."""

    def __init__(self) -> None:
        self.metrics = Metrics()
        self.throttled = _Throttled()
        self.listeners: dict[tuple[Address, str], Listener] = {}
        self._links: set[Link] = set()
        self._lock = threading.Lock()
        self._metrics_server: tuple[object, threading.Thread] | None = None
        self.metrics_address: tuple[str, int] | None = None
        #: Out of descriptors, waiting connections are still accepted and closed (refused) with it.
        self.reserve = Reserve()
        self.descriptor_limit = descriptors.soft_limit()
        self.sources = _Sources(descriptors.share(DESCRIPTORS, self.descriptor_limit))
        self.metrics.descriptor_limit.set(self.descriptor_limit)
        self.metrics.source_cap.set(self.sources.limit)
        self.admission = _Admission(self)

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
        for route in config.routes:
            if route.max_per_source > self.sources.limit:
                log.warning("route %s: at most %d connections per source, not max_per_source = %d: the descriptor "
                            "limit (ulimit -n) is %d, a relayed connection takes %d and one source a quarter of them; "
                            "a limit of %d would allow %d", route.name, self.sources.limit, route.max_per_source,
                            self.descriptor_limit, DESCRIPTORS, descriptors.needed(route.max_per_source, DESCRIPTORS),
                            route.max_per_source)  # fmt: skip
            shortfall = outage.persist_shortfall(route.idle_timeout)
            if shortfall is not None:
                log.warning("route %s: idle_timeout is %g s, but %s", route.name, route.idle_timeout, shortfall)
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
        self.admission.stop()
        self.reserve.close()
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
