"""PROXY v2 encoding and decoding, against the layout in HAProxy's specification."""

from __future__ import annotations

import pytest

from medbridge.gateway.proxy import HEADER_LEN, ProxyHeaderError, body_length, decode, encode, encode_local


def split(raw: bytes) -> tuple[bytes, bytes]:
    return raw[:HEADER_LEN], raw[HEADER_LEN:]


def test_ipv4_layout_and_round_trip() -> None:
    raw = encode(("10.1.0.7", 40000), ("10.0.0.5", 2222))
    assert raw[:12] == b"\r\n\r\n\x00\r\nQUIT\n" and raw[12] == 0x21 and raw[13] == 0x11
    assert body_length(raw[:16]) == 12 and len(raw) == 28
    info = decode(*split(raw))
    assert info.source == ("10.1.0.7", 40000) and info.destination == ("10.0.0.5", 2222)


def test_ipv6_round_trip() -> None:
    info = decode(*split(encode(("fd00::7", 1), ("fd00::5", 2))))
    assert info.source == ("fd00::7", 1) and info.destination == ("fd00::5", 2)


def test_local_has_no_addresses() -> None:
    info = decode(*split(encode_local()))
    assert info.source is None and info.destination is None


@pytest.mark.parametrize(
    "raw",
    [
        b"SSH-2.0-OpenSSH_9.2\r\n\0\0\0\0",
        b"\r\n\r\n\x00\r\nQUIT\n\x11\x11\x00\x0c",
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff",
    ],
    ids=["ssh-banner", "version-1", "too-long"],
)
def test_garbage_is_refused(raw: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        body_length(raw[:16])


def test_short_body_is_refused() -> None:
    header, body = split(encode(("10.1.0.7", 1), ("10.0.0.5", 2)))
    with pytest.raises(ProxyHeaderError):
        decode(header, body[:5])
