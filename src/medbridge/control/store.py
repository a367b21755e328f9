"""The store: the only place that opens database sessions; every use case is a method."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypedDict, TypeVar, Unpack, cast

from sqlalchemy import Select, Table, create_engine, delete, event, func, insert, select, text, update
from sqlalchemy.engine import Connection, Engine, Row
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import SQLAlchemyError as _SQLAlchemyError
from sqlalchemy.orm import Session, selectinload

from medbridge.control import schema
from medbridge.control.audit import (
    CHECKPOINT,
    GENESIS,
    Anchor,
    AuditEvent,
    ChainBroken,
    ChainWalk,
    Record,
    SignatureCheck,
    chain_hash,
    entry_fields,
    index_keys,
)
from medbridge.control.models import (
    AuditEntry,
    Certificate,
    Dataset,
    DatasetChange,
    DatasetFile,
    EnrolmentKey,
    Grant,
    Group,
    JobPlacement,
    Node,
    SerialCounter,
    User,
)
from medbridge.errors import AlreadyExists, IntegrityError, InvalidInput, MedbridgeError, NotFound, SchemaOutdated
from medbridge.policy.credentials import CertificateSpec, IssuanceLimits, certificate_spec, check_issuance
from medbridge.policy.grants import GrantFact, readable
from medbridge.policy.names import check_name
from medbridge.policy.nodes import NodeFact, Placement, check_networks, jobs_to_end
from medbridge.policy.sessions import CertificateFact, SessionFacts

_Named = TypeVar("_Named", User, Group, Dataset)
_AUDIT_TABLE = cast(Table, AuditEntry.__table__)  # Core inserts skip the ORM bulk path
_FILES_TABLE = cast(Table, DatasetFile.__table__)
_CHANGES_TABLE = cast(Table, DatasetChange.__table__)
_T = TypeVar("_T")
_ENTRY = (DatasetFile.path, DatasetFile.size, DatasetFile.sha256, DatasetFile.media_type, DatasetFile.mtime_ns)
#: PostgreSQL advisory lock that serialises appends to the audit chain (any constant; ours is "mbaudit").
AUDIT_LOCK = 0x6D6261756469
#: Rows per transaction or fetch when files are recorded or manifests streamed: memory stays flat.
BATCH = 5000


def batched(items: Iterable[_T], n: int) -> Iterator[tuple[_T, ...]]:
    """``items`` in tuples of at most ``n`` (itertools.batched is 3.12+)."""
    it = iter(items)
    while chunk := tuple(itertools.islice(it, n)):
        yield chunk


def writer_id() -> str:
    """This process, as a dataset's writer claim names it."""
    return f"{socket.gethostname()}:{os.getpid()}"


def writer_alive(writer: str | None) -> bool:
    """Could the writer of a claim still be running?  Only a process of this host is known dead."""
    if writer is None:
        return False
    host, _, pid = writer.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


#: The audit chain's last link, and an append: built once (the data plane runs them per commit).
_HEAD = select(AuditEntry.seq, AuditEntry.hash).order_by(AuditEntry.seq.desc()).limit(1)
_APPEND = insert(_AUDIT_TABLE)


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
    version: int = 1
    id: int = 0


@dataclass(frozen=True)
class ManifestEntry:
    path: str
    size: int
    sha256: str
    media_type: str = "application/octet-stream"
    #: The source's modification time when it was recorded (None: unknown, always rehashed by an update).
    mtime_ns: int | None = None


