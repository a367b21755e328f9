"""Moving bytes between two sockets in the kernel (splice through a pipe), with half-close.

Each direction is one thread blocked in ``splice``: the bytes never enter Python,
which keeps the gateway far below the 3-13 CPU-seconds per GB a Python asyncio relay
costs here.  When one side finishes sending, the other side's write half is shut
down (half-close), and the connection ends when both directions have.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import socket
import threading
import time
from collections.abc import Callable

#: What one relayed connection holds: its two sockets and a pipe (two ends) per direction.
#: splice(2) moves bytes only to or from a pipe, so the pipes are the price of never copying.
DESCRIPTORS = 6
PIPE_SIZE = 1 << 20
CHUNK = 1 << 20
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_GONE = {errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.EBADF, errno.ESHUTDOWN, errno.ETIMEDOUT}


class Link:
    """One relayed connection: two sockets, two pump threads, shared idle clock."""

    def __init__(
        self,
        client: socket.socket,
        backend: socket.socket,
        idle_timeout: float,
        count: Callable[[str, int], None],
        done: Callable[[Link], None],
    ):
        self.client, self.backend = client, backend
        self.idle_timeout = idle_timeout
        self._count = count
        self._done = done
        self._last = time.monotonic()
        self._closed = threading.Event()
        self._left = 2
        self._lock = threading.Lock()
        self.reason = "closed"
        #: Each direction's pipe, made here so that a process out of descriptors fails before
        #: anything starts (the caller refuses the connection) rather than inside a pump.
        self._pipes: list[tuple[int, int]] = []
        try:
            for _ in range(2):
                self._pipes.append(os.pipe())
        except OSError:
            for r, w in self._pipes:
                os.close(r)
                os.close(w)
            raise
        self.threads = [
            threading.Thread(target=self._pump, args=(client, backend, "up", *self._pipes[0]), daemon=True,
                             name="relay-up"),
            threading.Thread(target=self._pump, args=(backend, client, "down", *self._pipes[1]), daemon=True,
                             name="relay-down"),
        ]  # fmt: skip

    def start(self) -> bool:
        """Start both pumps; False, with the link closed and finished, if a thread cannot start."""
        for i, t in enumerate(self.threads):
            try:
                t.start()
            except RuntimeError:  # "can't start new thread": the process is out of threads or memory
                self.close("no thread for the relay")
                for r, w in self._pipes[i:]:
                    os.close(r)
                    os.close(w)
                    self._finish()
                return False
        return True

    def close(self, reason: str) -> None:
        """End both directions now (idle timeout, shutdown)."""
        if not self._closed.is_set():
            self.reason = reason
            self._closed.set()
            for s in (self.client, self.backend):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str, r: int, w: int) -> None:
        try:
            with contextlib.suppress(OSError):
                fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_SIZE)
            poller = select.poll()
            poller.register(src.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
            while not self._closed.is_set():
                if not poller.poll(1000):
                    if time.monotonic() - self._last > self.idle_timeout:
                        self.close("idle timeout")
                    continue
                try:
                    n = os.splice(src.fileno(), w, CHUNK, flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
                except BlockingIOError:
                    continue
                if n == 0:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    break
                self._last = time.monotonic()
                left = n
                while left:
                    left -= os.splice(r, dst.fileno(), left, flags=os.SPLICE_F_MOVE)
                self._count(direction, n)
        except OSError as exc:
            if exc.errno not in _GONE:
                raise
            self.close("reset")
        finally:
            os.close(r)
            os.close(w)
            self._finish()

    def _finish(self) -> None:
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            for s in (self.client, self.backend):
                s.close()
            self._done(self)
