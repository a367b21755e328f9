"""Fewer socket writes for an SSH connection: the packets of one event-loop pass leave in one ``send``.

asyncssh writes every SSH packet to its transport on its own, and asyncio's
transport sends each write at once when its buffer is empty: one system call per
packet.  A 32 KiB SFTP read reply to sshfs is two packets, each after an
``MSG_IGNORE`` asyncssh adds, and on a VM a ``send`` costs more than sealing a small packet (docs/benchmarks.md has the
profile).  :func:`coalesce` puts a thin
layer under the connection that joins what one pass of the loop writes and sends it
once, after the pass.  Order is kept, and nothing is delayed beyond the current pass.
``close``, ``abort`` and ``write_eof`` send what is pending first, as the plain
transport would have done.

Putting it under an asyncssh connection takes asyncssh's private state, so that is
done by :func:`medbridge.fastpath.coalesce`, behind its version gate (as is the
channel whose data is sealed in place, :class:`medbridge.fastpath.SealingChannel`).
"""

from __future__ import annotations

import abc
import asyncio
from typing import Any


class PassJoiner(abc.ABC):
    """Holds what one event-loop pass writes to ``target`` and hands it on joined, once, after the pass.

    Order is kept; nothing waits beyond the current pass, nor past ``limit`` held bytes
    (0: no bound).  ``write_eof`` and ``close`` hand on what is held first; everything
    else passes through to ``target``.  Subclasses say how a joined write is delivered.
    """

    limit = 0

    def __init__(self, target: Any, loop: asyncio.AbstractEventLoop):
        self._target = target
        self._loop = loop
        self._parts: list[bytes] = []
        self._size = 0

    def write(self, data: bytes) -> None:
        if not self._parts:
            self._loop.call_soon(self.flush)
        self._parts.append(data)
        self._size += len(data)
        if self.limit and self._size >= self.limit:
            self.flush()

    def flush(self) -> None:
        parts, self._parts, self._size = self._parts, [], 0
        if parts:
            self._deliver(parts[0] if len(parts) == 1 else b"".join(parts), len(parts))

    @abc.abstractmethod
    def _deliver(self, data: bytes, writes: int) -> None:
        """Hand on one joined write of ``writes`` parts."""

    def write_eof(self) -> None:
        self.flush()
        self._target.write_eof()

    def close(self) -> None:
        self.flush()
        self._target.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


class CoalescingTransport(PassJoiner):
    """Wraps a stream transport; everything but writing and closing passes through."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        super().__init__(transport, loop)
        #: Socket writes made and SSH packets they carried, for tests and profiles.
        self.sends = 0
        self.packets = 0

    def _deliver(self, data: bytes, writes: int) -> None:
        if not self._target.is_closing():
            self.sends += 1
            self.packets += writes
            self._target.write(data)

    def abort(self) -> None:
        self.flush()
        self._target.abort()

    def get_write_buffer_size(self) -> int:
        return int(self._target.get_write_buffer_size()) + self._size
