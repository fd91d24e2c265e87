"""Logging for both services: plain text by default, JSON lines as an option.

Records may carry `round_id` / `node_id` (pass them in `extra=`); both formats show them.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

_CONTEXT_FIELDS = ("round_id", "node_id", "region", "model_version")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in _CONTEXT_FIELDS:
            if hasattr(record, name):
                data[name] = getattr(record, name)
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        ctx = " ".join(f"{n}={getattr(record, n)}" for n in _CONTEXT_FIELDS if hasattr(record, n))
        return f"{base} [{ctx}]" if ctx else base


def configure_logging(*, json_logs: bool, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if json_logs
        else TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger("fedjewel")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
