"""server optimizer state (FedAdam's moments) per model version

Revision ID: 0004_server_optimizer
Revises: 0003_model_version_chunks
Create Date: 2026-11-26 10:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_server_optimizer"
down_revision: str | None = "0003_model_version_chunks"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "server_optimizer_states",
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("optimizer", sa.String(length=16), nullable=False),
        sa.Column("state", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["version"],
            ["model_versions.version"],
            name=op.f("fk_server_optimizer_states_version_model_versions"),
        ),
        sa.PrimaryKeyConstraint("version", name=op.f("pk_server_optimizer_states")),
    )


def downgrade() -> None:
    op.drop_table("server_optimizer_states")
