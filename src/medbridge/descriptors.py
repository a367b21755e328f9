"""Running out of file descriptors without stopping: one kept in reserve to refuse with.

A server out of descriptors cannot ``accept()``; the connections waiting in the backlog
then keep the listener readable (a busy loop) and their clients wait for a banner that
never comes.  With one descriptor held back, the server can accept them and close them
at once (a refusal the client sees), count them, back off, and accept again as soon as
descriptors free up.  Used by the gateway's listeners and the platform's.

The limits that keep one client from getting there are derived from the process's
descriptor limit (:func:`share`): whatever a service manager's ``LimitNOFILE`` allows, one
source or one user may take at most a quarter of it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import socket
import threading

#: Errors of ``accept()`` (and of making a socket or pipe) that mean the process or the
#: system is out of descriptors or memory, rather than that one client misbehaved.
EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: Back-off after running out: the first wait, and the longest, in seconds.
BACKOFF = (0.05, 1.0)


#: Descriptors a server keeps for itself, not its clients': the interpreter's, listeners, logs,
#: the database, epoll, the reserve below.
RESERVED = 32
#: What :func:`share` leaves one client (a source address, a user) of the rest: a quarter,
#: so that three at their limit still leave the others a quarter.
SHARE = 4


def raise_limit() -> int:
    """Raise the soft descriptor limit to the hard one (a server has no use for less); the soft limit after.

    systemd's default soft limit is 1024 whatever its hard limit; a service manager that
    set ``LimitNOFILE=`` sets both.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        # a hard limit the kernel will not grant as soft (unlimited, above nr_open): keep the soft one
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return soft_limit()


def soft_limit() -> int:
    """The process's soft descriptor limit (unlimited counts as 2**20, the kernel's default ``nr_open``)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


def share(each: int, limit: int | None = None) -> int:
    """How many things of ``each`` descriptors one client may hold (at least 1).

    A :data:`SHARE` of the limit past :data:`RESERVED`.
    """
    limit = soft_limit() if limit is None else limit
    return max(1, (limit - RESERVED) // (each * SHARE))


def needed(count: int, each: int) -> int:
    """The descriptor limit under which :func:`share` allows one client ``count`` things of ``each`` descriptors."""
    return RESERVED + count * each * SHARE


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
