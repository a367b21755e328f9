"""Child processes and files, handled one way everywhere: stop by PID politely first; hash in chunks."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_tuned = False


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse rather than hand it back to the kernel at once.

    Why: every request of the data plane builds buffers of 100 KiB to a few MiB (SSH
    packets, read replies, samples).  By default glibc maps each of those afresh, or
    trims the heap under them once freed, so the next one faults in every page again;
    on a virtual machine that costs more than encrypting the bytes (docs/benchmarks.md
    has the figures).  The price is that up to a few hundred MiB freed stay with the process.
    Process-wide and idempotent; False where the C library is not glibc.
    """
    global _tuned
    if _tuned:
        return True
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    _tuned = all(
        mallopt(param, value) == 1
        for param, value in ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 256 << 20), (_M_TOP_PAD, 16 << 20))
    )
    return _tuned


def stop(proc: subprocess.Popen[Any], timeout: float = 5.0, sig: int = signal.SIGTERM) -> int:
    """Signal a child we started (by its PID), wait, and SIGKILL it if it does not go; its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return int(proc.returncode)


def stop_group(proc: subprocess.Popen[Any], timeout: float = 5.0, sig: int = signal.SIGTERM) -> int:
    """:func:`stop` for a child that leads a process group of its own: the signals go to the whole group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return int(proc.returncode)


_PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int, parent: int) -> bool:
    """Have the kernel send ``sig`` to this process when ``parent`` (the thread that started it) ends.

    False if ``parent`` is gone already (this process was orphaned before it could ask).
    """
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    if prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    return os.getppid() == parent


def tethered(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets ``sig`` when this process dies, even by SIGKILL (``PR_SET_PDEATHSIG``).

    The signal follows the *thread* that started the child: start tethered children
    from a thread that lives as long as the process (``job run`` starts them from its
    main thread).  The libc lookup happens here, so the child only makes the call.
    """
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the call: act as if it came
            os.kill(os.getpid(), sig)

    return preexec


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used so far (0.0 once it is gone), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file's bytes, read in chunks (never the whole file in memory)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
