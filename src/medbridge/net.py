"""Network plumbing, written once: HOST:PORT, networks, binding a listener, signals to an event."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import signal
import socket
from collections.abc import Iterable, Sequence

from medbridge.errors import AddressInUse, InvalidInput, PlatformUnavailable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The signals that ask a server to stop in order.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def parse_address(
    value: object, where: str = "address", *, ip_only: bool = False, default_host: str | None = None
) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) as ``(host, port)``; ``ip_only`` refuses names.

    With ``default_host``, a bare ``PORT`` or ``:PORT`` means that host (never every interface).
    """
    if not isinstance(value, str):
        raise InvalidInput(f"{where}: must be a string HOST:PORT")
    host, sep, port = value.rpartition(":")
    if not host and default_host is not None:
        host, sep = default_host, ":"
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        form = "HOST:PORT or PORT" if default_host is not None else "HOST:PORT"
        raise InvalidInput(f"{where}: {value!r} is not {form} ([v6]:PORT for IPv6)")
    if ip_only:
        try:
            ipaddress.ip_address(host)
        except ValueError as exc:
            raise InvalidInput(f"{where}: {host!r} is not an IP address") from exc
    return host, int(port)


def format_address(host: str, port: int) -> str:
    """The inverse of :func:`parse_address`: brackets around an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_networks(values: Iterable[str], where: str = "networks") -> tuple[Network, ...]:
    """CIDRs (a bare address is a network of one) with one clear error naming the bad one."""
    out = []
    for value in values:
        try:
            out.append(ipaddress.ip_network(value, strict=False))
        except (ValueError, TypeError) as exc:
            raise InvalidInput(f"{where}: {value!r} is not a network ({exc})") from exc
    return tuple(out)


def in_networks(address: str, networks: Sequence[Network]) -> bool:
    """Is ``address`` (an IP, as a peer name gives it) inside any of ``networks``?  A name is not."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in n for n in networks)


def bind(host: str, port: int, *, reuse_addr: bool = True, reuse_port: bool = False, what: str = "") -> socket.socket:
    """A TCP socket bound (not yet listening) to ``host:port``, or one clear error.

    A taken address is :class:`AddressInUse`; anything else the kernel refuses is
    :class:`PlatformUnavailable`.  ``what`` names the listener in the message.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if reuse_addr:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        prefix = f"{what}: " if what else ""
        address = format_address(host, port)
        if exc.errno == errno.EADDRINUSE:
            raise AddressInUse(f"{prefix}cannot listen on {address}: address already in use") from exc
        raise PlatformUnavailable(f"{prefix}cannot listen on {address}: {exc.strerror or exc}") from exc
    return sock


def stop_event(signals: Sequence[int] = STOP_SIGNALS) -> asyncio.Event:
    """An event the running loop sets when one of ``signals`` arrives (call inside the loop)."""
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in signals:
        loop.add_signal_handler(sig, event.set)
    return event
