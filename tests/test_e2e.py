"""End to end: a coordinator and three nodes as real uvicorn processes over real HTTP."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, inspect, text

from shared.devservers import ServiceProcess, wait_for
from tests.conftest import tiny_catalog, tiny_events

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ADMIN = "e2e-admin-token"
REGIONS = [("eu-1", "EU", "silver"), ("na-1", "NA", "gold"), ("me-1", "ME", "platinum")]


def test_three_nodes_three_rounds(db_url: str, tmp_path: Path) -> None:
    procs: list[ServiceProcess] = []
    try:
        coord = ServiceProcess(
            name="coordinator",
            module="coordinator",
            env={
                "COORDINATOR_DATABASE_URL": db_url,
                "COORDINATOR_ADMIN_TOKEN": ADMIN,
                "COORDINATOR_MIN_UPDATES": "3",
                "COORDINATOR_ROUND_DEADLINE_SECONDS": "120",
                "COORDINATOR_ROUND_CHECK_SECONDS": "0.2",
                "COORDINATOR_EMBEDDING_DIM": "16",
                "COORDINATOR_MAX_ROUNDS": "3",
            },
            log_path=tmp_path / "coordinator.log",
        ).start()
        procs.append(coord)
        coord.wait_ready()
        admin = httpx.Client(base_url=coord.url, headers={"Authorization": f"Bearer {ADMIN}"})
        catalog = tiny_catalog()
        assert admin.put("/v1/catalog", json=catalog).status_code == 200

        nodes: list[ServiceProcess] = []
        for i, (node_id, region, material) in enumerate(REGIONS):
            creds = admin.post("/v1/nodes", json={"node_id": node_id, "region": region})
            assert creds.status_code == 201, creds.text
            node = ServiceProcess(
                name=node_id,
                module="regional_node",
                env={
                    "NODE_ID": node_id,
                    "NODE_REGION": region,
                    "NODE_COORDINATOR_URL": coord.url,
                    "NODE_TOKEN": creds.json()["token"],
                    "NODE_DATABASE_URL": f"sqlite:///{tmp_path / (node_id + '.db')}",
                    "NODE_POLL_SECONDS": "0.5",
                    "NODE_LOCAL_EPOCHS": "1",
                    "NODE_ALLOW_ANONYMOUS": "true",
                    "NODE_MIN_USERS_FOR_METRICS": "5",
                },
                log_path=tmp_path / f"{node_id}.log",
            ).start()
            procs.append(node)
            nodes.append(node)
            node.wait_ready()
            events = tiny_events(node_id, users=40, material=material, seed=i)
            r = httpx.post(node.url + "/v1/events", json=events, timeout=30)
            assert r.status_code == 200, r.text
            assert r.json()["inserted"] == len(events)

        def latest() -> int:
            return int(admin.get("/v1/models/latest").json()["version"])

        # Version 1 is the initialization; three closed rounds make version 4.
        wait_for(lambda: latest() >= 4, 240, "three rounds to complete", procs)
        versions = admin.get("/v1/models").json()
        numbers = [v["version"] for v in versions]
        assert numbers == sorted(numbers, reverse=True) and numbers[-1] == 1
        rounds = admin.get("/v1/rounds").json()
        closed = [r for r in rounds if r["state"] == "closed"]
        assert len(closed) >= 3
        assert all(sorted(r["participants"]) == sorted(n for n, _, _ in REGIONS) for r in closed)
        # Metrics travel as aggregates only and land on the version.
        assert "train_loss" in versions[0]["metrics"]

        newest = latest()
        wait_for(
            lambda: all(
                httpx.get(n.url + "/v1/status").json()["model_version"] >= newest for n in nodes
            ),
            60,
            "every node to serve the newest version",
            procs,
        )
        ids = {c["item_id"] for c in catalog}
        for n, (node_id, _region, _m) in zip(nodes, REGIONS, strict=True):
            rec = httpx.get(
                n.url + "/v1/recommend", params={"user_id": f"{node_id}-user-1", "k": 10}
            )
            assert rec.status_code == 200, rec.text
            body = rec.json()
            items = [it["item_id"] for it in body["items"]]
            assert len(items) == 10 and len(set(items)) == 10 and set(items) <= ids
            assert body["strategy"] == "model" and body["model_version"] >= newest
            status = httpx.get(n.url + "/v1/status").json()
            assert status["last_round_joined"] is not None and status["event_count"] > 0

        # No round trains on the last version, so each node fine-tunes it on its own
        # events with its own job (NODE_PERSONALIZE_EPOCHS) and serves that; the weights
        # never leave the node.
        assert latest() == newest == 4

        def fine_tuned(status: dict[str, object]) -> bool:
            return status["model_personalized"] is True and status["model_fine_tuned"] is True

        wait_for(
            lambda: all(fine_tuned(httpx.get(n.url + "/v1/status").json()) for n in nodes),
            120,
            "every node to serve the last version fine-tuned on its region",
            procs,
        )
        for n in nodes:
            status = httpx.get(n.url + "/v1/status").json()
            assert status["model_version"] == 4 and status["training"] is False

        _assert_no_private_data(db_url)
    finally:
        for p in reversed(procs):
            p.stop()


def _assert_no_private_data(db_url: str) -> None:
    """No user id and no event row in any table of the coordinator's database."""
    engine = create_engine(db_url)
    try:
        insp = inspect(engine)
        tables = insp.get_table_names()
        assert not any("event" in t for t in tables), tables
        with engine.connect() as conn:
            for table in tables:
                for row in conn.execute(text(f'SELECT * FROM "{table}"')):
                    for value in row:
                        blob = value if isinstance(value, bytes) else str(value).encode()
                        assert b"-user-" not in blob, f"user id found in table {table}"
    finally:
        engine.dispose()
