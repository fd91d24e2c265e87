"""`python -m shared.healthcheck URL`: exit 0 when URL answers 200 (container healthchecks).

Slim images have no curl; the services' own interpreter is always there.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request


def check(url: str, timeout: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status) == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m shared.healthcheck URL", file=sys.stderr)
        return 2
    ok = check(args[0])
    if not ok:
        print(f"unhealthy: {args[0]}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
