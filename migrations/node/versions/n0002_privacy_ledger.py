"""privacy ledger: one row per differentially private release

Revision ID: n0002_privacy
Revises: n0001
Create Date: 2026-11-25 22:05:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "n0002_privacy"
down_revision: str | None = "n0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "privacy_ledger",
        sa.Column("round_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("noise_multiplier", sa.Float(), nullable=False),
        sa.Column("sampling_rate", sa.Float(), nullable=False),
        sa.Column("released_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("round_id", name=op.f("pk_privacy_ledger")),
    )


def downgrade() -> None:
    op.drop_table("privacy_ledger")
