"""`python -m bench`: every benchmark in turn, in bounded time; JSON into one folder.

`python -m bench [--quick] [--out bench/results] [--only serving,transfer]`
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

BENCHMARKS = (
    "serving",
    "serving_training",
    "aggregation",
    "transfer",
    "compression",
    "quality",
    "round_overhead",
    "scale",
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--quick", action="store_true", help="tiny configurations (smoke test)")
    p.add_argument("--only", default="", help="comma-separated subset of " + ",".join(BENCHMARKS))
    args = p.parse_args(argv)
    chosen = [b for b in args.only.split(",") if b] or list(BENCHMARKS)
    unknown = sorted(set(chosen) - set(BENCHMARKS))
    if unknown:
        p.error(f"unknown benchmarks {unknown}")
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out} is a file; name a folder for the results")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        p.error(f"--out {args.out}: cannot make the folder: {exc}")
    summary: dict[str, object] = {}
    failed = []
    markets = tempfile.TemporaryDirectory(prefix="fedjewel-bench-markets-")
    os.environ["FEDJEWEL_BENCH_MARKETS"] = markets.name  # generated once, shared
    started = time.monotonic()
    for name in chosen:
        start = time.monotonic()
        print(f"\n=== bench.{name} ===", flush=True)
        out = args.out / f"{name}.json"
        bench_argv = ["--json", str(out)] + (["--quick"] if args.quick else [])
        try:
            importlib.import_module(f"bench.{name}").main(bench_argv)
            summary[name] = json.loads(out.read_text())
        except Exception:
            traceback.print_exc()
            failed.append(name)
            summary[name] = {"error": traceback.format_exc(limit=3)}
        print(f"--- {name}: {time.monotonic() - start:.0f} s", flush=True)
    markets.cleanup()
    summary["total_seconds"] = round(time.monotonic() - started, 1)
    print(f"\ntotal: {summary['total_seconds']:.0f} s", flush=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nwrote {args.out / 'summary.json'}" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
