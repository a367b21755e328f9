"""The catalogue: dataset versions and counters, writer claims, staged changes, a SHA-256 index;
the issuer's index on certificates (user, issue time).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Each step only where it is missing: homes made by create_all between releases already have some."""
    bind = op.get_bind()
    postgres = bind.dialect.name == "postgresql"
    have = sa.inspect(bind)
    columns = {c["name"] for c in have.get_columns("datasets")}
    if "version" not in columns:
        with op.batch_alter_table("datasets") as t:
            t.add_column(sa.Column("version", sa.BigInteger, nullable=False, server_default="1"))
            t.add_column(sa.Column("file_count", sa.BigInteger, nullable=False, server_default="0"))
            t.add_column(sa.Column("byte_count", sa.BigInteger, nullable=False, server_default="0"))
            t.add_column(sa.Column("writer", sa.String(256), nullable=True))
        op.execute(
            "UPDATE datasets SET"
            " file_count = (SELECT count(*) FROM dataset_files f WHERE f.dataset_id = datasets.id),"
            " byte_count = (SELECT coalesce(sum(f.size), 0) FROM dataset_files f WHERE f.dataset_id = datasets.id)"
        )
    if "mtime_ns" not in {c["name"] for c in have.get_columns("dataset_files")}:
        with op.batch_alter_table("dataset_files") as t:
            t.add_column(sa.Column("mtime_ns", sa.BigInteger, nullable=True))
    if postgres:  # code-point order, as Python and SQLite sort: manifests are ranges of it
        op.execute('ALTER TABLE dataset_files ALTER COLUMN path TYPE text COLLATE "C"')
    if "ix_dataset_files_sha256" not in {i["name"] for i in have.get_indexes("dataset_files")}:
        op.create_index("ix_dataset_files_sha256", "dataset_files", ["sha256"])
    if "ix_certificates_user_issued" not in {i["name"] for i in have.get_indexes("certificates")}:
        op.create_index("ix_certificates_user_issued", "certificates", ["user_id", "issued_at"])
    if not have.has_table("dataset_changes"):
        op.create_table(
            "dataset_changes",
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("dataset_id", sa.Integer, sa.ForeignKey("datasets.id", ondelete="CASCADE"), nullable=False),
            sa.Column("path", sa.Text(collation="C") if postgres else sa.Text, nullable=False),
            sa.Column("size", sa.BigInteger, nullable=False),
            sa.Column("sha256", sa.String(64), nullable=False),
            sa.Column("media_type", sa.String(64), nullable=False),
            sa.Column("mtime_ns", sa.BigInteger, nullable=True),
            sa.UniqueConstraint("dataset_id", "path"),
        )


def downgrade() -> None:
    op.drop_table("dataset_changes")
    op.drop_index("ix_certificates_user_issued", "certificates")
    op.drop_index("ix_dataset_files_sha256", "dataset_files")
    with op.batch_alter_table("dataset_files") as t:
        t.drop_column("mtime_ns")
    with op.batch_alter_table("datasets") as t:
        for column in ("writer", "byte_count", "file_count", "version"):
            t.drop_column(column)
