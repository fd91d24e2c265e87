"""`/metrics` on both services moves with real requests; logs come as text or JSON lines."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from coordinator.app import create_app as create_coordinator
from coordinator.settings import CoordinatorSettings
from regional_node.app import create_app as create_node
from regional_node.recommender import build_serving_model
from regional_node.settings import NodeSettings
from shared.logging_setup import configure_logging
from shared.model import ModelConfig, init_state
from shared.observability import UNMATCHED_ROUTE, sample_value
from shared.schemas import CatalogItem
from tests.conftest import tiny_catalog
from tests.hand_made_rounds import (
    ADMIN,
    ROUND_METRICS,
    bootstrap,
    hand_made_delta,
    run_rounds,
    submit,
)

LATENCY = "fedjewel_http_request_duration_seconds_count"


def _coordinator_settings(tmp_path: Path, name: str = "c.db") -> CoordinatorSettings:
    return CoordinatorSettings(
        database_url=f"sqlite:///{tmp_path / name}",
        admin_token=ADMIN,
        embedding_dim=8,
        round_check_seconds=0.05,
    )


def _scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse /metrics the way Prometheus does (the endpoint's text, not the registry)."""
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def test_coordinator_metrics_follow_rounds_and_updates(tmp_path: Path) -> None:
    app = create_coordinator(_coordinator_settings(tmp_path))
    registry: CollectorRegistry = app.state.metrics_registry
    with TestClient(app) as client:
        (token,) = bootstrap(client)
        run_rounds(client, token, ROUND_METRICS[:2])  # versions 2 and 3

        current = client.get("/v1/rounds/current").json()
        body = hand_made_delta(client, token, current["base_version"], 0.01)
        # Stale base version: 409. Corrupted body: 422. No token: 401. Unknown round: 404.
        assert submit(client, token, current["round_id"], 1, body, {}).status_code == 409
        bad = submit(client, token, current["round_id"], current["base_version"], body[:-8], {})
        assert bad.status_code == 422
        assert client.post(f"/v1/rounds/{current['round_id']}/updates").status_code == 401
        assert submit(client, token, 999, current["base_version"], body, {}).status_code == 404
        assert client.get("/no/such/path").status_code == 404

        samples = _scrape(client)

    def updates(outcome: str, reason: str) -> float:
        key = ("fedjewel_updates_total", (("outcome", outcome), ("reason", reason)))
        return samples.get(key, 0.0)

    assert updates("accepted", "ok") == 2
    assert updates("rejected", "conflict") == 1
    assert updates("rejected", "invalid") == 1
    assert updates("rejected", "unauthorized") == 1
    assert updates("rejected", "no_such_round") == 1
    assert samples[("fedjewel_rounds_closed_total", (("reason", "target"),))] == 2
    assert samples[("fedjewel_aggregation_duration_seconds_count", ())] == 2
    assert samples[("fedjewel_aggregation_duration_seconds_sum", ())] > 0
    # Latency is labelled by the route template, never the raw path.
    route = "/v1/rounds/{round_id}/updates"
    assert sample_value(registry, LATENCY, {"method": "POST", "route": route, "status": "200"}) == 2
    assert sample_value(registry, LATENCY, {"method": "POST", "route": route, "status": "409"}) == 1
    assert (
        sample_value(
            registry, LATENCY, {"method": "GET", "route": UNMATCHED_ROUTE, "status": "404"}
        )
        == 1
    )
    paths = {dict(labels).get("route") for (name, labels) in samples if name == LATENCY}
    assert not any(p and "999" in p for p in paths)


def test_each_app_has_its_own_registry(tmp_path: Path) -> None:
    one = create_coordinator(_coordinator_settings(tmp_path, "one.db"))
    two = create_coordinator(_coordinator_settings(tmp_path, "two.db"))
    labels = {"method": "GET", "route": "/healthz", "status": "200"}
    with TestClient(one) as c1, TestClient(two):
        for _ in range(3):
            assert c1.get("/healthz").status_code == 200
    assert sample_value(one.state.metrics_registry, LATENCY, labels) == 3
    assert sample_value(two.state.metrics_registry, LATENCY, labels) == 0


def test_made_up_methods_share_one_label(tmp_path: Path) -> None:
    """The server takes any token as a method (answered 405): were each its own label,
    anyone could grow /metrics without end."""
    app = create_coordinator(_coordinator_settings(tmp_path))
    with TestClient(app) as client:
        for i in range(5):
            assert client.request(f"ZZ{i:03d}", "/healthz").status_code == 405
        assert client.request("DELETE", "/healthz").status_code == 405
        text = client.get("/metrics").text
    assert "ZZ0" not in text
    registry = app.state.metrics_registry
    other = {"method": "OTHER", "route": "/healthz", "status": "405"}
    assert sample_value(registry, LATENCY, other) == 5
    assert sample_value(registry, LATENCY, {**other, "method": "DELETE"}) == 1


@pytest.fixture
def node_client(tmp_path: Path) -> Iterator[TestClient]:
    settings = NodeSettings(
        id="eu-1",
        region="EU",
        database_url=f"sqlite:///{tmp_path / 'node.db'}",
        allow_anonymous=True,
    )
    with TestClient(create_node(settings, participate=False)) as client:
        yield client


def test_node_metrics_model_version_and_recommend_latency(node_client: TestClient) -> None:
    app = node_client.app
    registry: CollectorRegistry = app.state.metrics_registry  # type: ignore[attr-defined]
    gauge = "fedjewel_node_model_version_served"
    assert _scrape(node_client)[(gauge, ())] == 0  # nothing served yet

    catalog = [CatalogItem.model_validate(c) for c in tiny_catalog(40)]
    config = ModelConfig(num_items=len(catalog), embedding_dim=8)
    app.state.runtime.serving = build_serving_model(  # type: ignore[attr-defined]
        7, "sha", config, init_state(config), catalog
    )
    assert _scrape(node_client)[(gauge, ())] == 7

    ok = node_client.get("/v1/recommend", params={"session_items": "I001,I002", "k": 5})
    assert ok.status_code == 200 and ok.json()["model_version"] == 7
    assert node_client.get("/v1/recommend", params={"k": 0}).status_code == 422
    rec = "fedjewel_node_recommend_duration_seconds_count"
    assert sample_value(registry, rec, {"status": "200"}) == 1
    assert sample_value(registry, rec, {"status": "422"}) == 1
    assert (
        sample_value(
            registry, LATENCY, {"method": "GET", "route": "/v1/recommend", "status": "200"}
        )
        == 1
    )


@pytest.fixture
def fedjewel_logger() -> Iterator[logging.Logger]:
    logger = logging.getLogger("fedjewel")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield logger
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


def test_json_logs_carry_round_and_node_ids(
    fedjewel_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging(json_logs=True)
    logging.getLogger("fedjewel.coordinator.rounds").info(
        "update accepted from %s", "eu-1", extra={"round_id": 4, "node_id": "eu-1"}
    )
    line = capsys.readouterr().err.strip().splitlines()[-1]
    record = json.loads(line)
    assert record["message"] == "update accepted from eu-1"
    assert record["round_id"] == 4 and record["node_id"] == "eu-1"
    assert record["level"] == "INFO" and record["logger"] == "fedjewel.coordinator.rounds"


def test_text_logs_carry_round_and_node_ids(
    fedjewel_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging(json_logs=False)
    logging.getLogger("fedjewel.coordinator.rounds").info(
        "round %s closed", 4, extra={"round_id": 4, "node_id": "eu-1"}
    )
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "round 4 closed" in line and "[round_id=4 node_id=eu-1]" in line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)
