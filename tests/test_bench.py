"""Every benchmark runs end to end in its tiny configuration and reports its figures."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

# The in-process benchmark and those with one or two services. serving_training,
# round_overhead and scale train real rounds with several processes (minutes on a
# shared 2-core box): `python -m bench --quick` runs them; they share this code path.
BENCHMARKS = ["compression", "serving", "transfer"]


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
