"""The platform's SSH server: authentication, live sessions, enforcement and the audit sink."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import socket
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import asyncssh
from asyncssh.channel import SSHChannel

from medbridge import descriptors, outage
from medbridge.config import CIPHERS, Home, PlatformSettings
from medbridge.control.audit import AuditEvent
from medbridge.control.store import Store
from medbridge.errors import AuditUnavailable, InvalidInput, MedbridgeError, PlatformUnavailable
from medbridge.fastpath import coalesce, sealing_channel
from medbridge.net import bind, parse_networks
from medbridge.platform.anchor import audit_key, checkpoint
from medbridge.platform.audit import AuditSink
from medbridge.platform.catalogue import Catalogue
from medbridge.platform.issuer import (
    END_JOB_COMMAND,
    ISSUE_COMMAND,
    LOOKUP_COMMAND,
    MAX_REQUEST,
    REPORT_COMMAND,
    REQUEST_LIMITS,
    Issuer,
)
from medbridge.platform.keys import fingerprint, load_private_key
from medbridge.platform.limits import HandleBudget, Handles, Quota, Refusals, SessionSlots, Usage, handles_per_user
from medbridge.platform.listener import accept_forever
from medbridge.platform.metrics import SessionTable, process_metrics
from medbridge.platform.sftp import JobSFTPServer, PlatformSession, Results
from medbridge.policy.credentials import REFUSED_BANNER, serial_from_principals, serial_principal
from medbridge.policy.nodes import NodeFact, may_log_in, node_name
from medbridge.policy.paths import View
from medbridge.policy.sessions import decide_session
from medbridge.transport import CoalescingTransport

log = logging.getLogger("medbridge.platform")


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class LiveSession:
    """A certificate-authenticated connection, re-checked on every enforcement tick."""

    user: str
    job: str
    serial: int
    key_id: str
    peer: str
    view: View
    roots: dict[str, str]
    #: The catalogue version of each dataset, refreshed every enforcement tick.
    versions: dict[str, int]
    ends_at: datetime | None
    conn: asyncssh.SSHServerConnection = field(repr=False)

    via: str | None = None
    #: The login's audit entry: None once committed, or why it could not be; every decision's reply waits on it.
    login: asyncio.Future[str | None] | None = field(default=None, repr=False)

    def identity(self) -> dict[str, Any]:
        return {"job": self.job, "serial": self.serial, "peer": self.peer, **({"via": self.via} if self.via else {})}


class _Gate(asyncssh.SSHAuthorizedKeys):
    """Decides which keys and certificates may log in, as the server's policy says.

    asyncssh asks it about every offered key; for certificates it passes the CA key
    and the principals, from which the serial principal names the issued record.
    asyncssh then checks the signature, validity window, principal and
    source-address itself.
    """

    def __init__(self, conn: PlatformConnection):
        super().__init__()
        self._conn = conn

    def validate(
        self,
        key: asyncssh.SSHKey,
        client_host: str,
        client_addr: str,
        cert_principals: Sequence[str] | None = None,
        ca: bool = False,
    ) -> dict[str, object] | None:
        if ca:
            return self._conn.check_certificate(key, list(cert_principals or ()))
        if node_name(self._conn.username) is not None:
            return self._conn.check_node_key(key)
        return self._conn.check_enrolment_key(key)


class PlatformConnection(asyncssh.SSHServer):
    """Per-connection policy: who logged in, with what, and what they may then do."""

    def __init__(self, platform: Platform, via: tuple[str, int] | None = None):
        self.platform = platform
        self.conn: asyncssh.SSHServerConnection | None = None
        self.transport: CoalescingTransport | None = None
        #: Session channels opened on this connection (their data is sealed in place, see medbridge.transport).
        self.channels: weakref.WeakSet[asyncssh.SSHServerChannel[Any]] = weakref.WeakSet()
        self.username = ""
        self.peer = ""
        #: The trusted gateway the connection came through (its PROXY header named ``peer``).
        self.via = f"{via[0]}:{via[1]}" if via else None
        self.attempts: list[dict[str, Any]] = []
        self.session: LiveSession | None = None
        self.enrolment: str | None = None
        #: A compute node's login (policy.nodes): its one command ends jobs placed on it.
        self.node: NodeFact | None = None
        self.peer_ip = ""
        self._authenticated = False
        #: File and directory handles open on this connection, over all its SFTP sessions.
        self.handles = Handles(limit=platform.settings.max_open_handles)
        #: Requests refused on this connection (each an audit row), over all its SFTP sessions.
        self.refusals = Refusals()
        #: Session channels open on this connection (max_channels_per_connection).
        self.open_channels = 0
        #: This login's place under max_sessions_per_user (a locked slot file), while it lasts.
        self._slot: int | None = None

    # -- authentication ---------------------------------------------------------------

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        self.platform.connections.add(self)
        #: Joins the SSH packets of one loop pass into one socket write (see medbridge.transport).
        self.transport = coalesce(conn)
        peer = conn.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.peer_ip = str(peer[0]) if peer else ""

    def where(self) -> dict[str, str]:
        """The client's address, and the gateway it came through if any."""
        return {"peer": self.peer, **({"via": self.via} if self.via else {})}

    def begin_auth(self, username: str) -> bool:
        self.username = username
        assert self.conn is not None
        self.conn.set_authorized_keys(_Gate(self))
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def check_certificate(self, ca_key: asyncssh.SSHKey, principals: list[str]) -> dict[str, object] | None:
        serial = serial_from_principals(principals)
        attempt: dict[str, Any] = {"kind": "certificate", "serial": serial}
        self.attempts.append(attempt)
        if ca_key != self.platform.issuer.ca_public:
            attempt["reason"] = "signed by an unknown CA"
            return None
        if serial is None:
            attempt["reason"] = "no medbridge serial principal"
            return None
        now = _now()
        facts = self.platform.store.session_facts([serial], now)[serial]
        cert = facts.certificate
        if cert is None:
            attempt["reason"] = "serial not issued by this platform"
            return None
        attempt["key_id"] = cert.key_id
        if cert.user != self.username:
            attempt["reason"] = f"issued to {cert.user!r}, not {self.username!r}"
            return None
        if sorted(principals) != sorted([cert.user, serial_principal(serial)]):
            attempt["reason"] = "principals are not the ones this platform signed"
            return None
        decision = decide_session(facts, now, follow_renewals=False)
        if not decision.ok:
            attempt["reason"] = decision.reason
            # Our own certificate, for this user: whoever holds it may learn why it no longer opens data.
            assert self.conn is not None
            self.conn.send_auth_banner(f"{REFUSED_BANNER}{decision.reason}\n")
            return None
        attempt["reason"] = "accepted by policy"
        return {"medbridge-serial": str(serial)}

    def check_enrolment_key(self, key: asyncssh.SSHKey) -> dict[str, object] | None:
        fpr = fingerprint(key)
        attempt: dict[str, Any] = {"kind": "key", "fingerprint": fpr}
        self.attempts.append(attempt)
        owner = self.platform.store.user_for_key(fpr)
        if owner is None:
            attempt["reason"] = "key not enrolled"
            return None
        name, enabled = owner
        if name != self.username:
            attempt["reason"] = f"key enrolled for {name!r}, not {self.username!r}"
            return None
        if not enabled:
            attempt["reason"] = "account disabled"
            return None
        attempt["reason"] = "accepted by policy"
        return {"medbridge-enrolment": fpr}

    def check_node_key(self, key: asyncssh.SSHKey) -> dict[str, object] | None:
        """A compute node's key, from one of the node's own addresses."""
        fpr = fingerprint(key)
        attempt: dict[str, Any] = {"kind": "node", "fingerprint": fpr}
        self.attempts.append(attempt)
        node = self.platform.store.node_for_key(fpr)
        if node is None:
            attempt["reason"] = "key not enrolled for a node"
            return None
        if f"node:{node.name}" != self.username:
            attempt["reason"] = f"key enrolled for node {node.name!r}, not {self.username!r}"
            return None
        why = may_log_in(node, self.peer_ip)
        if why is not None:
            attempt["reason"] = why
            return None
        attempt["reason"] = "accepted by policy"
        return {"medbridge-node": fpr}

    def auth_completed(self) -> None:
        assert self.conn is not None
        self._authenticated = True
        self.handles.budget, self.handles.user = self.platform.user_handles, self.username
        serial = self.conn.get_key_option("medbridge-serial")
        node_key = self.conn.get_key_option("medbridge-node")
        kind = "certificate" if serial is not None else "node" if node_key is not None else "enrolment"
        if not self._take_slot(kind):
            return
        if serial is not None:
            self.platform.open_session(self, int(str(serial)))
        elif node_key is not None:
            self.node = self.platform.store.node_for_key(str(node_key))
            self.platform.sink.record(AuditEvent(actor=self.username, action="login", outcome="ok", subject="node",
                                                 detail={**self.where(), "fingerprint": str(node_key)}))  # fmt: skip
        else:
            self.enrolment = str(self.conn.get_key_option("medbridge-enrolment"))
            self.platform.sink.record(
                AuditEvent(
                    actor=self.username,
                    action="login",
                    outcome="ok",
                    subject="enrolment",
                    detail={**self.where(), "fingerprint": self.enrolment},
                )
            )

    def _take_slot(self, kind: str) -> bool:
        """A place under ``max_sessions_per_user`` (over all workers), or the login is refused, audited and ended."""
        assert self.conn is not None
        limit = self.platform.settings.max_sessions_per_user
        try:
            self._slot = self.platform.slots.take(self.username)
            why = f"user {self.username!r} already has {limit} sessions open (max_sessions_per_user)"
        except OSError as exc:  # out of descriptors, or the run folder unwritable: no session can be counted
            why = f"sessions cannot be counted: {exc.strerror or exc}"
        if self._slot is not None:
            return True
        self._refused("login", kind, why)
        self.conn.disconnect(asyncssh.DISC_TOO_MANY_CONNECTIONS, f"medbridge: {why}")
        return False

    def _refused(self, action: str, subject: str, why: str) -> None:
        """Audit a refusal of this connection's, with where it came from and why."""
        event = AuditEvent(actor=self.username or "?", action=action, outcome="refused", subject=subject,
                           detail={**self.where(), "reason": why})  # fmt: skip
        self.platform.sink.record(event)

    def connection_lost(self, exc: Exception | None) -> None:
        self.platform.connections.discard(self)
        if self._slot is not None:
            os.close(self._slot)  # gives the place back (the kernel would, were this process to die)
            self._slot = None
        self.handles.give_all()
        if not self._authenticated:
            self.platform.sink.record(
                AuditEvent(
                    actor=self.username or "?",
                    action="login",
                    outcome="refused",
                    subject="",
                    detail={**self.where(), "attempts": self.attempts, **({"reason": str(exc)} if exc else {})},
                )
            )
        self.platform.close_session(self, f"connection lost: {exc}" if exc else "connection closed")

    # -- what an authenticated connection may open --------------------------------------

    def session_requested(self) -> tuple[asyncssh.SSHServerChannel[Any], PlatformSession]:
        """Commands go to :meth:`process`; the sftp subsystem to :meth:`sftp` under our handler."""
        assert self.conn is not None
        limit = self.platform.settings.max_channels_per_connection
        if self.open_channels >= limit:
            why = f"the connection already has {limit} sessions open (max_channels_per_connection)"
            self._refused("channel.refused", "session", why)
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_RESOURCE_SHORTAGE, f"medbridge: {why}")
        chan = sealing_channel(self.conn)
        self.channels.add(chan)
        self.open_channels += 1
        return chan, PlatformSession(self.process, self.sftp, 3, False, closed=self._channel_closed)

    def _channel_closed(self) -> None:
        self.open_channels -= 1

    def sftp(self, chan: SSHChannel[bytes]) -> JobSFTPServer:
        if self.session is None:
            self.platform.sink.record(
                AuditEvent(
                    actor=self.username,
                    action="sftp.refused",
                    outcome="refused",
                    subject="/",
                    detail={"reason": "only a job certificate opens data", "peer": self.peer},
                )
            )
        return self.platform.sftp_class(
            cast(asyncssh.SSHServerChannel[bytes], chan),  # a session channel: asyncssh's factory type is wider
            self.session,
            self.platform.sink.record,
            self.platform.results,
            self.platform.manifest_files,
            self.handles,
            self.refusals,
            sink=self.platform.sink,
        )

    async def process(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        """Commands: the issuer and the residue report for an enrolment key; ending its jobs for a node."""
        command = (process.command or "").strip()
        issuer = self.platform.issuer
        handler: Callable[[bytes, dict[str, Any]], dict[str, Any]] | None = None
        if self.node is not None:
            if command == END_JOB_COMMAND:
                handler = functools.partial(issuer.end_slurm_job, self.node)
            credential = self.node.fingerprint
        else:
            user_commands = {ISSUE_COMMAND: issuer.issue, REPORT_COMMAND: issuer.report, LOOKUP_COMMAND: issuer.lookup}
            if command in user_commands:
                handler = functools.partial(user_commands[command], self.username)
            credential = self.enrolment or ""
        if self.session is not None or not credential or handler is None:
            self.platform.sink.record(
                AuditEvent(
                    actor=self.username,
                    action="command.refused",
                    outcome="refused",
                    subject=command[:200],
                    detail={**self.where(), "session": "certificate" if self.session else "node" if self.node
                            else "enrolment"},
                )
            )  # fmt: skip
            allowed = (
                "a node may only end its jobs" if self.node else "enrolment keys may only request job certificates"
            )
            process.stderr.write(f"medbridge: no commands here; {allowed}\n".encode())
            process.exit(126)
            return
        try:
            raw = await read_request(process.stdin, REQUEST_LIMITS.get(command, MAX_REQUEST))
            await self.platform.sink.flush()
            reply = await asyncio.to_thread(handler, raw, {**self.where(), "fingerprint": credential})
        except MedbridgeError as exc:
            self._answer(process, {"error": str(exc), "type": type(exc).__name__}, exc.exit_code)
            return
        except Exception as exc:  # a bug or a failing store: the client gets a refusal, the log the cause
            log.exception("%s from %s failed", command, self.peer)
            self._answer(process, {"error": f"the platform could not answer ({type(exc).__name__})",
                                   "type": "PlatformUnavailable"}, PlatformUnavailable.exit_code)  # fmt: skip
            return
        self._answer(process, reply, 0)

    @staticmethod
    def _answer(process: asyncssh.SSHServerProcess[bytes], body: dict[str, Any], code: int) -> None:
        if code:
            body = {**body, "exit_code": code}
        process.stdout.write(json.dumps(body).encode() + b"\n")
        process.exit(code)


#: How long a command's client may take to send its whole request (it holds a channel meanwhile).
REQUEST_SECONDS = 60.0


async def read_request(stdin: asyncssh.SSHReader[bytes], limit: int, seconds: float = REQUEST_SECONDS) -> bytes:
    """A command's whole request, up to its EOF: one ``read(n)`` returns whatever one packet brought.

    A body over ``limit`` bytes is refused before more of it is buffered, and so is one
    still unfinished after ``seconds``.
    """
    chunks: list[bytes] = []
    size = 0

    async def until_eof() -> bytes:
        nonlocal size
        while chunk := await stdin.read(limit + 1 - size):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise InvalidInput(f"a request is at most {limit} bytes")
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(until_eof(), seconds)
    except TimeoutError:
        raise InvalidInput(f"the request did not end within {seconds:g} s") from None


class Platform:
    """A running platform: store, issuer, the sessions it serves and their enforcement."""

    def __init__(self, home: Home, settings: PlatformSettings | None = None, store: Store | None = None):
        self.home = home
        self.settings = settings or home.settings()
        self.store = store or Store(home.database_url(self.settings))
        self.host_key = load_private_key(home.host_key)
        self.issuer = Issuer(self.store, load_private_key(home.ca_key), self.settings)
        #: Enforcement has a thread of its own, so slow work elsewhere can never delay it.
        self._enforcer = ThreadPoolExecutor(1, thread_name_prefix="medbridge-enforce")
        self.sink = AuditSink(self.store)
        #: Signs the audit's checkpoints only (not the CA: it opens nothing).
        self.audit_key = audit_key(home)
        self.catalogue = Catalogue(self.store, home.manifests)
        #: Manifests are built here, never in the loop: a build is as long as the dataset.
        self._builder = ThreadPoolExecutor(1, thread_name_prefix="medbridge-catalogue")
        self._building: dict[str, asyncio.Future[tuple[int, Path, Path]]] = {}
        self.metrics = process_metrics()
        self.sessions: dict[PlatformConnection, LiveSession] = SessionTable(self.metrics)
        #: Every connection, logged in or not (a stop disconnects each with its reason).
        self.connections: set[PlatformConnection] = set()
        s = self.settings
        self.results_root = home.results_root(s)
        quota = Quota(user_bytes=s.results_quota_per_user, job_bytes=s.results_quota_per_job,
                      user_entries=s.results_max_entries_per_user, job_entries=s.results_max_entries_per_job,
                      file_size=s.results_max_file_size)  # fmt: skip
        self.results = Results(str(self.results_root), Usage(self.results_root, quota))
        self.slots = SessionSlots(home.root / "run" / "sessions", s.max_sessions_per_user)
        #: The descriptors of this process, and the handles each user may hold of them.
        self.descriptor_limit = descriptors.soft_limit()
        self.user_handles = HandleBudget(handles_per_user(s.max_open_handles_per_user, self.descriptor_limit))
        #: Connections refused for want of descriptors since the last report (see :meth:`_out_of_descriptors`).
        self._shed = 0
        self._shed_error = ""
        self._shed_reported = -1.0
        self._shed_report: asyncio.TimerHandle | None = None
        self.address = ("", 0)
        #: The SFTP handler class; tests put small fault-injecting subclasses here.
        self.sftp_class: type[JobSFTPServer] = JobSFTPServer
        self._listener: socket.socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        #: Enforcement ticks completed: the clock that "ends within one tick" is measured by.
        self.enforcement_ticks = 0

    async def manifest_files(self, dataset: str, version: int) -> tuple[Path, Path]:
        """The manifest and index files of a dataset (``version`` if built, else its current one).

        Normally ``dataset add`` built them; otherwise one build runs in the catalogue's
        thread while the loop goes on serving, and every request for it waits on that one.
        """
        built = self.catalogue.current(dataset, version)
        if built is not None:
            return built
        job = self._building.get(dataset)
        if job is None:
            job = asyncio.get_running_loop().run_in_executor(self._builder, self.catalogue.build, dataset)
            self._building[dataset] = job
            job.add_done_callback(lambda _: self._building.pop(dataset, None))
        _, manifest, index = await asyncio.shield(job)
        return manifest, index

    # -- sessions -----------------------------------------------------------------------

    def open_session(self, owner: PlatformConnection, serial: int) -> None:
        assert owner.conn is not None
        now = _now()
        check = decide_session(self.store.session_facts([serial], now)[serial], now, follow_renewals=False)
        cert = check.certificate
        if cert is None or not check.ok:  # policy changed between the key check and now
            detail = {"serial": serial, "reason": check.reason, **owner.where()}
            self.sink.record(
                AuditEvent(
                    actor=owner.username, action="login", outcome="refused", subject="certificate", detail=detail
                )
            )
            owner.conn.disconnect(asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE, f"access revoked: {check.reason}")
            return
        results = self.results_root / cert.user / cert.job_id
        try:
            results.mkdir(parents=True, exist_ok=True, mode=0o750)
        except OSError as exc:  # results full or failing: reading goes on; writing there will fail and say why
            log.error("cannot create the results folder %s: %s", results, exc.strerror or exc)
        catalogue = self.store.dataset_versions(check.datasets)
        session = LiveSession(
            user=cert.user,
            job=cert.job_id,
            serial=serial,
            key_id=cert.key_id,
            peer=owner.peer,
            view=View(cert.user, cert.job_id, check.datasets),
            roots={n: d.storage_path for n, d in catalogue.items()},
            versions={n: d.version for n, d in catalogue.items()},
            ends_at=check.ends_at,
            conn=owner.conn,
            via=owner.via,
        )
        owner.session = session
        self.sessions[owner] = session
        session.login = self.sink.pledge(
            AuditEvent(
                actor=cert.user,
                action="login",
                outcome="ok",
                subject="certificate",
                detail={"key_id": cert.key_id, "datasets": sorted(check.datasets), **session.identity()},
            )
        )

    def close_session(self, owner: PlatformConnection, reason: str, *, revoked: bool = False) -> None:
        """End a live session; ``revoked`` (policy ended it) tells the client why, as an access refusal.

        The client sees an SSH disconnect "no more auth methods available" with
        ``access revoked: <reason>`` (asyncssh raises it as ``PermissionDenied``,
        OpenSSH prints it), never a bare close it would take for a cut link.
        """
        session = self.sessions.pop(owner, None)
        if session is None:
            return
        self.sink.record(
            AuditEvent(
                actor=session.user,
                action="session.end",
                outcome="ok",
                subject=session.key_id,
                detail={"reason": reason, **session.identity()},
            )
        )
        if revoked:
            session.conn.disconnect(asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE, f"access revoked: {reason}")
        else:
            session.conn.close()

    async def enforce_once(self) -> None:
        """Re-decide every live session: expiry, revocation, disabled accounts, lost grants."""
        if not self.sessions:
            return
        now = _now()
        serials = [s.serial for s in self.sessions.values()]
        loop = asyncio.get_running_loop()
        facts = await loop.run_in_executor(self._enforcer, self.store.session_facts, serials, now)
        checks = {  # a session that logged in while this tick's query ran is decided by the next tick
            owner: decide_session(facts[s.serial], now, current=s.view.datasets)
            for owner, s in self.sessions.items()
            if s.serial in facts
        }
        names = {n for c in checks.values() for n in c.datasets}
        catalogue = await loop.run_in_executor(self._enforcer, self.store.dataset_versions, names)
        for owner, check in checks.items():
            session = self.sessions.get(owner)
            if session is None:
                continue  # ended while the catalogue was read
            if not check.ok:
                self.close_session(owner, check.reason, revoked=True)
                continue
            gained = check.datasets - session.view.datasets
            if gained:
                session.roots.update({n: catalogue[n].storage_path for n in gained if n in catalogue})
                session.view = View(session.user, session.job, check.datasets)
            session.versions.update({n: catalogue[n].version for n in check.datasets if n in catalogue})
            session.ends_at = check.ends_at

    async def checkpoint(self) -> None:
        """Sign the chain's head into it and write the home's anchor file (a failure is logged, never fatal)."""
        try:
            anchor = await self.sink.in_writer(functools.partial(checkpoint, self.home, self.store, self.audit_key))
        except (MedbridgeError, OSError) as exc:
            log.error("audit checkpoint failed: %s", exc)
            return
        log.info("audit checkpoint: entry %d has hash %s (signed by %s; %s)", anchor.seq, anchor.hash, anchor.key,
                 self.home.audit_anchor)  # fmt: skip

    async def _checkpoint_forever(self) -> None:
        signed_at = -1
        while True:
            await asyncio.sleep(self.settings.audit_checkpoint_interval)
            if self.sink.written != signed_at:  # this process wrote since: its entries get a signed head
                signed_at = self.sink.written
                await self.checkpoint()

    async def _enforce_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.enforcement_interval)
            try:
                await self.enforce_once()
            except Exception:  # enforcement must outlive any one bad tick: log it and check again
                log.exception("enforcement check failed, will retry")
            else:
                self.enforcement_ticks += 1

    # -- serving ------------------------------------------------------------------------

    async def start(
        self, host: str, port: int, trusted_proxies: Sequence[str] = (), reuse_port: bool = False
    ) -> tuple[str, int]:
        """Listen and return the bound address (port 0 picks a free one)."""
        proxies = parse_networks([*self.settings.trusted_proxies, *trusted_proxies], "trusted proxies")

        keepalive = outage.server_keepalive(self.settings.outage_tolerance)
        user_timeout = outage.tcp_user_timeout_ms(self.settings.outage_tolerance)
        shortfall = outage.persist_shortfall(user_timeout / 1000)
        if shortfall is not None:
            log.warning("outage_tolerance is %g s (a silent session is held %g s), but %s",
                        self.settings.outage_tolerance, user_timeout / 1000, shortfall)  # fmt: skip
        options = asyncssh.SSHServerConnectionOptions(
            server_host_keys=[self.host_key],
            encryption_algs=list(CIPHERS),
            encoding=None,
            allow_scp=False,
            agent_forwarding=False,
            x11_forwarding=False,
            allow_pty=False,
            keepalive_interval=keepalive.interval,
            keepalive_count_max=keepalive.count,
            login_timeout=60,
        )

        async def serve_one(sock: socket.socket, client: tuple[str, int], via: tuple[str, int] | None) -> None:
            def factory() -> PlatformConnection:
                return PlatformConnection(self, via=via)

            outage.tune(sock, user_timeout)
            try:
                await asyncssh.run_server(sock, options=options, server_factory=factory)
            except (asyncssh.Error, OSError, TimeoutError) as exc:
                log.debug("SSH connection from %s:%s ended before login: %s", *client, exc)

        def refuse(peer: tuple[str, int], reason: str) -> None:
            self.sink.record(
                AuditEvent(
                    actor="?",
                    action="proxy.refused",
                    outcome="refused",
                    subject=f"{peer[0]}:{peer[1]}",
                    detail={"reason": reason},
                )
            )

        listener = bind(host, port, reuse_port=reuse_port)
        listener.listen(512)
        listener.setblocking(False)
        self._listener = listener
        self.sink.start()
        self._tasks = [
            asyncio.create_task(self._enforce_forever()),
            asyncio.create_task(self._checkpoint_forever()),
            asyncio.create_task(accept_forever(listener, proxies, serve_one, refuse, self._out_of_descriptors)),
        ]
        bound = listener.getsockname()
        self.address = (bound[0], bound[1])
        self.sink.record(
            AuditEvent(
                actor="platform",
                action="platform.start",
                outcome="ok",
                subject=f"{bound[0]}:{bound[1]}",
                detail={
                    "pid": os.getpid(),
                    "trusted_proxies": [str(n) for n in proxies],
                    "descriptor_limit": self.descriptor_limit,
                    "max_open_handles_per_user": self.user_handles.limit,
                },
            )
        )
        return bound[0], bound[1]

    def _out_of_descriptors(self, error: str, refused: int) -> None:
        """Connections refused at accept for want of descriptors: logged and audited at most once a second, counted."""
        self._shed += refused
        self._shed_error = error
        if self._shed_report is not None:
            return  # a report is due and will carry these
        wait = self._shed_reported + 1.0 - time.monotonic()
        if wait > 0:
            self._shed_report = asyncio.get_running_loop().call_later(wait, self._report_shed)
        else:
            self._report_shed()

    def _report_shed(self) -> None:
        self._shed_report = None
        self._shed_reported = time.monotonic()
        count, self._shed = self._shed, 0
        reason = f"out of file descriptors ({self._shed_error}); raise the platform's limit (ulimit -n, LimitNOFILE=)"
        log.error("refused %d connection(s): %s", count, reason)
        self.sink.record(
            AuditEvent(
                actor="platform",
                action="connection.refused",
                outcome="refused",
                subject=f"{self.address[0]}:{self.address[1]}",
                detail={"reason": reason, "connections": count},
            )
        )

    async def disconnect_all(self, reason: str, timeout: float = 5.0) -> None:
        """End every connection with an SSH disconnect that says ``reason``; live sessions are audited as ended.

        Returns once each is closed (or after ``timeout``): the disconnect is on the wire
        before the process goes on to stop.
        """
        connections = [c.conn for c in self.connections if c.conn is not None]
        sessions = list(self.sessions)
        for conn in connections:  # first: the session's own close below would say only "disconnected"
            conn.disconnect(asyncssh.DISC_BY_APPLICATION, f"medbridge: {reason}")
        for owner in sessions:
            self.close_session(owner, reason)
        if connections:
            log.info("%s: disconnected %d connection(s), %d of them job sessions", reason, len(connections),
                     len(sessions), extra={"connections": len(connections), "sessions": len(sessions)})  # fmt: skip
            await asyncio.wait([asyncio.ensure_future(c.wait_closed()) for c in connections], timeout=timeout)

    async def stop(self) -> None:
        if self._shed_report is not None:
            self._shed_report.cancel()
            self._report_shed()
        if self._listener is not None:
            self._listener.close()
        await self.disconnect_all("the platform is stopping")
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.sink.record(AuditEvent(actor="platform", action="platform.stop", outcome="ok"))
        with contextlib.suppress(AuditUnavailable):  # close() below keeps retrying and logs what is left
            await self.sink.flush()
            await self.checkpoint()  # the last head this process saw, signed and in the anchor file
        await self.sink.close()
        self._enforcer.shutdown(wait=True)
        self._builder.shutdown(wait=True, cancel_futures=True)
        self.results.close()


async def serve(
    home: Home,
    host: str,
    port: int,
    ready: Callable[[str, int], None] | None = None,
    stop: asyncio.Event | None = None,
    trusted_proxies: Sequence[str] = (),
    reuse_port: bool = False,
) -> None:
    """Run a platform until ``stop`` is set (or forever)."""
    platform = Platform(home)
    bound = await platform.start(host, port, trusted_proxies, reuse_port)
    if ready:
        ready(*bound)
    try:
        await (stop or asyncio.Event()).wait()
    finally:
        await platform.stop()
        platform.store.close()
