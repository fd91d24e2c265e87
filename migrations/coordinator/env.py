"""Alembic environment for the coordinator's schema (version table `alembic_version`)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import engine_from_config, pool

from coordinator.models import Base
from coordinator.settings import CoordinatorSettings

config = context.config
url = config.get_main_option("sqlalchemy.url") or CoordinatorSettings().database_url
target_metadata = Base.metadata


def run_migrations_offline() -> None:
    context.configure(url=url, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = engine_from_config(
        {"sqlalchemy.url": url}, prefix="sqlalchemy.", poolclass=pool.NullPool
    )
    with engine.connect() as connection:
        context.configure(
            connection=connection, target_metadata=target_metadata, render_as_batch=True
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
