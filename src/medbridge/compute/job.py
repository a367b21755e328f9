"""``medbridge job run``: a job's platform access, from certificate to residue scan.

set up   enrolment key → job certificate for an in-memory key → private ssh-agent
         → optional sshfs mount → renewal thread (compute.renewal)
payload  runs with SSH_AUTH_SOCK and MEDBRIDGE_* set; SIGTERM/SIGINT/SIGHUP are
         forwarded and turn into an orderly teardown (exit 128+N)
teardown (always) upload outputs and commit their manifest → unmount (lazy if busy)
         → kill the agent → remove job-private files → residue scan (+ purge of what
         is proven the job's) → report the scan to the platform's audit log

The job's own folders, where a medical file written during the job is the job's:
``--scratch`` folders (``job submit`` names the working folder it makes for each job),
the payload's ``$TMPDIR`` (a folder made here for the job, removed at the end if the
job left nothing in it), and /tmp and /dev/shm when job_container/tmpfs made them
private to this Slurm job.  Everything else is only scanned and reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import getpass
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import asyncssh

from medbridge import outage, processes
from medbridge.compute import residue
from medbridge.compute.credentials import (
    Enrolment,
    JobCredential,
    PlatformLookup,
    end_job,
    request_certificate,
)
from medbridge.compute.guard import guarded
from medbridge.compute.linkwatch import LinkWatch
from medbridge.compute.mount import Mount, sshfs_options
from medbridge.compute.renewal import Renewer, seconds_left
from medbridge.compute.session import Endpoint, connect, upload_outputs, wipe
from medbridge.compute.slurm import SHARED_TEMP, private_temp
from medbridge.compute.state import DEFAULT_STATE_DIR, UserFolder
from medbridge.config import CIPHERS
from medbridge.errors import AccessDenied, InvalidInput, JobFailed, MedbridgeError
from medbridge.net import format_address, parse_address
from medbridge.platform.issuer import MAX_REQUEST
from medbridge.platform.keys import KEY_ALG, public_line, read_private_key_file
from medbridge.policy.manifest import parse_manifest
from medbridge.policy.names import check_name

SSH_HOST_ALIAS = "medbridge"
#: The residue report the platform gets: half of one request to its issuer, leaving room for the
#: outages the same request lists (the platform keeps a bounded claim of it; --report has it whole).
REPORT_BYTES = MAX_REQUEST // 2
#: Pre-existing medical files named on standard error; the report has them all.
SHOWN_PREEXISTING = 10


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
    mount: Path | None = None
    outputs: Path | None = None
    scan: Sequence[Path] = ()
    scratch: Sequence[Path] = ()
    purge: bool | None = None
    report: Path | None = None
    #: Seconds a silent link may last before the job gives up (None: as long as the platform allows).
    outage_tolerance: float | None = None


def default_job_id(environ: Mapping[str, str]) -> str:
    """The Slurm job id when inside a job, else a fresh local one.

    In a job of several nodes each node's ``job run`` is a platform job of its own,
    ``<Slurm job id>-n<node index>``: its own certificates, results and end (a job's end
    revokes all its certificates, which must not cut another node still at work).
    """
    slurm = environ.get("SLURM_JOB_ID")
    if not slurm:
        return f"local-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"
    nodes, node = environ.get("SLURM_JOB_NUM_NODES", ""), environ.get("SLURM_NODEID", "")
    return f"{slurm}-n{node}" if nodes.isdigit() and int(nodes) > 1 and node.isdigit() else slurm


def accepts_connections(path: Path) -> bool:
    """Does a Unix socket accept connections yet?  ssh-agent binds its socket a moment before it listens."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return False
    return True


