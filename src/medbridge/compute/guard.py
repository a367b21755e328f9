"""The payload's parent inside ``job run``: it dies with ``job run`` and takes the payload's process group along.

``job run`` starts ``python -m medbridge.compute.guard PID -- CMD…`` in a session of
its own; the guard runs CMD in its process group and waits for it.  Signals that
``job run`` forwards reach the whole group, CMD included; the guard ignores them and
reports CMD's end as its own exit code (128+N after signal N).

If ``job run`` dies, even by SIGKILL, the kernel sends the guard SIGTERM
(``PR_SET_PDEATHSIG``); the guard then sends SIGTERM to its group and, after
:data:`GRACE` seconds, SIGKILL to whatever of it is left, itself included.  Nothing of
the payload is left running under init with the job's credentials gone.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from medbridge.processes import set_parent_death_signal

#: Seconds the payload's group has to end after SIGTERM once ``job run`` is gone.
GRACE = 5.0
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def guarded(command: Sequence[str]) -> list[str]:
    """``command`` under a guard that this process's death ends (see the module's docstring)."""
    return [sys.executable, "-m", "medbridge.compute.guard", str(os.getpid()), "--", *command]


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        return


def guard(parent: int, command: list[str]) -> int:
    """Run ``command`` in this process group while ``parent`` lives; its exit code (128+N for signal N)."""
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    # A signal only wakes the wait below (through the wake-up descriptor); the payload got it too.
    signal.set_wakeup_fd(wake_w)
    for sig in FORWARDED:
        signal.signal(sig, lambda _s, _f: None)
    if not set_parent_death_signal(signal.SIGTERM, parent):
        return 128 + signal.SIGTERM
    try:
        child = subprocess.Popen(command)
    except OSError as exc:
        sys.stderr.write(f"medbridge: cannot start {command[0]!r}: {exc.strerror}\n")
        return 127 if isinstance(exc, FileNotFoundError) else 126
    pidfd = os.pidfd_open(child.pid)
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    deadline: float | None = None
    while child.poll() is None:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic()) * 1000
        poller.poll(wait)
        _drain(wake_r)
        if deadline is None and os.getppid() != parent:
            deadline = time.monotonic() + GRACE
            os.killpg(0, signal.SIGTERM)
        elif deadline is not None and time.monotonic() >= deadline:
            os.killpg(0, signal.SIGKILL)
    if deadline is not None:
        os.killpg(0, signal.SIGKILL)  # what the payload left in its group goes too, and so does the guard
    code = child.returncode
    return code if code >= 0 else 128 - code


def main(argv: list[str]) -> int:
    if len(argv) < 3 or not argv[0].isdigit() or argv[1] != "--":
        sys.stderr.write("usage: python -m medbridge.compute.guard PARENT_PID -- COMMAND [ARG…]\n")
        return 2
    return guard(int(argv[0]), argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
