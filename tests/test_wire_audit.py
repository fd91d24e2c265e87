"""Wire audit: every request each node sends to the coordinator, recorded and checked.

Real processes on loopback: a coordinator with secure aggregation, three nodes,
and one recording reverse proxy per node between it and the coordinator
(shared/wire_recorder.py), for three rounds. Node `dp-1` trains with DP-FedAvg
(or, in the second run, node-side DP-SGD: two noisy steps a round at sampling rate
0.5) and a budget that allows exactly three rounds; `big-1` has enough users for its
metrics to be sent; `small-1` has fewer users than NODE_MIN_USERS_FOR_METRICS.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest

from shared.devservers import ServiceProcess, wait_for
from shared.insights_schemas import RegionReport
from shared.privacy import dp_epsilon
from shared.serialization import bytes_to_state, read_metadata
from shared.wire_recorder import read_log
from tests.conftest import tiny_catalog, tiny_events

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ADMIN = "wire-admin"
MIN_USERS = 10
NODES = {  # node id -> (users, DP on)
    "dp-1": (30, True),
    "big-1": (30, False),
    "small-1": (6, False),
}
ALLOWED_PATHS = [
    r"/v1/catalog",
    r"/v1/models/latest",
    r"/v1/models/\d+",
    r"/v1/models/\d+/weights",
    r"/v1/rounds/current",
    r"/v1/rounds/\d+/secagg",
    r"/v1/rounds/\d+/secagg/keys",
    r"/v1/rounds/\d+/secagg/reveals",
    r"/v1/rounds/\d+/updates",
    r"/v1/insights/{node}",
]
ALLOWED_HEADERS = {
    "host",
    "accept",
    "accept-encoding",
    "connection",
    "user-agent",
    "authorization",
    "content-type",
    "content-length",
    "if-none-match",
    "x-content-sha256",
    "x-update-metrics",
    "x-update-encoding",
}
AGGREGATE_METRICS = {"hr@10", "ndcg@10", "eval_users", "train_loss"}
DP_METRICS = {"dp_epsilon", "dp_noise_multiplier"}


@pytest.mark.parametrize("mode", ["fedavg", "dpsgd", "fedsgd"])
def test_nodes_send_only_weights_counts_and_aggregates(tmp_path: Path, mode: str) -> None:
    # One release a round (fedavg, q 1), two subsampled steps a round (dpsgd, q 0.5), or
    # DP-FedSGD: one noisy mean gradient a round, half the noise (the cohort's minimum is
    # 2) and FedAdam on the coordinator.
    algorithm = "fedavg" if mode == "fedavg" else "dpsgd"
    steps, q = (2, 0.5) if mode == "dpsgd" else (1, 0.5) if mode == "fedsgd" else (1, 1.0)
    fedsgd = mode == "fedsgd"
    eps3 = dp_epsilon(noise_multiplier=1.0, sampling_rate=q, steps=3 * steps, delta=1e-5)
    eps4 = dp_epsilon(noise_multiplier=1.0, sampling_rate=q, steps=4 * steps, delta=1e-5)
    budget = (eps3 + eps4) / 2  # three DP rounds fit, a fourth does not
    procs: list[ServiceProcess] = []
    events: dict[str, list[dict[str, Any]]] = {}
    try:
        coord = ServiceProcess(
            name="coordinator",
            module="coordinator",
            env={
                "COORDINATOR_DATABASE_URL": f"sqlite:///{tmp_path / 'coordinator.db'}",
                "COORDINATOR_ADMIN_TOKEN": ADMIN,
                "COORDINATOR_MIN_UPDATES": "2",
                "COORDINATOR_TARGET_UPDATES": "3",
                "COORDINATOR_ROUND_DEADLINE_SECONDS": "300",  # slow CI: rounds close on target
                "COORDINATOR_ROUND_CHECK_SECONDS": "0.2",
                "COORDINATOR_EMBEDDING_DIM": "16",
                "COORDINATOR_SECURE_AGGREGATION": "true",
                "COORDINATOR_SERVER_OPTIMIZER": "adam" if fedsgd else "none",
            },
            log_path=tmp_path / "coordinator.log",
        ).start()
        procs.append(coord)
        coord.wait_ready()
        admin = httpx.Client(base_url=coord.url, headers={"Authorization": f"Bearer {ADMIN}"})

        nodes: dict[str, ServiceProcess] = {}
        proxies: dict[str, ServiceProcess] = {}
        for node_id in NODES:
            proxies[node_id] = ServiceProcess(
                name=f"proxy-{node_id}",
                module="shared.wire_recorder",
                env={},
                args=("--upstream", coord.url, "--log", str(tmp_path / f"{node_id}.wire.jsonl")),
                log_path=tmp_path / f"proxy-{node_id}.log",
            ).start()
            procs.append(proxies[node_id])
        for node_id, (_users, dp) in NODES.items():
            creds = admin.post("/v1/nodes", json={"node_id": node_id, "region": node_id[:-2]})
            assert creds.status_code == 201, creds.text
            env = {
                "NODE_ID": node_id,
                "NODE_REGION": node_id[:-2],
                "NODE_COORDINATOR_URL": proxies[node_id].url,  # all the node sends is recorded
                "NODE_TOKEN": creds.json()["token"],
                "NODE_DATABASE_URL": f"sqlite:///{tmp_path / (node_id + '.db')}",
                "NODE_POLL_SECONDS": "0.5",
                "NODE_LOCAL_EPOCHS": "1",
                "NODE_ALLOW_ANONYMOUS": "true",
                "NODE_MIN_USERS_FOR_METRICS": str(MIN_USERS),
                "NODE_SECURE_AGGREGATION": "true",
                "NODE_INSIGHTS_MIN_USERS": "5",
                "NODE_INSIGHTS_WEEKS": "4",
            }
            if dp:
                env |= {
                    "NODE_DP_ENABLED": "true",
                    "NODE_DP_ALGORITHM": algorithm,
                    "NODE_DP_SGD_STEPS": str(steps),
                    "NODE_DP_SGD_OPTIMIZER": "sgd" if fedsgd else "adam",
                    "NODE_DP_SGD_LEARNING_RATE": "1" if fedsgd else "0.01",
                    "NODE_DP_NOISE_NODES": "2" if fedsgd else "1",
                    "NODE_DP_SAMPLING_RATE": str(q),
                    "NODE_DP_CLIP_NORM": "0.5",
                    "NODE_DP_NOISE_MULTIPLIER": "1.0",
                    "NODE_DP_EPSILON_BUDGET": str(budget),
                    "NODE_DP_DELTA": "1e-5",
                }
            nodes[node_id] = ServiceProcess(
                name=node_id, module="regional_node", env=env, log_path=tmp_path / f"{node_id}.log"
            ).start()
            procs.append(nodes[node_id])
        for i, (node_id, (users, _dp)) in enumerate(NODES.items()):
            proxies[node_id].wait_ready("/__recorder/ready")
            nodes[node_id].wait_ready()
            events[node_id] = tiny_events(node_id, users=users, material="gold", seed=i)
            r = httpx.post(nodes[node_id].url + "/v1/events", json=events[node_id], timeout=30)
            assert r.status_code == 200, r.text

        # The catalog opens round 1 once every node is up, so all three make the cohort.
        assert admin.put("/v1/catalog", json=tiny_catalog()).status_code == 200

        def latest() -> int:
            return int(admin.get("/v1/models/latest").json()["version"])

        # Three rounds with all three nodes; then dp-1 has spent what its budget allows.
        wait_for(lambda: latest() >= 4, 200, "three secure rounds", procs)
        rounds = {r["round_id"]: r for r in admin.get("/v1/rounds").json()}
        for round_id in (1, 2, 3):
            assert sorted(rounds[round_id]["participants"]) == sorted(NODES)
        with sqlite3.connect(tmp_path / "coordinator.db") as db:
            (moments,) = db.execute("SELECT count(*) FROM server_optimizer_states").fetchone()
        assert (moments >= 3) if fedsgd else moments == 0  # FedAdam took the steps

        def dp_status() -> dict[str, Any]:
            return dict(httpx.get(nodes["dp-1"].url + "/v1/status").json()["privacy"])

        wait_for(lambda: dp_status()["training_refused"] is not None, 60, "refusal", procs)
        status = dp_status()
        assert status["dp_enabled"] and status["dp_releases"] == 3
        assert status["dp_algorithm"] == algorithm and status["dp_steps"] == 3 * steps
        assert status["dp_epsilon"] == pytest.approx(eps3)
        assert "privacy budget exhausted" in status["training_refused"]
        v4 = admin.get("/v1/models/4").json()
        assert v4["metrics"]["dp_epsilon"] == pytest.approx(eps3)  # stored with the version
        plain = httpx.get(nodes["big-1"].url + "/v1/status").json()["privacy"]
        assert plain["dp_enabled"] is False and plain["dp_epsilon"] is None

        base = bytes_to_state(admin.get("/v1/models/1/weights").content)
        shapes = {k: tuple(v.shape) for k, v in base.items()}
        for node_id in NODES:
            _audit(node_id, read_log(tmp_path / f"{node_id}.wire.jsonl"), events[node_id], shapes)
    finally:
        for p in reversed(procs):
            p.stop()


def _audit(
    node_id: str,
    requests: list[dict[str, Any]],
    events: list[dict[str, Any]],
    shapes: dict[str, tuple[int, ...]],
) -> None:
    users = {str(e["user_id"]) for e in events}
    timestamps = {str(e["timestamp"]) for e in events}
    for_unix = {str(int(datetime.fromisoformat(str(t)).timestamp())) for t in timestamps}
    allowed = [re.compile(p.replace("{node}", re.escape(node_id)) + "$") for p in ALLOWED_PATHS]
    by_kind: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for req in requests:
        assert req["method"] in ("GET", "POST"), req["method"]
        assert any(p.match(req["path"]) for p in allowed), req["path"]
        names = {k.lower() for k, _ in req["headers"]}
        assert names <= ALLOWED_HEADERS, names - ALLOWED_HEADERS
        text_parts = [req["path"], req["query"], json.dumps(req["headers"])]
        body: bytes = req["body"]
        is_update = req["path"].endswith("/updates")
        if not is_update:
            text_parts.append(body.decode())  # every other body is JSON text (or empty)
        blob = "\n".join(text_parts)
        # No user id, no event timestamp (ISO or unix): no event row can have crossed.
        assert "-user-" not in blob
        assert not any(u in blob for u in users)
        assert not any(t in blob for t in timestamps)
        assert not any(t in blob for t in for_unix)
        if is_update:
            assert b"-user-" not in body
        kind = req["path"].rsplit("/", 1)[-1] if req["method"] == "POST" else "GET"
        by_kind[kind].append(req)

    updates = by_kind["updates"]
    assert len(updates) >= 2
    users_with_examples = len(users)
    for req in updates:
        headers = {k.lower(): v for k, v in req["headers"]}
        assert headers["x-update-encoding"] == "secagg-v1"
        state = bytes_to_state(req["body"])
        assert read_metadata(req["body"]) == {}
        # Exactly the global model's tensors: no per-user parameter, no extra tensor.
        assert {k: tuple(v.shape) for k, v in state.items()} == shapes
        query = parse_qs(req["query"])
        assert set(query) == {"num_examples", "base_version"}
        assert int(query["num_examples"][0]) >= 1
        metrics = json.loads(headers["x-update-metrics"])
        assert all(isinstance(v, int | float) for v in metrics.values())
        if NODES[node_id][1]:
            # DP: only data-independent numbers; the count is the number of user units.
            assert set(metrics) == DP_METRICS
            assert int(query["num_examples"][0]) == users_with_examples
        elif NODES[node_id][0] >= MIN_USERS:
            assert set(metrics) == AGGREGATE_METRICS
            assert metrics["eval_users"] >= MIN_USERS
        else:
            assert metrics == {}  # fewer users than the threshold: nothing is sent
    for req in by_kind["keys"]:
        assert set(json.loads(req["body"])) == {"public_key"}
    for req in by_kind["reveals"]:
        assert set(json.loads(req["body"])) == {"seeds"}
    reports = by_kind[node_id]
    assert reports, "the node pushed no insights"
    for req in reports:
        report = RegionReport.model_validate_json(req["body"])  # extra fields forbidden
        _check_cells_have_enough_users(report, events)


def _check_cells_have_enough_users(report: RegionReport, events: list[dict[str, Any]]) -> None:
    catalog = {str(c["item_id"]): c for c in tiny_catalog()}
    users: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    for e in events:
        if e["event_type"] in ("view", "purchase"):
            item = catalog[str(e["item_id"])]
            for dim in ("category", "material"):
                users[(str(e["event_type"]), dim, str(item[dim]))].add(str(e["user_id"]))
    for kind, dims in report.kinds.items():
        for dim in ("category", "material"):
            for value in dims[dim].values:  # type: ignore[index]
                assert len(users[(kind, dim, value)]) >= report.min_users
