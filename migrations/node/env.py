"""Alembic environment for the regional node's private event store.

Its version table is `alembic_version_node`, apart from the coordinator's.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import engine_from_config, pool

from regional_node.models import Base
from regional_node.settings import NodeSettings

config = context.config
url = config.get_main_option("sqlalchemy.url") or NodeSettings(allow_anonymous=True).database_url
target_metadata = Base.metadata


def run_migrations_offline() -> None:
    context.configure(
        url=url,
        target_metadata=target_metadata,
        render_as_batch=True,
        version_table="alembic_version_node",
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = engine_from_config(
        {"sqlalchemy.url": url}, prefix="sqlalchemy.", poolclass=pool.NullPool
    )
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=True,
            version_table="alembic_version_node",
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
