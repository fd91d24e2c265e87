"""node secrets: random keys the node makes for itself (the insights noise key)

Revision ID: n0005_node_secrets
Revises: n0004_served_snapshot
Create Date: 2026-11-26 21:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "n0005_node_secrets"
down_revision: str | None = "n0004_served_snapshot"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "node_secrets",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_node_secrets")),
    )


def downgrade() -> None:
    op.drop_table("node_secrets")
