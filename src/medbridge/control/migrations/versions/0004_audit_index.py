"""The audit's indexed queries: the job and dataset each entry is about, and indexes by actor, action, job,
dataset and time.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from medbridge.control.audit import index_keys

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

INDEXES = {
    "ix_audit_actor_at": ["actor", "at", "seq"],
    "ix_audit_action_at": ["action", "at", "seq"],
    "ix_audit_job_at": ["job", "at", "seq"],
    "ix_audit_dataset_at": ["dataset", "at", "seq"],
    "ix_audit_at_seq": ["at", "seq"],
}
BATCH = 5000


def upgrade() -> None:
    """Each step only where it is missing; entries already there get their job and dataset from themselves."""
    bind = op.get_bind()
    have = sa.inspect(bind)
    if "job" not in {c["name"] for c in have.get_columns("audit")}:
        with op.batch_alter_table("audit") as t:
            t.add_column(sa.Column("job", sa.String(64), nullable=True))
            t.add_column(sa.Column("dataset", sa.String(64), nullable=True))
    audit = sa.table("audit", sa.column("seq"), sa.column("action"), sa.column("subject"), sa.column("detail"),
                     sa.column("job"), sa.column("dataset"))  # fmt: skip
    after = 0
    while True:  # in pages: memory stays flat however long the chain
        rows = bind.execute(
            sa.select(audit.c.seq, audit.c.action, audit.c.subject, audit.c.detail)
            .where(audit.c.seq > after)
            .order_by(audit.c.seq)
            .limit(BATCH)
        ).all()
        if not rows:
            break
        updates = []
        for seq, action, subject, detail in rows:
            job, dataset = index_keys(action, subject, detail)
            updates.append({"key": seq, "job": job, "dataset": dataset})
        bind.execute(
            audit.update()
            .where(audit.c.seq == sa.bindparam("key"))
            .values(job=sa.bindparam("job"), dataset=sa.bindparam("dataset")),
            updates,
        )
        after = rows[-1][0]
    existing = {i["name"] for i in have.get_indexes("audit")}
    for name, columns in INDEXES.items():
        if name not in existing:
            op.create_index(name, "audit", columns)


def downgrade() -> None:
    for name in INDEXES:
        op.drop_index(name, "audit")
    with op.batch_alter_table("audit") as t:
        t.drop_column("dataset")
        t.drop_column("job")
