"""The job's sshfs mount: started as our child (so we hold its PID), always unmounted."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from medbridge import outage, processes
from medbridge.errors import JobFailed


def sshfs_options(tolerance: float = outage.DEFAULT_TOLERANCE) -> tuple[str, ...]:
    """For long jobs over a WAN: silent for up to ``tolerance`` seconds before ssh gives up (see
    medbridge.outage), reconnect after that for files opened later, several connections for parallel reads."""
    keepalive = outage.client_keepalive(tolerance)
    return (
        "reconnect",
        f"ServerAliveInterval={keepalive.interval}",
        f"ServerAliveCountMax={keepalive.count}",
        "max_conns=4",
        "dir_cache=yes",
        "noatime",
    )


SSHFS_OPTIONS = sshfs_options()


def fusermount() -> str:
    for name in ("fusermount3", "fusermount"):
        found = shutil.which(name)
        if found:
            return found
    raise JobFailed("fusermount3 is missing (apt-get install fuse3)")


def unmount(path: Path, *, lazy_if_busy: bool = True) -> bool:
    """Unmount a FUSE mount; lazily if it is busy.  True if it is no longer mounted."""
    if not os.path.ismount(path):
        return True
    tool = fusermount()
    if subprocess.run([tool, "-u", "-q", str(path)], capture_output=True).returncode == 0:
        return True
    if lazy_if_busy:
        subprocess.run([tool, "-u", "-z", "-q", str(path)], capture_output=True)
    return not os.path.ismount(path)


class Mount:
    """``sshfs -f`` of the job's view at ``mountpoint``."""

    mounted = float("inf")

    def __init__(self, mountpoint: Path, ssh_config: Path, host_alias: str, *, timeout: float = 30, remote: str = "/",
                 ssh_command: str | None = None, options: Sequence[str] = SSHFS_OPTIONS,
                 tethered: bool = False):  # fmt: skip
        """``tethered``: sshfs ends (and unmounts) when this process does, however it ends (processes.tethered)."""
        if shutil.which("sshfs") is None:
            raise JobFailed("sshfs is missing (apt-get install sshfs)")
        if not os.path.exists("/dev/fuse"):
            raise JobFailed("/dev/fuse is missing: this node cannot mount (use the native loader or sftp)")
        self.mountpoint = mountpoint.absolute()
        self.created = not self.mountpoint.exists()
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        if os.path.ismount(self.mountpoint) or any(self.mountpoint.iterdir()):
            raise JobFailed(f"--mount {self.mountpoint}: must be an empty folder that is not a mount point")
        cmd = [
            "sshfs",
            "-f",
            "-F",
            str(ssh_config),
            f"{host_alias}:{remote}",
            str(self.mountpoint),
            *(["-o", ",".join(options)] if options else []),  # none: sshfs as the original system ran it
            *(["-o", f"ssh_command={ssh_command}"] if ssh_command else []),  # e.g. ssh from another namespace
        ]
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
            preexec_fn=processes.tethered() if tethered else None,
        )  # fmt: skip
        #: What sshfs and its ssh said, with when (time.time()): why a mount failed, or why its link broke later.
        self.said: deque[tuple[float, str]] = deque(maxlen=20)
        self._listener = threading.Thread(target=self._listen, name="medbridge-sshfs-stderr", daemon=True)
        self._listener.start()
        deadline = time.monotonic() + timeout
        while not os.path.ismount(self.mountpoint):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                err = self._stop_process()
                raise JobFailed(f"sshfs could not mount the platform at {self.mountpoint}: {err or 'timed out'}")
            time.sleep(0.02)
        self.mounted = time.time()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _listen(self) -> None:
        assert self._proc.stderr is not None
        try:
            for raw in self._proc.stderr:
                line = raw.decode(errors="replace").strip()
                if line:
                    self.said.append((time.time(), line))
        except (OSError, ValueError):  # the pipe was closed under us at the end: nothing more to hear
            return

    def broke(self) -> tuple[float, str] | None:
        """The first thing sshfs or its ssh said once mounted (a connection reset or given up), with when."""
        return next(((at, line) for at, line in self.said if at >= self.mounted), None)

    def _stop_process(self) -> str:
        processes.stop(self._proc)
        self._listener.join(timeout=5)  # its ssh may hold the pipe a moment longer
        if self._proc.stderr is not None and not self._listener.is_alive():
            self._proc.stderr.close()
        return self.said[-1][1] if self.said else ""

    def close(self) -> bool:
        """Unmount (lazily if busy), stop sshfs by PID, remove a mount point we created."""
        gone = unmount(self.mountpoint)
        self._stop_process()
        gone = gone and unmount(self.mountpoint)
        if gone and self.created:
            with contextlib.suppress(OSError):
                self.mountpoint.rmdir()
        return gone
