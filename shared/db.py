"""Engine and migration helpers used by both services (each has its own database)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, MetaData, create_engine, event, pool, text
from sqlalchemy.orm import Session, sessionmaker

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

READ_ONLY_OPTION = "fedjewel_read_only"

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def make_engine(url: str, **kwargs: Any) -> Engine:
    """One engine per process. SQLite gets WAL, a busy timeout and `BEGIN IMMEDIATE`.

    `BEGIN IMMEDIATE` takes the write lock when a transaction starts, so two
    writers queue instead of failing mid-transaction with "database is locked".
    """
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"timeout": 60, "check_same_thread": False}, **kwargs
        )

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            # Readers (`read_only(engine)`) open no transaction and take no write lock: each
            # SELECT is its own snapshot in WAL mode, and never waits for or blocks writers.
            if not conn.get_execution_options().get(READ_ONLY_OPTION, False):
                conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True, **kwargs)


def read_only(engine: Engine) -> Engine:
    """The same pool, for reads only (one SELECT per snapshot: no BEGIN on SQLite)."""
    return engine.execution_options(**{READ_ONLY_OPTION: True})


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(service: str, url: str) -> Config:
    """Alembic config for `coordinator` or `node` (separate scripts and version tables)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR / service))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade_to_head(service: str, url: str) -> None:
    command.upgrade(alembic_config(service, url), "head")


def run_alembic_env(
    context: Any, metadata: MetaData, url: str, version_table: str = "alembic_version"
) -> None:
    """The body of both services' `env.py`: offline or online, batch mode for SQLite."""
    opts: dict[str, Any] = {
        "target_metadata": metadata,
        "render_as_batch": True,
        "version_table": version_table,
    }
    if context.is_offline_mode():
        context.configure(url=url, **opts)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            context.configure(connection=connection, **opts)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


def database_ready(engine: Engine) -> None:
    """Raise `ServiceUnavailable` unless the database answers a trivial query."""
    from shared.errors import ServiceUnavailable

    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        raise ServiceUnavailable(f"database unreachable: {type(exc).__name__}") from exc
