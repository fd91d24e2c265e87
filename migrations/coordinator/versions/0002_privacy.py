"""privacy: secure aggregation state and regional insights

Revision ID: 0002_privacy
Revises: 0001
Create Date: 2026-11-25 22:05:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_privacy"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "secagg_rounds",
        sa.Column("round_id", sa.Integer(), nullable=False),
        sa.Column("cohort", sa.JSON(), nullable=True),
        sa.Column("sealed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("dropped", sa.JSON(), nullable=True),
        sa.Column("recovery_deadline", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["round_id"], ["rounds.id"], name=op.f("fk_secagg_rounds_round_id_rounds")
        ),
        sa.PrimaryKeyConstraint("round_id", name=op.f("pk_secagg_rounds")),
    )
    op.create_table(
        "secagg_keys",
        sa.Column("round_id", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.String(length=128), nullable=False),
        sa.Column("public_key", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["node_id"], ["nodes.node_id"], name=op.f("fk_secagg_keys_node_id_nodes")
        ),
        sa.ForeignKeyConstraint(
            ["round_id"], ["rounds.id"], name=op.f("fk_secagg_keys_round_id_rounds")
        ),
        sa.PrimaryKeyConstraint("round_id", "node_id", name=op.f("pk_secagg_keys")),
    )
    op.create_table(
        "secagg_reveals",
        sa.Column("round_id", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.String(length=128), nullable=False),
        sa.Column("dropped_node_id", sa.String(length=128), nullable=False),
        sa.Column("seed_hex", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["node_id"], ["nodes.node_id"], name=op.f("fk_secagg_reveals_node_id_nodes")
        ),
        sa.ForeignKeyConstraint(
            ["round_id"], ["rounds.id"], name=op.f("fk_secagg_reveals_round_id_rounds")
        ),
        sa.PrimaryKeyConstraint(
            "round_id", "node_id", "dropped_node_id", name=op.f("pk_secagg_reveals")
        ),
    )
    op.create_table(
        "region_insights",
        sa.Column("node_id", sa.String(length=128), nullable=False),
        sa.Column("region", sa.String(length=128), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("report", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["node_id"], ["nodes.node_id"], name=op.f("fk_region_insights_node_id_nodes")
        ),
        sa.PrimaryKeyConstraint("node_id", name=op.f("pk_region_insights")),
    )


def downgrade() -> None:
    op.drop_table("region_insights")
    op.drop_table("secagg_reveals")
    op.drop_table("secagg_keys")
    op.drop_table("secagg_rounds")
