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
BENCHMARKS = ["compression", "quality", "serving", "transfer"]


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


def test_quality_goal_ratios_by_hand() -> None:
    from bench.quality import GOALS, goal_ratios

    def part(hr: float) -> dict[str, float]:
        return {"hr@10": hr, "ndcg@10": hr / 2, "users": 10}

    sizes = {"A": 500, "B": 40, "C": 30, "D": 20}
    # method -> (overall, cold items, per region)
    table = {
        "popularity": (0.10, 0.00, {"A": 0.1, "B": 0.1, "C": 0.1, "D": 0.1}),
        "local_only": (0.20, 0.01, {"A": 0.3, "B": 0.2, "C": 0.1, "D": 0.3}),
        "federated": (0.30, 0.03, {"A": 0.4, "B": 0.3, "C": 0.2, "D": 0.1}),
        "centralized": (0.25, 0.02, {"A": 0.3, "B": 0.3, "C": 0.3, "D": 0.3}),
        "als": (0.15, 0.00, {"A": 0.1, "B": 0.1, "C": 0.1, "D": 0.1}),
    }
    results = {
        m: {
            "overall": part(o),
            "cold_items": part(c),
            "regions": {r: part(v) for r, v in regions.items()},
        }
        for m, (o, c, regions) in table.items()
    }
    ratios = goal_ratios(results, sizes)
    assert set(ratios) == set(GOALS)
    # The three smallest regions are B, C, D: local-only mean 0.2, federated mean 0.2.
    assert ratios["federated / small regions' local-only (as written)"] == pytest.approx(1.5)
    assert ratios["federated / local-only, on the small regions' users"] == pytest.approx(1.0)
    assert ratios["federated / centralized"] == pytest.approx(1.2)
    assert ratios["federated / als"] == pytest.approx(2.0)
    assert ratios["federated / popularity"] == pytest.approx(3.0)
    assert ratios["cold items: federated - 2 x popularity"] == pytest.approx(0.03)


def test_seed_lists_are_parsed_or_refused() -> None:
    import argparse

    from bench.common import seed_list

    assert seed_list("1, 2,3") == [1, 2, 3]
    for bad in ("", "1,x", ","):
        with pytest.raises(argparse.ArgumentTypeError):
            seed_list(bad)


def test_report_and_runner_refuse_unusable_paths_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each was a traceback."""
    from bench.__main__ import main as bench_main
    from bench.report import main as report_main

    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes(b'{"benchmark": "caf\xe9"}')
    for path in (tmp_path / "missing.json", bad_json, latin1):
        with pytest.raises(SystemExit) as info:
            report_main([str(path)])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "cannot read the results" in err and path.name in err
    a_file = tmp_path / "results"
    a_file.write_text("")
    with pytest.raises(SystemExit) as info:
        bench_main(["--out", str(a_file), "--only", "serving"])
    assert info.value.code == 2 and "is a file" in capsys.readouterr().err
