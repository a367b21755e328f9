"""``medbridge job run``: credentials that live only as long as the job, in an agent, never on disk."""

from __future__ import annotations

import asyncio
import getpass
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

import asyncssh

from medbridge.compute.credentials import JobCredential, parse_address, request_certificate
from medbridge.config import CIPHERS
from medbridge.errors import InvalidInput, JobFailed
from medbridge.platform.keys import KEY_ALG, public_line, read_private_key_file
from medbridge.policy.names import check_name

SSH_HOST_ALIAS = "medbridge"


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """What the user asked ``job run`` for; the platform decides what it gets."""

    platform: str
    key_file: str
    host_fingerprint: str
    command: Sequence[str]
    user: str | None = None
    job_id: str | None = None
    lifetime: int = 24 * 3600
    datasets: Sequence[str] | None = None


def default_job_id(environ: Mapping[str, str]) -> str:
    """The Slurm job id when inside a job, else a fresh local one."""
    return environ.get("SLURM_JOB_ID") or f"local-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"


class Agent:
    """A private ssh-agent for one job, started and killed by PID."""

    def __init__(self, folder: Path):
        self.socket = folder / "agent.sock"
        self._proc = subprocess.Popen(
            ["ssh-agent", "-D", "-a", str(self.socket)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise JobFailed("ssh-agent did not start (is openssh-client installed?)")
            time.sleep(0.01)

    @property
    def pid(self) -> int:
        return self._proc.pid

    async def load(self, key: asyncssh.SSHKey, cert: asyncssh.SSHCertificate, lifetime: int) -> None:
        agent = await asyncssh.connect_agent(str(self.socket))
        try:
            await agent.add_keys([(key, cert)], lifetime=max(1, lifetime))
        finally:
            agent.close()
            await agent.wait_closed()

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


def ssh_config(host: str, port: int, user: str, agent_socket: Path, known_hosts: Path) -> str:
    """An OpenSSH client config that pins the platform and uses only the job's agent."""
    return "\n".join(
        [
            f"Host {SSH_HOST_ALIAS}",
            f"  HostName {host}",
            f"  Port {port}",
            f"  User {user}",
            f"  IdentityAgent {agent_socket}",
            "  IdentityFile none",
            f"  UserKnownHostsFile {known_hosts}",
            "  GlobalKnownHostsFile /dev/null",
            "  StrictHostKeyChecking yes",
            "  CheckHostIP no",
            "  UpdateHostKeys no",
            "  PasswordAuthentication no",
            "  KbdInteractiveAuthentication no",
            "  PubkeyAuthentication yes",
            f"  Ciphers {','.join(CIPHERS)}",
            "  ServerAliveInterval 15",
            "  ServerAliveCountMax 20",
            "  BatchMode yes",
            "  LogLevel ERROR",
            "",
        ]
    )


def known_hosts_line(host: str, port: int, key: asyncssh.SSHKey) -> str:
    name = host if port == 22 else f"[{host}]:{port}"
    return f"{name} {public_line(key)}\n"


class _Signals:
    """Forward SIGTERM/SIGINT/SIGHUP to the payload, remember the first one."""

    HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self) -> None:
        self.received: int | None = None
        self.child: subprocess.Popen[bytes] | None = None
        self._old = {s: signal.signal(s, self._handle) for s in self.HANDLED}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)

    def restore(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


def run(spec: JobSpec, environ: Mapping[str, str] = os.environ) -> int:
    """Run the payload with a job certificate in a private agent; return its exit code."""
    if not spec.command:
        raise InvalidInput("no command given; put it after '--'")
    if not spec.host_fingerprint.startswith("SHA256:"):
        raise InvalidInput(
            "pin the platform with --host-key-fingerprint SHA256:… "
            "(printed by 'medbridge platform init' and 'platform fingerprint')"
        )
    host, port = parse_address(spec.platform)
    user = check_name("user", spec.user or environ.get("MEDBRIDGE_USER") or getpass.getuser())
    job_id = check_name("job id", spec.job_id or default_job_id(environ))
    enrolment = read_private_key_file(spec.key_file)
    ephemeral = asyncssh.generate_private_key(KEY_ALG)
    signals = _Signals()
    folder = Path(tempfile.mkdtemp(prefix="medbridge-job-"))
    agent: Agent | None = None
    try:
        cred = asyncio.run(
            request_certificate(
                host=host,
                port=port,
                user=user,
                enrolment_key=enrolment,
                host_fingerprint=spec.host_fingerprint,
                ephemeral=ephemeral,
                job_id=job_id,
                lifetime=spec.lifetime,
                datasets=list(spec.datasets) if spec.datasets is not None else None,
            )
        )
        agent = Agent(folder)
        asyncio.run(agent.load(ephemeral, cred.certificate, _seconds_left(cred)))
        del ephemeral
        env = _job_environment(environ, folder, host, port, cred, agent)
        if signals.received is not None:
            return 128 + signals.received
        child = subprocess.Popen(list(spec.command), env=env)
        signals.child = child
        code = child.wait()
        if signals.received is not None:
            return 128 + signals.received
        return 128 - code if code < 0 else code
    except FileNotFoundError as exc:
        raise JobFailed(f"cannot start {spec.command[0]!r}: {exc.strerror}") from exc
    finally:
        if agent is not None:
            agent.stop()
        shutil.rmtree(folder, ignore_errors=True)
        signals.restore()


def _seconds_left(cred: JobCredential) -> int:
    end = datetime.fromisoformat(cred.valid_before)
    return int((end - datetime.now(UTC)).total_seconds())


def _job_environment(
    environ: Mapping[str, str], folder: Path, host: str, port: int, cred: JobCredential, agent: Agent
) -> dict[str, str]:
    known = folder / "known_hosts"
    known.write_text(known_hosts_line(host, port, cred.host_key))
    config = folder / "ssh_config"
    config.write_text(ssh_config(host, port, cred.user, agent.socket, known))
    env = dict(environ)
    env.update(
        {
            "SSH_AUTH_SOCK": str(agent.socket),
            "MEDBRIDGE_PLATFORM": f"{host}:{port}",
            "MEDBRIDGE_USER": cred.user,
            "MEDBRIDGE_JOB_ID": cred.job_id,
            "MEDBRIDGE_SSH_CONFIG": str(config),
            "MEDBRIDGE_SSH_HOST": SSH_HOST_ALIAS,
            "MEDBRIDGE_CERT_SERIAL": str(cred.serial),
            "MEDBRIDGE_CERT_VALID_BEFORE": cred.valid_before,
        }
    )
    env.pop("SSH_AGENT_PID", None)
    return env
