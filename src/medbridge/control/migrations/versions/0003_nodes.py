"""Compute nodes' credentials, and where each Slurm job asked for its certificates (what a node may end).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Each table only where it is missing: homes made by create_all between releases already have them."""
    have = sa.inspect(op.get_bind())
    if not have.has_table("nodes"):
        op.create_table(
            "nodes",
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("name", sa.String(64), nullable=False, unique=True),
            sa.Column("public_key", sa.Text, nullable=False),
            sa.Column("fingerprint", sa.String(128), nullable=False, unique=True),
            sa.Column("networks", sa.Text, nullable=False),
            sa.Column("created_at", sa.DateTime, nullable=False),
        )
    if not have.has_table("job_placements"):
        op.create_table(
            "job_placements",
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
            sa.Column("job_id", sa.String(64), nullable=False),
            sa.Column("slurm_job_id", sa.String(32), nullable=False),
            sa.Column("address", sa.String(64), nullable=False),
            sa.Column("first_at", sa.DateTime, nullable=False),
            sa.UniqueConstraint("user_id", "job_id", "slurm_job_id", "address"),
        )
        op.create_index("ix_job_placements_slurm_job_id", "job_placements", ["slurm_job_id"])


def downgrade() -> None:
    op.drop_index("ix_job_placements_slurm_job_id", "job_placements")
    op.drop_table("job_placements")
    op.drop_table("nodes")
