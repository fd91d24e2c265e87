"""Alembic environment for the regional node's private event store.

Its version table is `alembic_version_node`, apart from the coordinator's.
"""

from __future__ import annotations

from alembic import context

from regional_node.models import Base
from regional_node.settings import NodeSettings
from shared.db import run_alembic_env

url = (
    context.config.get_main_option("sqlalchemy.url")
    or NodeSettings(allow_anonymous=True).database_url
)
run_alembic_env(context, Base.metadata, url, version_table="alembic_version_node")
