"""What every benchmark shares: arguments, the result table, JSON output, goals."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


@dataclass
class Figure:
    """One measured number, with the goal it answers to (if any)."""

    name: str
    value: float
    unit: str = ""
    goal: str | None = None  # e.g. ">= 0.5"
    note: str = ""

    @property
    def met(self) -> bool | None:
        if self.goal is None:
            return None
        op, _, bound = self.goal.partition(" ")
        limit = float(bound)
        return self.value >= limit if op == ">=" else self.value <= limit


@dataclass
class BenchResult:
    benchmark: str
    config: dict[str, Any]
    figures: list[Figure] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)  # raw measurements
    seconds: float = 0.0

    def add(
        self, name: str, value: float, unit: str = "", goal: str | None = None, note: str = ""
    ) -> None:
        self.figures.append(Figure(name, value, unit, goal, note))

    def to_json(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "config": self.config,
            "seconds": round(self.seconds, 1),
            "machine": machine_info(),
            "figures": [{**asdict(f), "met": f.met} for f in self.figures],
            "rows": self.rows,
        }


def machine_info() -> dict[str, Any]:
    load = os.getloadavg()
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg_1m_at_end": round(load[0], 2),
    }


def print_result(result: BenchResult, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"{result.benchmark} ({result.seconds:.0f} s)", show_lines=False)
    for col in ("figure", "value", "goal", "met", "note"):
        table.add_column(col)
    for f in result.figures:
        met = "" if f.met is None else ("yes" if f.met else "NO")
        value = f"{f.value:,.3f}".rstrip("0").rstrip(".") + (f" {f.unit}" if f.unit else "")
        table.add_row(f.name, value, f.goal or "", met, f.note)
    console.print(table)


def seed_list(text: str) -> list[int]:
    """argparse type of a `--seeds 1,2,3` option: at least one integer, else a usage error."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text!r}"
        ) from None
    if not seeds:
        raise argparse.ArgumentTypeError("at least one seed is needed")
    return seeds


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", type=Path, help="write the figures as JSON to this file")
    p.add_argument("--quick", action="store_true", help="tiny configuration (smoke test)")
    p.add_argument("--workdir", type=Path, help="keep data and logs here (default: a temp dir)")
    return p


def run_main(
    name: str,
    description: str,
    body: Callable[[argparse.Namespace, Path], BenchResult],
    argv: Sequence[str] | None = None,
    extra_args: Callable[[argparse.ArgumentParser], None] | None = None,
) -> BenchResult:
    """Parse arguments, run `body(args, workdir)`, print the table, write JSON."""
    import tempfile

    p = parser(description)
    if extra_args is not None:
        extra_args(p)
    args = p.parse_args(argv)
    start = time.monotonic()
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        result = body(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix=f"fedjewel-bench-{name}-") as tmp:
            result = body(args, Path(tmp))
    result.seconds = time.monotonic() - start
    print_result(result)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result.to_json(), indent=2))
        print(f"wrote {args.json}", file=sys.stderr)
    return result


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_mb(pid: int, key: str) -> float:
    """A `VmXxx:` line of /proc/<pid>/status (Linux), in MiB."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def rss_mb(pid: int) -> float:
    """Current resident set of a process."""
    return _status_mb(pid, "VmRSS")


def hwm_mb(pid: int) -> float:
    """Peak resident set (VmHWM) of a process since start or `reset_hwm`."""
    return _status_mb(pid, "VmHWM")


def reset_hwm(pid: int) -> bool:
    """Reset a process's VmHWM to its current RSS (Linux: write 5 to clear_refs)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False
