"""Several server processes on one port (SO_REUSEPORT): one asyncssh process is one core.

The parent reserves the port (bound, never listening), forks the workers (each
listens on the same port; the kernel spreads connections), forwards SIGTERM/SIGINT to
them by PID and restarts one that dies.  A worker whose parent dies (even by SIGKILL) is
sent SIGTERM by the kernel and stops as it would on the operator's (the audit written out,
the listener closed): no orphan goes on serving.  Workers share state only through the
control database: grants, certificates, the audit chain; each enforces expiry and
revocation on its own sessions, within the same bound.

With metrics, each worker counts into its own files in a folder the parent made
(``run/metrics-*`` in the home), and the parent serves their sum
(medbridge.platform.metrics); the folder goes when the parent stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from medbridge import processes
from medbridge.config import Home
from medbridge.errors import MedbridgeError, PlatformUnavailable
from medbridge.net import STOP_SIGNALS, bind, stop_event

if TYPE_CHECKING:
    from medbridge.platform.metrics import MetricsServer

log = logging.getLogger("medbridge.platform")


def reserve(host: str, port: int) -> socket.socket:
    """Bind (not listen) with SO_REUSEPORT, so the port is ours and workers can share it.

    No SO_REUSEADDR: with it, another process could bind the port while nothing listens yet.
    """
    return bind(host, port, reuse_addr=False, reuse_port=True)


#: prometheus_client's switch to multiprocess mode (read once, when it is first imported).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def metrics_folder(home: Home) -> Path:
    """A new folder for the workers' metric files, named to prometheus_client before it is imported.

    A folder of this run's own (so it holds no other run's counts), removed by :func:`run`.
    """
    if "prometheus_client" in sys.modules and os.environ.get(MULTIPROC_ENV) is None:
        raise MedbridgeError("internal error: prometheus_client was imported before the workers' metrics folder "
                             "was set, so the workers' metrics could not be summed")  # fmt: skip
    run_dir = home.root / "run"
    run_dir.mkdir(mode=0o700, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="metrics-", dir=run_dir))
    os.environ[MULTIPROC_ENV] = str(folder)
    return folder


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
        ready: Callable[[str, int, str | None], None], metrics: tuple[str, int] | None = None) -> None:  # fmt: skip
    """Serve with ``workers`` processes until SIGTERM/SIGINT; with ``metrics`` (HOST, PORT), their sum there.

    ``ready`` gets the address served and the metrics URL (None without metrics).
    """
    reserved = reserve(host, port)
    port = reserved.getsockname()[1]
    folder: Path | None = None
    exporter: MetricsServer | None = None
    if metrics is not None:
        try:
            folder = metrics_folder(home)
            from medbridge.platform.metrics import MetricsServer, workers_registry

            exporter = MetricsServer(workers_registry(str(folder)), *metrics)
        except BaseException:
            reserved.close()
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
            raise
    stopping = False
    children: dict[int, int] = {}

    def spawn(slot: int) -> int:
        r, w = os.pipe()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            reserved.close()
            if exporter is not None:
                exporter.forget_in_child()
            code = 0
            try:
                for sig in STOP_SIGNALS:  # not the parent's handler: until the worker's own, a stop signal ends it
                    signal.signal(sig, signal.SIG_DFL)
                if not processes.set_parent_death_signal(signal.SIGTERM, parent):
                    os.kill(os.getpid(), signal.SIGTERM)  # orphaned before it could ask: as if the signal came
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
        ready(host, port, exporter.start().url if exporter is not None else None)
        while children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            if folder is not None:
                _forget(pid, folder)
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
        if exporter is not None:
            exporter.stop()
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def _forget(pid: int, folder: Path) -> None:
    """A worker ended: its live gauges (sessions open, audit queue) leave the sum; its counters stay in it."""
    from prometheus_client.multiprocess import mark_process_dead

    mark_process_dead(pid, str(folder))  # type: ignore[no-untyped-call]
