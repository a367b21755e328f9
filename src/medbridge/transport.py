"""Fewer socket writes for an SSH connection: the packets of one event-loop pass leave in one ``send``.

asyncssh writes every SSH packet to its transport on its own, and asyncio's
transport sends each write at once when its buffer is empty: one system call per
packet.  A 32 KiB SFTP read reply to sshfs is two packets, each after an
``MSG_IGNORE`` asyncssh adds, and on a VM a ``send`` costs tens of microseconds.  The
profile of the server behind sshfs put 37% of its CPU in those calls.  :func:`coalesce` puts a thin
layer under the connection that joins what one pass of the loop writes and sends it
once, after the pass.  Order is kept, and nothing is delayed beyond the current pass.
``close``, ``abort`` and ``write_eof`` send what is pending first, as the plain
transport would have done.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncssh

log = logging.getLogger("medbridge.transport")


class CoalescingTransport:
    """Wraps a stream transport; everything but writing and closing passes through."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self._transport = transport
        self._loop = loop
        self._parts: list[bytes] = []
        #: Socket writes made and SSH packets they carried, for tests and profiles.
        self.sends = 0
        self.packets = 0

    def write(self, data: bytes) -> None:
        if not self._parts:
            self._loop.call_soon(self.flush)
        self._parts.append(data)

    def flush(self) -> None:
        parts, self._parts = self._parts, []
        if parts and not self._transport.is_closing():
            self.sends += 1
            self.packets += len(parts)
            self._transport.write(parts[0] if len(parts) == 1 else b"".join(parts))

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self.flush()
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(len(p) for p in self._parts)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def coalesce(conn: asyncssh.SSHClientConnection | asyncssh.SSHServerConnection) -> CoalescingTransport | None:
    """Put a :class:`CoalescingTransport` under ``conn`` (safe at any time: nothing is pending yet).

    asyncssh offers no hook for its transport, so this replaces its private
    ``_transport`` attribute.  Where that is missing (a future asyncssh), the
    connection works as before, only slower: a warning says so, and a test fails.
    """
    transport = getattr(conn, "_transport", None)
    if isinstance(transport, CoalescingTransport):
        return transport
    if not isinstance(transport, asyncio.Transport):
        log.warning("cannot coalesce SSH packets: asyncssh connection has no stream transport (%r)", type(transport))
        return None
    wrapped = CoalescingTransport(transport, asyncio.get_running_loop())
    conn._transport = wrapped  # type: ignore[assignment]  # see the docstring
    return wrapped
