"""privacy ledger: how many noisy steps one release made (DP-SGD makes several a round)

Revision ID: n0003_ledger_steps
Revises: n0002_privacy
Create Date: 2026-11-26 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "n0003_ledger_steps"
down_revision: str | None = "n0002_privacy"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Every release recorded before this column was one Gaussian mechanism (DP-FedAvg).
    with op.batch_alter_table("privacy_ledger") as batch:
        batch.add_column(sa.Column("steps", sa.Integer(), nullable=False, server_default="1"))


def downgrade() -> None:
    with op.batch_alter_table("privacy_ledger") as batch:
        batch.drop_column("steps")
