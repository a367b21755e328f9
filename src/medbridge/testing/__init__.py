"""Test helpers shipped with the package: keys, and a real platform on 127.0.0.1 port 0.

The platform runs in a background thread with its own event loop, so a test can
drive it with real SSH clients (asyncssh in-process, OpenSSH's ``sftp`` and
``sshfs`` as subprocesses) and stop it by calling :meth:`RunningPlatform.stop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import asyncssh

from medbridge.compute.credentials import Enrolment, JobCredential, request_certificate
from medbridge.compute.job import Agent
from medbridge.compute.session import Endpoint
from medbridge.config import CIPHERS, Home
from medbridge.control.audit import Record
from medbridge.control.store import Store
from medbridge.platform.background import BackgroundPlatform
from medbridge.platform.keys import KEY_ALG, fingerprint, load_private_key, public_line
from medbridge.platform.server import Platform
from medbridge.platform.storage import add_dataset, init_home
from medbridge.testing.wait import HANG, until


def write_key(path: Path) -> asyncssh.SSHKey:
    """A fresh unencrypted Ed25519 key in OpenSSH format, with ``.pub`` beside it."""
    key = asyncssh.generate_private_key(KEY_ALG)
    path.write_bytes(key.export_private_key())
    path.chmod(0o600)
    path.with_name(path.name + ".pub").write_bytes(key.export_public_key())
    return key


class RunningPlatform:
    """A platform home in ``root`` served on loopback (or ``host``) from a background thread."""

    def __init__(self, root: Path, database_url: str = "", *, host: str = "127.0.0.1", **settings: Any):
        self.root = root
        self.home = Home(root / "home")
        init_home(self.home, "test", database_url)
        if settings:
            lines = [f"{k} = {_toml(v)}" for k, v in {"database_url": database_url, **settings}.items()]
            self.home.settings_file.write_text("\n".join(lines) + "\n")
        self.store = Store(self.home.database_url(self.home.settings()))
        self.keys: dict[str, Path] = {}
        self.background = BackgroundPlatform(self.home, host)

    # -- content -----------------------------------------------------------------------

    def add_user(self, name: str, groups: Sequence[str] = ()) -> Path:
        key_path = self.root / f"{name}_enrolment"
        key = write_key(key_path)
        self.store.add_user(name, [(public_line(key), fingerprint(key))], groups, _now(), "test")
        self.keys[name] = key_path
        return key_path

    def add_dataset(self, name: str, files: Mapping[str, bytes]) -> Path:
        src = self.root / f"src-{name}"
        for rel, data in files.items():
            p = src / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        add_dataset(self.home, self.store, name, src, "test-society", "test")
        return self.home.datasets / name

    def grant(self, subject: str, dataset: str, until: datetime | None = None) -> None:
        self.store.grant(subject, dataset, until, _now(), "test")

    # -- serving -----------------------------------------------------------------------

    @property
    def fingerprint(self) -> str:
        return fingerprint(load_private_key(self.home.host_key))

    @property
    def address(self) -> str:
        return self.background.address

    @property
    def host(self) -> str:
        return self.background.host

    @property
    def port(self) -> int:
        return self.background.port

    @property
    def platform(self) -> Platform | None:
        return self.background.platform

    def start(self) -> RunningPlatform:
        self.background.start()
        return self

    @contextlib.contextmanager
    def process(self, *, nofile: int | None = None, timeout: float = 60) -> Iterator[int]:
        """Serve the home from ``medbridge platform serve`` (one worker) in a process of its own; its port.

        ``nofile`` runs it under that descriptor limit (``prlimit``), as a server started by
        a service manager with a low ``LimitNOFILE`` would be.  Stopped by PID on leaving.
        """
        serve = [sys.executable, "-m", "medbridge", "platform", "serve", "--home", str(self.home.root),
                 "--listen", "127.0.0.1:0", "--workers", "1"]  # fmt: skip
        cmd = [*(["prlimit", f"--nofile={nofile}:{nofile}"] if nofile else []), *serve]
        log = (self.root / "platform-process.log").open("w+")
        with log, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True) as proc:
            try:
                assert proc.stdout is not None
                line = proc.stdout.readline()
                if "listening on" not in line:
                    log.seek(0)
                    raise RuntimeError(f"the platform did not start: {line}{log.read()[-2000:]}")
                yield int(line.split("listening on ", 1)[1].split()[0].rsplit(":", 1)[1])
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def call(self, coro: Any) -> Any:
        return self.background.call(coro)

    def stop(self) -> None:
        self.background.stop()
        self.store.close()

    def __enter__(self) -> RunningPlatform:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # -- observing ---------------------------------------------------------------------

    def audit(
        self, action: str | None = None, until: Callable[[Record], bool] | None = None, timeout: float = HANG
    ) -> list[Record]:
        """Audit entries (flushed first), optionally of one action.

        With ``until``, waits (up to ``timeout``) for an entry it accepts: a refused login
        is recorded when the server sees the connection end, which can be after the client
        has already raised.
        """
        deadline = time.monotonic() + timeout
        while True:
            if self.platform is not None and self.background.running:
                self.call(self.platform.sink.flush())
            records = self.store.audit_records(action=action)
            if until is None or any(until(r) for r in records) or time.monotonic() > deadline:
                return records
            time.sleep(0.05)

    def enforced(self, ticks: int = 2, timeout: float = HANG) -> None:
        """Wait until ``ticks`` whole enforcement ticks have run from now.

        The first may have begun before this call (and decided on older facts); the
        second began after it, so two ticks see everything done before the call.
        """
        assert self.platform is not None
        platform = self.platform

        async def ticks_done() -> int:
            return platform.enforcement_ticks

        start = int(self.call(ticks_done()))
        until(lambda: int(self.call(ticks_done())) >= start + ticks, f"{ticks} enforcement ticks", timeout)

    def live_sessions(self) -> int:
        assert self.platform is not None

        async def count() -> int:
            assert self.platform is not None
            return len(self.platform.sessions)

        return int(self.call(count()))

    # -- clients -----------------------------------------------------------------------

    async def credential(
        self,
        user: str,
        job_id: str = "job-1",
        lifetime: int = 600,
        datasets: Iterable[str] | None = None,
        port: int | None = None,
        slurm_job_id: str | None = None,
    ) -> tuple[asyncssh.SSHKey, JobCredential]:
        """What ``job run`` obtains: an ephemeral key and its job certificate."""
        ephemeral = asyncssh.generate_private_key(KEY_ALG)
        wanted = list(datasets) if datasets is not None else None
        cred = await request_certificate(self.enrolment(user, port), ephemeral, job_id, lifetime, wanted, slurm_job_id)
        return ephemeral, cred

    def enrolment(self, user: str, port: int | None = None) -> Enrolment:
        """Reach the issuer directly, or through a gateway listening on ``port``."""
        key = asyncssh.read_private_key(str(self.keys[user]))
        return Enrolment(self.host, port or self.port, user, key, self.fingerprint)

    @contextlib.contextmanager
    def job_endpoint(self, user: str, job_id: str = "job-1", port: int | None = None) -> Iterator[Endpoint]:
        """What a job's environment gives the loader: its agent holding a job certificate."""
        folder = Path(tempfile.mkdtemp(prefix="medbridge-test-agent-"))
        agent = Agent(folder)
        try:
            key, cred = asyncio.run(self.credential(user, job_id=job_id))
            asyncio.run(agent.load(key, cred.certificate, 600))
            yield Endpoint(self.host, port or self.port, cred.user, cred.host_key, str(agent.socket))
        finally:
            agent.stop()
            shutil.rmtree(folder, ignore_errors=True)

    async def connect(
        self, user: str, client_keys: Sequence[Any], port: int | None = None, **options: Any
    ) -> asyncssh.SSHClientConnection:
        """An asyncssh client connection presenting exactly ``client_keys`` (to ``port``, or the platform's).

        ``options`` go to asyncssh.
        """
        return await asyncssh.connect(
            self.host,
            port or self.port,
            username=user,
            client_keys=list(client_keys),
            known_hosts=None,
            agent_path=None,
            encryption_algs=list(CIPHERS),
            config=None,
            **options,
        )


class PlatformProcess:
    """A home served by ``medbridge platform serve`` (with ``args``) in a process of its own, on 127.0.0.1.

    For what needs real processes: several workers, a SIGTERM, a SIGKILL.  Stopped by
    its PID (SIGTERM, or SIGKILL with :meth:`kill`).
    """

    def __init__(self, home: Home, *args: str):
        cmd = [sys.executable, "-m", "medbridge", "platform", "serve", "--home", str(home.root),
               "--listen", "127.0.0.1:0", *args]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "listening on 127.0.0.1:" not in line:
            self.kill()
            said = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"platform serve did not start: {line!r} {said}")
        self.port = int(line.split("127.0.0.1:")[1].split()[0])
        self.fingerprint = line.split("host key ")[1].split()[0]

    def stop(self, timeout: float = 60) -> tuple[int, str]:
        """SIGTERM; the exit code and what it wrote to stderr."""
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


def _now() -> datetime:
    return datetime.now(UTC)


def _toml(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)
