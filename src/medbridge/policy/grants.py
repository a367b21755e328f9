"""Which datasets an account may read, decided from grant facts and the time."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True, kw_only=True)
class GrantFact:
    """One grant as policy sees it: to a user or to a group, maybe expiring."""

    dataset: str
    user: str | None = None
    group: str | None = None
    expires_at: datetime | None = None

    def live(self, now: datetime) -> bool:
        return self.expires_at is None or now < self.expires_at

    def covers(self, user: str, groups: Iterable[str]) -> bool:
        return self.user == user or (self.group is not None and self.group in set(groups))


def readable(
    user: str, groups: Iterable[str], grants: Iterable[GrantFact], now: datetime
) -> dict[str, datetime | None]:
    """Map each dataset the user may read now to when that right ends (None: no end).

    Several grants for one dataset (a personal one and a group one) combine: the
    right lasts as long as the longest-lived of them.
    """
    member_of = set(groups)
    out: dict[str, datetime | None] = {}
    for g in grants:
        if not (g.covers(user, member_of) and g.live(now)):
            continue
        if g.dataset not in out:
            out[g.dataset] = g.expires_at
            continue
        known = out[g.dataset]
        if known is None or g.expires_at is None:
            out[g.dataset] = None
        else:
            out[g.dataset] = max(known, g.expires_at)
    return out


def scope(rights: Mapping[str, datetime | None], wanted: Iterable[str] | None) -> dict[str, datetime | None]:
    """Narrow ``rights`` to the datasets a job asked for; ``None`` asks for all."""
    if wanted is None:
        return dict(rights)
    return {name: rights[name] for name in wanted if name in rights}
