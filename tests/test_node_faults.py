"""Node-side fault tolerance with real processes (coordinator on PostgreSQL).

- promote / roll back: nodes follow the active version; corrupted weights are refused;
- the coordinator dies: nodes keep serving, back off, say so in /v1/status, recover;
- a node dies mid-training: the round closes at its deadline with the remaining
  quorum, and the node rejoins when restarted.
"""

from __future__ import annotations

import random
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from regional_node.participation import backoff_seconds
from shared.devservers import ServiceProcess, wait_for
from tests.conftest import tiny_catalog, tiny_events
from tests.sec_support import (
    ADMIN,
    bearer,
    seeded_delta,
    start_coordinator,
    submit,
)

KEY = {"X-API-Key": "shop-key"}


def test_backoff_is_exponential_with_full_jitter_and_capped() -> None:
    rng = random.Random(7)
    for failures in range(1, 12):
        bound = min(30.0, 0.5 * 2**failures)
        draws = [backoff_seconds(failures, 0.5, 30.0, rng) for _ in range(200)]
        assert all(0 <= d <= bound for d in draws)
        assert max(draws) > 0.8 * bound  # jitter spreads over the whole interval
    assert backoff_seconds(10_000, 0.5, 30.0, rng) <= 30.0


def _node(
    node_id: str,
    coord_url: str,
    token: str,
    tmp_path: Path,
    log_name: str | None = None,
    port: int | None = None,
    **env: str,
) -> ServiceProcess:
    settings = {
        "NODE_ID": node_id,
        "NODE_REGION": "EU",
        "NODE_COORDINATOR_URL": coord_url,
        "NODE_TOKEN": token,
        "NODE_DATABASE_URL": f"sqlite:///{tmp_path / (node_id + '.db')}",
        "NODE_POLL_SECONDS": "0.3",
        "NODE_BACKOFF_MAX_SECONDS": "1.5",
        "NODE_LOCAL_EPOCHS": "1",
        "NODE_API_KEYS": "shop-key",
        "NODE_MIN_USERS_FOR_METRICS": "5",
        **{f"NODE_{k.upper()}": v for k, v in env.items()},
    }
    log = tmp_path / f"{log_name or node_id}.log"
    proc = ServiceProcess(name=log.stem, module="regional_node", env=settings, log_path=log)
    if port is not None:
        proc.port = port
    proc.start()
    proc.wait_ready()
    return proc


def _status(node: ServiceProcess) -> dict[str, object]:
    r = httpx.get(node.url + "/v1/status", timeout=10)
    r.raise_for_status()
    body: dict[str, object] = r.json()
    return body


def _served_version(node: ServiceProcess) -> int | None:
    r = httpx.get(
        node.url + "/v1/recommend",
        params={"session_items": "I001,I002", "k": 5},
        headers=KEY,
        timeout=10,
    )
    r.raise_for_status()
    version: int | None = r.json()["model_version"]
    return version


