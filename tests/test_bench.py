"""Every benchmark runs end to end in its tiny configuration and reports its figures."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

# Benchmarks that start real services; aggregation and transfer also need PostgreSQL
# (aggregation always, transfer only outside --quick).
BENCHMARKS = ["compression", "serving", "serving_training", "transfer", "round_overhead", "scale"]


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_runs_quick(name: str, tmp_path: Path) -> None:
    out = tmp_path / f"{name}.json"
    module = importlib.import_module(f"bench.{name}")
    module.main(["--quick", "--json", str(out), "--workdir", str(tmp_path / "work")])
    data = json.loads(out.read_text())
    assert data["benchmark"] == name
    assert data["figures"], "a benchmark must report figures"
    for figure in data["figures"]:
        assert figure["value"] == figure["value"], f"{figure['name']} is NaN"


def test_aggregation_benchmark_runs_quick(pg_url: str, tmp_path: Path) -> None:
    # pg_url makes sure PostgreSQL answers (the benchmark makes its own databases).
    out = tmp_path / "aggregation.json"
    importlib.import_module("bench.aggregation").main(
        ["--quick", "--json", str(out), "--workdir", str(tmp_path / "work")]
    )
    figures = {f["name"]: f for f in json.loads(out.read_text())["figures"]}
    assert any(name.startswith("N=2: peak RSS") for name in figures)
