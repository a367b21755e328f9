"""A private PostgreSQL server for tests and benchmarks: Debian's binaries, our own data folder and socket.

Never the system service: ``initdb`` makes a cluster in a temporary folder, ``postgres``
runs it as an unprivileged user (PostgreSQL refuses root) on a private socket folder
and port with no TCP listener, and :meth:`PostgresServer.stop` ends it by PID and
removes the folder.  Each caller gets a fresh database from :meth:`database`.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from medbridge.errors import PlatformUnavailable

USER = "medbridge"


def bindir() -> Path | None:
    """Debian's newest PostgreSQL binaries, if the package is installed."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    return found[-1].parent if found else None


class PostgresServer:
    """Start with :meth:`start` (or ``with``); URLs from :meth:`database`; :meth:`stop` ends and removes it."""

    def __init__(self, runas: str = "nobody"):
        found = bindir()
        if found is None:
            raise PlatformUnavailable("PostgreSQL is not installed (Debian package postgresql)")
        self.bin = found
        self.runas = runas
        self.root = Path(tempfile.mkdtemp(prefix="medbridge-pg-"))
        self.socket_dir = self.root / "run"
        self.port = 5432
        self._proc: subprocess.Popen[bytes] | None = None

    def _as_user(self) -> dict[str, Any]:
        if os.geteuid() != 0:
            return {}
        pw = pwd.getpwnam(self.runas)
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}

    def start(self, timeout: float = 60) -> PostgresServer:
        data = self.root / "data"
        self.socket_dir.mkdir()
        data.mkdir(mode=0o700)
        if os.geteuid() == 0:
            pw = pwd.getpwnam(self.runas)
            os.chmod(self.root, 0o755)
            for p in (self.socket_dir, data):
                os.chown(p, pw.pw_uid, pw.pw_gid)
        init = subprocess.run(
            [str(self.bin / "initdb"), "-D", str(data), "-U", USER, "--auth=trust", "-E", "UTF8", "--no-sync"],
            capture_output=True, text=True, timeout=timeout, **self._as_user(),
        )  # fmt: skip
        if init.returncode != 0:
            self.stop()
            raise PlatformUnavailable(f"initdb failed: {init.stderr.strip()[-300:]}")
        self.port = 20000 + secrets.randbelow(20000)  # only a socket's name: no TCP listener
        with open(self.root / "log", "wb") as log:
            self._proc = subprocess.Popen(
                [str(self.bin / "postgres"), "-D", str(data), "-k", str(self.socket_dir), "-p", str(self.port),
                 "-c", "listen_addresses=", "-c", "fsync=off", "-c", "max_connections=200"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
                **self._as_user(),
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not (self.socket_dir / f".s.PGSQL.{self.port}").exists():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                said = (self.root / "log").read_text(errors="replace").strip()[-300:]
                self.stop()
                raise PlatformUnavailable(f"PostgreSQL did not start: {said}")
            time.sleep(0.05)
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{USER}@/{database}?host={self.socket_dir}&port={self.port}"

    def database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        name = f"t_{secrets.token_hex(6)}"
        with psycopg.connect(host=str(self.socket_dir), port=self.port, user=USER, dbname="postgres",
                             autocommit=True) as conn:  # fmt: skip
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGINT)  # fast shutdown: sessions end, the cluster closes cleanly
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
