"""The Alembic migrations build exactly the tables the ORM models describe, on both
databases, and go down to nothing and up again."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import MetaData, create_engine

from coordinator.models import Base as CoordinatorBase
from regional_node.models import Base as NodeBase
from shared.db import alembic_config, upgrade_to_head


@pytest.mark.parametrize(
    ("service", "metadata"),
    [("coordinator", CoordinatorBase.metadata), ("node", NodeBase.metadata)],
)
def test_migrations_match_the_models(db_url: str, service: str, metadata: MetaData) -> None:
    upgrade_to_head(service, db_url)
    command.downgrade(alembic_config(service, db_url), "base")
    upgrade_to_head(service, db_url)
    engine = create_engine(db_url)
    version_table = "alembic_version" if service == "coordinator" else "alembic_version_node"
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"version_table": version_table})
            diff = compare_metadata(context, metadata)
    finally:
        engine.dispose()
    assert diff == []
