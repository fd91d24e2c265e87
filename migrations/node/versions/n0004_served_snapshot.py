"""served snapshot: the last served global version and catalog, for restarts without
the coordinator

Revision ID: n0004_served_snapshot
Revises: n0003_ledger_steps
Create Date: 2026-11-26 21:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "n0004_served_snapshot"
down_revision: str | None = "n0003_ledger_steps"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "served_snapshot",
        sa.Column("slot", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("config", sa.Text(), nullable=False),
        sa.Column("weights", sa.LargeBinary(), nullable=False),
        sa.Column("catalog", sa.LargeBinary(), nullable=False),
        sa.Column("catalog_etag", sa.String(length=256), nullable=True),
        sa.Column("saved_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("slot", name=op.f("pk_served_snapshot")),
    )


def downgrade() -> None:
    op.drop_table("served_snapshot")
