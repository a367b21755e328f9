"""Whether a job certificate's session may start or go on, and with which datasets.

Every session decision is made here, from facts the store loads: at login (the
certificate alone) and on each enforcement tick (the session's current view, and
the renewals its job's agent holds).  A certificate ends, for good, when its job
ends, when it is revoked, expires or its account is disabled, and when a grant it
relies on ends: a later login with it is refused with that reason, never let in to
an empty view.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from medbridge.policy.grants import GrantFact, readable, scope


@dataclass(frozen=True, kw_only=True)
class CertificateFact:
    """One job certificate the issuer signed, as recorded."""

    serial: int
    user: str
    job_id: str
    key_id: str
    valid_after: datetime
    valid_before: datetime
    revoked: bool
    #: The datasets the job named; ``None``: every dataset its user is granted.
    datasets: tuple[str, ...] | None


@dataclass(frozen=True, kw_only=True)
class SessionFacts:
    """What the store knows about one certificate, read in one transaction."""

    #: ``None`` when no certificate of that serial was issued here.
    certificate: CertificateFact | None
    enabled: bool = False
    #: The job was ended (``end_job``): none of its certificates may be used again.
    job_ended: bool = False
    groups: tuple[str, ...] = ()
    grants: tuple[GrantFact, ...] = ()
    #: Other unexpired certificates of the same user, job and key: the job's renewals.
    renewals: tuple[CertificateFact, ...] = ()


@dataclass(frozen=True)
class SessionDecision:
    """May the session go on, with which datasets, until when, and why not."""

    ok: bool
    reason: str = ""
    datasets: frozenset[str] = frozenset()
    ends_at: datetime | None = None
    #: The certificate that carries the session now (a renewal once its own has expired).
    certificate: CertificateFact | None = None


def refuse(reason: str, cert: CertificateFact | None = None) -> SessionDecision:
    return SessionDecision(False, reason, frozenset(), cert.valid_before if cert else None, cert)


def renewal(facts: SessionFacts, now: datetime) -> CertificateFact | None:
    """The live renewal that carries the session past its own certificate: the latest-ending one."""
    live = [c for c in facts.renewals if not c.revoked and c.valid_after <= now < c.valid_before]
    return max(live, key=lambda c: c.valid_before, default=None)


def decide_session(
    facts: SessionFacts,
    now: datetime,
    *,
    current: frozenset[str] | None = None,
    follow_renewals: bool = True,
) -> SessionDecision:
    """Decide a certificate's session.  Pure: the store loads ``facts``, the server acts.

    ``current`` is the live session's view (``None`` at login).  A live session ends
    when any dataset in its view is no longer granted; a login is refused when a
    dataset the certificate named is no longer granted, or, for a certificate that
    named none, when no grant is left.  ``follow_renewals=False`` judges the
    certificate alone (logins present the certificate they hold).
    """
    cert = facts.certificate
    if cert is None:
        return refuse("certificate not issued by this platform")
    if follow_renewals and now >= cert.valid_before:
        cert = renewal(facts, now) or cert
    if facts.job_ended:
        return refuse(f"certificate revoked: job {cert.job_id!r} has ended", cert)
    if cert.revoked:
        return refuse("certificate revoked", cert)
    if not facts.enabled:
        return refuse(f"account {cert.user!r} disabled", cert)
    if now >= cert.valid_before:
        return refuse("certificate expired", cert)
    if now < cert.valid_after:
        return refuse("certificate not yet valid", cert)
    rights = readable(cert.user, facts.groups, facts.grants, now)
    granted = frozenset(scope(rights, cert.datasets))
    relied_on = current if current is not None else None if cert.datasets is None else frozenset(cert.datasets)
    if relied_on is not None:
        lost = relied_on - granted
        if lost:
            return refuse(f"grant ended for dataset(s) {', '.join(sorted(lost))}", cert)
    elif not granted:
        return refuse(f"no live grant left for user {cert.user!r}", cert)
    return SessionDecision(True, "", granted, cert.valid_before, cert)
