"""Drive coordinator rounds over HTTP with hand-made deltas: no node process, no training.

Works with an `httpx.Client` on a real process or a `TestClient` on an in-process app.
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch

from shared.serialization import bytes_to_state, sha256_hex, state_to_bytes
from tests.conftest import tiny_catalog

ADMIN = "dash-admin-token"


def admin_headers(token: str = ADMIN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def bootstrap(client: Any, node_ids: tuple[str, ...] = ("eu-1",), items: int = 40) -> list[str]:
    """Upload a tiny catalog (version 1, round 1) and register nodes; returns their tokens."""
    r = client.put("/v1/catalog", json=tiny_catalog(items), headers=admin_headers())
    assert r.status_code == 200, r.text
    tokens = []
    for node_id in node_ids:
        r = client.post(
            "/v1/nodes",
            json={"node_id": node_id, "region": node_id[:2].upper()},
            headers=admin_headers(),
        )
        assert r.status_code == 201, r.text
        tokens.append(r.json()["token"])
    return tokens


def hand_made_delta(client: Any, token: str, base_version: int, scale: float) -> bytes:
    """A delta with the base version's names, shapes and dtypes: every float moved by `scale`."""
    weights = client.get(f"/v1/models/{base_version}/weights", headers=admin_headers(token))
    assert weights.status_code == 200, weights.text
    state = bytes_to_state(weights.content)
    return state_to_bytes(
        {
            k: torch.full_like(v, scale) if v.is_floating_point() else torch.zeros_like(v)
            for k, v in state.items()
        }
    )


def submit(
    client: Any,
    token: str,
    round_id: int,
    base_version: int,
    body: bytes,
    metrics: dict[str, float],
    num_examples: int = 100,
) -> Any:
    return client.post(
        f"/v1/rounds/{round_id}/updates",
        params={"num_examples": num_examples, "base_version": base_version},
        content=body,
        headers={
            **admin_headers(token),
            "Content-Type": "application/octet-stream",
            "X-Content-SHA256": sha256_hex(body),
            "X-Update-Metrics": json.dumps(metrics),
        },
    )


def wait_for_version(client: Any, version: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get("/v1/models/latest")
        if r.status_code == 200 and r.json()["version"] >= version:
            return
        time.sleep(0.05)
    raise AssertionError(f"version {version} did not appear within {timeout}s")


def run_rounds(client: Any, token: str, metrics_per_round: list[dict[str, float]]) -> None:
    """One node, MIN_UPDATES=1: each accepted update closes its round and makes a version."""
    for i, metrics in enumerate(metrics_per_round):
        current = client.get("/v1/rounds/current").json()
        body = hand_made_delta(client, token, current["base_version"], 0.001 * (i + 1))
        r = submit(client, token, current["round_id"], current["base_version"], body, metrics)
        assert r.status_code == 200, r.text
        wait_for_version(client, current["base_version"] + 1)


ROUND_METRICS = [
    {"train_loss": 4.2, "hr@10": 0.10, "ndcg@10": 0.05},
    {"train_loss": 3.6, "hr@10": 0.16, "ndcg@10": 0.08},
    {"train_loss": 3.3, "hr@10": 0.21, "ndcg@10": 0.11},
]
