"""The store: the only place that opens database sessions; every use case is a method."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

from sqlalchemy import Table, create_engine, event, func, insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import SQLAlchemyError as _SQLAlchemyError
from sqlalchemy.orm import Session, selectinload

from medbridge.control.audit import GENESIS, AuditEvent, Record, chain_hash, entry_fields, first_break
from medbridge.control.models import (
    AuditEntry,
    Base,
    Certificate,
    Dataset,
    DatasetFile,
    EnrolmentKey,
    Grant,
    Group,
    SerialCounter,
    User,
)
from medbridge.errors import AlreadyExists, IntegrityError, InvalidInput, MedbridgeError, NotFound
from medbridge.policy.credentials import CertificateSpec, certificate_spec
from medbridge.policy.grants import GrantFact, readable
from medbridge.policy.names import check_name

_Named = TypeVar("_Named", User, Group, Dataset)
_AUDIT_TABLE = cast(Table, AuditEntry.__table__)  # Core inserts skip the ORM bulk path


@dataclass(frozen=True)
class UserInfo:
    name: str
    enabled: bool
    groups: tuple[str, ...]
    key_fingerprints: tuple[str, ...]


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    provider: str
    storage_path: str
    files: int
    bytes: int
    created_at: datetime


@dataclass(frozen=True)
class ManifestEntry:
    path: str
    size: int
    sha256: str
    media_type: str = "application/octet-stream"


@dataclass(frozen=True)
class GrantInfo:
    subject: str
    dataset: str
    expires_at: datetime | None


@dataclass(frozen=True)
class CertificateInfo:
    serial: int
    user: str
    job_id: str
    key_id: str
    valid_after: datetime
    valid_before: datetime
    revoked: bool
    datasets: tuple[str, ...] | None


@dataclass(frozen=True)
class SessionCheck:
    """A live session's standing: may it go on, which datasets, until when."""

    ok: bool
    reason: str
    datasets: frozenset[str]
    ends_at: datetime | None


def parse_subject(subject: str) -> tuple[str | None, str | None]:
    """``alice`` names a user, ``@society`` a group."""
    if subject.startswith("@"):
        return None, check_name("group", subject[1:])
    return check_name("user", subject), None


