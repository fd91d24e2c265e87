"""`fedjewel import`: bad rows are reported by line and nothing is loaded; re-imports are no-ops."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from coordinator.app import create_app
from coordinator.settings import CoordinatorSettings
from regional_node.store import EventStore
from shared.cli import import_catalog, main

ADMIN = "admin-secret"

GOOD_EVENTS = """user_id,item_id,event_type,timestamp,country,region
u1,J1,view,2026-10-01T10:00:00Z,DE,EU
u1,J1,purchase,2026-10-01T10:05:00Z,DE,EU
u2,J2,click,1790000000,FR,EU
u3,J1,view,2026-10-02T09:00:00Z,US,NA
"""

BAD_EVENTS = """user_id,item_id,event_type,timestamp,country,region
u1,J1,view,2026-10-01T10:00:00Z,DE,EU
u2,J2,like,2026-10-01T10:00:00Z,DE,EU
u3,J3,view,yesterday,DE,EU
u4,J4,view,2026-10-01T10:00:00Z,DE,EU
u5,J5,view,2099-01-01T00:00:00Z,DE,EU
"""


def _run(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        main(argv)
    return int(info.value.code or 0)


def _store_count(url: str) -> int:
    store = EventStore(url)
    try:
        store.migrate()
        return store.count()
    finally:
        store.dispose()


def test_events_with_bad_rows_load_nothing_and_name_the_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'node.db'}"
    bad = tmp_path / "events.csv"
    bad.write_text(BAD_EVENTS)
    code = _run(["import", str(bad), "--database-url", url, "--region", "EU"])
    assert code == 2
    err = capsys.readouterr().err
    assert "nothing imported" in err
    assert "line 3" in err and "like" in err
    assert "line 4" in err and "yesterday" in err
    assert "line 6" in err and "in the future" in err  # a node refuses far-future times
    assert "line 2:" not in err and "line 5:" not in err
    assert _store_count(url) == 0


def test_events_reimport_adds_no_duplicates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'node.db'}"
    good = tmp_path / "events.csv"
    good.write_text(GOOD_EVENTS)
    args = ["import", str(good), "--database-url", url, "--region", "EU"]
    assert _run(args) == 0
    first = capsys.readouterr()
    assert "imported 3 new events" in first.out
    assert "skipping 1 rows of other regions" in first.err  # u3 is in NA
    assert _store_count(url) == 3
    assert _run(args) == 0
    assert "imported 0 new events (3 already present)" in capsys.readouterr().out
    assert _store_count(url) == 3


def test_unrecognised_file_and_missing_coordinator_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    odd = tmp_path / "odd.csv"
    odd.write_text("a,b\n1,2\n")
    assert _run(["import", str(odd)]) == 2
    assert "--kind" in capsys.readouterr().err
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("item_id\nJ1\n")
    assert _run(["import", str(catalog)]) == 2
    assert "--url and --admin-token" in capsys.readouterr().err
    assert _run(["import", str(tmp_path / "missing.csv")]) == 2


@pytest.fixture
def coordinator(tmp_path: Path):  # type: ignore[no-untyped-def]
    settings = CoordinatorSettings(
        database_url=f"sqlite:///{tmp_path / 'coordinator.db'}", admin_token=ADMIN
    )
    with TestClient(create_app(settings)) as client:
        yield client


def test_catalog_import_is_all_or_nothing_and_idempotent(
    coordinator: TestClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "item_id,title,category,material,gemstone,style_tags,price_usd\n"
        "J1,Gold ring,ring,gold,,classic,120\n"
        "J2,Silver ring,ring,silver,,,-5\n"
        "J1,Again,ring,gold,,,10\n"
    )
    base = str(coordinator.base_url)
    assert import_catalog(bad, base, ADMIN, client=coordinator) == 2
    err = capsys.readouterr().err
    assert "line 3" in err and "price_usd" in err
    assert "line 4" in err and "duplicate item_id" in err
    empty = coordinator.get("/v1/catalog").json()
    assert empty["items"] == [] and empty["catalog_version"] == 0

    good = tmp_path / "catalog.csv"
    good.write_text(
        "item_id,title,category,material,gemstone,style_tags,price_usd\n"
        "J1,Gold ring,ring,gold,,classic|bridal,120\n"
        "J2,Silver studs,earrings,silver,,,\n"
        "J3,,,,,,\n"
    )
    assert import_catalog(good, base, ADMIN, client=coordinator) == 0
    assert "3 added" in capsys.readouterr().out
    assert import_catalog(good, base, ADMIN, client=coordinator) == 0
    assert "0 added" in capsys.readouterr().out
    items = coordinator.get("/v1/catalog").json()["items"]
    assert [it["item_id"] for it in items] == ["J1", "J2", "J3"]
    assert items[0]["style_tags"] == ["classic", "bridal"]

    # A wrong token is the coordinator's 4xx, reported and not retried.
    assert import_catalog(good, base, "wrong", client=coordinator) == 1
    assert "refused" in capsys.readouterr().err
    # A token no header can carry and a URL that is none were tracebacks.
    assert import_catalog(good, base, "é", client=coordinator) == 2
    assert "printable ASCII" in capsys.readouterr().err
    assert import_catalog(good, "http://[::1", ADMIN) == 2
    assert "not a usable URL" in capsys.readouterr().err


def test_simulate_runs_the_poisoning_and_dp_experiments(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from shared.cli import main
    from shared.market import generate_market

    generate_market(tmp_path, seed=2, regions=3, users=200, items=60)
    base = ["simulate", "--data", str(tmp_path), "--rounds", "1", "--threads", "1"]
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "--attack", "signflip", "--aggregation", "median"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "median" in out and "signflip" in out and "HR@10" in out
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "--dp-epsilon", "8,inf", "--dp-sampling-rate", "0.5", "--dp-server-lr", "2"])
    assert exit_info.value.code == 0
    assert "inf" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "--dp-epsilon", "8", "--dp-algorithm", "dpsgd", "--dp-steps", "2"])
    assert exit_info.value.code == 0
    assert "dpsgd (2 steps a round)" in capsys.readouterr().out
    # The best measured setting by name: its own schedule (non-private 30 rounds), and a
    # flag given explicitly still wins over the recipe's value.
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                *base,
                "--dp-epsilon",
                "8,inf",
                "--dp-algorithm",
                "fedsgd",
                "--dp-sampling-rate",
                "0.5",
            ]
        )
    assert exit_info.value.code == 0
    out, err = capsys.readouterr()
    assert "epsilon 8: round 1/1 " in err and "epsilon inf: round 30/30 " in err
    assert "1 rounds (30 non-private)" in out and "q 0.5" in out
    assert "optimizer adam (lr 0.01, tau 1e-08)" in out and "dpsgd (1 steps a round)" in out
    rows = [line for line in out.splitlines() if line.startswith(("| 8 ", "| inf "))]
    assert len(rows) == 2


def test_events_of_no_row_of_this_region_are_refused_and_case_does_not_matter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A node whose region matches no row once imported nothing and exited 0."""
    url = f"sqlite:///{tmp_path / 'node.db'}"
    good = tmp_path / "events.csv"
    good.write_text(GOOD_EVENTS)
    assert _run(["import", str(good), "--database-url", url, "--region", "XX"]) == 2
    err = capsys.readouterr().err
    assert "none of its 4 rows is of this node's region 'XX'" in err and "EU, NA" in err
    assert _store_count(url) == 0
    assert _run(["import", str(good), "--database-url", url, "--region", "eu"]) == 0
    assert "imported 3 new events" in capsys.readouterr().out


