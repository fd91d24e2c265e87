"""`python -m regional_node --host H --port P` or `python -m regional_node import-events FILE`."""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from regional_node.settings import NodeSettings
from shared.logging_setup import configure_logging


def _settings() -> NodeSettings:
    try:
        return NodeSettings()
    except ValidationError as exc:
        msgs = "; ".join(str(e["msg"]) for e in exc.errors())
        sys.exit(f"regional node: invalid configuration: {msgs}")


def import_events(path: str, settings: NodeSettings) -> int:
    from regional_node.store import EventStore
    from shared.data import DataFormatError, event_record_to_event_in, read_events_csv

    try:
        records = read_events_csv(path)
    except DataFormatError as exc:
        print(f"rejected {path}: nothing imported\n{exc}", file=sys.stderr)
        return 2
    store = EventStore(settings.database_url)
    store.migrate()
    wrong_region = [r for r in records if r.region and r.region != settings.region]
    if wrong_region:
        print(
            f"note: skipping {len(wrong_region)} rows of other regions "
            f"(this node is {settings.region!r})",
            file=sys.stderr,
        )
    mine = [
        event_record_to_event_in(r) for r in records if not r.region or r.region == settings.region
    ]
    inserted = store.add_events(mine)
    store.dispose()
    print(f"imported {inserted} new events ({len(mine) - inserted} already present) from {path}")
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m regional_node",
        description="Run a fedjewel regional node (configuration: NODE_* variables).",
    )
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the HTTP service (default)")
    for p in (parser, serve):
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=8100)
    imp = sub.add_parser("import-events", help="import an events.csv into this node's store")
    imp.add_argument("file")
    args = parser.parse_args(argv)
    settings = _settings()
    configure_logging(json_logs=settings.log_json)
    if args.command == "import-events":
        sys.exit(import_events(args.file, settings))
    import uvicorn

    from regional_node.app import create_app

    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
