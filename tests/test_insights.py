"""Regional insights: numbers checked against a direct computation on a generated market."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from coordinator.app import create_app
from coordinator.settings import CoordinatorSettings
from regional_node.insights import compute_report, least_squares_slope, week_start
from regional_node.store import EventStore
from shared.data import event_record_to_event_in, read_catalog_csv, read_events_csv
from shared.features import price_band, price_band_label
from shared.insights_schemas import MAX_INSIGHT_VALUES, RegionReport
from shared.market import generate_market
from shared.schemas import CatalogItem

ADMIN = "insights-admin"
WEEKS = 4
MIN_USERS = 15


@pytest.fixture(scope="module")
def market(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("market")
    summary = generate_market(out, seed=11, regions=4, users=1000, items=200)
    catalog = read_catalog_csv(summary.catalog_path)
    events = read_events_csv(summary.events_path)
    return catalog, events


def _rows(market, region: str, db: Path):  # type: ignore[no-untyped-def]
    """Through the node's real path: the region's events in its EventStore."""
    _catalog, events = market
    store = EventStore(f"sqlite:///{db}")
    store.migrate()
    store.add_events([event_record_to_event_in(e) for e in events if e.region == region])
    rows = [(u, i, k, t) for u, i, k, t, _c in store.iter_events()]
    store.dispose()
    return rows


@pytest.fixture(scope="module")
def stored_rows(market, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("stores")
    return {region: _rows(market, region, out / f"{region}.db") for region in ("EU", "EA")}


def _report(market, stored_rows, region: str, min_users: int = MIN_USERS) -> RegionReport:  # type: ignore[no-untyped-def]
    report = compute_report(
        stored_rows[region], market[0], region=region, weeks=WEEKS, min_users=min_users
    )
    assert report is not None
    return report


def _direct(market, region: str, kind: str, dim: str):  # type: ignore[no-untyped-def]
    """Plain counting over the CSV rows: window events and users, per-week events and users."""
    catalog, events = market
    attr = {}
    for it in catalog:
        band = price_band(it.price_usd)
        attr[it.item_id] = {
            "category": it.category or "unknown",
            "material": it.material or "unknown",
            "gemstone": it.gemstone or "none",
            "price_band": price_band_label(band) if band is not None else "unknown",
        }[dim]
    mine = [e for e in events if e.region == region and e.event_type in ("view", "purchase")]
    end = max(e.timestamp for e in mine)
    monday = (end - timedelta(days=end.weekday())).replace(
        hour=0, minute=0, second=0, microsecond=0
    )
    first = monday - timedelta(weeks=WEEKS - 1)
    n: dict[str, int] = defaultdict(int)
    users: dict[str, set[str]] = defaultdict(set)
    wn: dict[tuple[str, int], int] = defaultdict(int)
    wu: dict[tuple[str, int], set[str]] = defaultdict(set)
    for e in mine:
        if e.event_type != kind or e.timestamp < first:
            continue
        v = attr[e.item_id]
        w = (e.timestamp - first).days // 7
        n[v] += 1
        users[v].add(e.user_id)
        wn[(v, w)] += 1
        wu[(v, w)].add(e.user_id)
    return n, users, wn, wu, first


@pytest.mark.parametrize("region", ["EU", "EA"])
def test_report_matches_direct_counting(market, stored_rows, region: str) -> None:  # type: ignore[no-untyped-def]
    report = _report(market, stored_rows, region)
    for kind in ("view", "purchase"):
        for dim in ("category", "material", "gemstone", "price_band"):
            n, users, wn, wu, first = _direct(market, region, kind, dim)
            assert report.weeks[0] == first.date().isoformat()
            kept = {v for v in n if len(users[v]) >= MIN_USERS}
            got = report.kinds[kind][dim]  # type: ignore[index]
            assert set(got.values) == kept
            assert got.suppressed_cells == len(n) - len(kept)
            total = sum(n[v] for v in kept)
            assert got.reported_events == total
            for v in kept:
                cell = got.values[v]
                assert cell.events == n[v]
                assert cell.share == pytest.approx(n[v] / total)
                for w in range(WEEKS):
                    week_total = sum(wn[(x, w)] for x in kept if len(wu[(x, w)]) >= MIN_USERS)
                    if len(wu[(v, w)]) >= MIN_USERS:
                        assert cell.weekly_share[w] == pytest.approx(wn[(v, w)] / week_total)
                    else:
                        assert cell.weekly_share[w] is None


def test_regional_tastes_show_up(market, stored_rows) -> None:  # type: ignore[no-untyped-def]
    eu = _report(market, stored_rows, "EU")
    ea = _report(market, stored_rows, "EA")
    jade = "jade"
    ea_jade = ea.kinds["view"]["material"].values[jade].share
    eu_jade = eu.kinds["view"]["material"].values.get(jade)
    assert eu_jade is None or ea_jade > 2 * eu_jade.share
    assert eu.kinds["view"]["material"].values["silver"].share > (
        ea.kinds["view"]["material"].values.get("silver", None).share  # type: ignore[union-attr]
        if "silver" in ea.kinds["view"]["material"].values
        else 0.0
    )


def test_threshold_suppresses_small_cells(market, stored_rows) -> None:  # type: ignore[no-untyped-def]
    strict = _report(market, stored_rows, "EA", min_users=10_000)
    for dims in strict.kinds.values():
        for d in dims.values():
            assert d.values == {} and d.reported_events == 0 and d.suppressed_cells > 0


def test_week_start_and_slope() -> None:
    assert week_start(datetime(2026, 11, 25, 13, 5, tzinfo=UTC)) == datetime(
        2026, 11, 23, tzinfo=UTC
    )
    assert least_squares_slope([(0, 0.1), (1, 0.2), (2, 0.3)]) == pytest.approx(0.1)
    assert least_squares_slope([(1, 0.5)]) is None


def test_noise_changes_counts_but_not_the_shape(market, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    catalog, events = market
    rows = [
        (e.user_id, e.item_id, e.event_type, e.timestamp.timestamp())
        for e in events
        if e.region == "EU"
    ]
    plain = compute_report(rows, catalog, region="EU", weeks=WEEKS, min_users=MIN_USERS)
    noisy = compute_report(
        rows,
        catalog,
        region="EU",
        weeks=WEEKS,
        min_users=MIN_USERS,
        noise_scale=5.0,
        noise_secret=b"node secret",
    )
    assert plain is not None and noisy is not None
    p = plain.kinds["view"]["material"].values
    q = noisy.kinds["view"]["material"].values
    assert set(p) == set(q)
    assert any(p[v].events != q[v].events for v in p)
    assert all(abs(p[v].events - q[v].events) < 100 for v in p)


def _noisy(rows, secret: bytes, scale: float = 2.0):  # type: ignore[no-untyped-def]
    report = compute_report(
        rows,
        _TINY_CATALOG,
        region="EU",
        weeks=2,
        min_users=20,
        noise_scale=scale,
        noise_secret=secret,
    )
    assert report is not None
    return report.kinds["view"]


_TINY_CATALOG = [
    CatalogItem(item_id="ring-gold", category="ring", material="gold"),
    CatalogItem(item_id="ring-silver", category="ring", material="silver"),
    CatalogItem(item_id="brooch-gold", category="brooch", material="gold"),
]
_MONDAY = datetime(2026, 10, 5, 12, tzinfo=UTC).timestamp()
_WEEK = 7 * 86400


def _one_shopper_in_a_small_cell():  # type: ignore[no-untyped-def]
    """30 and 25 shoppers view gold and silver rings in both weeks; one shopper views a
    gold brooch 7 times: a 'brooch' category cell of one user (suppressed), whose events
    still count under 'gold' in the material dimension."""
    rows = []
    for u in range(30):
        rows += [(f"g{u}", "ring-gold", "view", _MONDAY + d) for d in (0, _WEEK)]
    for u in range(25):
        rows += [(f"s{u}", "ring-silver", "view", _MONDAY + d) for d in (0, _WEEK)]
    rows += [("target", "brooch-gold", "view", _MONDAY + _WEEK + 60 * i) for i in range(7)]
    return rows


def test_a_suppressed_cell_is_not_recovered_by_subtraction() -> None:
    """Without noise the material total minus the category total is the one shopper's 7
    brooch views exactly. With the node's default noise the same subtraction is off by
    several counts, in a different direction under each node's secret."""
    rows = _one_shopper_in_a_small_cell()
    exact = _noisy(rows, b"x", scale=0.0)
    assert "brooch" not in exact["category"].values
    assert exact["material"].reported_events - exact["category"].reported_events == 7
    guesses = []
    for i in range(200):
        view = _noisy(rows, f"node {i}".encode())
        assert "brooch" not in view["category"].values
        guesses.append(view["material"].reported_events - view["category"].reported_events)
    assert sum(g == 7 for g in guesses) < 0.2 * len(guesses)
    spread = (sum((g - 7) ** 2 for g in guesses) / len(guesses)) ** 0.5
    assert spread > 3, spread


