"""Network plumbing: HOST:PORT both ways, networks, binding with clear errors, signals to an event."""

from __future__ import annotations

import asyncio
import os
import signal
import socket

import pytest

from medbridge.errors import AddressInUse, InvalidInput, PlatformUnavailable
from medbridge.net import bind, format_address, in_networks, parse_address, parse_networks, stop_event


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:2222", ("127.0.0.1", 2222)),
        ("gw.example:0", ("gw.example", 0)),
        ("[::1]:2201", ("::1", 2201)),
        ("[2001:db8::5]:65535", ("2001:db8::5", 65535)),
    ],
)
def test_host_port_parses_and_formats_back(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected
    assert format_address(*expected) == text


@pytest.mark.parametrize("text", ["2222", ":2222", "host:", "host:port", "host:65536", "[]:22", 2222])
def test_bad_host_port_is_one_clear_error_naming_where(text: object) -> None:
    with pytest.raises(InvalidInput, match=r"^--listen: .*HOST:PORT"):
        parse_address(text, "--listen")


def test_a_default_host_fills_a_bare_port_and_nothing_else() -> None:
    assert parse_address("9102", default_host="127.0.0.1") == ("127.0.0.1", 9102)
    assert parse_address(":9102", default_host="127.0.0.1") == ("127.0.0.1", 9102)
    assert parse_address("[::]:9102", default_host="127.0.0.1") == ("::", 9102)
    for bad in ("", ":", "99999", "host:", "::"):
        with pytest.raises(InvalidInput, match=r"^--metrics: .* is not HOST:PORT or PORT"):
            parse_address(bad, "--metrics", default_host="127.0.0.1")


def test_ip_only_refuses_names() -> None:
    with pytest.raises(InvalidInput, match="'gw' is not an IP address"):
        parse_address("gw:2201", "route[0].listen", ip_only=True)
    assert parse_address("[::1]:1", ip_only=True) == ("::1", 1)


def test_networks_and_membership() -> None:
    nets = parse_networks(["10.1.0.0/24", "::1", "192.168.1.7/16"])
    assert in_networks("10.1.0.9", nets) and in_networks("::1", nets) and in_networks("192.168.200.1", nets)
    assert not in_networks("10.1.1.9", nets)
    assert not in_networks("gw.example", nets), "a name is never inside a network"
    with pytest.raises(InvalidInput, match=r"^--trusted-proxy: '10\.0\.0\.0/33' is not a network"):
        parse_networks(["10.0.0.0/8", "10.0.0.0/33"], "--trusted-proxy")


def test_a_taken_address_is_address_in_use() -> None:
    taken = bind("127.0.0.1", 0, reuse_addr=False)
    taken.listen(1)
    try:
        port = taken.getsockname()[1]
        with pytest.raises(AddressInUse, match=rf"^route 'x': cannot listen on 127\.0\.0\.1:{port}: address already"):
            bind("127.0.0.1", port, what="route 'x'")
    finally:
        taken.close()


def test_an_address_not_on_this_machine_is_platform_unavailable() -> None:
    with pytest.raises(PlatformUnavailable, match=r"cannot listen on 192\.0\.2\.1:0") as caught:
        bind("192.0.2.1", 0)  # TEST-NET-1: never a local address
    assert not isinstance(caught.value, AddressInUse)


def test_reuse_port_lets_workers_share_a_reserved_port() -> None:
    reserved = bind("127.0.0.1", 0, reuse_addr=False, reuse_port=True)
    try:
        worker = bind("127.0.0.1", reserved.getsockname()[1], reuse_port=True)
        worker.close()
        with pytest.raises(AddressInUse):
            bind("127.0.0.1", reserved.getsockname()[1])  # without SO_REUSEPORT: refused
    finally:
        reserved.close()


def test_an_ipv6_host_binds_an_ipv6_socket() -> None:
    if not socket.has_ipv6:
        pytest.skip("this Python has no IPv6")
    s = bind("::1", 0)
    try:
        assert s.family == socket.AF_INET6
    finally:
        s.close()


def test_a_stop_signal_sets_the_event() -> None:
    async def main() -> bool:
        stop = stop_event((signal.SIGUSR1,))
        try:
            asyncio.get_running_loop().call_soon(os.kill, os.getpid(), signal.SIGUSR1)
            await asyncio.wait_for(stop.wait(), 10)
            return stop.is_set()
        finally:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGUSR1)

    assert asyncio.run(main())