@dataclass(frozen=True)
class GrantInfo:
    subject: str
    dataset: str
    expires_at: datetime | None


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
        self._writer = self.engine.execution_options(medbridge_write=True)
        self._schema_ok = False

    def check_schema(self) -> None:
        """Refuse a database whose schema is not this medbridge's, naming the remedy."""
        try:
            found, wanted = schema.current(self.engine), schema.head()
        except _SQLAlchemyError as exc:
            raise MedbridgeError(f"control database error: {exc}") from exc
        if found != wanted:
            raise SchemaOutdated(
                f"the control database is at schema revision {found or 'none'}, this medbridge needs {wanted}: "
                "run 'medbridge platform migrate' (once, with every platform stopped)"
                if found is None or found < wanted
                else f"the control database is at schema revision {found}, newer than this medbridge ({wanted}): "
                "upgrade medbridge"
            )
        self._schema_ok = True

    def create(self) -> None:
        """A new control database at the newest schema revision."""
        schema.create(self.engine)
        self._schema_ok = True
        with self._tx() as s:
            if s.get(SerialCounter, 1) is None:
                s.add(SerialCounter(id=1, next_serial=1))

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _tx(self, *, write: bool = True, snapshot: bool = False) -> Iterator[Session]:
        """A transaction; ``snapshot`` reads every statement from one snapshot (SQLite's WAL does anyway)."""
        if not self._schema_ok:
            self.check_schema()
        engine = self.engine.execution_options(medbridge_write=write)
        if snapshot and self.engine.dialect.name == "postgresql":
            engine = engine.execution_options(isolation_level="REPEATABLE READ")
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
                self._key_free(s, fpr)
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
        files: Iterable[ManifestEntry],
        now: datetime,
        actor: str,
        gate: Mapping[str, Any] | None = None,
    ) -> DatasetInfo:
        """Record a whole dataset: :meth:`begin_dataset`, :meth:`record_files` in batches, :meth:`finish_dataset`."""
        ds_id = self.begin_dataset(name, provider, storage_path, now)
        try:
            for batch in batched(files, BATCH):
                self.record_files(ds_id, batch)
            return self.finish_dataset(ds_id, now, actor, gate)
        except BaseException:
            self.abandon_dataset(ds_id)
            raise

    def begin_dataset(self, name: str, provider: str, storage_path: str, now: datetime) -> int:
        """Create a dataset nobody sees yet (version 0) and claim it for this process; return its id.

        Files are then recorded in short transactions (a long one would hold SQLite's
        write lock, and with it every audit write, for the whole add).  A claim left by a
        process of this host that has died is taken over; its rows are removed.
        """
        check_name("dataset", name)
        with self._tx() as s:
            ds = s.scalar(select(Dataset).where(Dataset.name == name).with_for_update())
            if ds is not None:
                if ds.version > 0:
                    raise AlreadyExists(f"dataset {name!r} already exists")
                if writer_alive(ds.writer):
                    raise AlreadyExists(f"dataset {name!r} is being added by {ds.writer}")
                s.execute(delete(DatasetFile).where(DatasetFile.dataset_id == ds.id))
                s.execute(delete(DatasetChange).where(DatasetChange.dataset_id == ds.id))
                s.delete(ds)
                s.flush()
            ds = Dataset(name=name, provider=provider, storage_path=storage_path, created_at=now, version=0,
                         file_count=0, byte_count=0, writer=writer_id())  # fmt: skip
            s.add(ds)
            s.flush()
            return ds.id

    def record_files(self, dataset_id: int, files: Sequence[ManifestEntry]) -> None:
        """One batch of a dataset being added (version 0): one executemany, counters kept with it."""
        if not files:
            return
        with self._tx() as s:
            s.execute(insert(_FILES_TABLE), [_row(dataset_id, f) for f in files])
            s.execute(
                update(Dataset)
                .where(Dataset.id == dataset_id)
                .values(
                    file_count=Dataset.file_count + len(files),
                    byte_count=Dataset.byte_count + sum(f.size for f in files),
                )
            )

    def finish_dataset(
        self, dataset_id: int, now: datetime, actor: str, gate: Mapping[str, Any] | None = None
    ) -> DatasetInfo:
        """Make a recorded dataset visible (version 1) and audit it, in one transaction."""
        with self._tx() as s:
            ds = s.get(Dataset, dataset_id)
            if ds is None or ds.version != 0:
                raise IntegrityError(f"dataset id {dataset_id} is not being added")
            ds.version, ds.writer = 1, None
            detail = {"provider": ds.provider, "files": ds.file_count, "bytes": ds.byte_count, **(gate or {})}
            self._append(s, [AuditEvent(actor=actor, action="dataset.add", outcome="ok", subject=ds.name,
                                        detail=detail)], now)  # fmt: skip
            return _dataset_info(ds)

    def abandon_dataset(self, dataset_id: int) -> None:
        """Remove a dataset that was never made visible, with everything recorded for it."""
        with self._tx() as s:
            ds = s.get(Dataset, dataset_id)
            if ds is None or ds.version != 0:
                return
            s.execute(delete(DatasetFile).where(DatasetFile.dataset_id == dataset_id))
            s.delete(ds)

    def claim(self, name: str) -> DatasetInfo:
        """Claim a visible dataset for one writer (update, pack); a dead writer's claim on this host is taken over."""
        with self._tx() as s:
            ds = self._dataset(s, name, lock=True)
            if ds.writer is not None and ds.writer != writer_id() and writer_alive(ds.writer):
                raise AlreadyExists(f"dataset {name!r} is being changed by {ds.writer}")
            s.execute(delete(DatasetChange).where(DatasetChange.dataset_id == ds.id))
            ds.writer = writer_id()
            return _dataset_info(ds)

    def stage_changes(self, dataset_id: int, files: Sequence[ManifestEntry]) -> None:
        """One batch of new or changed files for a claimed dataset; readers see none of it until applied."""
        if files:
            with self._tx() as s:
                s.execute(insert(_CHANGES_TABLE), [_row(dataset_id, f) for f in files])

    def known_files(self, dataset_id: int, paths: Sequence[str]) -> dict[str, ManifestEntry]:
        """The recorded entries of ``paths`` (one indexed query per batch)."""
        out: dict[str, ManifestEntry] = {}
        with self._tx(write=False) as s:
            for batch in batched(paths, 500):
                q = select(*_ENTRY).where(DatasetFile.dataset_id == dataset_id, DatasetFile.path.in_(batch))
                out.update({r[0]: ManifestEntry(*r) for r in s.execute(q)})
        return out

    def apply_changes(
        self, dataset_id: int, now: datetime, actor: str, action: str, detail: Mapping[str, Any] | None = None
    ) -> DatasetInfo:
        """Apply the staged files as the dataset's next version, set-wise, with its audit entry; release the claim."""
        with self._tx() as s:
            ds = s.get(Dataset, dataset_id)
            if ds is None or ds.writer != writer_id():
                raise IntegrityError(f"dataset id {dataset_id} is not claimed by this process")
            staged = select(DatasetChange.path).where(DatasetChange.dataset_id == dataset_id)
            replaced = DatasetFile.__table__.c
            old_n, old_bytes = s.execute(
                select(func.count(), func.coalesce(func.sum(DatasetFile.size), 0)).where(
                    DatasetFile.dataset_id == dataset_id, DatasetFile.path.in_(staged)
                )
            ).one()
            new_n, new_bytes = s.execute(
                select(func.count(), func.coalesce(func.sum(DatasetChange.size), 0)).where(
                    DatasetChange.dataset_id == dataset_id
                )
            ).one()
            s.execute(delete(DatasetFile).where(DatasetFile.dataset_id == dataset_id, DatasetFile.path.in_(staged)))
            columns = ["dataset_id", "path", "size", "sha256", "media_type", "mtime_ns"]
            s.execute(
                insert(_FILES_TABLE).from_select(
                    [replaced[c] for c in columns],
                    select(*(getattr(DatasetChange, c) for c in columns)).where(DatasetChange.dataset_id == dataset_id),
                )
            )
            s.execute(delete(DatasetChange).where(DatasetChange.dataset_id == dataset_id))
            ds.version += 1
            ds.file_count += new_n - old_n
            ds.byte_count += new_bytes - old_bytes
            ds.writer = None
            full = {"version": ds.version, "files": new_n, "bytes": new_bytes, "replaced": old_n, **(detail or {})}
            self._append(s, [AuditEvent(actor=actor, action=action, outcome="ok", subject=ds.name, detail=full)], now)
            return _dataset_info(ds)

    def release(self, dataset_id: int) -> None:
        """Give up a claim: staged files are dropped, the catalogue is as it was."""
        with self._tx() as s:
            s.execute(delete(DatasetChange).where(DatasetChange.dataset_id == dataset_id))
            s.execute(
                update(Dataset).where(Dataset.id == dataset_id, Dataset.writer == writer_id()).values(writer=None)
            )

    def dataset_exists(self, name: str) -> bool:
        with self._tx(write=False) as s:
            return s.scalar(select(Dataset.id).where(Dataset.name == name, Dataset.version > 0)) is not None

    def dataset(self, name: str) -> DatasetInfo:
        with self._tx(write=False) as s:
            return _dataset_info(self._dataset(s, name))

    def datasets(self) -> list[DatasetInfo]:
        with self._tx(write=False) as s:
            return [
                _dataset_info(d) for d in s.scalars(select(Dataset).where(Dataset.version > 0).order_by(Dataset.name))
            ]

    def dataset_roots(self, names: Iterable[str]) -> dict[str, str]:
        return {n: v.storage_path for n, v in self.dataset_versions(names).items()}

    def dataset_versions(self, names: Iterable[str]) -> dict[str, DatasetInfo]:
        """Storage and catalogue version of each named dataset that exists (one query)."""
        wanted = list(names)
        with self._tx(write=False) as s:
            rows = s.scalars(select(Dataset).where(Dataset.name.in_(wanted), Dataset.version > 0))
            return {d.name: _dataset_info(d) for d in rows}

    @contextmanager
    def manifest_rows(self, name: str) -> Iterator[tuple[DatasetInfo, Iterator[ManifestEntry]]]:
        """One version of a dataset's manifest, sorted by path, streamed in batches from one snapshot."""
        with self._tx(write=False, snapshot=True) as s:
            ds = self._dataset(s, name)
            q = (
                select(*_ENTRY)
                .where(DatasetFile.dataset_id == ds.id)
                .order_by(DatasetFile.path)
                .execution_options(yield_per=BATCH)
            )
            result = s.execute(q)
            try:
                yield _dataset_info(ds), (ManifestEntry(*r) for r in result)
            finally:
                result.close()  # a server-side cursor (PostgreSQL) read only in part

    def manifest(self, name: str) -> list[ManifestEntry]:
        """A whole manifest in memory: for small datasets and tests; everything else streams :meth:`manifest_rows`."""
        with self.manifest_rows(name) as (_, rows):
            return list(rows)

    def add_files(self, name: str, files: Sequence[ManifestEntry], now: datetime, actor: str, action: str) -> None:
        """Add derived files (shards) to a dataset's manifest, as its next version."""
        ds = self.claim(name)
        try:
            clash = self.known_files(ds.id, [f.path for f in files])
            if clash:
                raise AlreadyExists(f"dataset {name!r} already has {min(clash)}")
            for batch in batched(files, BATCH):
                self.stage_changes(ds.id, batch)
            self.apply_changes(ds.id, now, actor, action)
        except BaseException:
            self.release(ds.id)
            raise

    def find_hashes(self, user: str, job_id: str, hashes: Sequence[str], now: datetime) -> dict[str, tuple[str, str]]:
        """Which of ``hashes`` are files of a dataset the user may read, or one the job's certificates named.

        The residue scan's lookup: ``sha256 -> (dataset, path)``, through the SHA-256 index,
        so a node checks its candidate files without holding any manifest.
        """
        with self._tx(write=False) as s:
            u = self._user(s, user)
            scope = set(self._rights(s, u, now))
            named = s.scalars(
                select(Certificate.datasets).where(Certificate.user_id == u.id, Certificate.job_id == job_id)
            )
            for text in named:
                scope.update(json.loads(text) if text else ())
            if not scope:
                return {}
            out: dict[str, tuple[str, str]] = {}
            for batch in batched(sorted(set(hashes)), 500):
                q = (
                    select(DatasetFile.sha256, Dataset.name, DatasetFile.path)
                    .join(Dataset, Dataset.id == DatasetFile.dataset_id)
                    .where(DatasetFile.sha256.in_(batch), Dataset.name.in_(sorted(scope)), Dataset.version > 0)
                )
                for sha, ds_name, path in s.execute(q):
                    out.setdefault(sha, (ds_name, path))
            return out

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
        limits: IssuanceLimits | None = None,
        placement: tuple[str, str] | None = None,
        audit: Callable[[CertificateSpec], AuditEvent] | None = None,
    ) -> tuple[CertificateSpec, Any]:
        """Decide, sign and record one job certificate, and its audit entry, in one transaction.

        The serial counter's row is locked first, so issuances are counted one after
        another by every process (``limits``: the user's rate, the job's live certificates,
        checked once the request itself is known to be valid).  ``placement`` is
        ``(Slurm job id, address)`` of a request from a Slurm job: the node at that address
        may end the job (:meth:`end_slurm_job`).
        """
        check_name("job id", job_id)  # before it reaches a query
        with self._tx() as s:
            u = self._user(s, user)
            counter = s.get(SerialCounter, 1, with_for_update=True)
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
                enabled=u.enabled,
                job_ended=self._job_ended(s, u.id, job_id),
            )
            if limits is not None:
                check_issuance(
                    user=user,
                    job_id=job_id,
                    issued_in_window=self._count_certificates(s, Certificate.user_id == u.id,
                                                              Certificate.issued_at > now - limits.window),
                    live_for_job=self._count_certificates(s, Certificate.user_id == u.id, Certificate.job_id == job_id,
                                                          Certificate.revoked_at.is_(None),
                                                          Certificate.valid_before > now),
                    limits=limits,
                )  # fmt: skip
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
            if placement is not None:
                self._place(s, u, job_id, *placement, now)
            if audit is not None:
                self._append(s, [audit(spec)], now)
            return spec, signed

    @staticmethod
    def _place(s: Session, u: User, job_id: str, slurm_job_id: str, address: str, now: datetime) -> None:
        known = s.scalar(
            select(JobPlacement.id).where(
                JobPlacement.user_id == u.id,
                JobPlacement.job_id == job_id,
                JobPlacement.slurm_job_id == slurm_job_id,
                JobPlacement.address == address,
            )
        )
        if known is None:
            s.add(JobPlacement(user=u, job_id=job_id, slurm_job_id=slurm_job_id, address=address, first_at=now))

    @staticmethod
    def _count_certificates(s: Session, *where: Any) -> int:
        return int(s.scalar(select(func.count()).select_from(Certificate).where(*where)) or 0)

    def end_job(self, user: str, job_id: str, now: datetime, actor: str) -> int:
        """Revoke every certificate of a finished job: its live sessions end at the next check.

        Every one, expired or not, so the job stays ended: its certificates never log in
        again and the issuer signs no new one for it (see ``_job_ended``).
        """
        with self._tx() as s:
            return self._end_job(s, self._user(s, user), job_id, now, actor, {})

    def _end_job(self, s: Session, u: User, job_id: str, now: datetime, actor: str, detail: dict[str, Any]) -> int:
        live = list(s.scalars(select(Certificate).where(
            Certificate.user_id == u.id, Certificate.job_id == job_id, Certificate.revoked_at.is_(None)
        )))  # fmt: skip
        for c in live:
            c.revoked_at = now
        self._append(s, [AuditEvent(actor=actor, action="job.end", outcome="ok", subject=job_id,
                                    detail={"revoked_serials": [c.serial for c in live], **detail})], now)  # fmt: skip
        return len(live)

    def end_slurm_job(
        self, node: NodeFact, slurm_job_id: str, now: datetime, detail: Mapping[str, Any]
    ) -> list[dict[str, Any]]:
        """A node's epilog: end every job placed from the node's addresses as this Slurm job (policy.nodes)."""
        with self._tx() as s:
            rows = s.scalars(select(JobPlacement).where(JobPlacement.slurm_job_id == slurm_job_id))
            placements = [Placement(user=p.user.name, job_id=p.job_id, slurm_job_id=p.slurm_job_id,
                                    address=p.address) for p in rows]  # fmt: skip
            ended = []
            for user, job_id in jobs_to_end(node, slurm_job_id, placements):
                extra = {"slurm_job_id": slurm_job_id, **detail}
                revoked = self._end_job(s, self._user(s, user), job_id, now, f"node:{node.name}", extra)
                ended.append({"user": user, "job_id": job_id, "revoked": revoked})
            return ended

    # -- compute nodes ----------------------------------------------------------------

    def add_node(
        self, name: str, public_key: tuple[str, str], networks: Sequence[str], now: datetime, actor: str
    ) -> NodeFact:
        """Enrol a compute node's key ``(openssh line, fingerprint)``, bound to ``networks``."""
        check_name("node", name)
        nets = check_networks(networks)
        line, fpr = public_key
        with self._tx() as s:
            if s.scalar(select(Node).where(Node.name == name)):
                raise AlreadyExists(f"node {name!r} already exists")
            self._key_free(s, fpr)
            s.add(Node(name=name, public_key=line, fingerprint=fpr, networks=json.dumps(list(nets)), created_at=now))
            self._append(s, [AuditEvent(actor=actor, action="node.add", outcome="ok", subject=name,
                                        detail={"key": fpr, "networks": list(nets)})], now)  # fmt: skip
            return NodeFact(name=name, fingerprint=fpr, networks=nets)

    @staticmethod
    def _key_free(s: Session, fpr: str) -> None:
        """A key is one principal's: a user's enrolment key or a node's, never both, never twice."""
        owner = s.scalar(select(EnrolmentKey).where(EnrolmentKey.fingerprint == fpr))
        if owner is not None:
            raise AlreadyExists(f"key {fpr} is already enrolled for user {owner.user.name!r}")
        node = s.scalar(select(Node).where(Node.fingerprint == fpr))
        if node is not None:
            raise AlreadyExists(f"key {fpr} is already enrolled for node {node.name!r}")

    def remove_node(self, name: str, now: datetime, actor: str) -> None:
        with self._tx() as s:
            node = s.scalar(select(Node).where(Node.name == name))
            if node is None:
                raise NotFound(f"no node {name!r}")
            s.delete(node)
            self._append(s, [AuditEvent(actor=actor, action="node.remove", outcome="ok", subject=name)], now)

    def nodes(self) -> list[NodeFact]:
        with self._tx(write=False) as s:
            return [_node_fact(n) for n in s.scalars(select(Node).order_by(Node.name))]

    def node_for_key(self, fingerprint: str) -> NodeFact | None:
        with self._tx(write=False) as s:
            node = s.scalar(select(Node).where(Node.fingerprint == fingerprint))
            return None if node is None else _node_fact(node)

    def certificate(self, serial: int) -> CertificateFact | None:
        with self._tx(write=False) as s:
            c = s.get(Certificate, serial)
            return None if c is None else _cert_info(c)

    def certificates(self, user: str | None = None) -> list[CertificateFact]:
        with self._tx(write=False) as s:
            q = select(Certificate).order_by(Certificate.serial)
            if user is not None:
                q = q.where(Certificate.user_id == self._user(s, user).id)
            return [_cert_info(c) for c in s.scalars(q)]

    def job_certificates(self, user: str, job_id: str) -> int:
        """How many certificates one job of ``user`` was issued (more than one: it renewed)."""
        with self._tx(write=False) as s:
            where = (Certificate.user_id == self._user(s, user).id, Certificate.job_id == job_id)
            return self._count_certificates(s, *where)

    def session_facts(self, serials: Iterable[int], now: datetime) -> dict[int, SessionFacts]:
        """What policy needs to judge each certificate's session, read in one transaction.

        The enforcement loop's one query per tick, and each login's.  Renewals are the
        other certificates of the same user, job and key that have not expired by ``now``.
        """
        out: dict[int, SessionFacts] = {}
        with self._tx(write=False) as s:
            for serial in set(serials):
                c = s.get(Certificate, serial)
                if c is None:
                    out[serial] = SessionFacts(certificate=None)
                    continue
                groups, grants = self._grant_facts(s, c.user)
                renewals = s.scalars(
                    select(Certificate)
                    .where(
                        Certificate.user_id == c.user_id,
                        Certificate.job_id == c.job_id,
                        Certificate.key_fingerprint == c.key_fingerprint,
                        Certificate.serial != c.serial,
                        Certificate.valid_before > now,
                    )
                    .order_by(Certificate.valid_before.desc())
                    .limit(8)
                )
                out[serial] = SessionFacts(
                    certificate=_cert_info(c),
                    enabled=c.user.enabled,
                    job_ended=self._job_ended(s, c.user_id, c.job_id),
                    groups=groups,
                    grants=grants,
                    renewals=tuple(_cert_info(r) for r in renewals),
                )
        return out

    # -- audit ------------------------------------------------------------------------

    def audit(self, events: Sequence[AuditEvent], now: datetime) -> None:
        """Append events to the chain, serialised against every other writer.

        On a plain connection, not an ORM session: the data plane commits a small
        batch per decision it waits on, and the session's bookkeeping cost more than
        the rows.
        """
        if not events:
            return
        if not self._schema_ok:
            self.check_schema()
        try:
            with self._writer.begin() as conn:
                self._append(conn, events, now)
        except OperationalError as exc:
            raise MedbridgeError(f"control database error: {exc.orig}") from exc

    @staticmethod
    def _append(s: Session | Connection, events: Sequence[AuditEvent], now: datetime) -> None:
        """Append inside the caller's transaction, so a decision and its record commit together.

        One executemany of plain rows through the table, not the ORM: the data plane
        writes an entry per file opened, and ORM bulk inserts cost more than the hashing.
        """
        last = _chain_head(s)
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
            job, dataset = index_keys(action, subject, detail)
            rows.append({f.name: getattr(rec, f.name) for f in dataclasses.fields(rec)}
                        | {"hash": prev, "job": job, "dataset": dataset})  # fmt: skip
        s.execute(_APPEND, rows)

    def audit_records(self, **filters: Unpack[AuditFilters]) -> list[Record]:
        """Entries in chain order; each filter is answered by an index (:func:`audit_query`)."""
        with self._tx(write=False) as s:
            rows = list(s.scalars(audit_query(**filters)))
        return [_record(r) for r in reversed(rows)]

    def audit_entries(self, *, after: int = 0, until: int | None = None, batch: int = 5000) -> Iterator[Record]:
        """The chain in order from entry ``after + 1``, read in pages: memory stays flat however long it is."""
        while True:
            with self._tx(write=False) as s:
                q = select(AuditEntry).where(AuditEntry.seq > after)
                if until is not None:
                    q = q.where(AuditEntry.seq <= until)
                page = [_record(r) for r in s.scalars(q.order_by(AuditEntry.seq).limit(batch))]
            yield from page
            if len(page) < batch:
                return
            after = page[-1].seq

    def audit_head(self) -> tuple[int, str] | None:
        """The last entry's ``(seq, hash)``, None for an empty chain."""
        with self._tx(write=False) as s:
            row = s.execute(_HEAD).first()
            return None if row is None else (row[0], row[1])

    def verify_audit(self) -> int:
        """Check the whole chain; return the number of entries, or raise IntegrityError."""
        return self.verify_chain().entries

    def verify_chain(
        self,
        *,
        start: Anchor | None = None,
        anchors: Sequence[Anchor] = (),
        check: SignatureCheck | None = None,
        batch: int = 5000,
    ) -> ChainWalk:
        """Check the chain as far as it goes now; raise IntegrityError at the first entry that does not verify.

        From the genesis, or from the trusted checkpoint ``start`` (work and memory
        grow with the entries after it, not with the chain).  Every signed checkpoint
        met is checked with ``check``; every anchor must be met (a cut end fails).
        """
        head = self.audit_head()
        walk = ChainWalk(start, check=check, anchors=anchors)
        try:
            if start is not None:
                with self._tx(write=False) as s:
                    found = s.scalar(select(AuditEntry.hash).where(AuditEntry.seq == start.seq))
                if found is None:
                    raise ChainBroken(start.seq, "missing: the trusted checkpoint's entry is gone (the end was cut)")
                if found != start.hash:
                    raise ChainBroken(start.seq, "differs from the trusted checkpoint: the chain was rewritten")
            for r in self.audit_entries(after=walk.last, until=head[0] if head else 0, batch=batch):
                walk.feed(r)
            walk.finish()
        except ChainBroken as exc:
            raise IntegrityError(str(exc)) from exc
        return walk

    def checkpoint(self, sign: Callable[[int, str], Anchor], now: datetime) -> Anchor:
        """Append a signed checkpoint of the head (``sign(seq, hash)``) in one transaction; return it."""
        with self._tx() as s:
            last = _chain_head(s)
            if last is None:
                raise IntegrityError("the audit chain is empty: nothing to checkpoint")
            anchor = sign(last[0], last[1])
            detail = {"seq": anchor.seq, "hash": anchor.hash, "key": anchor.key, "signature": anchor.signature}
            self._append(s, [AuditEvent(actor="platform", action=CHECKPOINT, outcome="ok", detail=detail)], now)
            return dataclasses.replace(anchor, at=now.astimezone(UTC).isoformat())

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

    @staticmethod
    def _dataset(s: Session, name: str, lock: bool = False) -> Dataset:
        q = select(Dataset).where(Dataset.name == name, Dataset.version > 0)
        row = s.scalar(q.with_for_update() if lock else q)
        if row is None:
            raise NotFound(f"no such dataset {name!r}")
        return row

    @staticmethod
    def _grant_facts(s: Session, u: User) -> tuple[tuple[str, ...], tuple[GrantFact, ...]]:
        """The user's groups and every grant that names the user or one of them."""
        group_ids = [g.id for g in u.groups]
        q = select(Grant).where((Grant.user_id == u.id) | (Grant.group_id.in_(group_ids)))
        facts = tuple(
            GrantFact(
                dataset=g.dataset.name,
                user=g.user.name if g.user else None,
                group=g.group.name if g.group else None,
                expires_at=g.expires_at,
            )
            for g in s.scalars(q)
        )
        return tuple(g.name for g in u.groups), facts

    @classmethod
    def _rights(cls, s: Session, u: User, now: datetime) -> dict[str, datetime | None]:
        groups, facts = cls._grant_facts(s, u)
        return readable(u.name, groups, facts, now)

    @staticmethod
    def _job_ended(s: Session, user_id: int, job_id: str) -> bool:
        """Was the job ended?  ``end_job`` revokes every certificate of it, and nothing else revokes."""
        return (
            s.scalar(
                select(Certificate.serial)
                .where(
                    Certificate.user_id == user_id, Certificate.job_id == job_id, Certificate.revoked_at.is_not(None)
                )
                .limit(1)
            )
            is not None
        )


