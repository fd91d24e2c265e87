"""model weights stored in slices (model_version_chunks) instead of one bytea per version

Revision ID: 0003_model_version_chunks
Revises: 0002_privacy
Create Date: 2026-11-26 01:00:00

Writing a new version as one bound parameter made the driver hold a copy of the
whole serialized model next to the coordinator's own (PostgreSQL: libpq's
copy of the INSERT parameter). Slices of at most 4 MiB are written one at a
time instead. Existing versions move over as one slice each (plain SQL, so
`alembic upgrade --sql` works too); readers take slices of any size.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_model_version_chunks"
down_revision: str | None = "0002_privacy"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "model_version_chunks",
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("seq", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["version"],
            ["model_versions.version"],
            name=op.f("fk_model_version_chunks_version_model_versions"),
        ),
        sa.PrimaryKeyConstraint("version", "seq", name=op.f("pk_model_version_chunks")),
    )
    op.execute(
        "INSERT INTO model_version_chunks (version, seq, data) "
        "SELECT version, 0, weights FROM model_versions WHERE weights IS NOT NULL"
    )
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.drop_column("weights")


def downgrade() -> None:
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("weights", sa.LargeBinary(), nullable=True))
    # Joined in Python (SQLite has no aggregate that concatenates blobs).
    bind = op.get_bind()
    chunks = sa.table(
        "model_version_chunks",
        sa.column("version", sa.Integer()),
        sa.column("seq", sa.Integer()),
        sa.column("data", sa.LargeBinary()),
    )
    versions = sa.table(
        "model_versions",
        sa.column("version", sa.Integer()),
        sa.column("weights", sa.LargeBinary()),
    )
    numbers = bind.execute(sa.select(chunks.c.version).distinct()).scalars().all()
    for number in numbers:
        parts = bind.execute(
            sa.select(chunks.c.data).where(chunks.c.version == number).order_by(chunks.c.seq)
        ).scalars()
        blob = b"".join(bytes(p) for p in parts)
        bind.execute(
            sa.update(versions).where(versions.c.version == number).values(weights=blob)
        )
    op.drop_table("model_version_chunks")
