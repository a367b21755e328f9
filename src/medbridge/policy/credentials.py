"""What a job certificate says: principals, key id, and a lifetime the server caps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from medbridge.errors import AccountDisabled, CertificateRefused, GrantMissing, InvalidInput, LimitReached
from medbridge.policy.names import check_name

#: Certificates start slightly in the past so a compute node's clock skew does not
#: make a fresh certificate "not yet valid".
BACKDATE = timedelta(seconds=30)

SERIAL_PRINCIPAL_PREFIX = "medbridge-cert-"

#: Opens the authentication banner in which the platform says why it refused a job certificate.
REFUSED_BANNER = "medbridge: certificate refused: "


def serial_principal(serial: int) -> str:
    """The second principal of every job certificate: binds a session to its record."""
    return f"{SERIAL_PRINCIPAL_PREFIX}{serial}"


def serial_from_principals(principals: Sequence[str]) -> int | None:
    """Read the serial back from a certificate's principals, if it carries one."""
    for p in principals:
        if p.startswith(SERIAL_PRINCIPAL_PREFIX):
            digits = p[len(SERIAL_PRINCIPAL_PREFIX) :]
            if digits.isdigit():
                return int(digits)
    return None


@dataclass(frozen=True, kw_only=True)
class CertificateSpec:
    """Everything the issuer signs; decided here, never taken from the client."""

    user: str
    job_id: str
    serial: int
    key_id: str
    principals: tuple[str, ...]
    valid_after: datetime
    valid_before: datetime
    datasets: tuple[str, ...] | None
    source_addresses: tuple[str, ...]

    @property
    def lifetime(self) -> timedelta:
        return self.valid_before - self.valid_after - BACKDATE


def certificate_spec(
    *,
    user: str,
    job_id: str,
    serial: int,
    requested: timedelta,
    now: datetime,
    max_lifetime: timedelta,
    rights: Mapping[str, datetime | None],
    datasets: Sequence[str] | None,
    enabled: bool,
    job_ended: bool,
    source_addresses: Sequence[str] = (),
) -> CertificateSpec:
    """Decide a certificate for ``user``'s job, or refuse.

    ``rights`` are the user's readable datasets with their grant ends.  The
    lifetime is the smallest of what was asked, the platform maximum and the end
    of the grants the job relies on: the named datasets, else the longest grant.
    A disabled account gets none, and neither does a job that has ended.
    """
    check_name("job id", job_id)
    if not enabled:
        raise AccountDisabled(f"account {user!r} is disabled")
    if job_ended:
        raise CertificateRefused(
            f"job {job_id!r} of user {user!r} has ended; its certificates are revoked and no new one is issued "
            "(a new job needs a new job id)"
        )
    if requested <= timedelta(0):
        raise InvalidInput("certificate lifetime must be positive")
    if datasets is not None:
        if not datasets:
            raise InvalidInput("name at least one dataset, or none to use every granted one")
        for name in datasets:
            check_name("dataset", name)
        missing = sorted(set(datasets) - set(rights))
        if missing:
            raise GrantMissing(f"user {user!r} has no live grant for dataset(s): {', '.join(missing)}")
        ends = [rights[name] for name in datasets]
        relevant_end = None if any(e is None for e in ends) else min(e for e in ends if e is not None)
    else:
        if not rights:
            raise GrantMissing(f"user {user!r} has no live grant for any dataset")
        ends = list(rights.values())
        relevant_end = None if any(e is None for e in ends) else max(e for e in ends if e is not None)
    end = now + min(requested, max_lifetime)
    if relevant_end is not None:
        end = min(end, relevant_end)
    if end <= now:
        raise CertificateRefused(f"the grants of user {user!r} end before a certificate could start")
    end = end.replace(microsecond=0)
    if end <= now:
        raise CertificateRefused(f"the grants of user {user!r} end within a second")
    return CertificateSpec(
        user=user,
        job_id=job_id,
        serial=serial,
        key_id=f"medbridge:user={user}:job={job_id}:serial={serial}",
        principals=(user, serial_principal(serial)),
        valid_after=(now - BACKDATE).replace(microsecond=0),
        valid_before=end,
        datasets=tuple(datasets) if datasets is not None else None,
        source_addresses=tuple(source_addresses),
    )


@dataclass(frozen=True, kw_only=True)
class IssuanceLimits:
    """How many certificates the issuer signs: per user in a sliding window, and live per job."""

    rate: int
    window: timedelta
    live_per_job: int


def check_issuance(*, user: str, job_id: str, issued_in_window: int, live_for_job: int,
                   limits: IssuanceLimits) -> None:  # fmt: skip
    """Refuse a certificate past the user's issuance rate or the job's live certificates (LimitReached)."""
    if issued_in_window >= limits.rate:
        window = int(limits.window.total_seconds())
        raise LimitReached(
            f"user {user!r} was issued {issued_in_window} certificates in the last {window} s "
            f"(certificate_rate_limit = {limits.rate} per certificate_rate_window = {window} s); try again later"
        )
    if live_for_job >= limits.live_per_job:
        raise LimitReached(
            f"job {job_id!r} already holds {live_for_job} live certificates "
            f"(max_live_certificates_per_job = {limits.live_per_job}); end the job or let them expire"
        )
