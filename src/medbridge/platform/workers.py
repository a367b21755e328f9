"""Several server processes on one port (SO_REUSEPORT): one asyncssh process is one core.

The parent reserves the port (bound, never listening), forks the workers (each
listens on the same port; the kernel spreads connections), forwards SIGTERM/SIGINT to
them by PID and restarts one that dies.  Workers share state only through the
control database: grants, certificates, the audit chain; each enforces expiry and
revocation on its own sessions, within the same bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Sequence

from medbridge.config import Home
from medbridge.errors import PlatformUnavailable
from medbridge.net import STOP_SIGNALS, bind, stop_event

log = logging.getLogger("medbridge.platform")


def reserve(host: str, port: int) -> socket.socket:
    """Bind (not listen) with SO_REUSEPORT, so the port is ours and workers can share it.

    No SO_REUSEADDR: with it, another process could bind the port while nothing listens yet.
    """
    return bind(host, port, reuse_addr=False, reuse_port=True)


def _worker(home: Home, host: str, port: int, trusted: Sequence[str], ready_fd: int) -> None:
    from medbridge.platform.server import serve

    async def main() -> None:
        stop = stop_event()

        def ready(_host: str, _port: int) -> None:
            os.write(ready_fd, b"r")
            os.close(ready_fd)

        await serve(home, host, port, ready=ready, stop=stop, trusted_proxies=trusted, reuse_port=True)

    asyncio.run(main())


def run(home: Home, host: str, port: int, workers: int, trusted: Sequence[str],
        ready: Callable[[str, int], None]) -> None:  # fmt: skip
    """Serve with ``workers`` processes until SIGTERM/SIGINT."""
    reserved = reserve(host, port)
    port = reserved.getsockname()[1]
    stopping = False
    children: dict[int, int] = {}

    def spawn(slot: int) -> int:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            reserved.close()
            code = 0
            try:
                _worker(home, host, port, trusted, w)
            except BaseException:  # a forked child must never unwind into the parent's code: log and exit
                log.exception("worker %d failed", slot)
                code = 1
            os._exit(code)
        os.close(w)
        with os.fdopen(r, "rb") as pipe:
            if pipe.read(1) != b"r":
                raise PlatformUnavailable(f"worker {slot} did not start")
        return pid

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    for sig in STOP_SIGNALS:
        signal.signal(sig, stop)
    try:
        for slot in range(workers):
            children[spawn(slot)] = slot
        ready(host, port)
        while children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            if pid in children and not stopping:
                lost = children.pop(pid)
                log.error("worker %d (pid %d) ended with %s; restarting it", lost, pid, status)
                time.sleep(0.5)
                children[spawn(lost)] = lost
            else:
                children.pop(pid, 0)
    finally:
        stop(signal.SIGTERM, None)
        for pid in list(children):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        reserved.close()
