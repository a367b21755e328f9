"""Running out of file descriptors without stopping: one kept in reserve to refuse with.

A server out of descriptors cannot ``accept()``; the connections waiting in the backlog
then keep the listener readable (a busy loop) and their clients wait for a banner that
never comes.  With one descriptor held back, the server can accept them and close them
at once (a refusal the client sees), count them, back off, and accept again as soon as
descriptors free up.  Used by the gateway's listeners and the platform's.
"""

from __future__ import annotations

import errno
import os
import socket
import threading

#: Errors of ``accept()`` (and of making a socket or pipe) that mean the process or the
#: system is out of descriptors or memory, rather than that one client misbehaved.
EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: Back-off after running out: the first wait, and the longest, in seconds.
BACKOFF = (0.05, 1.0)


def next_backoff(wait: float) -> float:
    """The wait after ``wait`` (0: none yet), doubling up to the longest."""
    return min(max(wait * 2, BACKOFF[0]), BACKOFF[1])


def error_name(exc: OSError) -> str:
    """``EMFILE``, ``ECONNABORTED``…: an errno as operators and metrics name it."""
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


class Reserve:
    """One descriptor held back to refuse waiting connections with when the process has none left."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fd: int | None = _spare()

    def shed(self, listener: socket.socket, most: int = 512) -> int:
        """Accept and close what waits on the non-blocking ``listener`` (at most ``most``); how many."""
        refused = 0
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            try:
                while refused < most:
                    try:
                        client, _ = listener.accept()
                    except OSError:  # none left waiting, or the freed descriptor was taken meanwhile
                        break
                    client.close()
                    refused += 1
            finally:
                self._fd = _spare()
        return refused

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _spare() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # already out: the next shed tries again
        return None