def test_the_same_cells_get_the_same_noise_in_every_report() -> None:
    """Fresh noise per report could be averaged away over the reports a node pushes every
    few minutes; cell-key noise is a function of the cell's events and the node's secret."""
    rows = _one_shopper_in_a_small_cell()
    first = _noisy(rows, b"node secret")
    assert _noisy(list(reversed(rows)), b"node secret") == first
    assert _noisy(rows, b"another node") != first
    # One more silver view in week 1 redraws the silver cells' noise only.
    extra = ("s0", "ring-silver", "view", _MONDAY + _WEEK + 5)
    silver_moved = 0
    for i in range(20):
        secret = f"node {i}".encode()
        before, after = _noisy(rows, secret), _noisy([*rows, extra], secret)
        gold = [r["material"].values["gold"] for r in (before, after)]
        assert gold[0].events == gold[1].events  # same cell, same noise
        silver = [r["material"].values["silver"] for r in (before, after)]
        # (Noise of scale 2 often rounds to the same count: the cell as a whole moves.)
        silver_moved += silver[0] != silver[1]
    assert silver_moved >= 10


def test_insights_endpoints(market, stored_rows, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # A low threshold so this small region's weekly cells carry trends (highlights below).
    report = _report(market, stored_rows, "EA", min_users=5)
    settings = CoordinatorSettings(
        database_url=f"sqlite:///{tmp_path / 'c.db'}",
        admin_token=ADMIN,
        embedding_dim=8,
        dashboard_public=False,  # insights are then as private as the dashboard
    )
    with TestClient(create_app(settings)) as client:
        admin = {"Authorization": f"Bearer {ADMIN}"}
        tokens = {}
        for n, region in (("ea-1", "EA"), ("eu-1", "EU")):
            r = client.post("/v1/nodes", json={"node_id": n, "region": region}, headers=admin)
            tokens[n] = {"Authorization": f"Bearer {r.json()['token']}"}
        body = report.model_dump_json()
        ct = {"Content-Type": "application/json"}
        assert client.get("/v1/insights").status_code == 401
        # A node can only write its own report.
        r = client.post("/v1/insights/eu-1", content=body, headers={**tokens["ea-1"], **ct})
        assert r.status_code == 403
        r = client.post("/v1/insights/ea-1", content=body, headers={**tokens["ea-1"], **ct})
        assert r.status_code == 204, r.text
        bad = client.post(
            "/v1/insights/ea-1", content=b'{"region": "EA"}', headers={**tokens["ea-1"], **ct}
        )
        assert bad.status_code == 422
        # NaN or Infinity anywhere in a report is a 422 (it was stored, or a 500 on
        # PostgreSQL's JSON column).
        for literal in ("NaN", "Infinity"):
            r = client.post(
                "/v1/insights/ea-1",
                content=_with_first_trend(body, literal),
                headers={**tokens["ea-1"], **ct},
            )
            assert r.status_code == 422, r.text
        # A report bounded in size, one figure a week: a node cannot bloat the public
        # GET /v1/insights (a 5 MB report of a million weekly shares was stored).
        for mangle in _OVERSIZED_OR_MISMATCHED:
            wire = report.model_dump(mode="json")
            mangle(wire)
            r = client.post("/v1/insights/ea-1", json=wire, headers=tokens["ea-1"])
            assert r.status_code == 422 and r.json()["detail"], r.text
        r = client.post("/v1/insights/ea%001", content=body, headers={**tokens["ea-1"], **ct})
        assert r.status_code == 422
        # A node cannot label its figures as another region's: they show under its own.
        r = client.post(
            "/v1/insights/ea-1",
            content=report.model_copy(update={"region": "EU"}).model_dump_json(),
            headers={**tokens["ea-1"], **ct},
        )
        assert r.status_code == 204
        got = client.get("/v1/insights", headers=admin).json()
        assert got["regions"][0]["report"]["region"] == "EA"
        assert [r["node_id"] for r in got["regions"]] == ["ea-1"]
        assert RegionReport.model_validate(got["regions"][0]["report"]) == report
        assert got["highlights"] and {h["region"] for h in got["highlights"]} == {"EA"}
        assert client.get("/v1/insights", headers=tokens["eu-1"]).status_code == 200
    # With a public dashboard (the default), insights are public too.
    public = settings.model_copy(update={"dashboard_public": True})
    with TestClient(create_app(public)) as client:
        assert client.get("/v1/insights").status_code == 200


def _first_dimension(wire: dict) -> dict:  # type: ignore[type-arg]
    return next(iter(next(iter(wire["kinds"].values())).values()))  # type: ignore[no-any-return]


def _first_cell(wire: dict) -> dict:  # type: ignore[type-arg]
    return next(iter(_first_dimension(wire)["values"].values()))  # type: ignore[no-any-return]


def _many_values(wire: dict) -> None:  # type: ignore[type-arg]
    dim = _first_dimension(wire)
    cell = _first_cell(wire)
    dim["values"] = {f"v{i}": cell for i in range(MAX_INSIGHT_VALUES + 1)}


_OVERSIZED_OR_MISMATCHED = [
    lambda w: _first_cell(w)["weekly_share"].append(0.1),  # a week more than `weeks`
    lambda w: w.update(weeks=[]),  # figures for weeks the report does not have
    lambda w: _first_dimension(w)["weekly_reported_events"].pop(),
    lambda w: _first_cell(w).update(weekly_share=[0.1] * 105),
    _many_values,
    lambda w: _first_dimension(w)["values"].update({"gold\x00": _first_cell(w)}),
]


def test_a_node_reports_its_values_with_the_most_events_and_counts_the_rest_suppressed() -> None:
    """A catalog of more categories than a report may carry: the node sends the ones with
    the most events (the coordinator refuses a longer list) and says how many it left out."""
    n = MAX_INSIGHT_VALUES + 10
    catalog = [CatalogItem(item_id=f"i{c}", category=f"cat{c:03d}") for c in range(n)]
    rows = [
        (f"u{c}-{k}", f"i{c}", "view", _MONDAY + k)
        for c in range(n)
        for k in range(1 + (c >= 10))  # the first ten categories have one view, the rest two
    ]
    report = compute_report(rows, catalog, region="EA", weeks=2, min_users=1)
    assert report is not None
    category = report.kinds["view"]["category"]
    assert len(category.values) == MAX_INSIGHT_VALUES
    assert category.suppressed_cells == 10
    assert set(category.values) == {f"cat{c:03d}" for c in range(10, n)}
    assert category.reported_events == 2 * MAX_INSIGHT_VALUES


def _with_first_trend(body: str, literal: str) -> str:
    """The report's JSON with its first numeric trend replaced by a bare `literal`."""
    head, sep, tail = body.partition('"trend_per_week":')
    assert sep
    number = tail.split(",", 1)[0].split("}", 1)[0]
    return head + sep + literal + tail[len(number) :]