class Agent:
    """A private ssh-agent for one job, started and killed by PID."""

    def __init__(self, folder: Path, *, tethered: bool = False):
        """``tethered``: the agent ends when this process does, however it ends.

        ssh-agent is set-group-ID on Debian, so the kernel drops a parent-death signal
        set before its exec: a tethered agent runs under a guard (compute.guard) instead.
        """
        self.socket = folder / "agent.sock"
        agent = ["ssh-agent", "-D", "-a", str(self.socket)]
        self._proc = subprocess.Popen(
            guarded(agent) if tethered else agent,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while not accepts_connections(self.socket):
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
        processes.stop_group(self._proc)


def ssh_config(host: str, port: int, user: str, agent_socket: Path, known_hosts: Path,
               tolerance: float = outage.DEFAULT_TOLERANCE) -> str:  # fmt: skip
    """An OpenSSH client config that pins the platform, uses only the job's agent and waits out outages.

    ssh waits ``tolerance`` seconds of silence before it gives up, and its socket comes
    from :mod:`medbridge.compute.dial`, tuned so TCP does not give up first.
    """
    keepalive = outage.client_keepalive(tolerance)
    dial = f"{shlex.quote(sys.executable)} -m medbridge.compute.dial %h %p {outage.tcp_user_timeout_ms(tolerance)}"
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
            f"  ServerAliveInterval {keepalive.interval}",
            f"  ServerAliveCountMax {keepalive.count}",
            f"  ProxyCommand {dial}",
            "  ProxyUseFdpass yes",
            "  BatchMode yes",
            "  LogLevel ERROR",
            "",
        ]
    )


def known_hosts_line(host: str, port: int, key: asyncssh.SSHKey) -> str:
    name = host if port == 22 else f"[{host}]:{port}"
    return f"{name} {public_line(key)}\n"


