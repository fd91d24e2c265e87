"""Alembic environment for the coordinator's schema (version table `alembic_version`)."""

from __future__ import annotations

from alembic import context

from coordinator.models import Base
from coordinator.settings import CoordinatorSettings
from shared.db import run_alembic_env

url = context.config.get_main_option("sqlalchemy.url") or CoordinatorSettings().database_url
run_alembic_env(context, Base.metadata, url)
