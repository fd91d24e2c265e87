"""Regional node API: events, recommendations, status, API keys."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from regional_node.app import create_app
from regional_node.recommender import build_serving_model
from regional_node.settings import NodeSettings
from shared.model import ModelConfig, init_state
from shared.schemas import CatalogItem, CatalogOut
from tests.conftest import _pg_admin, tiny_catalog, tiny_events

KEY = {"X-API-Key": "shop-key"}


@pytest.fixture
def node(tmp_path: Path) -> Iterator[TestClient]:
    settings = NodeSettings(
        id="eu-1",
        region="EU",
        database_url=f"sqlite:///{tmp_path / 'node.db'}",
        api_keys="shop-key,other-key",
    )
    app = create_app(settings, participate=False)
    with TestClient(app) as c:
        yield c


def _install_model(client: TestClient, n: int = 60) -> None:
    items = [CatalogItem.model_validate(d) for d in tiny_catalog(n)]
    config = ModelConfig(num_items=n, embedding_dim=8)
    runtime = client.app.state.runtime  # type: ignore[attr-defined]
    runtime.catalog = CatalogOut(catalog_version=1, items=items)
    runtime.serving = build_serving_model(7, "0" * 64, config, init_state(config), items)


def test_settings_refuse_to_run_without_keys() -> None:
    with pytest.raises(ValueError, match="NODE_API_KEYS"):
        NodeSettings(api_keys="", allow_anonymous=False)
    assert NodeSettings(api_keys="", allow_anonymous=True).allow_anonymous


def test_api_key_required(node: TestClient) -> None:
    assert node.get("/v1/recommend").status_code == 401
    assert node.get("/v1/recommend", headers={"X-API-Key": "nope"}).status_code == 401
    assert node.post("/v1/events", json=[]).status_code == 401
    assert node.get("/v1/recommend", headers={"X-API-Key": "other-key"}).status_code == 200
    # Health and status stay open for probes.
    assert node.get("/healthz").status_code == 200
    assert node.get("/readyz").status_code == 200


@pytest.fixture
def node_on_db(db_url: str) -> Iterator[TestClient]:
    """`node`, once on SQLite and once on PostgreSQL."""
    settings = NodeSettings(id="eu-1", region="EU", database_url=db_url, api_keys="shop-key")
    with TestClient(create_app(settings, participate=False)) as c:
        yield c


def test_events_ingest_validates_and_dedupes(node_on_db: TestClient) -> None:
    node = node_on_db
    events = tiny_events("eu", users=5, material="gold", seed=1)
    r = node.post("/v1/events", json=events, headers=KEY)
    assert r.status_code == 200 and r.json()["inserted"] == len(events)
    again = node.post("/v1/events", json=events, headers=KEY).json()
    assert again["inserted"] == 0 and again["duplicates"] == len(events)
    assert node.get("/v1/status").json()["event_count"] == len(events)

    bad = [*events[:2], {**events[0], "event_type": "buy"}]
    r = node.post("/v1/events", json=bad, headers=KEY)
    assert r.status_code == 422 and "event_type" in str(r.json()["detail"])
    r = node.post("/v1/events", json=[{**events[0], "timestamp": "yesterday"}], headers=KEY)
    assert r.status_code == 422
    r = node.post("/v1/events", json=[{**events[0], "secret": 1}], headers=KEY)
    assert r.status_code == 422
    assert node.get("/v1/status").json()["event_count"] == len(events)
    # Part new, part stored: the counts say which (PostgreSQL's rowcount once read -1).
    more = tiny_events("eu", users=7, material="gold", seed=1)
    fresh = len(more) - len(events)
    r = node.post("/v1/events", json=more, headers=KEY).json()
    assert fresh > 0 and (r["inserted"], r["duplicates"]) == (fresh, len(events))
    assert node.get("/v1/status").json()["event_count"] == len(more)


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        # Before year 1 once converted to UTC (was a 500: OverflowError).
        ("timestamp", "0001-01-01T00:00:00+01:00", "out of range"),
        ("timestamp", "9999-12-31T23:59:59-01:00", "out of range"),
        # One event dated years ahead moved the regional insights' window past every
        # real event (until 2026-11-27).
        ("timestamp", "2099-01-01T00:00:00Z", "in the future"),
        ("country", "D\x00E", "not a code"),  # PostgreSQL text cannot hold NUL (was a 500)
        ("country", "ABCDEFGHIJ", "not a code"),
    ],
)
def test_events_with_values_no_database_can_hold_are_a_422(
    node_on_db: TestClient, field: str, value: str, says: str
) -> None:
    event = {**tiny_events("eu", users=1, material="gold", seed=1)[0], field: value}
    r = node_on_db.post("/v1/events", json=[event], headers=KEY)
    assert r.status_code == 422 and says in str(r.json()["detail"]), r.text
    assert node_on_db.get("/v1/status").json()["event_count"] == 0


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_a_non_finite_json_number_is_a_422_not_a_500(node: TestClient, literal: str) -> None:
    # Python's JSON parser accepts these; the 422 that echoes the input must still encode.
    event = '{"user_id": "u1", "item_id": "I001", "event_type": "view", "timestamp": '
    body = f"[{event}{literal}}}]"
    r = node.post("/v1/events", content=body, headers={**KEY, "Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", 0, "timestamp"]


def test_recommend_popularity_without_model(node: TestClient) -> None:
    events = tiny_events("eu", users=10, material="gold", seed=2)
    node.post("/v1/events", json=events, headers=KEY)
    body = node.get("/v1/recommend", params={"user_id": "new-user", "k": 5}, headers=KEY).json()
    assert body["strategy"] == "popularity" and body["model_version"] is None
    assert len(body["items"]) == 5
    scores = [i["score"] for i in body["items"]]
    assert scores == sorted(scores, reverse=True)


def test_recommend_with_model_excludes_purchases(node: TestClient) -> None:
    _install_model(node)
    events = [
        {
            "user_id": "u1",
            "item_id": f"I{i:03d}",
            "event_type": etype,
            "timestamp": f"2026-10-01T10:0{i}:00Z",
            "country": "DE",
        }
        for i, etype in [(1, "view"), (2, "purchase"), (3, "add_to_cart")]
    ]
    node.post("/v1/events", json=events, headers=KEY)
    body = node.get("/v1/recommend", params={"user_id": "u1", "k": 10}, headers=KEY).json()
    assert body["strategy"] == "model" and body["model_version"] == 7
    ids = [i["item_id"] for i in body["items"]]
    assert len(ids) == 10 and len(set(ids)) == 10 and "I002" not in ids
    catalog_ids = {c["item_id"] for c in tiny_catalog(60)}
    assert set(ids) <= catalog_ids


def test_recommend_session_context_and_filters(node: TestClient) -> None:
    _install_model(node)
    params = {"session_items": "I004,I008", "country": "fr", "k": 10, "category": "ring"}
    body = node.get("/v1/recommend", params=params, headers=KEY).json()
    assert body["strategy"] == "model" and body["user_id"] is None
    by_id = {c["item_id"]: c for c in tiny_catalog(60)}
    ids = [i["item_id"] for i in body["items"]]
    assert ids and all(by_id[i]["category"] == "ring" for i in ids)
    assert "I004" not in ids and "I008" not in ids
    capped = node.get(
        "/v1/recommend", params={"session_items": "I001", "max_price": 300, "k": 50}, headers=KEY
    ).json()["items"]
    assert capped and all(by_id[i["item_id"]]["price_usd"] <= 300 for i in capped)
    none = node.get(
        "/v1/recommend", params={"session_items": "I001", "category": "tiara"}, headers=KEY
    ).json()
    assert none["items"] == []
    assert node.get("/v1/recommend", params={"k": 0}, headers=KEY).status_code == 422
    assert node.get("/v1/recommend", params={"k": 1000}, headers=KEY).status_code == 422


def test_status(node: TestClient) -> None:
    status = node.get("/v1/status").json()
    assert status["node_id"] == "eu-1" and status["region"] == "EU"
    assert status["model_version"] is None and status["event_count"] == 0
    assert status["coordinator_reachable"] is False


def test_recommend_refuses_inputs_it_cannot_honour(node: TestClient) -> None:
    _install_model(node)
    for params, says in [
        ({"min_price": 500, "max_price": 100}, "above max_price"),
        ({"max_price": "inf"}, "finite"),
        ({"min_price": "nan"}, "finite"),
        ({"user_id": "a\x00b"}, "pattern"),
        ({"country": "D\x00E"}, "not a code"),
    ]:
        r = node.get("/v1/recommend", params=params, headers=KEY)
        assert r.status_code == 422 and says in r.text, (params, r.text)
    # A filter value is compared as the catalog's are: surrounding blanks do not count.
    padded = node.get(
        "/v1/recommend", params={"session_items": "I001", "category": " ring "}, headers=KEY
    ).json()["items"]
    by_id = {c["item_id"]: c for c in tiny_catalog(60)}
    assert padded and all(by_id[i["item_id"]]["category"] == "ring" for i in padded)


def test_a_long_session_counts_its_newest_items(node: TestClient) -> None:
    _install_model(node)
    session = ["I001"] * 100 + ["I002", "I003"]  # the newest two came after 100 others
    body = node.get(
        "/v1/recommend", params={"session_items": ",".join(session), "k": 60}, headers=KEY
    ).json()
    ids = {i["item_id"] for i in body["items"]}
    assert len(ids) == 57 and not ids & {"I001", "I002", "I003"}


def test_a_session_of_items_the_model_does_not_know_gets_popularity(node: TestClient) -> None:
    _install_model(node)
    node.post("/v1/events", json=tiny_events("eu", users=10, material="gold", seed=2), headers=KEY)
    params = {"user_id": "nobody", "session_items": "NOPE1,NOPE2", "k": 5}
    body = node.get("/v1/recommend", params=params, headers=KEY).json()
    assert body["strategy"] == "popularity" and len(body["items"]) == 5


def test_before_the_first_model_filters_are_refused_and_inactive_items_left_out(
    node: TestClient,
) -> None:
    events = tiny_events("eu", users=10, material="gold", seed=2)
    node.post("/v1/events", json=events, headers=KEY)
    r = node.get("/v1/recommend", params={"category": "tiara"}, headers=KEY)
    assert r.status_code == 503 and "filters cannot be applied" in r.json()["detail"]
    top = node.get("/v1/recommend", params={"k": 3}, headers=KEY).json()["items"][0]["item_id"]
    # The catalog came, the model not yet: an item the catalog deactivated is not served.
    items = [CatalogItem.model_validate(d) for d in tiny_catalog(60)]
    runtime = node.app.state.runtime  # type: ignore[attr-defined]
    runtime.catalog = CatalogOut(catalog_version=2, items=items, inactive_item_ids=[top])
    body = node.get("/v1/recommend", params={"k": 50}, headers=KEY).json()
    assert body["strategy"] == "popularity" and body["items"]
    assert top not in {i["item_id"] for i in body["items"]}
    # Events may name items the catalog does not hold: never served (they were until
    # 2026-11-27), and the answer is filled up to k from the catalog's active items.
    ghost = [{**events[0], "item_id": "GHOST-1", "user_id": f"g{i}"} for i in range(30)]
    assert node.post("/v1/events", json=ghost, headers=KEY).json()["unknown_item_ids"] == [
        "GHOST-1"
    ]
    body = node.get("/v1/recommend", params={"k": 59}, headers=KEY).json()
    ids = [i["item_id"] for i in body["items"]]
    assert len(ids) == len(set(ids)) == 59 and "GHOST-1" not in ids and top not in ids


def test_anonymous_calls_are_served_beside_keys_when_allowed(tmp_path: Path) -> None:
    settings = NodeSettings(
        id="eu-1",
        region="EU",
        database_url=f"sqlite:///{tmp_path / 'node.db'}",
        api_keys="shop-key",
        allow_anonymous=True,
    )
    with TestClient(create_app(settings, participate=False)) as c:
        assert c.get("/v1/recommend").status_code == 200
        assert c.get("/v1/recommend", headers=KEY).status_code == 200
        assert c.get("/v1/recommend", headers={"X-API-Key": "nope"}).status_code == 401


def test_storefront_spellings_of_a_country_are_stored_as_codes(node: TestClient) -> None:
    events = [
        {"user_id": f"u{i}", "item_id": "I001", "event_type": "view", "timestamp": 1, "country": c}
        for i, c in enumerate(["u.k.", "gb eng", "GB_ENG", " de "])
    ]
    r = node.post("/v1/events", json=events, headers=KEY)
    assert r.status_code == 200 and r.json()["inserted"] == 4, r.text
    store = node.app.state.store  # type: ignore[attr-defined]
    stored = {store.recommend_context(f"u{i}", 5)[2] for i in range(4)}
    assert stored == {"UK", "GB-ENG", "DE"}


def test_a_shopper_with_history_is_served_by_the_model_on_both_databases(
    node_on_db: TestClient,
) -> None:
    # On PostgreSQL the history query itself failed (UNION types timestamp with time
    # zone and text cannot be matched): every /v1/recommend with a known user_id was a
    # 500 there until 2026-11-26. The query now returns the user's raw events, oldest
    # first, with purchases and the newest country, on both databases.
    _install_model(node_on_db)

    def event(item: str, etype: str, t: int, country: str | None = None) -> dict[str, object]:
        return {
            "user_id": "h",
            "item_id": item,
            "event_type": etype,
            "timestamp": t,
            "country": country,
        }

    events = [
        event("I001", "view", 1, "FR"),
        event("I002", "view", 2),
        event("I001", "purchase", 3),
    ]
    events += [event("I003", "view", 10 + i) for i in range(3)]
    events += [event("I002", "add_to_cart", 60, "DE"), event("I004", "view", 61)]
    r = node_on_db.post("/v1/events", json=events, headers=KEY)
    assert r.status_code == 200 and r.json()["inserted"] == len(events), r.text
    store = node_on_db.app.state.store  # type: ignore[attr-defined]
    history, purchased, country = store.recommend_context("h")
    assert history == [(e["item_id"], e["event_type"]) for e in events]
    assert (purchased, country) == ({"I001"}, "DE")
    assert store.recommend_context("h", 2)[0] == [("I002", "add_to_cart"), ("I004", "view")]
    assert store.recommend_context("nobody") == ([], set(), None)
    body = node_on_db.get("/v1/recommend", params={"user_id": "h", "k": 5}, headers=KEY)
    assert body.status_code == 200, body.text
    assert body.json()["strategy"] == "model"
    assert not {i["item_id"] for i in body.json()["items"]} & {"I001"}  # bought


def test_a_database_outage_is_a_503_the_storefront_may_retry(pg_url: str) -> None:
    # Connection errors reached the storefront as a 500 from /v1/recommend and
    # /v1/events while /readyz said 503 (docs/operations.md promises 503).
    settings = NodeSettings(id="eu-1", region="EU", database_url=pg_url, api_keys="shop-key")
    name = pg_url.rsplit("/", 1)[1]
    events = tiny_events("eu", users=2, material="gold", seed=1)
    with TestClient(create_app(settings, participate=False), raise_server_exceptions=False) as c:
        assert c.post("/v1/events", json=events, headers=KEY).status_code == 200
        with _pg_admin() as conn:
            conn.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
            conn.execute(
                f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
            )
        try:
            recommend = c.get("/v1/recommend", params={"user_id": "eu-user-0"}, headers=KEY)
            ingest = c.post("/v1/events", json=events[:1], headers=KEY)
            for r in (recommend, ingest):
                assert r.status_code == 503, r.text
                assert "database is not available" in r.json()["detail"]
                assert r.headers["retry-after"] == "1"
            assert c.get("/readyz").status_code == 503
        finally:
            with _pg_admin() as conn:
                conn.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
        assert (
            c.get("/v1/recommend", params={"user_id": "eu-user-0"}, headers=KEY).status_code == 200
        )


def test_a_broken_schema_is_a_500_not_a_database_outage(tmp_path: Path) -> None:
    # SQLite reports a missing column as OperationalError too: answered as "the database
    # is not available; retry", it hid a bug behind a 503 and logged no traceback.
    url = f"sqlite:///{tmp_path / 'node.db'}"
    settings = NodeSettings(id="eu-1", region="EU", database_url=url, api_keys="shop-key")
    with TestClient(create_app(settings, participate=False), raise_server_exceptions=False) as c:
        store = c.app.state.store  # type: ignore[attr-defined]
        with store.engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE events RENAME COLUMN country TO gone")
        r = c.get("/v1/recommend", params={"user_id": "u1"}, headers=KEY)
        assert r.status_code == 500


def test_which_operational_errors_mean_the_database_is_unavailable() -> None:
    import sqlite3

    from sqlalchemy.exc import OperationalError

    from shared.errors import database_unavailable

    def sqlite_error(text: str) -> OperationalError:
        return OperationalError("SELECT 1", {}, sqlite3.OperationalError(text))

    assert database_unavailable(sqlite_error("database is locked"))
    assert database_unavailable(sqlite_error("unable to open database file"))
    assert not database_unavailable(sqlite_error("no such column: country"))
