"""Coordinator API, endpoint by endpoint, with its error cases (SQLite and PostgreSQL)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from coordinator.app import create_app
from coordinator.settings import CoordinatorSettings
from shared.serialization import bytes_to_state, sha256_hex, state_to_bytes
from tests.conftest import tiny_catalog

ADMIN = {"Authorization": "Bearer admin-secret"}


def small_coordinator(db_url: str, **overrides: object) -> CoordinatorSettings:
    """A coordinator for API tests: ADMIN's token, a small model, a fast round checker."""
    defaults: dict[str, object] = {
        "admin_token": "admin-secret",
        "min_updates": 2,
        "round_check_seconds": 0.05,
        "embedding_dim": 8,
    }
    return CoordinatorSettings(database_url=db_url, **{**defaults, **overrides})  # type: ignore[arg-type]


@pytest.fixture
def client(db_url: str) -> Iterator[TestClient]:
    with TestClient(create_app(small_coordinator(db_url))) as c:
        yield c


def _register(client: TestClient, node_id: str) -> dict[str, str]:
    r = client.post("/v1/nodes", json={"node_id": node_id, "region": "EU"}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


def _zero_delta(client: TestClient, headers: dict[str, str], scale: float = 0.0) -> bytes:
    weights = client.get("/v1/models/1/weights", headers=headers)
    state = bytes_to_state(weights.content)
    return state_to_bytes({k: torch.full_like(v, scale) for k, v in state.items()})


def _submit(
    client: TestClient, headers: dict[str, str], payload: bytes, *, round_id: int = 1, **params: int
) -> httpx.Response:
    query = {"num_examples": 10, "base_version": 1, **params}
    return client.post(
        f"/v1/rounds/{round_id}/updates",
        params=query,
        content=payload,
        headers={**headers, "X-Content-SHA256": sha256_hex(payload)},
    )


def test_health_and_ready(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}


def test_node_registration(client: TestClient) -> None:
    r = client.post("/v1/nodes", json={"node_id": "eu-1", "region": "EU"})
    assert r.status_code == 401 and "detail" in r.json()
    r = client.post(
        "/v1/nodes", json={"node_id": "eu-1", "region": "EU"}, headers={"Authorization": "Bearer x"}
    )
    assert r.status_code == 401
    node = _register(client, "eu-1")
    assert (
        client.post(
            "/v1/nodes", json={"node_id": "eu-1", "region": "EU"}, headers=ADMIN
        ).status_code
        == 409
    )
    # A node token is not an admin token.
    assert (
        client.post("/v1/nodes", json={"node_id": "x", "region": "EU"}, headers=node).status_code
        == 403
    )
    r = client.post("/v1/nodes", json={"node_id": "bad id!", "region": "EU"}, headers=ADMIN)
    assert r.status_code == 422 and "detail" in r.json()
    listed = client.get("/v1/nodes", headers=ADMIN).json()
    assert [n["node_id"] for n in listed] == ["eu-1"]
    assert "token" not in listed[0] and "token_hash" not in listed[0]


def test_catalog_and_bootstrap(client: TestClient) -> None:
    assert client.get("/v1/rounds/current").status_code == 404
    assert client.get("/v1/models/latest").status_code == 404
    assert client.put("/v1/catalog", json=tiny_catalog(10)).status_code == 401
    r = client.put("/v1/catalog", json=[{"item_id": "A", "price_usd": -1}], headers=ADMIN)
    assert r.status_code == 422
    r = client.put("/v1/catalog", json=[{"item_id": "A"}, {"item_id": "A"}], headers=ADMIN)
    assert r.status_code == 422 and "duplicate" in r.json()["detail"]
    assert client.get("/v1/catalog").json()["items"] == []  # nothing half-written

    r = client.put("/v1/catalog", json=tiny_catalog(10), headers=ADMIN)
    assert r.status_code == 200 and r.json()["added"] == 10
    catalog = client.get("/v1/catalog")
    assert [i["item_id"] for i in catalog.json()["items"]] == [f"I{i:03d}" for i in range(10)]
    etag = catalog.headers["etag"]
    # RFC 9110: a list, weak tags and `*` match too (each was a full 200 until 2026-11-27).
    for header in (etag, f'"other", {etag}', f"W/{etag}", "*"):
        assert client.get("/v1/catalog", headers={"If-None-Match": header}).status_code == 304
    assert client.get("/v1/catalog", headers={"If-None-Match": '"other"'}).status_code == 200

    latest = client.get("/v1/models/latest").json()
    assert latest["version"] == 1 and latest["status"] == "active" and latest["num_items"] == 10
    assert client.get("/v1/models/1").json()["sha256"] == latest["sha256"]
    assert client.get("/v1/models/99").status_code == 404
    assert client.get("/v1/models/abc").status_code == 422
    rnd = client.get("/v1/rounds/current").json()
    assert rnd["round_id"] == 1 and rnd["base_version"] == 1 and rnd["state"] == "open"

    # Growing the catalog keeps rows stable and appends new ones.
    grown = tiny_catalog(12)
    r = client.put("/v1/catalog", json=grown[::-1], headers=ADMIN)
    assert r.json()["added"] == 2 and r.json()["items"] == 12
    ids = [i["item_id"] for i in client.get("/v1/catalog").json()["items"]]
    assert ids[:10] == [f"I{i:03d}" for i in range(10)] and set(ids[10:]) == {"I010", "I011"}
    assert client.get("/v1/catalog", headers={"If-None-Match": etag}).status_code == 200


def test_weights_download(client: TestClient) -> None:
    client.put("/v1/catalog", json=tiny_catalog(10), headers=ADMIN)
    node = _register(client, "eu-1")
    assert client.get("/v1/models/1/weights").status_code == 401
    r = client.get("/v1/models/1/weights", headers=node)
    assert r.status_code == 200
    meta = client.get("/v1/models/1").json()
    assert r.headers["etag"] == f'"{meta["sha256"]}"' and sha256_hex(r.content) == meta["sha256"]
    assert len(r.content) == meta["size_bytes"]
    for header in (r.headers["etag"], f'W/{r.headers["etag"]}, "x"', "*"):
        again = client.get("/v1/models/1/weights", headers={**node, "If-None-Match": header})
        assert again.status_code == 304
    assert client.get("/v1/models/7/weights", headers=node).status_code == 404


def test_round_closes_with_weighted_mean(client: TestClient) -> None:
    client.put("/v1/catalog", json=tiny_catalog(10), headers=ADMIN)
    a, b = _register(client, "a"), _register(client, "b")
    base = bytes_to_state(client.get("/v1/models/1/weights", headers=a).content)
    one, four = _zero_delta(client, a, 1.0), _zero_delta(client, a, 4.0)
    r = _submit(client, a, one, num_examples=30)
    assert r.status_code == 200 and r.json()["updates_received"] == 1
    # A retry of the same update is answered, not counted twice.
    again = _submit(client, a, one, num_examples=30)
    assert again.json()["duplicate"] is True and again.json()["updates_received"] == 1
    # A different second update from the same node in the same round is refused.
    assert _submit(client, a, four, num_examples=30).status_code == 409
    assert client.get("/v1/models/latest").json()["version"] == 1  # 1 of 2 updates: still open
    assert _submit(client, b, four, num_examples=10).status_code == 200

    deadline = time.monotonic() + 20
    while client.get("/v1/models/latest").json()["version"] != 2:
        assert time.monotonic() < deadline, "round did not close"
        time.sleep(0.05)
    v2 = client.get("/v1/models/2").json()
    assert v2["round_id"] == 1 and v2["metrics"]["num_examples"] == 40
    assert client.get("/v1/models/1").json()["status"] == "retired"
    new = bytes_to_state(client.get("/v1/models/2/weights", headers=a).content)
    # Σ n_k/n Δ_k = 30/40 * 1 + 10/40 * 4 = 1.75
    for name, value in base.items():
        assert torch.allclose(new[name], value + 1.75, atol=1e-5), name
    closed = client.get("/v1/rounds/1").json()
    assert closed["state"] == "closed" and closed["result_version"] == 2
    assert closed["participants"] == ["a", "b"]
    current = client.get("/v1/rounds/current").json()
    assert current["round_id"] == 2 and current["base_version"] == 2
    # Updates to a closed round, or against a stale base, are conflicts.
    assert _submit(client, a, one, round_id=1).status_code in (200, 409)
    assert _submit(client, a, one, round_id=2, base_version=1).status_code == 409
    assert _submit(client, a, one, round_id=99).status_code == 404


def test_current_round_long_poll(client: TestClient) -> None:
    """`after` + `wait`: answered when a newer round opens, not at the end of the wait."""
    from concurrent.futures import ThreadPoolExecutor

    waited = client.get("/v1/rounds/current", params={"after": 0, "wait": 1})
    assert waited.status_code == 404  # no catalog yet: no round, even after waiting
    client.put("/v1/catalog", json=tiny_catalog(10), headers=ADMIN)
    a, b = _register(client, "a"), _register(client, "b")
    # A round newer than `after` is open already: answered at once.
    started = time.monotonic()
    assert client.get("/v1/rounds/current", params={"after": 0, "wait": 20}).json()["round_id"] == 1
    assert time.monotonic() - started < 5
    # No newer round within the wait: the current one, after the wait.
    started = time.monotonic()
    r = client.get("/v1/rounds/current", params={"after": 1, "wait": 0.5})
    assert r.json()["round_id"] == 1 and time.monotonic() - started >= 0.5
    assert client.get("/v1/rounds/current", params={"after": 1, "wait": 31}).status_code == 422
    assert client.get("/v1/rounds/current", params={"after": -1}).status_code == 422

    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        waiting = pool.submit(client.get, "/v1/rounds/current", params={"after": 1, "wait": 25})
        time.sleep(0.3)
        assert not waiting.done()
        assert _submit(client, a, _zero_delta(client, a)).status_code == 200
        assert _submit(client, b, _zero_delta(client, b)).status_code == 200
        answer = waiting.result(timeout=20)
    assert answer.json()["round_id"] == 2 and answer.json()["base_version"] == 2
    assert time.monotonic() - started < 15  # woken by the close, not by the 25 s wait


def test_update_validation(client: TestClient) -> None:
    client.put("/v1/catalog", json=tiny_catalog(10), headers=ADMIN)
    node = _register(client, "a")
    good = _zero_delta(client, node)
    assert _submit(client, {}, good).status_code == 401
    assert _submit(client, ADMIN, good).status_code == 403
    assert _submit(client, node, good, num_examples=0).status_code == 422
    assert _submit(client, node, b"not safetensors").status_code == 422
    wrong_shape = state_to_bytes({"item_id.weight": torch.zeros(3, 3)})
    r = _submit(client, node, wrong_shape)
    assert r.status_code == 422 and "missing parameter" in r.json()["detail"]
    state = bytes_to_state(good)
    state["country.weight"][0, 0] = float("nan")
    r = _submit(client, node, state_to_bytes(state))
    assert r.status_code == 422 and "NaN" in r.json()["detail"]
    r = client.post(
        "/v1/rounds/1/updates",
        params={"num_examples": 5, "base_version": 1},
        content=good,
        headers={**node, "X-Content-SHA256": "0" * 64},
    )
    assert r.status_code == 422 and "sha256" in r.json()["detail"]
    r = client.post(
        "/v1/rounds/1/updates",
        params={"num_examples": 5, "base_version": 1},
        content=good,
        headers={**node, "X-Update-Metrics": "{not json"},
    )
    assert r.status_code == 422
    # None of the rejected submissions was stored.
    assert client.get("/v1/rounds/current").json()["updates_received"] == 0


def test_rounds_resume_when_max_rounds_is_raised(sqlite_url: str) -> None:
    # Nothing opened a round once COORDINATOR_MAX_ROUNDS was reached: raising or
    # unsetting it and restarting left the federation idle for ever.
    def app(max_rounds: int | None) -> TestClient:
        settings = small_coordinator(sqlite_url, min_updates=1, max_rounds=max_rounds)
        return TestClient(create_app(settings))

    admin = ADMIN
    with app(1) as c:
        c.put("/v1/catalog", json=tiny_catalog(20), headers=admin)
        token = c.post("/v1/nodes", json={"node_id": "a", "region": "EU"}, headers=admin)
        auth = {"Authorization": f"Bearer {token.json()['token']}"}
        base = bytes_to_state(c.get("/v1/models/1/weights", headers=auth).content)
        body = state_to_bytes({k: torch.zeros_like(v) for k, v in base.items()})
        r = c.post(
            "/v1/rounds/1/updates",
            params={"num_examples": 5, "base_version": 1},
            content=body,
            headers={**auth, "X-Content-SHA256": sha256_hex(body)},
        )
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 10
        while c.get("/v1/rounds/1").json()["state"] == "open" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.get("/v1/rounds/current").status_code == 404  # the limit: no round 2
    with app(1) as c:  # the same limit after a restart: still none
        time.sleep(0.5)  # the round checker has looked (it resumes rounds, not start-up)
        assert c.get("/v1/rounds/current").status_code == 404
        assert c.post("/v1/models/1/promote", headers=admin).status_code == 200
        assert c.get("/v1/rounds/current").status_code == 404
    with app(None) as c:  # unset: training resumes on the active version
        deadline = time.monotonic() + 10
        while (current := c.get("/v1/rounds/current")).status_code == 404:
            assert time.monotonic() < deadline, "no round resumed"
            time.sleep(0.05)
        assert current.json()["base_version"] == 1


def test_the_coordinator_starts_while_its_database_is_down() -> None:
    # It must come up and say so on /readyz (the orchestrator's probe), not crash at
    # start-up: resuming rounds there did, briefly, on 2026-11-27.
    settings = small_coordinator(
        "postgresql+psycopg://postgres@127.0.0.1:1/none", migrate_on_start=False
    )
    with TestClient(create_app(settings)) as c:
        time.sleep(0.2)
        assert c.get("/readyz").status_code == 503
        assert c.get("/healthz").status_code == 200