class _Signals:
    """Forward SIGTERM/SIGINT/SIGHUP to the payload's process group, remember the first one.

    A payload that ignores the signal gets SIGKILL after ``grace`` seconds, so the
    teardown always runs before Slurm's own KillWait ends the wrapper too.
    """

    HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self, grace: float = 10.0) -> None:
        self.received: int | None = None
        self.child: subprocess.Popen[bytes] | None = None
        self.grace = grace
        self._timer: threading.Timer | None = None
        self._old = {s: signal.signal(s, self._handle) for s in self.HANDLED}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
        if self.child is not None and self.child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.child.pid, signum)
            if self._timer is None:
                self._timer = threading.Timer(self.grace, self._kill)
                self._timer.daemon = True
                self._timer.start()

    def _kill(self) -> None:
        if self.child is not None and self.child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.child.pid, signal.SIGKILL)

    def restore(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for s, old in self._old.items():
            signal.signal(s, old)


@dataclass
class Outcome:
    """What happened, for the summary line, ``--report`` and the platform's audit log."""

    job_id: str
    user: str
    exit_code: int | None = None
    signal: int | None = None
    certificate_serial: int | None = None
    renewals: int = 0
    renewal_refused: str | None = None
    uploaded_files: int = 0
    uploaded_bytes: int = 0
    upload_error: str | None = None
    committed: bool | None = None
    #: Files left in --outputs because they were not uploaded as they are now (written after the upload read them).
    outputs_kept: list[str] = field(default_factory=list)
    outage_tolerance: float = outage.DEFAULT_TOLERANCE
    outages: list[dict[str, Any]] = field(default_factory=list)
    #: Why the platform refused the job's certificate at its end (a revoked grant, a disabled account).
    access_revoked: str | None = None
    #: Why the platform could not be told the job ended (its certificates then end at expiry or by the epilog).
    end_error: str | None = None
    unmounted: bool | None = None
    agent_stopped: bool = False
    residue: dict[str, Any] = field(default_factory=dict)
    #: Teardown steps that failed with an unexpected error (the later steps still ran).
    teardown_errors: list[str] = field(default_factory=list)


class Job:
    """One run of ``medbridge job run``."""

    def __init__(self, spec: JobSpec, environ: Mapping[str, str], say: Callable[[str], None]):
        if not spec.command:
            raise InvalidInput("no command given; put it after '--'")
        if not spec.host_fingerprint.startswith("SHA256:"):
            raise InvalidInput(
                "pin the platform with --host-key-fingerprint SHA256:… "
                "(printed by 'medbridge platform init' and 'platform fingerprint')"
            )
        self.environ = environ
        self.say = say
        host, port = parse_address(spec.platform, "--platform")
        user = check_name("user", spec.user or environ.get("MEDBRIDGE_USER") or getpass.getuser())
        self.job_id = check_name("job id", spec.job_id or default_job_id(environ))
        self.spec = spec = dataclasses.replace(
            spec,
            mount=_per_job(spec.mount, self.job_id),
            outputs=_per_job(spec.outputs, self.job_id),
        )
        for name in spec.datasets or ():
            check_name("dataset", name)
        if spec.outage_tolerance is not None:
            try:
                outage.check(spec.outage_tolerance, "--outage-tolerance")
            except ValueError as exc:
                raise InvalidInput(str(exc)) from exc
        self.enrolment = Enrolment(host, port, user, read_private_key_file(spec.key_file), spec.host_fingerprint)
        self.ephemeral = asyncssh.generate_private_key(KEY_ALG)
        self.in_slurm = "SLURM_JOB_ID" in environ
        self.purge = spec.purge if spec.purge is not None else self.in_slurm
        self.outcome = Outcome(self.job_id, user)
        #: The residue report as sent to the platform: lists cut to fit one request.
        self.residue_summary: dict[str, Any] = {}
        self.agent: Agent | None = None
        self.mount: Mount | None = None
        self.renewer: Renewer | None = None
        self.watch: LinkWatch | None = None
        self.tolerance = spec.outage_tolerance or outage.DEFAULT_TOLERANCE
        #: Where the job's state for the epilog lies, and the name of its file there.
        self.state: tuple[UserFolder, str] | None = None
        self.scratch = [_own_folder(p) for p in spec.scratch]
        if spec.outputs is not None and spec.outputs.exists():
            _own_folder(spec.outputs, "--outputs")
        #: Folders made private (0700) for the job's lifetime, with the modes they get back.
        self.loosened: list[tuple[Path, int]] = []
        self.started_at: float | None = None
        self.tmpdir: Path | None = None
        self.job_scratch: Path | None = None  # $MEDBRIDGE_SCRATCH: removed with the job's folder at teardown
        #: The files (device, inode) in the scanned folders before the payload started: never purged.
        self.existed: frozenset[tuple[int, int]] = frozenset()

    async def certify(self) -> JobCredential:
        """A certificate for the job's in-memory key, loaded into its agent."""
        datasets = list(self.spec.datasets) if self.spec.datasets is not None else None
        slurm_job = self.environ.get("SLURM_JOB_ID")
        cred = await request_certificate(self.enrolment, self.ephemeral, self.job_id, self.spec.lifetime, datasets,
                                         slurm_job if slurm_job and slurm_job.isdigit() else None)  # fmt: skip
        if self.agent is not None:
            await self.agent.load(self.ephemeral, cred.certificate, int(seconds_left(cred.valid_before)))
        return cred

    def run(self) -> int:
        signals = _Signals()
        folder = Path(tempfile.mkdtemp(prefix="medbridge-job-"))
        # The job's start on the file-system clock that stamps the files it will write.
        self.started_at = folder.stat().st_ctime
        started = False
        try:
            self.make_private()
            try:
                self.tmpdir = Path(tempfile.mkdtemp(prefix=f"medbridge-tmp-{self.job_id}-", dir=self._inherited_tmp()))
            except OSError as exc:
                raise JobFailed(f"cannot make the job's $TMPDIR: {exc}") from exc
            cred = asyncio.run(self.certify())
            self.outcome.certificate_serial = cred.serial
            self.tolerance = self.outcome.outage_tolerance = self.settle_tolerance(cred.outage_tolerance)
            self.agent = Agent(folder, tethered=True)
            self.watch = LinkWatch(self.enrolment, self.tolerance)
            self.watch.start()
            asyncio.run(self.agent.load(self.ephemeral, cred.certificate, int(seconds_left(cred.valid_before))))
            env = self.environment(folder, cred)
            if self.spec.mount is not None:
                self.mount = Mount(self.spec.mount, Path(env["MEDBRIDGE_SSH_CONFIG"]), SSH_HOST_ALIAS,
                                   options=sshfs_options(self.tolerance), tethered=True)  # fmt: skip
                env["MEDBRIDGE_MOUNT"] = str(self.mount.mountpoint)
                env["MEDBRIDGE_RESULTS"] = str(self.mount.mountpoint / "results" / cred.user / self.job_id)
            try:
                self.write_state()
            except (OSError, InvalidInput) as exc:
                self.say(f"could not leave state for the Slurm epilog ({exc}); its safety net is weaker for this job")
            # What is in the scanned folders now is not the job's, however the payload moves or chmods it.
            self.existed = residue.inventory([*self.scan_roots(), *self.own_folders()])
            self.renewer = Renewer(cred, self.certify, self.say)
            self.renewer.start()
            if signals.received is None:
                started = True
                child = self.start_payload(env)
                signals.child = child
                code = child.wait()
                self.outcome.exit_code = 128 - code if code < 0 else code
        except FileNotFoundError as exc:
            raise JobFailed(f"cannot start {self.spec.command[0]!r}: {exc.strerror}") from exc
        finally:
            self.outcome.signal = signals.received
            self.teardown(folder, scanned=started or signals.received is not None, cred_ok=self.agent is not None)
            signals.restore()
        return self.exit_code()

    def settle_tolerance(self, platform: float | None) -> float:
        """The job's outage tolerance: as asked, but never longer than the platform keeps a silent session."""
        asked = self.spec.outage_tolerance
        if platform is None:
            return asked or outage.DEFAULT_TOLERANCE
        if asked is None:
            return platform
        if asked > platform:
            self.say(f"--outage-tolerance {asked:g} s is longer than the platform keeps a silent session "
                     f"({platform:g} s); using {platform:g} s")  # fmt: skip
            return platform
        return asked

    def start_payload(self, env: dict[str, str]) -> subprocess.Popen[bytes]:
        """The payload, under a guard that ends its process group should this wrapper die (compute.guard).

        In a session of its own, so the signals this wrapper forwards reach the whole
        group and a terminal's Ctrl-C reaches only the wrapper; umask 077, so what it
        writes is its user's alone.
        """
        command = list(self.spec.command)
        if shutil.which(command[0], path=env.get("PATH")) is None:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", command[0])
        return subprocess.Popen(guarded(command), env=env, start_new_session=True, umask=0o077)

    def make_private(self) -> None:
        """The job's own folders are its user's alone while it runs (0700; the payload's umask is 077).

        Another user of the node could otherwise read its outputs and scratch files as
        they are written.  A folder's own mode comes back at teardown.
        """
        outputs = self.spec.outputs
        if outputs is not None and not outputs.exists():
            try:
                outputs.mkdir(mode=0o700, parents=True)
            except OSError as exc:
                raise JobFailed(f"cannot make --outputs {outputs}: {exc.strerror}") from exc
        for path in [*self.scratch, *([outputs] if outputs is not None else [])]:
            mode = stat.S_IMODE(os.stat(path).st_mode)
            if mode & 0o077:
                os.chmod(path, 0o700)
                self.loosened.append((path, mode))

    def exit_code(self) -> int:
        o = self.outcome
        if o.signal is not None:
            return 128 + o.signal
        code = o.exit_code if o.exit_code is not None else JobFailed.exit_code
        if code == 0 and (o.upload_error or o.teardown_errors):
            return JobFailed.exit_code
        return code

    def endpoint(self, cred: JobCredential) -> Endpoint:
        assert self.agent is not None
        e = self.enrolment
        return Endpoint(e.host, e.port, cred.user, cred.host_key, str(self.agent.socket))

    def environment(self, folder: Path, cred: JobCredential) -> dict[str, str]:
        assert self.agent is not None
        e = self.enrolment
        known = folder / "known_hosts"
        known.write_text(known_hosts_line(e.host, e.port, cred.host_key))
        config = folder / "ssh_config"
        config.write_text(ssh_config(e.host, e.port, cred.user, self.agent.socket, known, self.tolerance))
        env = dict(self.environ)
        env.pop("SSH_AGENT_PID", None)
        self.job_scratch = scratch = folder / "scratch"
        scratch.mkdir(mode=0o700, exist_ok=True)
        if self.tmpdir is not None:
            env["TMPDIR"] = str(self.tmpdir)
        env.update(
            {
                "MEDBRIDGE_SCRATCH": str(scratch),
                "MEDBRIDGE_RESULTS_LEDGER": str(folder / "results.ledger"),
                "MEDBRIDGE_RESULTS_URL": f"medbridge://results/{cred.user}/{cred.job_id}",
                "SSH_AUTH_SOCK": str(self.agent.socket),
                "MEDBRIDGE_PLATFORM": format_address(e.host, e.port),
                "MEDBRIDGE_USER": cred.user,
                "MEDBRIDGE_JOB_ID": cred.job_id,
                "MEDBRIDGE_SSH_CONFIG": str(config),
                "MEDBRIDGE_SSH_HOST": SSH_HOST_ALIAS,
                "MEDBRIDGE_RESULTS": f"/results/{cred.user}/{cred.job_id}",
                "MEDBRIDGE_CERT_SERIAL": str(cred.serial),
                "MEDBRIDGE_CERT_VALID_BEFORE": cred.valid_before,
                "MEDBRIDGE_OUTAGE_TOLERANCE": f"{self.tolerance:g}",
            }
        )
        return env

    # -- teardown -----------------------------------------------------------------------

    def _inherited_tmp(self) -> str | None:
        tmp = self.environ.get("TMPDIR")
        return tmp if tmp and os.path.isdir(tmp) else None

    def scan_roots(self) -> list[Path]:
        roots = [Path.cwd()]
        if self.environ.get("TMPDIR"):
            roots.append(Path(self.environ["TMPDIR"]))
        if self.job_scratch is not None and self.job_scratch.exists():  # for the epilog, if this wrapper is killed
            roots.append(self.job_scratch)
        return roots + list(self.spec.scan)

    def own_folders(self) -> list[Path]:
        """The folders that are this job's alone (see the module's docstring)."""
        own = list(self.scratch)
        if self.tmpdir is not None:
            own.append(self.tmpdir)
        if self.job_scratch is not None and self.job_scratch.exists():
            own.append(self.job_scratch)
        slurm_id = self.environ.get("SLURM_JOB_ID", "")
        with contextlib.suppress(OSError):
            own += [Path(p) for p in private_temp(Path("/proc/self/mountinfo").read_text(), slurm_id)]
        return own

    def teardown(self, folder: Path, *, scanned: bool, cred_ok: bool) -> None:
        """Every step runs, whatever an earlier one raised: the agent stops, the mount closes, the end is reported."""
        o = self.outcome
        keep: list[Path] = []
        self._step("stopping the renewals", self.stop_renewals)
        written = self.written(folder)
        uploads = (self.spec.outputs is not None or written) and cred_ok and self.renewer is not None
        if uploads and not self._step("the upload of the outputs", lambda: self.upload(keep, written)):
            o.upload_error = o.upload_error or "the upload failed (internal error): outputs kept"
            if self.spec.outputs is not None:
                keep.append(self.spec.outputs)
        if self.watch is not None:
            watch = self.watch
            self._step("stopping the link watch", lambda: setattr(o, "outages", [x.as_dict() for x in watch.stop()]))
        if self.mount is not None:
            mount = self.mount
            self._step("unmounting", lambda: setattr(o, "unmounted", mount.close()))
        if self.agent is not None:
            self._step("stopping the ssh-agent", self.stop_agent)
        shutil.rmtree(folder, ignore_errors=True)
        if scanned:
            self._step("the residue scan", lambda: self.scan(keep))
        if self.tmpdir is not None:
            tmpdir = self.tmpdir
            self._step("removing $TMPDIR", lambda: self.remove_tmpdir(tmpdir))
        if cred_ok:
            self._step("telling the platform the job ended", self.end)
        for path, mode in self.loosened:
            with contextlib.suppress(OSError):  # gone meanwhile: nothing to give back
                os.chmod(path, mode)
        if self.state is not None:
            self._step("removing the epilog's state", self.remove_state)
        if self.agent is not None:
            self._step("the summary", self.summarise)

    def _step(self, what: str, action: Callable[[], object]) -> bool:
        """One teardown step: an unexpected error is said and recorded (the job then fails), and the next step runs."""
        try:
            action()
        except Exception as exc:  # the later steps (agent, mount, end of job) must run whatever this is
            said = f"{what} failed: internal error ({type(exc).__name__}: {exc})"
            self.outcome.teardown_errors.append(said)
            self.say(said)
            return False
        return True

    def stop_renewals(self) -> None:
        o = self.outcome
        if self.renewer is not None:
            self.renewer.stop()
            o.renewals, o.renewal_refused = self.renewer.renewals, self.renewer.refused
        if o.exit_code not in (0, None) and self.renewer is not None and self.agent is not None:
            o.access_revoked = self.revoked()
            if o.access_revoked:
                self.say(f"data access ended during the job: {o.access_revoked}")

    def remove_state(self) -> None:
        assert self.state is not None
        state, name = self.state
        state.remove(name)
        state.close()

    def stop_agent(self) -> None:
        assert self.agent is not None
        self.agent.stop()
        self.outcome.agent_stopped = True

    def end(self) -> None:
        """Tell the platform the job ended; left open while its outputs wait for 'job run --job-id'."""
        o = self.outcome
        try:
            asyncio.run(end_job(self.enrolment, self.job_id, self.residue_summary, o.outages[-20:],
                                ended=o.upload_error is None))  # fmt: skip
        except MedbridgeError as exc:
            o.end_error = str(exc)
            self.say(f"could not tell the platform the job ended: {exc}")

    def revoked(self) -> str | None:
        """Why the platform no longer lets the job in, if it does not (a revoked grant, a disabled account).

        Asked when the payload failed: a mount then shows only I/O errors, which look like
        a cut link; a login with the job's certificate tells the two apart.
        """
        assert self.renewer is not None
        endpoint = self.endpoint(self.renewer.current)

        async def login() -> None:
            async with await connect(endpoint, connect_timeout=10):
                pass

        try:
            asyncio.run(login())
        except AccessDenied as exc:
            return str(exc)
        except MedbridgeError:
            return None  # unreachable is not revoked
        return None

    def written(self, folder: Path) -> list[tuple[str, str]]:
        """Results the payload wrote through ``medbridge://`` (the ledger its file systems appended to)."""
        try:
            return parse_manifest((folder / "results.ledger").read_text())
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError, InvalidInput) as exc:
            self.outcome.upload_error = f"the results written through medbridge:// cannot be committed: {exc}"
            return []

    def upload(self, keep: list[Path], written: list[tuple[str, str]]) -> None:
        o = self.outcome
        assert self.renewer is not None
        outputs = self.spec.outputs
        if outputs is not None and not outputs.is_dir():
            o.upload_error = f"--outputs {outputs} is not a folder"
            return
        complete = o.exit_code == 0 and o.signal is None  # what a failed payload wrote is not its result
        try:
            done = asyncio.run(upload_outputs(self.endpoint(self.renewer.current), self.job_id, outputs, written,
                                              tolerance=self.tolerance, commit=complete))  # fmt: skip
        except MedbridgeError as exc:
            o.upload_error = str(exc)
            if outputs is not None:
                keep.append(outputs)
            return
        o.uploaded_files, o.uploaded_bytes, o.committed = done.files, done.bytes, done.committed
        if outputs is not None:
            kept = wipe(outputs, done.sent)
            if kept:
                keep.append(outputs)
                o.outputs_kept = [str(p) for p in kept]
                self.say(f"{len(kept)} files appeared or changed in --outputs {outputs} after the upload began: "
                         "not uploaded, kept")  # fmt: skip

    def scan(self, keep: list[Path]) -> None:
        exclude = [p for p in (self.mount.mountpoint if self.mount else None, *keep) if p is not None]
        job = residue.JobContext(started=self.started_at, scratch=self.own_folders(), existed=self.existed)
        lookup = PlatformLookup(self.enrolment, self.job_id)  # hashes are asked of the platform: no manifest here
        report = residue.scan(self.scan_roots(), lookup, exclude=exclude, owner=os.getuid(), job=job)
        if self.purge:
            residue.purge(report)
        self.outcome.residue = report.as_dict()
        self.residue_summary = report.bounded(REPORT_BYTES)

    def remove_tmpdir(self, tmpdir: Path) -> None:
        """Remove the payload's $TMPDIR if the job left nothing in it; files left there stay."""
        for dirpath, _dirnames, _files in os.walk(tmpdir, topdown=False):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)
        if tmpdir.exists():
            self.say(f"the job's $TMPDIR {tmpdir} still holds files; left in place")

    def summarise(self) -> None:
        o = self.outcome
        failed = o.exit_code != 0 or o.signal is not None or o.upload_error is not None
        cause = self.watch.during() if self.watch is not None and failed else None
        payload_failed = o.exit_code != 0 or o.signal is not None  # only its reads go through the mount
        broke = self.mount.broke() if self.mount is not None and payload_failed and cause is None else None
        if cause is not None:
            parts = [f"job {o.job_id} failed: {cause.describe()}"]
        elif broke is not None:
            at = datetime.fromtimestamp(broke[0], UTC).strftime("%H:%M:%S UTC")
            said = broke[1][:200]
            parts = [f"job {o.job_id} failed: the mount's link to the platform broke at {at} (sshfs: {said}); "
                     "files open then could not be read (sshfs reconnects only for files opened later)"]  # fmt: skip
        else:
            parts = [f"job {o.job_id}"]
        if o.exit_code is not None:
            parts.append(f"payload exit {o.exit_code}")
        survived = [x for x in o.outages if not x["beyond"]]
        if survived and not cause:
            longest = max(x["seconds"] for x in survived)
            parts.append(f"waited out {len(survived)} outage(s) of the link to the platform (longest {longest:.0f} s)")
        if o.renewals:
            parts.append(f"certificate renewed {o.renewals}x")
        if self.spec.outputs is not None or o.uploaded_files or o.upload_error:
            if o.upload_error:
                parts.append(f"outputs NOT uploaded ({o.upload_error})")
            elif not o.uploaded_files:
                parts.append("no output files")
            elif not o.committed:
                parts.append(f"{o.uploaded_files} output files uploaded but NOT committed (the payload failed)")
            else:
                parts.append(f"{o.uploaded_files} output files ({o.uploaded_bytes} bytes) committed")
        if o.outputs_kept:
            parts.append(f"{len(o.outputs_kept)} files kept in --outputs, not uploaded")
        if o.unmounted is not None:
            parts.append("unmounted" if o.unmounted else "MOUNT STILL PRESENT")
        if o.teardown_errors:
            parts.append(f"{len(o.teardown_errors)} teardown step(s) FAILED (the others ran)")
        if o.residue:
            r = o.residue
            found = r["findings"]
            if not found:
                parts.append(f"residue scan clean ({r['files_scanned']} files)")
            else:
                purged = sum(1 for f in found if f["purged"])
                parts.append(f"residue: {len(found)} found, {purged} purged")
            if r["preexisting"]:
                parts.append(f"{len(r['preexisting'])} pre-existing medical files left in place")
        self.say("; ".join(parts))
        for f in o.residue.get("findings", []):
            self.say(f"residue {'purged' if f['purged'] else 'LEFT'}: {f['path']} ({f['reason']}; {f['why']})")
        old = o.residue.get("preexisting", [])
        for f in old[:SHOWN_PREEXISTING]:
            self.say(f"pre-existing, left in place: {f['path']} ({f['reason']})")
        if len(old) > SHOWN_PREEXISTING:
            more = "; --report lists them all" if self.spec.report is None else ""
            self.say(f"… and {len(old) - SHOWN_PREEXISTING} more pre-existing medical files left in place{more}")
        if self.spec.report is not None:
            self.spec.report.write_text(json.dumps(o.__dict__, indent=2, default=str) + "\n")

    def write_state(self) -> None:
        """Leave what the Slurm epilog needs if this wrapper dies by SIGKILL (see medbridge.compute.state)."""
        state_dir = Path(self.environ.get("MEDBRIDGE_STATE_DIR", DEFAULT_STATE_DIR))
        slurm_id = self.environ.get("SLURM_JOB_ID")
        if slurm_id is None or not state_dir.is_dir() or not os.access(state_dir, os.W_OK):
            return
        name = f"{check_name('job id', slurm_id)}.json"
        folder = UserFolder.claim(state_dir)
        self.state = (folder, name)
        e = self.enrolment
        state = {
            "slurm_job_id": slurm_id,
            "job_id": self.job_id,
            "uid": os.getuid(),
            "wrapper_pid": os.getpid(),
            "agent_pid": self.agent.pid if self.agent else None,
            "sshfs_pid": self.mount.pid if self.mount else None,
            "mount": str(self.mount.mountpoint) if self.mount else None,
            "scan": [str(p) for p in self.scan_roots()],
            "scratch": [str(p) for p in self.own_folders()],
            "started": self.started_at,
            # how the epilog's scan (run as this user) asks the platform which hashes are dataset files
            "lookup": {"platform": format_address(e.host, e.port), "user": e.user, "job_id": self.job_id,
                       "key": str(Path(self.spec.key_file).absolute()), "host_fingerprint": e.host_fingerprint},
        }  # fmt: skip
        folder.write(name, json.dumps(state).encode())


