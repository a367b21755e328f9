"""Unix users for tests that replay what another user of a compute node can do.

Each user is made with a fresh name and removed by that name afterwards; nothing
this module did not create is ever removed.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any

#: useradd and userdel take /etc/passwd's lock; another test run may hold it a moment.
_LOCK_TRIES = 20


def available() -> str | None:
    """Why users cannot be made here, or None if they can."""
    if os.geteuid() != 0:
        return "needs root to add Unix users"
    if shutil.which("useradd") is None:
        return "useradd is missing"
    return None


def _retry(cmd: list[str]) -> None:
    for attempt in range(_LOCK_TRIES):
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode == 0:
            return
        if "lock" not in r.stderr or attempt == _LOCK_TRIES - 1:
            raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()}")
        time.sleep(0.05 * (attempt + 1))  # another useradd holds /etc/passwd's lock file: back off, retry


@contextlib.contextmanager
def unix_user(prefix: str = "mbt") -> Iterator[pwd.struct_passwd]:
    """A new unprivileged user with no home and no password, removed on leaving."""
    name = f"{prefix}{secrets.token_hex(4)}"
    _retry(["useradd", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/bin/sh", name])
    try:
        yield pwd.getpwnam(name)
    finally:
        _retry(["userdel", name])


def as_user(user: pwd.struct_passwd) -> dict[str, Any]:
    """subprocess arguments that run a command as ``user`` (its primary group, no others)."""
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
