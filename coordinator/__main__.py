"""`python -m coordinator --host H --port P` (settings from COORDINATOR_* variables)."""

from __future__ import annotations

import argparse

import uvicorn

from coordinator.app import create_app
from coordinator.settings import CoordinatorSettings
from shared.errors import database_or_exit, port_number, settings_or_exit
from shared.logging_setup import configure_logging


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m coordinator",
        description="Run the fedjewel coordinator. Configuration: COORDINATOR_* variables "
        "(see README).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=port_number, default=8000)
    parser.add_argument(
        "--migrate-only",
        action="store_true",
        help="apply migrations (and COORDINATOR_BOOTSTRAP_NODES), then exit",
    )
    args = parser.parse_args(argv)
    settings = settings_or_exit(CoordinatorSettings, "coordinator")
    configure_logging(json_logs=settings.log_json)
    database_or_exit(settings.database_url, "coordinator")
    if args.migrate_only:
        from coordinator.db import Database
        from coordinator.nodes.bootstrap import bootstrap_from_settings

        db = Database(settings.database_url)
        db.migrate()
        bootstrap_from_settings(db, settings.bootstrap_nodes)
        db.dispose()
        return
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
