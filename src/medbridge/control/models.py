"""SQLAlchemy models of the control database (SQLite by default, any SQLAlchemy URL)."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps stored naive in UTC and always handed back timezone-aware."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the control store")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    pass


membership = Table(
    "membership",
    Base.metadata,
    Column("user_id", ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("group_id", ForeignKey("groups.id", ondelete="CASCADE"), primary_key=True),
)


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    keys: Mapped[list[EnrolmentKey]] = relationship(back_populates="user", cascade="all, delete-orphan")
    groups: Mapped[list[Group]] = relationship(secondary=membership, back_populates="members")


class EnrolmentKey(Base):
    """A user's long-lived public key: it can ask for job certificates, nothing else."""

    __tablename__ = "enrolment_keys"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    public_key: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(String(128), unique=True)
    user: Mapped[User] = relationship(back_populates="keys")


class Group(Base):
    """A set of users, such as a medical society whose members see members-only data."""

    __tablename__ = "groups"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    members: Mapped[list[User]] = relationship(secondary=membership, back_populates="groups")


#: Paths sort by code point everywhere (SQLite's BINARY; PostgreSQL's "C" collation), as Python sorts
#: them: manifests are ranges of that order, and a locale's order would differ between databases.
PATH = Text().with_variant(Text(collation="C"), "postgresql")


class Dataset(Base):
    """A dataset and its catalogue's counters, kept as files are recorded (never counted on a request)."""

    __tablename__ = "datasets"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    provider: Mapped[str] = mapped_column(String(128), default="")
    storage_path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    #: The catalogue version readers see; 0 while a first ``dataset add`` is still recording it.
    version: Mapped[int] = mapped_column(BigInteger, default=1, server_default="1")
    file_count: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    byte_count: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    #: Who is writing the next version (``host:pid``), so two writers never interleave.
    writer: Mapped[str | None] = mapped_column(String(256), nullable=True)


class DatasetFile(Base):
    """One manifest line: the dataset's file, its size and SHA-256."""

    __tablename__ = "dataset_files"
    __table_args__ = (
        UniqueConstraint("dataset_id", "path"),
        Index("ix_dataset_files_sha256", "sha256"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    path: Mapped[str] = mapped_column(PATH)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    media_type: Mapped[str] = mapped_column(String(64), default="application/octet-stream")
    #: The source file's modification time when recorded: an update rehashes only files whose size or time moved.
    mtime_ns: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class DatasetChange(Base):
    """A file an update will record: staged in batches, applied to the catalogue in one transaction."""

    __tablename__ = "dataset_changes"
    __table_args__ = (UniqueConstraint("dataset_id", "path"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    path: Mapped[str] = mapped_column(PATH)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    media_type: Mapped[str] = mapped_column(String(64), default="application/octet-stream")
    #: The source file's modification time when recorded: an update rehashes only files whose size or time moved.
    mtime_ns: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class Grant(Base):
    """Read access to a dataset for one user or one group, optionally until a time."""

    __tablename__ = "grants"
    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    group_id: Mapped[int | None] = mapped_column(ForeignKey("groups.id", ondelete="CASCADE"))
    right: Mapped[str] = mapped_column(String(16), default="read")
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    dataset: Mapped[Dataset] = relationship()
    user: Mapped[User | None] = relationship()
    group: Mapped[Group | None] = relationship()


class Certificate(Base):
    """A job certificate the issuer signed: who, which job, which key, how long."""

    __tablename__ = "certificates"
    #: The issuer counts a user's recent certificates and a job's live ones on every request.
    __table_args__ = (Index("ix_certificates_user_issued", "user_id", "issued_at"),)
    serial: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    job_id: Mapped[str] = mapped_column(String(64))
    key_id: Mapped[str] = mapped_column(String(256))
    key_fingerprint: Mapped[str] = mapped_column(String(128))
    datasets: Mapped[str | None] = mapped_column(Text, nullable=True)
    valid_after: Mapped[datetime] = mapped_column(UTCDateTime)
    valid_before: Mapped[datetime] = mapped_column(UTCDateTime)
    issued_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    user: Mapped[User] = relationship()


class Node(Base):
    """A compute node's credential: from its addresses it may end the jobs placed there, nothing else."""

    __tablename__ = "nodes"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    public_key: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(String(128), unique=True)
    #: JSON list of CIDRs the node logs in from (what the platform sees, through a trusted gateway).
    networks: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class JobPlacement(Base):
    """Where a job asked for a certificate from, and the Slurm job it said it was: what a node may end."""

    __tablename__ = "job_placements"
    __table_args__ = (
        UniqueConstraint("user_id", "job_id", "slurm_job_id", "address"),
        Index("ix_job_placements_slurm_job_id", "slurm_job_id"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    job_id: Mapped[str] = mapped_column(String(64))
    slurm_job_id: Mapped[str] = mapped_column(String(32))
    address: Mapped[str] = mapped_column(String(64))
    first_at: Mapped[datetime] = mapped_column(UTCDateTime)
    user: Mapped[User] = relationship()


class SerialCounter(Base):
    """Single row handing out certificate serials (works the same on any database)."""

    __tablename__ = "serial_counter"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    next_serial: Mapped[int] = mapped_column(BigInteger)


class AuditEntry(Base):
    """One hash-chained audit record; ``hash`` covers ``prev_hash`` and every field."""

    __tablename__ = "audit"
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    outcome: Mapped[str] = mapped_column(String(16))
    subject: Mapped[str] = mapped_column(Text)
    detail: Mapped[str] = mapped_column(Text)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))
    #: What the entry is about, for indexed queries (medbridge.control.audit.index_keys; outside the hash,
    #: checked by audit verify).
    job: Mapped[str | None] = mapped_column(String(64), nullable=True)
    dataset: Mapped[str | None] = mapped_column(String(64), nullable=True)

    __table_args__ = (
        Index("ix_audit_actor_at", "actor", "at", "seq"),
        Index("ix_audit_action_at", "action", "at", "seq"),
        Index("ix_audit_job_at", "job", "at", "seq"),
        Index("ix_audit_dataset_at", "dataset", "at", "seq"),
        Index("ix_audit_at_seq", "at", "seq"),
    )