@pytest.mark.postgres
@pytest.mark.e2e
@pytest.mark.slow
def test_rollback_and_unreachable_coordinator(pg_url: str, tmp_path: Path) -> None:
    procs: list[ServiceProcess] = []
    try:
        coord = start_coordinator(pg_url, tmp_path / "coordinator.log", min_updates="1")
        procs.append(coord)
        admin = httpx.Client(base_url=coord.url, headers=ADMIN, timeout=30)
        admin.put("/v1/catalog", json=tiny_catalog(30)).raise_for_status()
        # The test itself plays a training node, so it decides what each version holds.
        creds = admin.post("/v1/nodes", json={"node_id": "t", "region": "X"}).json()
        trainer = bearer(creds["token"])
        client = httpx.Client(base_url=coord.url, timeout=30)
        v1 = admin.get("/v1/models/1/weights").content
        for version in (1, 2):
            rnd = client.get("/v1/rounds/current").json()
            weights = admin.get(f"/v1/models/{version}/weights").content
            r = submit(
                client,
                trainer,
                seeded_delta(weights, version),
                round_id=rnd["round_id"],
                base_version=version,
            )
            assert r.status_code == 200, r.text
            wait_for(
                lambda v=version: admin.get("/v1/models/latest").json()["version"] == v + 1,
                30,
                f"version {version + 1}",
                procs,
            )
        # Serving-only nodes (no events: they never train) follow the active version.
        nodes = []
        tokens = []
        for node_id in ("eu-1", "eu-2"):
            token = admin.post("/v1/nodes", json={"node_id": node_id, "region": "EU"})
            tokens.append(token.json()["token"])
            nodes.append(_node(node_id, coord.url, tokens[-1], tmp_path))
            procs.append(nodes[-1])
        wait_for(
            lambda: all(_served_version(n) == 3 for n in nodes), 60, "nodes on version 3", procs
        )

        # Roll back to version 2: the open round is rebased on it and nodes follow.
        r = admin.post("/v1/models/2/promote")
        assert r.status_code == 200 and r.json()["status"] == "active"
        assert admin.get("/v1/models/latest").json()["version"] == 2
        assert admin.get("/v1/models/3").json()["status"] == "retired"
        assert admin.get("/v1/rounds/current").json()["base_version"] == 2
        wait_for(
            lambda: all(_served_version(n) == 2 for n in nodes), 60, "nodes on version 2", procs
        )

        # Corrupted weights are refused by the nodes: they keep serving version 2.
        engine = create_engine(pg_url)
        with engine.begin() as conn:
            conn.execute(
                text("UPDATE model_version_chunks SET data = :w WHERE version = 3 AND seq = 0"),
                {"w": v1},
            )
        engine.dispose()
        assert admin.post("/v1/models/3/promote").status_code == 200
        wait_for(
            lambda: all("sha256" in str(_status(n)["last_error"]) for n in nodes),
            60,
            "nodes to refuse the corrupted version",
            procs,
        )
        assert all(_served_version(n) == 2 for n in nodes)
        assert admin.post("/v1/models/2/promote").status_code == 200

        # The coordinator dies: serving goes on, the nodes back off and say so.
        coord.kill()
        wait_for(
            lambda: all(
                _status(n)["coordinator_reachable"] is False
                and int(_status(n)["consecutive_failures"]) >= 2  # type: ignore[call-overload]
                for n in nodes
            ),
            60,
            "nodes to notice the coordinator is gone",
            procs,
        )
        for n in nodes:
            s = _status(n)
            # A transport error: refused connects, or a pooled connection reset by the kill.
            transport = ("ConnectError", "ReadError", "RemoteProtocolError", "WriteError")
            assert any(name in str(s["last_error"]) for name in transport), s["last_error"]
            assert 0 <= float(s["next_retry_seconds"]) <= 1.5  # type: ignore[arg-type]
            assert s["model_version"] == 2
            assert _served_version(n) == 2
            ok = httpx.post(
                n.url + "/v1/events",
                json=tiny_events("x", users=1, material="gold", seed=1),
                headers=KEY,
            )
            assert ok.status_code == 200  # storefront traffic is still accepted

        # A node restarted during the outage serves the version and catalog it served
        # before (it once had neither: unfiltered popularity, deactivated items and all).
        nodes[1].stop()
        nodes[1] = _node(
            "eu-2", coord.url, tokens[1], tmp_path, log_name="eu-2-restarted", port=nodes[1].port
        )
        procs.append(nodes[1])
        wait_for(lambda: _served_version(nodes[1]) == 2, 30, "the stored version 2", procs)
        rings = httpx.get(
            nodes[1].url + "/v1/recommend",
            params={"session_items": "I001", "category": "ring", "k": 5},
            headers=KEY,
        ).json()
        by_id = {c["item_id"]: c for c in tiny_catalog(30)}
        assert rings["strategy"] == "model" and rings["items"]
        assert all(by_id[i["item_id"]]["category"] == "ring" for i in rings["items"])
        assert _status(nodes[1])["coordinator_reachable"] is not True

        coord = start_coordinator(pg_url, tmp_path / "coordinator-2.log", port=coord.port)
        procs.append(coord)
        wait_for(
            lambda: all(
                _status(n)["coordinator_reachable"] is True
                and _status(n)["consecutive_failures"] == 0
                for n in nodes
            ),
            60,
            "nodes to reconnect",
            procs,
        )
        # Back in the loop: the events posted during the outage are trained on, and the
        # nodes serve whatever the coordinator makes active next.
        wait_for(
            lambda: all(
                _served_version(n) == admin.get("/v1/models/latest").json()["version"] > 2
                for n in nodes
            ),
            90,
            "nodes to train again and follow the new version",
            procs,
        )
    finally:
        for p in reversed(procs):
            p.stop()


@pytest.mark.postgres
@pytest.mark.e2e
@pytest.mark.slow
def test_node_killed_mid_training(pg_url: str, tmp_path: Path) -> None:
    procs: list[ServiceProcess] = []
    try:
        coord = start_coordinator(
            pg_url,
            tmp_path / "coordinator.log",
            min_updates="2",  # the quorum a round closes with at its deadline
            target_updates="3",  # all three close a round at once
            round_deadline_seconds="10",
        )
        procs.append(coord)
        admin = httpx.Client(base_url=coord.url, headers=ADMIN, timeout=30)
        admin.put("/v1/catalog", json=tiny_catalog(60)).raise_for_status()
        tokens = {
            n: admin.post("/v1/nodes", json={"node_id": n, "region": "EU"}).json()["token"]
            for n in ("a", "b", "c")
        }
        # Node c trains very slowly (batch size 1, many epochs): it will be killed mid-way.
        slow = {"batch_size": "1", "local_epochs": "100"}
        nodes = {
            n: _node(n, coord.url, tokens[n], tmp_path, **(slow if n == "c" else {}))
            for n in ("c", "a", "b")
        }
        procs.extend(nodes.values())
        for i, (n, proc) in enumerate(nodes.items()):
            events = tiny_events(n, users=30, material="gold", seed=i)
            httpx.post(proc.url + "/v1/events", json=events, headers=KEY).raise_for_status()

        wait_for(lambda: _status(nodes["c"])["training"] is True, 60, "c to train", procs)
        killed_in = int(admin.get("/v1/rounds/current").json()["round_id"])
        nodes["c"].kill()

        def closed(round_id: int) -> dict[str, object] | None:
            r: dict[str, object] = admin.get(f"/v1/rounds/{round_id}").json()
            return r if r["state"] == "closed" else None

        wait_for(lambda: closed(killed_in) is not None, 60, "the round to close", procs)
        rnd = closed(killed_in)
        assert rnd is not None
        assert rnd["participants"] == ["a", "b"]
        assert rnd["updates_received"] == 2
        closed_at = datetime.fromisoformat(str(rnd["closed_at"]))
        assert closed_at >= datetime.fromisoformat(str(rnd["deadline"]))  # by its deadline

        # c comes back (now at normal speed) and takes part in a later round.
        nodes["c"] = _node("c", coord.url, tokens["c"], tmp_path, log_name="c-restarted")
        procs.append(nodes["c"])
        wait_for(
            lambda: any(
                "c" in r["participants"] and r["state"] == "closed"
                for r in admin.get("/v1/rounds").json()
            ),
            90,
            "c to rejoin a round",
            procs,
        )
        assert _status(nodes["c"])["last_round_joined"] is not None
    finally:
        for p in reversed(procs):
            p.stop()
