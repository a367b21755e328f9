"""Certificate policy: the server caps lifetimes and names principals; the client cannot widen them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from medbridge.errors import AccountDisabled, CertificateRefused, GrantMissing, InvalidInput
from medbridge.policy.credentials import BACKDATE, certificate_spec, serial_from_principals, serial_principal
from medbridge.policy.grants import GrantFact, readable, scope

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)


def spec(**kw: object):  # type: ignore[no-untyped-def]
    args: dict[str, object] = dict(
        user="alice",
        job_id="42",
        serial=7,
        requested=DAY,
        now=NOW,
        max_lifetime=timedelta(hours=12),
        rights={"chest": None},
        datasets=None,
        enabled=True,
        job_ended=False,
    )
    args.update(kw)
    return certificate_spec(**args)  # type: ignore[arg-type]


def test_principals_key_id_and_backdate() -> None:
    s = spec()
    assert s.principals == ("alice", "medbridge-cert-7")
    assert s.key_id == "medbridge:user=alice:job=42:serial=7"
    assert s.valid_after == NOW - BACKDATE
    assert serial_from_principals(s.principals) == 7
    assert serial_from_principals(["alice", serial_principal(12)]) == 12
    assert serial_from_principals(["alice", "medbridge-cert-x"]) is None


def test_lifetime_capped_by_platform_maximum() -> None:
    assert spec().valid_before == NOW + timedelta(hours=12)
    assert spec(requested=timedelta(hours=1)).valid_before == NOW + timedelta(hours=1)


def test_lifetime_capped_by_the_grant_the_job_uses() -> None:
    soon = NOW + timedelta(minutes=30)
    rights = {"chest": soon, "knee": None}
    assert spec(rights=rights, datasets=["chest"]).valid_before == soon
    assert spec(rights=rights, datasets=["knee"]).valid_before == NOW + timedelta(hours=12)
    assert spec(rights={"chest": soon}).valid_before == soon


def test_refusals() -> None:
    with pytest.raises(GrantMissing):
        spec(rights={})
    with pytest.raises(GrantMissing):
        spec(datasets=["knee"])
    with pytest.raises(InvalidInput):
        spec(job_id="../etc")
    with pytest.raises(InvalidInput):
        spec(requested=timedelta(0))
    with pytest.raises(CertificateRefused):
        spec(rights={"chest": NOW + timedelta(milliseconds=200)})
    with pytest.raises(AccountDisabled, match="account 'alice' is disabled"):
        spec(enabled=False)
    with pytest.raises(CertificateRefused, match="job '42' of user 'alice' has ended"):
        spec(job_ended=True)


def test_readable_combines_user_and_group_grants() -> None:
    grants = [
        GrantFact(dataset="chest", user="alice", expires_at=NOW + DAY),
        GrantFact(dataset="chest", group="society", expires_at=NOW + 2 * DAY),
        GrantFact(dataset="knee", group="society", expires_at=NOW - DAY),
        GrantFact(dataset="hand", user="bob"),
        GrantFact(dataset="spine", group="other"),
    ]
    assert readable("alice", ["society"], grants, NOW) == {"chest": NOW + 2 * DAY}
    assert readable("alice", [], grants, NOW) == {"chest": NOW + DAY}
    assert readable("bob", [], grants, NOW) == {"hand": None}
    assert scope({"chest": None, "knee": None}, ["knee", "hand"]) == {"knee": None}
    assert scope({"chest": None}, None) == {"chest": None}
