"""PROXY protocol v2 (HAProxy): the binary header that carries a client's address through a relay.

Only what the gateway sends and the platform accepts: version 2, command PROXY or
LOCAL, TCP over IPv4 or IPv6.  TLVs are skipped.  Pure: bytes in, values out.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
HEADER_LEN = 16
MAX_BODY = 512


class ProxyHeaderError(ValueError):
    """A malformed or unsupported PROXY header."""


@dataclass(frozen=True)
class ProxyInfo:
    """What a PROXY header said: the client's and the proxy's addresses (None for LOCAL)."""

    source: tuple[str, int] | None
    destination: tuple[str, int] | None


def encode(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A PROXY v2 header for a TCP connection from ``source`` to ``destination``."""
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if src.version != dst.version:
        raise ProxyHeaderError("source and destination must be the same IP version")
    family = 0x11 if src.version == 4 else 0x21
    body = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    return SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body


def encode_local() -> bytes:
    """A LOCAL header: the connection is the proxy's own (health checks)."""
    return SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)


def body_length(header: bytes) -> int:
    """From the first 16 bytes, how many more bytes the header has."""
    if len(header) < HEADER_LEN or header[:12] != SIGNATURE:
        raise ProxyHeaderError("not a PROXY v2 header")
    if header[12] >> 4 != 2:
        raise ProxyHeaderError("unsupported PROXY protocol version")
    length = int(struct.unpack("!H", header[14:16])[0])
    if length > MAX_BODY:
        raise ProxyHeaderError("PROXY header too long")
    return length


def decode(header: bytes, body: bytes) -> ProxyInfo:
    """Parse a complete header (16 bytes) and its body."""
    body_length(header)
    command, family = header[12] & 0x0F, header[13]
    src: ipaddress.IPv4Address | ipaddress.IPv6Address
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address
    if command == 0x0:
        return ProxyInfo(None, None)
    if command != 0x1:
        raise ProxyHeaderError("unsupported PROXY command")
    if family == 0x11:
        if len(body) < 12:
            raise ProxyHeaderError("short IPv4 PROXY header")
        src, dst = ipaddress.IPv4Address(body[0:4]), ipaddress.IPv4Address(body[4:8])
        sport, dport = struct.unpack("!HH", body[8:12])
    elif family == 0x21:
        if len(body) < 36:
            raise ProxyHeaderError("short IPv6 PROXY header")
        src, dst = ipaddress.IPv6Address(body[0:16]), ipaddress.IPv6Address(body[16:32])
        sport, dport = struct.unpack("!HH", body[32:36])
    elif family == 0x00:
        return ProxyInfo(None, None)
    else:
        raise ProxyHeaderError("only TCP over IPv4/IPv6 is supported")
    return ProxyInfo((str(src), sport), (str(dst), dport))