def test_unreadable_inputs_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    utf16 = tmp_path / "events.csv"
    utf16.write_text(GOOD_EVENTS, encoding="utf-16")
    assert _run(["import", str(utf16), "--database-url", f"sqlite:///{tmp_path / 'n.db'}"]) == 2
    assert "cannot read it as a UTF-8 CSV file" in _err(capsys)
    quoted = tmp_path / "quoted.csv"
    quoted.write_text('"item_id","title"\nJ1,Ring\n')
    assert _run(["import", str(quoted)]) == 2  # recognised as a catalog: needs --url
    assert "--url and --admin-token" in _err(capsys)
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    assert _run(["generate-market", "--out", str(a_file), "--users", "50"]) == 2
    assert "cannot generate the market" in _err(capsys)


def test_the_node_binds_the_port_given_before_or_after_serve() -> None:
    from regional_node.__main__ import build_parser

    parser = build_parser()
    assert parser.parse_args(["--port", "18420", "serve"]).port == 18420
    assert parser.parse_args(["--host", "0.0.0.0", "serve"]).host == "0.0.0.0"
    assert parser.parse_args(["serve", "--port", "18421"]).port == 18421
    assert parser.parse_args([]).port == 8100


def test_a_bad_setting_stops_a_service_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from coordinator.__main__ import main as coordinator_main

    monkeypatch.setenv("COORDINATOR_MIN_UPDATES", "abc")
    with pytest.raises(SystemExit) as info:
        coordinator_main([])
    assert str(info.value.code).startswith("coordinator: invalid configuration: min_updates:")


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("sqlite:////nonexistent-dir/c.db", "cannot reach the database sqlite:////nonexistent-dir"),
        ("bogus", "is not a URL SQLAlchemy can read"),
        ("postgresql+psycopg://fedjewel:secret@127.0.0.1:1/x", "cannot reach the database"),
        ("nosuchdialect://x/y", "cannot use the database"),
    ],
)
def test_a_database_a_service_cannot_use_stops_it_with_one_line(
    monkeypatch: pytest.MonkeyPatch, url: str, says: str
) -> None:
    """These were a SQLAlchemy traceback (and uvicorn's "Application startup failed")."""
    from coordinator.__main__ import main as coordinator_main
    from regional_node.__main__ import main as node_main

    monkeypatch.setenv("COORDINATOR_DATABASE_URL", url)
    for argv in (["--migrate-only"], []):
        with pytest.raises(SystemExit) as info:
            coordinator_main(argv)
        message = str(info.value.code)
        assert message.startswith("coordinator: ") and says in message, message
        assert "secret" not in message  # the password is not shown
    monkeypatch.setenv("NODE_DATABASE_URL", url)
    monkeypatch.setenv("NODE_ALLOW_ANONYMOUS", "true")
    with pytest.raises(SystemExit) as info:
        node_main(["serve"])
    assert str(info.value.code).startswith("regional node: ") and says in str(info.value.code)