class Store:
    """Accounts, groups, datasets, grants, certificates and the audit chain."""

    def __init__(self, url: str):
        self.url = url
        try:
            self.engine: Engine = create_engine(url)
        except (_SQLAlchemyError, ValueError) as exc:
            raise InvalidInput(f"database URL {url!r}: {exc}") from exc
        if self.engine.dialect.name == "sqlite":
            _sqlite_tuning(self.engine)

    def create(self) -> None:
        Base.metadata.create_all(self.engine)
        with self._tx() as s:
            if s.get(SerialCounter, 1) is None:
                s.add(SerialCounter(id=1, next_serial=1))

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _tx(self, *, write: bool = True) -> Iterator[Session]:
        engine = self.engine.execution_options(medbridge_write=write)
        try:
            with Session(engine, expire_on_commit=False) as s, s.begin():
                yield s
        except OperationalError as exc:
            raise MedbridgeError(f"control database error: {exc.orig}") from exc

    # -- users and groups -------------------------------------------------------------

    def add_user(
        self, name: str, public_keys: Sequence[tuple[str, str]], groups: Sequence[str], now: datetime, actor: str
    ) -> None:
        """Create an account with its enrolment keys ``(openssh line, fingerprint)``."""
        check_name("user", name)
        with self._tx() as s:
            if s.scalar(select(User).where(User.name == name)):
                raise AlreadyExists(f"user {name!r} already exists")
            members_of = [self._group(s, g) for g in groups]
            for _, fpr in public_keys:
                owner = s.scalar(select(EnrolmentKey).where(EnrolmentKey.fingerprint == fpr))
                if owner is not None:
                    raise AlreadyExists(f"key {fpr} is already enrolled for user {owner.user.name!r}")
            user = User(name=name, enabled=True, created_at=now, groups=members_of)
            user.keys = [EnrolmentKey(public_key=line, fingerprint=fpr) for line, fpr in public_keys]
            s.add(user)
            self._append(
                s,
                [
                    AuditEvent(
                        actor=actor,
                        action="user.add",
                        outcome="ok",
                        subject=name,
                        detail={"keys": [f for _, f in public_keys], "groups": list(groups)},
                    )
                ],
                now,
            )

    def set_enabled(self, name: str, enabled: bool, now: datetime, actor: str) -> None:
        with self._tx() as s:
            self._user(s, name).enabled = enabled
            action = "user.enable" if enabled else "user.disable"
            self._append(s, [AuditEvent(actor=actor, action=action, outcome="ok", subject=name)], now)

    def add_group(self, name: str, now: datetime, actor: str) -> None:
        check_name("group", name)
        with self._tx() as s:
            if s.scalar(select(Group).where(Group.name == name)):
                raise AlreadyExists(f"group {name!r} already exists")
            s.add(Group(name=name))
            self._append(s, [AuditEvent(actor=actor, action="group.add", outcome="ok", subject=name)], now)

    def add_member(self, user: str, group: str, now: datetime, actor: str) -> None:
        with self._tx() as s:
            u, g = self._user(s, user), self._group(s, group)
            if g in u.groups:
                raise AlreadyExists(f"user {user!r} is already in group {group!r}")
            u.groups.append(g)
            self._append(
                s,
                [AuditEvent(actor=actor, action="group.member", outcome="ok", subject=group, detail={"user": user})],
                now,
            )

    def users(self) -> list[UserInfo]:
        with self._tx(write=False) as s:
            rows = s.scalars(
                select(User).options(selectinload(User.groups), selectinload(User.keys)).order_by(User.name)
            )
            return [
                UserInfo(
                    u.name, u.enabled, tuple(sorted(g.name for g in u.groups)), tuple(k.fingerprint for k in u.keys)
                )
                for u in rows
            ]

    def user_for_key(self, fingerprint: str) -> tuple[str, bool] | None:
        """Which account enrolled this key, and is it enabled?"""
        with self._tx(write=False) as s:
            key = s.scalar(select(EnrolmentKey).where(EnrolmentKey.fingerprint == fingerprint))
            return None if key is None else (key.user.name, key.user.enabled)

    def user_state(self, name: str) -> bool | None:
        """``None`` when there is no such account, else whether it is enabled."""
        with self._tx(write=False) as s:
            u = s.scalar(select(User).where(User.name == name))
            return None if u is None else u.enabled

    # -- datasets ---------------------------------------------------------------------

    def add_dataset(
        self,
        name: str,
        provider: str,
        storage_path: str,
        files: Sequence[ManifestEntry],
        now: datetime,
        actor: str,
        gate: Mapping[str, Any] | None = None,
    ) -> None:
        check_name("dataset", name)
        with self._tx() as s:
            if s.scalar(select(Dataset).where(Dataset.name == name)):
                raise AlreadyExists(f"dataset {name!r} already exists")
            ds = Dataset(name=name, provider=provider, storage_path=storage_path, created_at=now)
            ds.files = [DatasetFile(path=f.path, size=f.size, sha256=f.sha256, media_type=f.media_type) for f in files]
            s.add(ds)
            self._append(
                s,
                [
                    AuditEvent(
                        actor=actor,
                        action="dataset.add",
                        outcome="ok",
                        subject=name,
                        detail={
                            "provider": provider,
                            "files": len(files),
                            "bytes": sum(f.size for f in files),
                            **(gate or {}),
                        },
                    )
                ],
                now,
            )

    def dataset_exists(self, name: str) -> bool:
        with self._tx(write=False) as s:
            return s.scalar(select(Dataset.id).where(Dataset.name == name)) is not None

    def datasets(self) -> list[DatasetInfo]:
        with self._tx(write=False) as s:
            stats = {
                ds_id: (n, total)
                for ds_id, n, total in s.execute(
                    select(DatasetFile.dataset_id, func.count(), func.coalesce(func.sum(DatasetFile.size), 0)).group_by(
                        DatasetFile.dataset_id
                    )
                )
            }
            return [
                DatasetInfo(d.name, d.provider, d.storage_path, *stats.get(d.id, (0, 0)), d.created_at)
                for d in s.scalars(select(Dataset).order_by(Dataset.name))
            ]

    def dataset_roots(self, names: Iterable[str]) -> dict[str, str]:
        wanted = list(names)
        with self._tx(write=False) as s:
            rows = s.execute(select(Dataset.name, Dataset.storage_path).where(Dataset.name.in_(wanted)))
            return {n: p for n, p in rows}

    def manifest(self, name: str) -> list[ManifestEntry]:
        with self._tx(write=False) as s:
            ds = self._dataset(s, name)
            return [ManifestEntry(f.path, f.size, f.sha256, f.media_type) for f in ds.files]

    def add_files(self, name: str, files: Sequence[ManifestEntry], now: datetime, actor: str, action: str) -> None:
        """Add derived files (shards) to a dataset's manifest."""
        with self._tx() as s:
            ds = self._dataset(s, name)
            known = {f.path for f in ds.files}
            clash = sorted(f.path for f in files if f.path in known)
            if clash:
                raise AlreadyExists(f"dataset {name!r} already has {clash[0]}")
            for f in files:
                ds.files.append(DatasetFile(path=f.path, size=f.size, sha256=f.sha256, media_type=f.media_type))
            self._append(
                s,
                [
                    AuditEvent(
                        actor=actor,
                        action=action,
                        outcome="ok",
                        subject=name,
                        detail={"files": len(files), "bytes": sum(f.size for f in files)},
                    )
                ],
                now,
            )

    # -- grants -----------------------------------------------------------------------

    def grant(self, subject: str, dataset: str, until: datetime | None, now: datetime, actor: str) -> None:
        """Give read access; granting again replaces the expiry of the existing grant."""
        user_name, group_name = parse_subject(subject)
        with self._tx() as s:
            ds = self._dataset(s, dataset)
            user = self._user(s, user_name) if user_name else None
            group = self._group(s, group_name) if group_name else None
            existing = s.scalar(
                select(Grant).where(
                    Grant.dataset_id == ds.id,
                    Grant.user_id == user.id if user else Grant.user_id.is_(None),
                    Grant.group_id == group.id if group else Grant.group_id.is_(None),
                )
            )
            if existing is not None:
                existing.expires_at = until
            else:
                s.add(Grant(dataset=ds, user=user, group=group, right="read", expires_at=until, created_at=now))
            self._append(
                s,
                [
                    AuditEvent(
                        actor=actor,
                        action="grant",
                        outcome="ok",
                        subject=dataset,
                        detail={"to": subject, "until": until},
                    )
                ],
                now,
            )

    def revoke(self, subject: str, dataset: str, now: datetime, actor: str) -> None:
        user_name, group_name = parse_subject(subject)
        with self._tx() as s:
            ds = self._dataset(s, dataset)
            q = select(Grant).where(Grant.dataset_id == ds.id)
            if user_name:
                q = q.where(Grant.user_id == self._user(s, user_name).id)
            else:
                q = q.where(Grant.group_id == self._group(s, group_name or "").id)
            found = list(s.scalars(q))
            if not found:
                raise NotFound(f"no grant of dataset {dataset!r} to {subject}")
            for g in found:
                s.delete(g)
            self._append(
                s,
                [AuditEvent(actor=actor, action="revoke", outcome="ok", subject=dataset, detail={"from": subject})],
                now,
            )

    def grants(self) -> list[GrantInfo]:
        with self._tx(write=False) as s:
            out = []
            for g in s.scalars(select(Grant)):
                subject = g.user.name if g.user else f"@{g.group.name if g.group else '?'}"
                out.append(GrantInfo(subject, g.dataset.name, g.expires_at))
            return sorted(out, key=lambda g: (g.dataset, g.subject))

    def rights(self, user: str, now: datetime) -> dict[str, datetime | None]:
        """Datasets ``user`` may read now, each with the end of that right."""
        with self._tx(write=False) as s:
            return self._rights(s, self._user(s, user), now)

    # -- certificates -----------------------------------------------------------------

    def issue_certificate(
        self,
        *,
        user: str,
        job_id: str,
        requested: timedelta,
        datasets: Sequence[str] | None,
        key_fingerprint: str,
        now: datetime,
        max_lifetime: timedelta,
        source_addresses: Sequence[str],
        sign: Callable[[CertificateSpec], Any],
    ) -> tuple[CertificateSpec, Any]:
        """Decide, sign and record one job certificate in one transaction."""
        with self._tx() as s:
            u = self._user(s, user)
            counter = s.get(SerialCounter, 1)
            if counter is None:
                raise IntegrityError("control database has no serial counter; was it initialised?")
            serial = counter.next_serial
            counter.next_serial = serial + 1
            spec = certificate_spec(
                user=user,
                job_id=job_id,
                serial=serial,
                requested=requested,
                now=now,
                max_lifetime=max_lifetime,
                rights=self._rights(s, u, now),
                datasets=datasets,
                source_addresses=source_addresses,
            )
            signed = sign(spec)
            s.add(
                Certificate(
                    serial=serial,
                    user=u,
                    job_id=job_id,
                    key_id=spec.key_id,
                    key_fingerprint=key_fingerprint,
                    datasets=None if spec.datasets is None else json.dumps(list(spec.datasets)),
                    valid_after=spec.valid_after,
                    valid_before=spec.valid_before,
                    issued_at=now,
                )
            )
            return spec, signed

    def end_job(self, user: str, job_id: str, now: datetime, actor: str) -> int:
        """Revoke every certificate of a finished job: its live sessions end at the next check."""
        with self._tx() as s:
            u = self._user(s, user)
            live = list(s.scalars(select(Certificate).where(
                Certificate.user_id == u.id, Certificate.job_id == job_id, Certificate.revoked_at.is_(None)
            )))  # fmt: skip
            for c in live:
                c.revoked_at = now
            self._append(s, [AuditEvent(actor=actor, action="job.end", outcome="ok", subject=job_id,
                                        detail={"revoked_serials": [c.serial for c in live]})], now)  # fmt: skip
            return len(live)

    def certificate(self, serial: int) -> CertificateInfo | None:
        with self._tx(write=False) as s:
            c = s.get(Certificate, serial)
            return None if c is None else _cert_info(c)

    def certificates(self, user: str | None = None) -> list[CertificateInfo]:
        with self._tx(write=False) as s:
            q = select(Certificate).order_by(Certificate.serial)
            if user is not None:
                q = q.where(Certificate.user_id == self._user(s, user).id)
            return [_cert_info(c) for c in s.scalars(q)]

    def check_sessions(
        self, serials: Iterable[int], now: datetime, *, follow_renewals: bool = True
    ) -> dict[int, SessionCheck]:
        """Re-decide every live session at once: the enforcement loop's one query per tick.

        A session outlives its own certificate only through a renewal: a later
        certificate of the same user and job for the same key, which the job's
        agent holds.  ``follow_renewals=False`` judges the certificate alone (logins).
        """
        out: dict[int, SessionCheck] = {}
        with self._tx(write=False) as s:
            for serial in set(serials):
                c = s.get(Certificate, serial)
                if follow_renewals and c is not None and now >= c.valid_before:
                    c = self._renewal(s, c, now) or c
                out[serial] = self._check(s, c, now)
        return out

    @staticmethod
    def _renewal(s: Session, c: Certificate, now: datetime) -> Certificate | None:
        return s.scalar(
            select(Certificate)
            .where(
                Certificate.user_id == c.user_id,
                Certificate.job_id == c.job_id,
                Certificate.key_fingerprint == c.key_fingerprint,
                Certificate.revoked_at.is_(None),
                Certificate.valid_after <= now,
                Certificate.valid_before > now,
            )
            .order_by(Certificate.valid_before.desc())
            .limit(1)
        )

    def _check(self, s: Session, c: Certificate | None, now: datetime) -> SessionCheck:
        none: frozenset[str] = frozenset()
        if c is None:
            return SessionCheck(False, "certificate not issued by this platform", none, None)
        if c.revoked_at is not None:
            return SessionCheck(False, "certificate revoked", none, None)
        if not c.user.enabled:
            return SessionCheck(False, f"account {c.user.name!r} disabled", none, None)
        if now >= c.valid_before:
            return SessionCheck(False, "certificate expired", none, c.valid_before)
        if now < c.valid_after:
            return SessionCheck(False, "certificate not yet valid", none, c.valid_before)
        rights = self._rights(s, c.user, now)
        wanted = None if c.datasets is None else json.loads(c.datasets)
        granted = frozenset(rights) if wanted is None else frozenset(d for d in wanted if d in rights)
        return SessionCheck(True, "", granted, c.valid_before)

    # -- audit ------------------------------------------------------------------------

    def audit(self, events: Sequence[AuditEvent], now: datetime) -> None:
        """Append events to the chain, serialised against every other writer."""
        if events:
            with self._tx() as s:
                self._append(s, events, now)

    @staticmethod
    def _append(s: Session, events: Sequence[AuditEvent], now: datetime) -> None:
        """Append inside the caller's transaction, so a decision and its record commit together.

        One executemany of plain rows through the table, not the ORM: the data plane
        writes an entry per file opened, and ORM bulk inserts cost more than the hashing.
        """
        last = s.execute(select(AuditEntry.seq, AuditEntry.hash).order_by(AuditEntry.seq.desc()).limit(1)).first()
        seq, prev = (last[0], last[1]) if last else (0, GENESIS)
        rows = []
        for ev in events:
            seq += 1
            actor, action, outcome, subject, detail = entry_fields(ev)
            rec = Record(
                seq=seq,
                at=(ev.at or now).astimezone(UTC),
                actor=actor,
                action=action,
                outcome=outcome,
                subject=subject,
                detail=detail,
                prev_hash=prev,
            )
            prev = chain_hash(rec)
            rows.append({f.name: getattr(rec, f.name) for f in dataclasses.fields(rec)} | {"hash": prev})
        s.execute(insert(_AUDIT_TABLE), rows)

    def audit_records(self, *, last: int | None = None, action: str | None = None) -> list[Record]:
        with self._tx(write=False) as s:
            q = select(AuditEntry)
            if action:
                q = q.where(AuditEntry.action == action)
            q = q.order_by(AuditEntry.seq.desc())
            if last:
                q = q.limit(last)
            rows = list(s.scalars(q))
        return [_record(r) for r in reversed(rows)]

    def verify_audit(self) -> int:
        """Check the whole chain; return the number of entries, or raise IntegrityError."""
        with self._tx(write=False) as s:
            records = [_record(r) for r in s.scalars(select(AuditEntry).order_by(AuditEntry.seq))]
        broken = first_break(records)
        if broken:
            raise IntegrityError(f"audit chain broken at entry {broken[0]}: {broken[1]}")
        return len(records)

    # -- helpers ----------------------------------------------------------------------

    @staticmethod
    def _named(s: Session, model: type[_Named], name: str) -> _Named:
        row = s.scalar(select(model).where(model.name == name))
        if row is None:
            raise NotFound(f"no such {model.__tablename__.rstrip('s')} {name!r}")
        return row

    @classmethod
    def _user(cls, s: Session, name: str) -> User:
        return cls._named(s, User, name)

    @classmethod
    def _group(cls, s: Session, name: str) -> Group:
        return cls._named(s, Group, name)

    @classmethod
    def _dataset(cls, s: Session, name: str) -> Dataset:
        return cls._named(s, Dataset, name)

    @staticmethod
    def _rights(s: Session, u: User, now: datetime) -> dict[str, datetime | None]:
        groups = [g.name for g in u.groups]
        group_ids = [g.id for g in u.groups]
        q = select(Grant).where((Grant.user_id == u.id) | (Grant.group_id.in_(group_ids)))
        facts = [
            GrantFact(
                dataset=g.dataset.name,
                user=g.user.name if g.user else None,
                group=g.group.name if g.group else None,
                expires_at=g.expires_at,
            )
            for g in s.scalars(q)
        ]
        return readable(u.name, groups, facts, now)


def _cert_info(c: Certificate) -> CertificateInfo:
    return CertificateInfo(
        c.serial,
        c.user.name,
        c.job_id,
        c.key_id,
        c.valid_after,
        c.valid_before,
        c.revoked_at is not None,
        None if c.datasets is None else tuple(json.loads(c.datasets)),
    )


def _record(r: AuditEntry) -> Record:
    return Record(**{f.name: getattr(r, f.name) for f in dataclasses.fields(Record)})


def _sqlite_tuning(engine: Engine) -> None:
    """WAL so readers never wait, a busy timeout, and BEGIN IMMEDIATE for writers.

    Writers take the lock when they begin, so two processes appending to the audit
    chain can never both read the same last entry.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        write = conn.get_execution_options().get("medbridge_write", True)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
