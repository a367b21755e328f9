"""Which SFTP requests reach asyncssh's server handler: a listed few; every other one is held back here.

The platform serves SFTP version 3 and a fixed list of extensions.  asyncssh's handler
serves more (``copy-data`` copies inside the server; ``ranges@asyncssh.com``; version 6
links and locks) and a new release may add more.  :class:`RequestFilter` reads the request
stream before asyncssh does, on either path of :mod:`medbridge.fastpath`, and holds back
every request not listed: refused by default, whatever the release.  It decides from each
packet's head alone and hands the rest on untouched; a malformed or oversized packet is
handed on for asyncssh to reject as it does.

A request held back is replaced in the stream by what ``replace`` makes of it (the
platform: a REALPATH of a path only it can name, which its ``realpath`` refuses and
audits), so its answer leaves in turn with the others: SFTP clients such as OpenSSH's
expect the replies of requests they did not pipeline in order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from medbridge.config import READ_FILE_EXTENSION

# SFTP packet types (draft-ietf-secsh-filexfer-02, version 3)
FXP_INIT = 1
FXP_OPEN = 3
FXP_REALPATH = 16
FXP_SYMLINK = 20
FXP_EXTENDED = 200

#: Requests served (OPEN to SYMLINK); LINK, BLOCK and UNBLOCK are version 6, not offered.
SERVED_TYPES = frozenset(range(FXP_OPEN, FXP_SYMLINK + 1))
#: OpenSSH's extensions asyncssh's handler serves for the platform (each through a ``JobSFTPServer`` method, or
#: ``limits@openssh.com``, which names the platform's own limits on the fast path and asyncssh's otherwise).
PASSED_EXTENSIONS = frozenset(
    {
        b"posix-rename@openssh.com",
        b"statvfs@openssh.com",
        b"fstatvfs@openssh.com",
        b"hardlink@openssh.com",
        b"fsync@openssh.com",
        b"lsetstat@openssh.com",
        b"limits@openssh.com",
    }
)
#: Served only where the handler has it (the fast path).
FAST_EXTENSIONS = frozenset({READ_FILE_EXTENSION})

#: Longest extension name read; a longer one is not served.
MAX_EXTENSION_NAME = 255
_HEAD = 13 + MAX_EXTENSION_NAME  # length, type, id, name length, name


@dataclass(frozen=True, slots=True)
class Held:
    """A request held back: its type, its extension name (b'' if none or unreadable) and its id."""

    kind: int
    name: bytes
    pktid: int

    @property
    def op(self) -> str:
        """What it asked, for the audit and the reply (an extension name is escaped by the audit)."""
        if self.kind == FXP_EXTENDED:
            return f"extension {self.name.decode('ascii', 'backslashreplace') or '(unreadable)'}"
        return f"request type {self.kind}"


def realpath_request(pktid: int, path: bytes) -> bytes:
    """A REALPATH request: what a held-back request is replaced by."""
    return (
        (5 + 4 + len(path)).to_bytes(4, "big")
        + bytes([FXP_REALPATH])
        + pktid.to_bytes(4, "big")
        + (len(path).to_bytes(4, "big") + path)
    )


class RequestFilter:
    """Passes an SFTP request stream on to asyncssh's handler, each request not served replaced by ``replace``'s.

    Fed the bytes of one channel as they come, in order; packets may span any number of feeds.
    """

    def __init__(
        self,
        types: frozenset[int],
        extensions: frozenset[bytes],
        max_packet: int,
        replace: Callable[[Held], bytes],
        *,
        seen: Callable[[int, bytes], None] | None = None,
    ):
        self.types = types
        self.extensions = extensions
        self.max_packet = max_packet
        self.replace = replace
        #: Told each request once, served or not: its type, and an extended request's name (else b"").
        self.seen = seen
        self._head = bytearray()  # the head of a packet split across feeds
        self._left = 0  # bytes of the current packet still to come
        self._dropping = False  # ... and whether they are held back

    def feed(self, data: bytes) -> list[bytes]:
        """What goes on for ``data``, in order, in as few pieces as can be (``data`` itself if all of it)."""
        out: list[bytes] = []
        pos, start, end = 0, 0, len(data)
        if self._head:  # finish the head begun in an earlier feed
            joined = bytes(self._head) + data[: _HEAD - len(self._head)]
            seen = len(self._head)
            verdict = self._peek(joined, 0, len(joined))
            if verdict is None:
                self._head += data
                return out
            size, request = verdict
            self._head.clear()
            out.append(joined[:seen] if request is None else self.replace(request))
            self._left, self._dropping = size - seen, request is not None
        while pos < end:
            if self._left:
                n = min(self._left, end - pos)
                if self._dropping:
                    if pos > start:
                        out.append(data[start:pos])
                    start = pos + n
                self._left -= n
                pos += n
                continue
            verdict = self._peek(data, pos, end)
            if verdict is None:  # the head goes on in the next feed
                if pos > start:
                    out.append(data[start:pos])
                self._head += data[pos:]
                return out
            size, request = verdict
            if request is not None:
                if pos > start:
                    out.append(data[start:pos])
                out.append(self.replace(request))
                start = pos
            self._left, self._dropping = size, request is not None
        if end > start:
            out.append(data[start:end] if start or end < len(data) else data)
        return out

    def _peek(self, data: bytes, pos: int, end: int) -> tuple[int, Held | None] | None:
        """At a packet's start: None if its head is not all here; else its size and whether it is held back."""
        if end - pos < 5:
            return None
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4]
        size = 4 + length
        if kind == FXP_INIT or kind in self.types or length < 5 or length > self.max_packet:
            self._seen(kind, b"")
            return size, None  # served, or malformed (no request id, too large): asyncssh rejects it
        if end - pos < 9:
            return None
        pktid = int.from_bytes(data[pos + 5 : pos + 9], "big")
        if kind != FXP_EXTENDED or length < 9:
            self._seen(kind, b"")
            return size, Held(kind, b"", pktid)
        if end - pos < 13:
            return None
        name_length = int.from_bytes(data[pos + 9 : pos + 13], "big")
        if name_length > MAX_EXTENSION_NAME or 9 + name_length > length:
            self._seen(kind, b"")
            return size, Held(kind, b"", pktid)
        if end - pos < 13 + name_length:
            return None
        name = bytes(data[pos + 13 : pos + 13 + name_length])
        self._seen(kind, name)
        return size, (None if name in self.extensions else Held(kind, name, pktid))

    def _seen(self, kind: int, name: bytes) -> None:
        if self.seen is not None and kind != FXP_INIT:
            self.seen(kind, name)
