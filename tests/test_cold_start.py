"""Cold start in serving (a brand-new shopper with a session) and catalog growth."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from coordinator.aggregation import compute_delta
from coordinator.app import create_app as create_coordinator
from coordinator.settings import CoordinatorSettings
from regional_node.app import create_app as create_node
from regional_node.recommender import ServingModel, build_serving_model
from regional_node.settings import NodeSettings
from shared.data import read_catalog_csv
from shared.market import generate_market
from shared.model import HybridTwoTower, ModelConfig, init_state
from shared.schemas import CatalogItem
from shared.serialization import bytes_to_state, sha256_hex, state_to_bytes
from shared.simulate import SimulationConfig, load_dataset, train_federated
from tests.conftest import tiny_catalog

ADMIN = "admin-secret"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[ServingModel, list[CatalogItem]]:
    """A model federated-trained on a small market, wrapped for serving."""
    out = tmp_path_factory.mktemp("cold-market")
    generate_market(out, seed=11, regions=3, users=400, items=160)
    data = load_dataset(out)
    model: HybridTwoTower = train_federated(
        data, SimulationConfig(rounds=2, local_epochs=1)
    ).global_model
    catalog = read_catalog_csv(out / "catalog.csv")
    serving = build_serving_model(1, "test", model.config, model.state_dict(), catalog)
    return serving, catalog


@pytest.fixture
def node(trained: tuple[ServingModel, list[CatalogItem]], tmp_path: Path) -> Iterator[TestClient]:
    settings = NodeSettings(
        database_url=f"sqlite:///{tmp_path / 'node.db'}", allow_anonymous=True, region="EU"
    )
    app = create_node(settings, participate=False)
    app.state.runtime.serving = trained[0]
    with TestClient(app) as client:
        yield client


def _complete(catalog: list[CatalogItem]) -> list[CatalogItem]:
    return [it for it in catalog if it.category and it.material and it.price_usd is not None]


def test_new_shopper_with_a_two_item_session_gets_similar_items(
    node: TestClient, trained: tuple[ServingModel, list[CatalogItem]]
) -> None:
    _, catalog = trained
    by_id = {it.item_id: it for it in catalog}
    items = _complete(catalog)
    shared_hits = 0
    shown = 0
    base_rate = 0.0
    sessions = 0
    for material in ("gold", "silver", "platinum", "rose_gold"):
        for category in ("ring", "necklace", "earrings"):
            pair = [it for it in items if it.material == material and it.category == category][:2]
            if len(pair) < 2:
                continue
            sessions += 1
            resp = node.get(
                "/v1/recommend",
                params={
                    "user_id": f"new-{material}-{category}",
                    "country": "DE",
                    "session_items": ",".join(it.item_id for it in pair),
                    "k": 10,
                },
            )
            assert resp.status_code == 200, resp.text
            body = resp.json()
            assert body["strategy"] == "model"
            recs = [by_id[r["item_id"]] for r in body["items"]]
            assert len(recs) == 10
            assert not {it.item_id for it in pair} & {it.item_id for it in recs}
            shared_hits += sum(
                1 for it in recs if it.material == material or it.category == category
            )
            shown += len(recs)
            base_rate += sum(
                1 for it in catalog if it.material == material or it.category == category
            ) / len(catalog)
    assert sessions >= 6
    chance = base_rate / sessions
    # Measured 0.44 vs 0.357 by chance (1.23x) on this seed and model.
    assert shared_hits / shown >= 1.15 * chance, (shared_hits / shown, chance)


def test_filters_hold_and_purchases_are_excluded(
    node: TestClient, trained: tuple[ServingModel, list[CatalogItem]]
) -> None:
    _, catalog = trained
    by_id = {it.item_id: it for it in catalog}
    items = _complete(catalog)
    session = [items[0].item_id, items[1].item_id]
    resp = node.get(
        "/v1/recommend",
        params={
            "session_items": ",".join(session),
            "category": "ring",
            "material": "silver",
            "max_price": 400,
            "k": 20,
        },
    )
    assert resp.status_code == 200
    recs = [by_id[r["item_id"]] for r in resp.json()["items"]]
    assert recs, "the filters leave candidates in this catalog"
    for it in recs:
        assert it.category == "ring" and it.material == "silver"
        assert it.price_usd is not None and it.price_usd <= 400

    # A known shopper: what they bought is never recommended back to them.
    unfiltered = node.get("/v1/recommend", params={"session_items": ",".join(session), "k": 5})
    bought = [r["item_id"] for r in unfiltered.json()["items"]][:3]
    events = [
        {
            "user_id": "buyer",
            "item_id": item,
            "event_type": etype,
            "timestamp": f"2026-10-0{i + 1}T10:00:00Z",
            "country": "DE",
        }
        for i, item in enumerate([*session, *bought])
        for etype in (["view", "purchase"] if item in bought else ["view"])
    ]
    assert node.post("/v1/events", json=events).status_code == 200
    recs = node.get("/v1/recommend", params={"user_id": "buyer", "k": 50}).json()
    assert recs["strategy"] == "model"
    assert not set(bought) & {r["item_id"] for r in recs["items"]}


def test_coordinator_next_version_grows_rows_for_new_items(tmp_path: Path) -> None:
    settings = CoordinatorSettings(
        database_url=f"sqlite:///{tmp_path / 'c.db'}",
        admin_token=ADMIN,
        embedding_dim=8,
        round_check_seconds=0.1,
    )
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with TestClient(create_coordinator(settings)) as client:
        assert client.put("/v1/catalog", json=tiny_catalog(20), headers=admin).status_code == 200
        v1 = client.get("/v1/models/latest").json()
        assert v1["num_items"] == 20
        token = client.post(
            "/v1/nodes", json={"node_id": "eu-1", "region": "EU"}, headers=admin
        ).json()["token"]
        base = bytes_to_state(
            client.get(f"/v1/models/{v1['version']}/weights", headers=admin).content
        )
        # The catalog grows while the round is open.
        assert client.put("/v1/catalog", json=tiny_catalog(26), headers=admin).status_code == 200
        trained = {k: v + 0.01 for k, v in base.items()}
        payload = state_to_bytes(compute_delta(trained, base))
        rnd = client.get("/v1/rounds/current").json()
        resp = client.post(
            f"/v1/rounds/{rnd['round_id']}/updates",
            params={"num_examples": 10, "base_version": v1["version"]},
            content=payload,
            headers={
                "Authorization": f"Bearer {token}",
                "Content-Type": "application/octet-stream",
                "X-Content-SHA256": sha256_hex(payload),
            },
        )
        assert resp.status_code in (200, 201, 202), resp.text
        deadline = time.monotonic() + 20
        latest = v1
        while latest["version"] == v1["version"] and time.monotonic() < deadline:
            time.sleep(0.1)
            latest = client.get("/v1/models/latest").json()
        assert latest["version"] > v1["version"]
        assert latest["num_items"] == 26
        new = bytes_to_state(
            client.get(f"/v1/models/{latest['version']}/weights", headers=admin).content
        )
        rows = new["item_id.weight"]
        assert rows.shape[0] == 26
        # Trained rows kept (base + the update), new rows start at zero (content only).
        assert torch.allclose(rows[:20], trained["item_id.weight"])
        assert torch.count_nonzero(rows[20:]) == 0
        config = ModelConfig.model_validate(latest["config"])
        model = HybridTwoTower(config)
        model.load_state_dict(new)
        assert set(new) == set(init_state(config))