@pytest.mark.parametrize("port", ["70000", "-5", "http"])
def test_a_port_out_of_range_is_refused_by_both_services(
    port: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from coordinator.__main__ import main as coordinator_main
    from regional_node.__main__ import build_parser

    for parse in (coordinator_main, build_parser().parse_args):
        with pytest.raises(SystemExit) as info:
            parse(["--port", port])
        assert info.value.code == 2
        assert "port" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--rounds", "0"], "--rounds must be at least 1"),
        (["--local-epochs", "0"], "--local-epochs must be at least 1"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--threads", "-1"], "--threads must be at least 1"),
        (["--embedding-dim", "0"], "--embedding-dim must be at least 4"),
        (["--lr", "-1"], "--lr must be a positive number"),
        (["--methods", ","], "--methods names none"),
        (["--dp-epsilon", "abc"], "--dp-epsilon takes numbers"),
        (["--json", "/nonexistent-dir/x.json"], "checked before the run"),
        # These ran on: inf ended in a traceback after the run, or ranked every item alike
        # (HR 0.000); a negative mu was taken as 0.
        (["--lr", "inf"], "--lr must be a positive number"),
        (["--personal-lr", "inf"], "--personal-lr must be a positive number"),
        (["--fedprox-mu", "-1"], "--fedprox-mu must be 0 or a positive number"),
        (["--fedprox-mu", "nan"], "--fedprox-mu must be 0 or a positive number"),
        (["--json", "."], "is a directory"),  # failed after the whole run, results lost
        # The experiments ignored these: no JSON written, another model than asked for.
        (["--dp-epsilon", "8", "--json", "x.json"], "does not take --json, --methods"),
        (["--attack", "signflip", "--lr", "0.1"], "does not take --methods, --lr"),
        (["--dp-epsilon", "8", "--aggregation", "median"], "does not take --methods, --agg"),
        (["--attack", "signflip", "--dp-epsilon", "8"], "one at a time"),
        (["--dp-steps", "2"], "only apply with --dp-epsilon"),
        (["--dp-epsilon", "8", "--dp-server-lr", "-1"], "--dp-server-lr must be a positive"),
        (["--dp-epsilon", "8", "--dp-sampling-rate", "0"], "--dp-sampling-rate must be in"),
    ],
)
def test_simulate_refuses_arguments_that_make_no_sense_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], says: str
) -> None:
    """These once ran and reported results (--rounds 0), or ended in a traceback, or (a
    bad --json path) failed only after the whole run."""
    from shared.market import generate_market

    generate_market(tmp_path, seed=2, regions=3, users=60, items=30)
    assert _run(["simulate", "--data", str(tmp_path), "--methods", "popularity", *extra]) == 2
    err = _err(capsys)
    assert says in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--epsilons", "abc"], "--epsilons takes numbers or inf"),
        (["--epsilons", "8,-1"], "must all be positive"),
        (["--delta", "0"], "--delta must be in (0, 1)"),
        (["--threads", "0"], "--threads must be at least 1"),
        (["--groups", "-3"], "--groups must be at least 0"),
        (["--epochs", "0"], "--epochs must be at least 1"),
    ],
)
def test_the_dp_experiment_refuses_bad_arguments_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], says: str
) -> None:
    """Tracebacks, some after the market was loaded or generated; some ran silently."""
    from shared import dp_experiment

    with pytest.raises(SystemExit) as info:
        dp_experiment.main(["--data", str(tmp_path / "m"), *extra])
    assert info.value.code == 2
    assert says in _err(capsys)
    assert not (tmp_path / "m").exists()  # nothing generated


