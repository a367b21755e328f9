"""Getting a job certificate: connect with the enrolment key, pin the host key, ask the issuer."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncssh

from medbridge import errors
from medbridge.config import CIPHERS
from medbridge.errors import HostKeyMismatch, MedbridgeError, PlatformUnavailable
from medbridge.platform.issuer import ISSUE_COMMAND, LOOKUP_COMMAND, MAX_LOOKUP, REPORT_COMMAND


@dataclass(frozen=True)
class JobCredential:
    """What the issuer returned, plus the host key that was verified on the way."""

    user: str
    job_id: str
    serial: int
    key_id: str
    valid_before: str
    certificate: asyncssh.SSHCertificate
    host_key: asyncssh.SSHKey
    #: The platform's outage tolerance, seconds (None from a platform that does not say).
    outage_tolerance: float | None = None


class _PinnedHost(asyncssh.SSHClient):
    """Accepts the server only if its host key has the pinned fingerprint."""

    def __init__(self, pinned: str):
        self.pinned = pinned
        self.seen: asyncssh.SSHKey | None = None

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        if key.get_fingerprint("sha256") == self.pinned:
            self.seen = key
            return True
        self.seen = key
        return False


@dataclass(frozen=True)
class Enrolment:
    """How a job reaches the issuer: the platform, the pinned host key and the user's enrolment key."""

    host: str
    port: int
    user: str
    key: asyncssh.SSHKey
    host_fingerprint: str


async def connect_enrolment(enrolment: Enrolment, **options: Any) -> asyncssh.SSHClientConnection:
    """Log in with the enrolment key, pinning the platform's host key; ``options`` go to asyncssh."""
    e = enrolment
    pin = _PinnedHost(e.host_fingerprint)
    options.setdefault("connect_timeout", 30)
    try:
        conn, _ = await asyncssh.create_connection(
            lambda: pin,
            e.host,
            e.port,
            username=e.user,
            client_keys=[e.key],
            known_hosts=([], [], []),
            agent_path=None,
            encryption_algs=list(CIPHERS),
            config=None,
            **options,
        )
    except asyncssh.HostKeyNotVerifiable as exc:
        seen = pin.seen.get_fingerprint("sha256") if pin.seen else "unknown"
        raise HostKeyMismatch(
            f"platform {e.host}:{e.port} presented host key {seen}, not the pinned "
            f"{e.host_fingerprint}; refusing to continue"
        ) from exc
    except asyncssh.PermissionDenied as exc:
        raise errors.AccessDenied(f"platform {e.host}:{e.port} refused the enrolment key for user {e.user!r}") from exc
    except (OSError, asyncssh.Error, TimeoutError) as exc:
        raise PlatformUnavailable(f"cannot reach platform {e.host}:{e.port}: {exc}") from exc
    return conn


async def call_platform(enrolment: Enrolment, command: str, payload: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """Run one enrolment-key command; return its reply and the verified host key."""
    e = enrolment
    conn = await connect_enrolment(enrolment)
    host_key = conn.get_server_host_key()
    try:
        async with conn:
            result = await conn.run(command, input=json.dumps(payload).encode(), encoding=None)
    except (OSError, asyncssh.Error) as exc:
        raise PlatformUnavailable(f"platform {e.host}:{e.port} dropped the request: {exc}") from exc
    reply = _parse_reply(result.stdout)
    if result.exit_status != 0 or "error" in reply:
        raise _as_error(reply)
    return reply, host_key


async def request_certificate(
    enrolment: Enrolment,
    ephemeral: asyncssh.SSHKey,
    job_id: str,
    lifetime: int,
    datasets: list[str] | None,
    slurm_job_id: str | None = None,
) -> JobCredential:
    """Ask the platform to sign ``ephemeral`` for this job; raise the platform's refusal as ours.

    ``slurm_job_id`` (inside Slurm) lets the node's epilog end the job on the platform.
    """
    request: dict[str, Any] = {
        "public_key": ephemeral.export_public_key().decode(),
        "job_id": job_id,
        "lifetime": lifetime,
        "datasets": datasets,
    }
    if slurm_job_id is not None:
        request["slurm_job_id"] = slurm_job_id
    reply, host_key = await call_platform(enrolment, ISSUE_COMMAND, request)
    cert = asyncssh.import_certificate(reply["certificate"])
    tolerance = reply.get("outage_tolerance")
    return JobCredential(
        reply["user"], reply["job_id"], int(reply["serial"]), reply["key_id"], reply["valid_before"], cert, host_key,
        float(tolerance) if isinstance(tolerance, (int, float)) and not isinstance(tolerance, bool) else None,
    )  # fmt: skip


async def end_job(
    enrolment: Enrolment,
    job_id: str,
    residue: dict[str, Any],
    outages: list[dict[str, Any]] | None = None,
    *,
    ended: bool = True,
) -> None:
    """Tell the platform the job is over, with its residue scan and outages if any.

    An ended job's certificates are revoked and it gets no new one, ever; ``ended=False``
    reports only, leaving the job open (its outputs still have to be uploaded).
    """
    body: dict[str, Any] = {"job_id": job_id, "report": residue, "ended": ended}
    if outages:
        body["outages"] = outages
    await call_platform(enrolment, REPORT_COMMAND, body)


async def lookup_hashes(enrolment: Enrolment, job_id: str, hashes: list[str]) -> dict[str, str]:
    """Which of ``hashes`` are dataset files this job could read: ``sha256 -> "dataset/path"``."""
    known: dict[str, str] = {}
    for start in range(0, len(hashes), MAX_LOOKUP):
        reply, _ = await call_platform(enrolment, LOOKUP_COMMAND,
                                       {"job_id": job_id, "sha256": hashes[start : start + MAX_LOOKUP]})  # fmt: skip
        found = reply.get("known")
        if not isinstance(found, dict):
            raise PlatformUnavailable("the platform sent an unreadable lookup reply")
        known.update({str(k): str(v) for k, v in found.items()})
    return known


class PlatformLookup:
    """The residue scan's lookup, asked of the platform with the enrolment key: no manifest comes to the node."""

    def __init__(self, enrolment: Enrolment, job_id: str):
        self.enrolment = enrolment
        self.job_id = job_id

    def __call__(self, hashes: Sequence[str]) -> dict[str, str]:
        return asyncio.run(lookup_hashes(self.enrolment, self.job_id, list(hashes)))


def _parse_reply(raw: Any) -> dict[str, Any]:
    try:
        reply = json.loads(raw or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlatformUnavailable(f"the platform's issuer sent an unreadable reply: {exc}") from exc
    if not isinstance(reply, dict):
        raise PlatformUnavailable("the platform's issuer sent an unreadable reply")
    return reply


def _as_error(reply: dict[str, Any]) -> MedbridgeError:
    """Rebuild the platform's refusal as the same class of our tree."""
    cls = getattr(errors, str(reply.get("type", "")), None)
    message = str(reply.get("error", "the platform refused the certificate request"))
    if isinstance(cls, type) and issubclass(cls, MedbridgeError):
        return cls(message)
    return errors.CertificateRefused(message)