def _node_fact(n: Node) -> NodeFact:
    return NodeFact(name=n.name, fingerprint=n.fingerprint, networks=tuple(json.loads(n.networks)))


class AuditFilters(TypedDict, total=False):
    """What ``audit`` queries may filter on: ``user`` is the actor; ``last`` the newest N."""

    last: int | None
    action: str | None
    user: str | None
    job: str | None
    dataset: str | None
    since: datetime | None
    until: datetime | None


def _chain_head(s: Session | Connection) -> Row[int, str] | None:
    """The chain's last ``(seq, hash)``, locked against every other writer until the transaction ends.

    One total order across every process and host: on PostgreSQL a transaction-scoped
    advisory lock (taken again by the same transaction, it is held once); SQLite's
    writers hold the database from BEGIN IMMEDIATE.
    """
    dialect = s.dialect if isinstance(s, Connection) else s.get_bind().dialect
    if dialect.name == "postgresql":
        s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": AUDIT_LOCK})
    return s.execute(_HEAD).first()


def audit_query(**filters: Unpack[AuditFilters]) -> Select[AuditEntry]:
    """The newest entries first (``last`` of them) matching every filter given; ``user`` is the actor.

    Filtered, newest by time (the chain's order but for entries of one moment from several processes):
    each filter's index is (column, time, entry), so a filter with a time window reads only what it returns.
    """
    action, user, job, dataset = (filters.get(k) for k in ("action", "user", "job", "dataset"))
    since, until, last = filters.get("since"), filters.get("until"), filters.get("last")
    q = select(AuditEntry)
    for column, value in ((AuditEntry.action, action), (AuditEntry.actor, user), (AuditEntry.job, job),
                          (AuditEntry.dataset, dataset)):  # fmt: skip
        if value:
            q = q.where(column == value)
    if since is not None:
        q = q.where(AuditEntry.at >= since)
    if until is not None:
        q = q.where(AuditEntry.at < until)
    if since is not None or until is not None or action or user or job or dataset:
        q = q.order_by(AuditEntry.at.desc(), AuditEntry.seq.desc())  # the filter's index serves filter and order
    else:
        q = q.order_by(AuditEntry.seq.desc())
    return q.limit(last) if last else q


def _cert_info(c: Certificate) -> CertificateFact:
    return CertificateFact(
        serial=c.serial,
        user=c.user.name,
        job_id=c.job_id,
        key_id=c.key_id,
        valid_after=c.valid_after,
        valid_before=c.valid_before,
        revoked=c.revoked_at is not None,
        datasets=None if c.datasets is None else tuple(json.loads(c.datasets)),
    )


def _dataset_info(d: Dataset) -> DatasetInfo:
    return DatasetInfo(d.name, d.provider, d.storage_path, d.file_count, d.byte_count, d.created_at, d.version, d.id)


def _row(dataset_id: int, f: ManifestEntry) -> dict[str, Any]:
    return {"dataset_id": dataset_id, "path": f.path, "size": f.size, "sha256": f.sha256, "media_type": f.media_type,
            "mtime_ns": f.mtime_ns}  # fmt: skip


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
