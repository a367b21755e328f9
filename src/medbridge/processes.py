"""Child processes and files, handled one way everywhere: stop by PID politely first; hash in chunks."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
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


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
