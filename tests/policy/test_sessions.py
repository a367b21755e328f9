"""Session policy: every reason a certificate's session may not start or go on, and what it may see."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest

from medbridge.policy.grants import GrantFact
from medbridge.policy.sessions import CertificateFact, SessionFacts, decide_session

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)

CERT = CertificateFact(
    serial=7,
    user="alice",
    job_id="42",
    key_id="medbridge:user=alice:job=42:serial=7",
    valid_after=NOW - HOUR,
    valid_before=NOW + HOUR,
    revoked=False,
    datasets=None,
)
GRANTS = (
    GrantFact(dataset="chest", user="alice"),
    GrantFact(dataset="knee", group="society", expires_at=NOW + 2 * HOUR),
    GrantFact(dataset="hand", user="bob"),
)


def facts(cert: CertificateFact | None = CERT, **kw: object) -> SessionFacts:
    base: dict[str, object] = dict(certificate=cert, enabled=True, groups=("society",), grants=GRANTS)
    base.update(kw)
    return SessionFacts(**base)  # type: ignore[arg-type]


def cert(**kw: object) -> CertificateFact:
    return dataclasses.replace(CERT, **kw)  # type: ignore[arg-type]


def test_a_good_certificate_sees_every_granted_dataset_or_the_ones_it_named() -> None:
    d = decide_session(facts(), NOW)
    assert d.ok and d.datasets == {"chest", "knee"} and d.ends_at == CERT.valid_before and d.certificate == CERT
    named = decide_session(facts(cert(datasets=("knee",))), NOW)
    assert named.ok and named.datasets == {"knee"}


LIVE = frozenset({"chest", "knee"})


@pytest.mark.parametrize(
    ("case", "current", "expected"),
    [
        (facts(None), None, "certificate not issued by this platform"),
        (facts(job_ended=True), LIVE, "certificate revoked: job '42' has ended"),
        (facts(cert(revoked=True)), LIVE, "certificate revoked"),
        (facts(enabled=False), LIVE, "account 'alice' disabled"),
        (facts(cert(valid_before=NOW)), LIVE, "certificate expired"),
        (facts(cert(valid_after=NOW + timedelta(seconds=1))), None, "certificate not yet valid"),
        (facts(cert(datasets=("chest", "spine"))), None, "grant ended for dataset(s) spine"),
        (facts(groups=()), LIVE, "grant ended for dataset(s) knee"),
        (facts(grants=GRANTS[2:]), None, "no live grant left for user 'alice'"),
        (facts(grants=(GrantFact(dataset="chest", user="alice", expires_at=NOW),)), None, "no live grant left"),
    ],
    ids=[
        "unknown",
        "job-ended",
        "revoked",
        "disabled",
        "expired",
        "not-yet-valid",
        "named-grant-gone",
        "view-grant-gone",
        "no-grant-left",
        "grant-expired",
    ],
)
def test_every_refusal_names_its_reason(case: SessionFacts, current: frozenset[str] | None, expected: str) -> None:
    d = decide_session(case, NOW, current=current, follow_renewals=current is not None)
    assert not d.ok and d.datasets == frozenset()
    assert d.reason.startswith(expected), d.reason


def test_a_live_session_ends_when_any_dataset_it_sees_is_no_longer_granted() -> None:
    after = facts(groups=())  # alice left the society: knee is gone, chest remains
    d = decide_session(after, NOW, current=frozenset({"chest", "knee"}))
    assert not d.ok and d.reason == "grant ended for dataset(s) knee"
    assert decide_session(after, NOW).ok, "a new login with what is left is a new session"
    gained = decide_session(facts(), NOW, current=frozenset({"chest"}))
    assert gained.ok and gained.datasets == {"chest", "knee"}, "a new grant appears in a live session"


def test_a_grant_that_expires_ends_the_session_at_its_end() -> None:
    later = NOW + 2 * HOUR
    d = decide_session(facts(cert(valid_before=later + HOUR)), later, current=frozenset({"chest", "knee"}))
    assert not d.ok and d.reason == "grant ended for dataset(s) knee"


def test_renewals_carry_a_session_past_its_own_certificate() -> None:
    later = NOW + HOUR + timedelta(minutes=1)
    renewed = cert(serial=8, valid_after=NOW, valid_before=NOW + 3 * HOUR)
    longer = cert(serial=9, valid_after=NOW, valid_before=NOW + 4 * HOUR)
    f = facts(renewals=(renewed, longer, cert(serial=10, valid_before=NOW + 5 * HOUR, revoked=True)))
    d = decide_session(f, later, current=frozenset({"chest"}))
    assert d.ok and d.certificate == longer and d.ends_at == longer.valid_before
    assert decide_session(f, later, follow_renewals=False).reason == "certificate expired", "a login is its own cert"
    not_yet = facts(renewals=(cert(serial=8, valid_after=later + HOUR, valid_before=NOW + 3 * HOUR),))
    assert decide_session(not_yet, later).reason == "certificate expired"
    ended = dataclasses.replace(f, job_ended=True)
    assert decide_session(ended, later).reason.startswith("certificate revoked: job '42' has ended")