def test_the_dp_experiment_says_when_it_cannot_load_the_market(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from shared import dp_experiment

    a_file = tmp_path / "a-file"
    a_file.write_text("")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "catalog.csv").write_text("")
    for data, says in ((a_file, "is a file"), (tmp_path / "empty", "cannot load the market")):
        with pytest.raises(SystemExit) as info:
            dp_experiment.main(["--data", str(data), "--epsilons", "inf", "--rounds", "1"])
        assert info.value.code == 2
        assert says in _err(capsys)


@pytest.mark.parametrize("mode", [["--dp-epsilon", "8"], ["--attack", "signflip"]])
def test_the_experiments_refuse_a_folder_without_a_market(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: list[str]
) -> None:
    """A typo in --data once generated a 6,000-user market there (--dp-epsilon) or ended
    in a traceback (--attack)."""
    typo = tmp_path / "typo"
    assert _run(["simulate", "--data", str(typo), *mode]) == 2
    err = _err(capsys)
    assert "no catalog.csv" in err and "Traceback" not in err
    assert not typo.exists()


def test_the_client_takes_one_session_item_as_a_string() -> None:
    from shared.client import recommend_params

    params = recommend_params(user_id=None, k=3, session_items="J00017", country=None, filters=None)
    assert params["session_items"] == "J00017"  # not "J,0,0,0,1,7"


def test_the_demo_refuses_settings_it_cannot_run_before_starting_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from shared.demo import main as demo_main

    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for argv, says in (
        (["--users", "1"], "--users must be at least 100"),
        (["--rounds", "0"], "--rounds and --local-epochs"),
        (["--workdir", str(a_file)], "is not a directory"),
    ):
        with pytest.raises(SystemExit) as info:
            demo_main([*argv, "--no-keep"])
        assert info.value.code == 2
        assert says in capsys.readouterr().err


def _err(capsys: pytest.CaptureFixture[str]) -> str:
    """What the command wrote to stderr, with the console's line wrapping undone."""
    return " ".join(capsys.readouterr().err.split())


def test_a_country_or_timestamp_no_event_can_hold_is_a_line_error_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'node.db'}"
    rows = tmp_path / "events.csv"
    rows.write_text(
        "user_id,item_id,event_type,timestamp,country\n"
        "u1,J1,view,2026-10-01T10:00:00Z,u.k.\n"  # stored as UK
        "u2,J1,view,2026-10-01T10:00:00Z,TOOLONGCODE\n"
        "u3,J1,view,0001-01-01T00:00:00+01:00,DE\n"
    )
    assert _run(["import", str(rows), "--database-url", url, "--region", "EU"]) == 2
    err = _err(capsys)
    assert "line 3" in err and "not a code" in err
    assert "line 4" in err and "out of range" in err and "Traceback" not in err
    assert _store_count(url) == 0
