"""`python -m bench.report DIR`: the figures of every `DIR/*.json` as one Markdown table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _fmt(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def markdown(paths: list[Path]) -> str:
    lines = ["| benchmark | figure | value | goal | met |", "|---|---|---|---|---|"]
    for path in paths:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError too
            raise ValueError(f"{path}: {exc}") from exc
        if not isinstance(data, dict) or "figures" not in data:
            continue
        for f in data["figures"]:
            value = _fmt(float(f["value"])) + (f" {f['unit']}" if f["unit"] else "")
            met = "" if f["met"] is None else ("yes" if f["met"] else "**no**")
            note = f" ({f['note']})" if f.get("note") else ""
            lines.append(
                f"| {data['benchmark']} | {f['name']}{note} | {value} | {f['goal'] or ''} | {met} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("paths", nargs="+", type=Path, help="result folders or JSON files")
    args = p.parse_args(argv)
    files: list[Path] = []
    for path in args.paths:
        files += sorted(path.glob("*.json")) if path.is_dir() else [path]
    try:
        print(markdown([f for f in files if f.name != "summary.json"]))
    except (ValueError, KeyError, TypeError) as exc:  # unreadable, or not a bench result
        p.error(f"cannot read the results: {exc}")


if __name__ == "__main__":
    main()
