"""Synthetic market: determinism, realism properties, and that its files load."""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path

import pytest

from shared import market as market_module
from shared.cli import main
from shared.data import EventRecord, read_catalog_csv, read_events_csv
from shared.market import MarketSummary, generate_market
from shared.schemas import EVENT_TYPES, CatalogItem

USERS, ITEMS = 800, 300


@pytest.fixture(scope="module")
def market(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[MarketSummary, list[CatalogItem], list[EventRecord]]:
    summary = generate_market(tmp_path_factory.mktemp("market"), seed=7, users=USERS, items=ITEMS)
    catalog = read_catalog_csv(summary.catalog_path)
    known = {item.item_id for item in catalog}
    events = read_events_csv(summary.events_path, known_item_ids=known)
    return summary, catalog, events


Market = tuple[MarketSummary, list[CatalogItem], list[EventRecord]]


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    a = generate_market(tmp_path / "a", seed=3, users=300, items=120)
    b = generate_market(tmp_path / "b", seed=3, users=300, items=120)
    c = generate_market(tmp_path / "c", seed=4, users=300, items=120)
    for name in ("catalog.csv", "events.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()
    assert a.as_dict() | {"out_dir": "", "catalog_path": "", "events_path": ""} == (
        b.as_dict() | {"out_dir": "", "catalog_path": "", "events_path": ""}
    )
    assert c.events != a.events or c.cold_item_ids != a.cold_item_ids


def test_files_load_and_match_summary(market: Market) -> None:
    summary, catalog, events = market
    assert len(catalog) == ITEMS == summary.items
    assert len(events) == summary.events  # no duplicates were dropped
    assert len({e.user_id for e in events}) == USERS
    assert summary.events_path.read_text().splitlines()[0].endswith(",country,region")
    assert Counter(e.event_type for e in events) == summary.event_types
    # Incomplete catalog: some attribute cells are blank.
    assert any(i.material is None for i in catalog) or any(i.category is None for i in catalog)
    assert all(i.title is None or len(i.title.split()) >= 3 for i in catalog)


def test_region_sizes_differ_a_lot(market: Market) -> None:
    summary, _, events = market
    sizes = summary.users_per_region
    assert list(sizes) == ["EU", "NA", "ME", "EA", "SEA", "LATAM"]
    assert sum(sizes.values()) == USERS
    assert sizes["EU"] >= 4 * sizes["LATAM"]
    assert Counter(e.region for e in events) == summary.events_per_region
    countries: dict[str | None, set[str | None]] = defaultdict(set)
    for e in events:
        countries[e.region].add(e.country)
    assert countries["EU"] <= {"DE", "FR", "IT", "ES"} and len(countries["EU"]) >= 3
    assert countries["ME"] <= {"AE", "SA", "QA"}


def test_all_event_types_and_funnel_rates(market: Market) -> None:
    counts = market[0].event_types
    assert all(counts[t] > 0 for t in EVENT_TYPES)
    assert 0.2 < counts["click"] / counts["view"] < 0.4
    assert 0.2 < counts["add_to_cart"] / counts["click"] < 0.4
    assert 0.28 < counts["purchase"] / counts["add_to_cart"] < 0.52


def test_funnel_order_and_time_per_user(market: Market) -> None:
    summary, _, events = market
    needs = {"click": "view", "add_to_cart": "click", "purchase": "add_to_cart"}
    reached: dict[tuple[str, str], set[str]] = defaultdict(set)
    last_time: dict[str, datetime] = {}
    for e in events:  # file is chronological
        assert summary.start <= e.timestamp <= summary.end
        if e.user_id in last_time:
            assert e.timestamp > last_time[e.user_id], "timestamps strictly increase per user"
        last_time[e.user_id] = e.timestamp
        key = (e.user_id, e.item_id)
        if e.event_type in needs:
            assert needs[e.event_type] in reached[key], f"{e} without earlier step"
        reached[key].add(e.event_type)


def test_cold_items_and_cold_users(market: Market) -> None:
    summary, _, events = market
    assert 0.04 < summary.cold_items / ITEMS < 0.18
    cold = set(summary.cold_item_ids)
    cold_events = [e for e in events if e.item_id in cold]
    assert all(e.timestamp >= summary.cold_items_since for e in cold_events)
    per_user = Counter(e.user_id for e in events)
    n_cold_users = sum(1 for n in per_user.values() if n <= 2)
    assert n_cold_users == summary.cold_users
    assert 0.1 < summary.cold_users / USERS < 0.35
    assert max(per_user.values()) >= 40  # heavy tail of very active users


def test_regional_tastes_differ(market: Market) -> None:
    _, catalog, events = market
    material = {i.item_id: i.material for i in catalog}
    share: dict[str, float] = {}
    for region in ("EU", "ME"):
        intent = [
            material[e.item_id] for e in events if e.region == region and e.event_type != "view"
        ]
        share[region] = sum(m == "gold" for m in intent) / len(intent)
    assert share["ME"] - share["EU"] > 0.3


def test_taste_is_visible_in_content(market: Market) -> None:
    # Purchases prefer the region's price band: LATAM buys cheaper than ME.
    _, catalog, events = market
    price = {i.item_id: i.price_usd for i in catalog}

    def median_price(region: str) -> float:
        values = sorted(
            p
            for e in events
            if e.region == region and e.event_type != "view" and (p := price[e.item_id])
        )
        return values[len(values) // 2]

    assert median_price("ME") > 2 * median_price("LATAM")


def test_more_regions_are_synthesized(tmp_path: Path) -> None:
    summary = generate_market(tmp_path, seed=1, regions=8, users=400, items=100)
    assert summary.regions == ("EU", "NA", "ME", "EA", "SEA", "LATAM", "R7", "R8")
    assert all(n > 0 for n in summary.users_per_region.values())
    two = generate_market(tmp_path / "two", seed=1, regions=2, users=100, items=50)
    assert two.regions == ("EU", "NA")


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        generate_market(tmp_path, seed=1, regions=0)
    with pytest.raises(ValueError):
        generate_market(tmp_path, seed=1, regions=6, users=3)


def _files(out: Path) -> tuple[bytes, bytes]:
    return (out / "catalog.csv").read_bytes(), (out / "events.csv").read_bytes()


def test_design_weight_zero_does_not_depend_on_the_design_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The design vectors have their own random stream, so a market without them
    (`--design-weight 0`) is the market from before they existed, byte for byte."""

    def gen(name: str, weight: float) -> None:
        generate_market(tmp_path / name, seed=3, users=300, items=120, design_weight=weight)

    gen("w0", 0.0)
    gen("w1", 1.0)
    monkeypatch.setattr(market_module, "_DESIGN_STREAM", 12345)
    gen("w0-other", 0.0)
    gen("w1-other", 1.0)
    assert _files(tmp_path / "w0") == _files(tmp_path / "w0-other")
    # With the design taste on, behaviour follows the design vectors; the catalog never
    # shows them.
    assert _files(tmp_path / "w1")[1] != _files(tmp_path / "w1-other")[1]
    assert _files(tmp_path / "w1")[0] == _files(tmp_path / "w0")[0]
    assert _files(tmp_path / "w1")[1] != _files(tmp_path / "w0")[1]


@pytest.mark.parametrize("weight", [-0.5, float("nan"), float("inf")])
def test_design_weight_must_be_finite_and_not_negative(tmp_path: Path, weight: float) -> None:
    with pytest.raises(ValueError, match="design_weight"):
        generate_market(tmp_path, seed=1, users=50, items=20, design_weight=weight)
    assert not (tmp_path / "events.csv").exists()


def test_cli_rejects_a_bad_design_weight(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["generate-market", "--out", str(tmp_path), "--design-weight", "-1"])
    assert exit_info.value.code == 2