def run(spec: JobSpec, environ: Mapping[str, str] = os.environ, say: Callable[[str], None] | None = None) -> int:
    """Run the payload with a job certificate in a private agent; return its exit code."""
    return Job(spec, environ, say or _say).run()


def _own_folder(path: Path, option: str = "--scratch") -> Path:
    """A ``--scratch`` (or ``--outputs``) folder: an existing folder of this user that no one else shares."""
    real = Path(os.path.realpath(path))
    try:
        st = os.stat(real)
    except OSError as exc:
        raise InvalidInput(f"{option} {path}: {exc.strerror}") from exc
    if not real.is_dir():
        raise InvalidInput(f"{option} {path}: not a folder")
    if st.st_uid != os.getuid():
        raise InvalidInput(f"{option} {path}: not your folder (owned by uid {st.st_uid})")
    if str(real) in {"/", *SHARED_TEMP, os.path.realpath(os.path.expanduser("~"))}:
        raise InvalidInput(
            f"{option} {path}: a shared folder is not the job's own (in Slurm with job_container/tmpfs, "
            "the job's private /tmp is recognised by itself)"
        )
    return real


def _per_job(path: Path | None, job_id: str) -> Path | None:
    """``{job}`` in a path becomes the job id, so one batch script serves many jobs."""
    return None if path is None else Path(str(path).replace("{job}", job_id))


def _say(message: str) -> None:
    sys.stderr.write(f"medbridge: {message}\n")
    sys.stderr.flush()
