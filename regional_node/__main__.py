"""`python -m regional_node --host H --port P` or `python -m regional_node import-events FILE`."""

from __future__ import annotations

import argparse
import sys

from regional_node.settings import NodeSettings
from shared.errors import database_or_exit, port_number, settings_or_exit
from shared.logging_setup import configure_logging


def import_events(path: str, settings: NodeSettings) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from regional_node.store import EventStore
    from shared.data import DataFormatError, event_record_to_event_in, read_events_csv

    try:
        records = read_events_csv(path, refuse_future=True)
    except DataFormatError as exc:
        print(f"rejected {path}: nothing imported\n{exc}", file=sys.stderr)
        return 2
    except (OSError, UnicodeDecodeError) as exc:
        print(f"cannot read {path}: {exc}", file=sys.stderr)
        return 2
    region = settings.region.casefold()
    mine = [
        event_record_to_event_in(r)
        for r in records
        if not r.region or r.region.casefold() == region  # "eu" is this node's "EU" too
    ]
    if records and not mine:
        regions = sorted({r.region for r in records if r.region})
        print(
            f"rejected {path}: none of its {len(records)} rows is of this node's region "
            f"{settings.region!r} (the file has {', '.join(regions)}); set NODE_REGION",
            file=sys.stderr,
        )
        return 2
    if len(mine) < len(records):
        print(
            f"note: skipping {len(records) - len(mine)} rows of other regions "
            f"(this node is {settings.region!r})",
            file=sys.stderr,
        )
    print(f"storing {len(mine)} events of {settings.region!r} ...", file=sys.stderr, flush=True)
    try:
        store = EventStore(settings.database_url)
        store.migrate()
        inserted = store.add_events(mine)
        store.dispose()
    except SQLAlchemyError as exc:
        print(f"cannot store events in {settings.database_url}: {exc}", file=sys.stderr)
        return 1
    print(f"imported {inserted} new events ({len(mine) - inserted} already present) from {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m regional_node",
        description="Run a fedjewel regional node (configuration: NODE_* variables).",
    )
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the HTTP service (default)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=port_number, default=8100)
    # Given after `serve` too; SUPPRESS keeps a value given before `serve` when not.
    serve.add_argument("--host", default=argparse.SUPPRESS)
    serve.add_argument("--port", type=port_number, default=argparse.SUPPRESS)
    imp = sub.add_parser("import-events", help="import an events.csv into this node's store")
    imp.add_argument("file")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    settings = settings_or_exit(NodeSettings, "regional node")
    configure_logging(json_logs=settings.log_json)
    if args.command == "import-events":
        sys.exit(import_events(args.file, settings))
    database_or_exit(settings.database_url, "regional node")
    import uvicorn

    from regional_node.app import create_app

    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
