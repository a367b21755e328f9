"""Child processes and files, handled one way everywhere: stop by PID politely first; hash in chunks."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

CHUNK = 1 << 20


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


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used so far (0.0 once it is gone), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
