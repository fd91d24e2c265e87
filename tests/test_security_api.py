"""Access control and input validation of both services, endpoint by endpoint.

Every rejection is a 4xx with a JSON `detail` and leaves the coordinator's
tables exactly as they were.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from coordinator.app import create_app
from coordinator.settings import CoordinatorSettings
from regional_node.app import create_app as create_node_app
from regional_node.settings import NodeSettings
from shared.serialization import bytes_to_state, sha256_hex, state_to_bytes
from tests.conftest import tiny_catalog, tiny_events
from tests.sec_support import ADMIN, ADMIN_TOKEN, bearer, row_counts, seeded_delta, submit

MAX_UPDATE_BYTES = 256 * 1024


def _coordinator(db_url: str, **overrides: Any) -> Iterator[tuple[TestClient, str]]:
    settings = CoordinatorSettings(
        **{
            "database_url": db_url,
            "admin_token": ADMIN_TOKEN,
            "min_updates": 3,
            "round_check_seconds": 0.05,
            "embedding_dim": 4,
            "max_update_bytes": MAX_UPDATE_BYTES,
            "max_num_examples": 1000,
            **overrides,
        }
    )
    with TestClient(create_app(settings)) as client:
        assert client.put("/v1/catalog", json=tiny_catalog(20), headers=ADMIN).status_code == 200
        yield client, db_url


@pytest.fixture
def coord(sqlite_url: str) -> Iterator[tuple[TestClient, str]]:
    yield from _coordinator(sqlite_url)


@pytest.fixture
def coord_any_db(db_url: str) -> Iterator[tuple[TestClient, str]]:
    """The same coordinator, once on SQLite and once on PostgreSQL."""
    yield from _coordinator(db_url)


def _register(client: TestClient, node_id: str) -> dict[str, str]:
    r = client.post("/v1/nodes", json={"node_id": node_id, "region": "EU"}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return bearer(r.json()["token"])


def _weights(client: TestClient) -> bytes:
    r = client.get("/v1/models/1/weights", headers=ADMIN)
    assert r.status_code == 200
    return r.content


# (method, path, json body) of every protected coordinator endpoint, by role it needs.
ADMIN_ENDPOINTS = [
    ("POST", "/v1/nodes", {"node_id": "new-1", "region": "EU"}),
    ("GET", "/v1/nodes", None),
    ("POST", "/v1/nodes/eu-1/revoke", None),
    ("PUT", "/v1/catalog", tiny_catalog(20)),
    ("POST", "/v1/models/1/promote", None),
]
READER_ENDPOINTS = [("GET", "/v1/models/1/weights", None)]
NODE_ENDPOINTS = [("POST", "/v1/rounds/1/updates?num_examples=5&base_version=1", None)]
ALL_PROTECTED = ADMIN_ENDPOINTS + READER_ENDPOINTS + NODE_ENDPOINTS


def _call(client: TestClient, method: str, path: str, body: object, headers: dict[str, str]):  # type: ignore[no-untyped-def]
    extra = {"X-Content-SHA256": "0" * 64} if "/updates" in path else {}
    if body is None and "/updates" in path:
        return client.request(method, path, content=b"x", headers={**headers, **extra})
    return client.request(method, path, json=body, headers=headers)


def test_protected_endpoints_refuse_missing_and_unknown_tokens(
    coord: tuple[TestClient, str],
) -> None:
    client, db_url = coord
    _register(client, "eu-1")
    before = row_counts(db_url)
    for method, path, body in ALL_PROTECTED:
        for headers in (
            {},
            bearer("not-a-token"),
            bearer("eu-1.forged-secret"),  # a real node id with a made-up secret
            {"Authorization": f"Basic {ADMIN_TOKEN}"},
        ):
            r = _call(client, method, path, body, headers)
            assert r.status_code == 401, (path, headers, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
            assert isinstance(r.json()["detail"], str)
    assert row_counts(db_url) == before


def test_wrong_role_is_403(coord: tuple[TestClient, str]) -> None:
    client, db_url = coord
    node = _register(client, "eu-1")
    other = _register(client, "na-1")
    before = row_counts(db_url)
    for method, path, body in ADMIN_ENDPOINTS:
        r = _call(client, method, path, body, node)
        assert r.status_code == 403, (path, r.text)
        assert "admin" in r.json()["detail"]
    # Another node's token cannot revoke this one either.
    r = client.post("/v1/nodes/eu-1/revoke", headers=other)
    assert r.status_code == 403
    assert row_counts(db_url) == before
    # A revoked node loses the node and reader endpoints.
    assert client.post("/v1/nodes/eu-1/revoke", headers=ADMIN).json()["revoked"] is True
    before = row_counts(db_url)
    for method, path, body in NODE_ENDPOINTS + READER_ENDPOINTS:
        r = _call(client, method, path, body, node)
        assert r.status_code == 403, (path, r.text)
        assert "revoked" in r.json()["detail"]
    assert client.get("/v1/models/1/weights", headers=other).status_code == 200
    assert row_counts(db_url) == before


def test_update_endpoint_refuses_the_admin_token(coord: tuple[TestClient, str]) -> None:
    client, db_url = coord
    before = row_counts(db_url)
    payload = seeded_delta(_weights(client), 0)
    r = submit(client, ADMIN, payload)  # type: ignore[arg-type]
    assert r.status_code == 403 and "node token" in r.json()["detail"]
    assert row_counts(db_url) == before


def test_a_node_submits_only_as_itself_and_revocation_drops_its_update(
    coord: tuple[TestClient, str],
) -> None:
    client, db_url = coord
    a = _register(client, "eu-1")
    _register(client, "na-1")
    payload = seeded_delta(_weights(client), 1)
    # A node id smuggled into the query is ignored: the token says who submits.
    r = client.post(
        "/v1/rounds/1/updates",
        params={"num_examples": 5, "base_version": 1, "node_id": "na-1"},
        content=payload,
        headers={**a, "X-Content-SHA256": sha256_hex(payload)},
    )
    assert r.status_code == 200, r.text
    assert r.json()["node_id"] == "eu-1"
    assert client.get("/v1/rounds/1").json()["participants"] == ["eu-1"]
    # Revoking the node drops its update from the open round.
    client.post("/v1/nodes/eu-1/revoke", headers=ADMIN)
    assert client.get("/v1/rounds/1").json()["participants"] == []
    assert row_counts(db_url)["updates"] == 0


def _header_only(shape: list[int]) -> bytes:
    """A safetensors payload of one empty tensor with the given shape."""
    header = json.dumps({"x": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}})
    return struct.pack("<Q", len(header)) + header.encode()


def _rejections(weights: bytes) -> list[tuple[str, bytes, dict[str, object], int, str]]:
    """(case, body, submit() overrides, expected status, a word of the detail)."""
    base = bytes_to_state(weights)
    name = sorted(base)[0]
    good = seeded_delta(weights, 2)

    def with_(change: dict[str, torch.Tensor | None]) -> bytes:
        state = bytes_to_state(good)
        for k, v in change.items():
            if v is None:
                del state[k]
            else:
                state[k] = v
        return state_to_bytes(state)

    shape = tuple(base[name].shape)
    nan = torch.zeros(shape)
    nan.view(-1)[0] = math.nan
    inf = torch.zeros(shape)
    inf.view(-1)[-1] = math.inf
    return [
        ("missing parameter", with_({name: None}), {}, 422, "missing"),
        ("extra parameter", with_({"evil": torch.zeros(2)}), {}, 422, "unexpected"),
        ("wrong shape", with_({name: torch.zeros(shape[0] + 1, *shape[1:])}), {}, 422, "shape"),
        ("wrong dtype", with_({name: torch.zeros(shape, dtype=torch.float64)}), {}, 422, "dtype"),
        ("NaN", with_({name: nan}), {}, 422, "NaN"),
        ("Inf", with_({name: inf}), {}, 422, "Inf"),
        ("not safetensors", b"\x00garbage" * 10, {}, 422, "rejected"),
        # Empty tensors whose other sizes overflow torch's (were 500s).
        ("huge shape beside 0", _header_only([0, 10**20]), {}, 422, "bad shape"),
        ("overflowing shape", _header_only([2**40, 2**40, 0]), {}, 422, "bad shape"),
        ("empty body", b"", {}, 422, "rejected"),
        ("checksum mismatch", good, {"sha256": "ab" * 32}, 422, "sha256"),
        ("stale base", good, {"base_version": 2}, 409, "stale"),
        ("closed or unknown round", good, {"round_id": 99}, 404, "round"),
        ("num_examples zero", good, {"num_examples": 0}, 422, "num_examples"),
        ("num_examples over cap", good, {"num_examples": 1001}, 422, "limit"),
        ("too large", b"x" * (MAX_UPDATE_BYTES + 1), {}, 413, "limit"),
        ("bad metrics header", good, {"metrics": "{not json"}, 422, "X-Update-Metrics"),
        ("NaN metric", good, {"metrics": '{"loss": NaN}'}, 422, "finite"),
        # json.loads raised RecursionError: a 500.
        ("deep metrics", good, {"metrics": '{"a":' + "[" * 1500 + "]" * 1500 + "}"}, 422, "JSON"),
        # Finite, but its example-weighted sum is inf, which PostgreSQL's JSON cannot
        # hold: every close of the round failed, for ever (until 2026-11-27).
        ("huge metric", good, {"metrics": '{"loss": 1e308}'}, 422, "magnitude"),
        # float() of it raised OverflowError: a 500.
        ("400-digit metric", good, {"metrics": '{"loss": 1' + "0" * 400 + "}"}, 422, "magnitude"),
        # Cut to 64 characters, two long names were stored as one, the second's value.
        ("long metric name", good, {"metrics": json.dumps({"x" * 65: 1.0})}, 422, "over 64"),
        ("bad encoding", good, {"encoding": "zstd"}, 422, "encoding"),
        ("payload not in its encoding", good, {"encoding": "topk"}, 422, "missing parameter"),
    ]


def test_every_invalid_update_is_a_json_4xx_and_stores_nothing(
    coord_any_db: tuple[TestClient, str],
) -> None:
    client, db_url = coord_any_db
    node = _register(client, "eu-1")
    weights = _weights(client)
    before = row_counts(db_url)
    for case, body, overrides, status, word in _rejections(weights):
        extra: dict[str, str] = {}
        if "metrics" in overrides:
            extra["X-Update-Metrics"] = str(overrides.pop("metrics"))
        if "encoding" in overrides:
            extra["X-Update-Encoding"] = str(overrides.pop("encoding"))
        r = submit(client, node, body, extra_headers=extra, **overrides)  # type: ignore[arg-type]
        assert r.status_code == status, (case, r.text)
        detail = r.json()["detail"]
        assert word.lower() in str(detail).lower(), (case, detail)
        assert row_counts(db_url) == before, case
    # A missing checksum header is refused too (the node client always sends it).
    r = client.post(
        "/v1/rounds/1/updates",
        params={"num_examples": 5, "base_version": 1},
        content=seeded_delta(weights, 3),
        headers=node,
    )
    assert r.status_code == 422 and "x-content-sha256" in r.text.lower()
    assert row_counts(db_url) == before
    # And the valid update is then accepted, once.
    good = seeded_delta(weights, 2)
    first = submit(client, node, good)
    assert first.status_code == 200 and first.json()["duplicate"] is False
    again = submit(client, node, good)
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert again.json()["accepted_at"] == first.json()["accepted_at"]
    other = submit(client, node, seeded_delta(weights, 4))
    assert other.status_code == 409 and "once per round" in other.json()["detail"]
    assert row_counts(db_url)["updates"] == before["updates"] + 1


def test_invalid_admin_input_stores_nothing(coord_any_db: tuple[TestClient, str]) -> None:
    client, db_url = coord_any_db
    before = row_counts(db_url)
    bad_catalogs: list[object] = [
        [],
        [{"item_id": "has space"}],
        [{"item_id": "A"}, {"item_id": "A"}],
        [{"item_id": "A", "price_usd": -1}],
        [{"item_id": "A", "unknown_field": 1}],
        {"item_id": "A"},
        # PostgreSQL text cannot hold a NUL (SQLite can): both refuse it, as a 422
        [{"item_id": "A", "title": "ring\u0000"}],
        [{"item_id": "A", "category": "ring\u0000"}],
        [{"item_id": "A", "style_tags": ["boho\u0000"]}],
    ]
    for bad in bad_catalogs:
        r = client.put("/v1/catalog", json=bad, headers=ADMIN)
        assert r.status_code == 422, (bad, r.text)
        assert "detail" in r.json()
    # Bodies whose echo in the 422 JSON cannot carry as they are: a lone surrogate (what
    # a storefront sends when it cuts a string inside an emoji), bytes that are not UTF-8
    # sent as text (curl -d with a Latin-1 file)
    raw_bodies = [
        ('[{"item_id": "A", "title": "ring \\ud83d"}]', "application/json"),
        ('[{"item_id": "A", "material": "\\udc00gold"}]', "application/json"),
        (b"\xff\xfering", "text/plain"),
        (b"\xe9", "application/x-www-form-urlencoded"),
    ]
    for body, content_type in raw_bodies:
        headers = {**ADMIN, "Content-Type": content_type}
        r = client.put("/v1/catalog", content=body, headers=headers)
        assert r.status_code == 422, (body, r.text)
        assert r.json()["detail"]
    r = client.post("/v1/nodes", content=b"\xff", headers={**ADMIN, "Content-Type": "text/plain"})
    assert r.status_code == 422, r.text
    for bad_node in ({"node_id": "", "region": "EU"}, {"node_id": "a b", "region": "EU"}, {}):
        r = client.post("/v1/nodes", json=bad_node, headers=ADMIN)
        assert r.status_code == 422, r.text
    assert client.post("/v1/models/99/promote", headers=ADMIN).status_code == 404
    assert client.post("/v1/models/1/promote", headers=ADMIN).status_code == 409  # active
    assert client.post("/v1/nodes/nobody/revoke", headers=ADMIN).status_code == 404
    r = client.post("/v1/nodes/a%00b/revoke", headers=ADMIN)  # no node id holds a NUL
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["path", "node_id"]
    assert row_counts(db_url) == before
    assert client.get("/v1/catalog").json()["items"] == tiny_catalog(20)


# --------------------------------------------------------------------------- regional node


@pytest.fixture
def node_client(tmp_path: Path) -> Iterator[TestClient]:
    settings = NodeSettings(
        id="eu-1",
        region="EU",
        database_url=f"sqlite:///{tmp_path / 'node.db'}",
        api_keys="key-one, key-two",
        max_events_per_batch=50,
    )
    with TestClient(create_node_app(settings, participate=False)) as client:
        yield client


def test_storefront_endpoints_need_an_api_key(node_client: TestClient) -> None:
    events = tiny_events("eu", users=2, material="gold", seed=0)[:5]
    calls = [
        ("POST", "/v1/events", events),
        ("GET", "/v1/recommend?user_id=eu-user-0", None),
    ]
    for method, path, body in calls:
        for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": "key-one,key-two"}):
            r = node_client.request(method, path, json=body, headers=headers)
            assert r.status_code == 401, (path, headers, r.text)
            assert isinstance(r.json()["detail"], str)
        for key in ("key-one", "key-two"):
            r = node_client.request(method, path, json=body, headers={"X-API-Key": key})
            assert r.status_code == 200, r.text
    assert node_client.get("/v1/status").json()["event_count"] == 5


def test_event_validation_limits_and_idempotency(node_client: TestClient) -> None:
    key = {"X-API-Key": "key-one"}
    events = tiny_events("eu", users=3, material="gold", seed=1)[:20]
    bad_batches: list[object] = [
        [{**events[0], "event_type": "stare"}],
        [{**events[0], "user_id": ""}],
        [{**events[0], "timestamp": "yesterday"}],
        [{**events[0], "extra": 1}],
        [events[1], {k: v for k, v in events[0].items() if k != "item_id"}],
        {"not": "a list"},
    ]
    for bad in bad_batches:
        r = node_client.post("/v1/events", json=bad, headers=key)
        assert r.status_code == 422, (bad, r.text)
        assert r.json()["detail"]
    lone_surrogate = json.dumps([{**events[0], "user_id": "USER"}]).replace("USER", "\\ud800")
    for body, content_type in (
        (lone_surrogate, "application/json"),
        (b"\xff\xfe", "text/plain"),
        (b"\xff\xfe", "application/octet-stream"),
    ):
        headers = {**key, "Content-Type": content_type}
        r = node_client.post("/v1/events", content=body, headers=headers)
        assert r.status_code == 422, (body, r.text)
        assert r.json()["detail"]
    too_many = tiny_events("eu", users=20, material="gold", seed=2)[:51]
    r = node_client.post("/v1/events", json=too_many, headers=key)
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    assert node_client.get("/v1/status").json()["event_count"] == 0  # all or nothing

    r = node_client.post("/v1/events", json=events, headers=key)
    assert r.json() == {
        "received": 20,
        "inserted": 20,
        "duplicates": 0,
        "unknown_item_ids": [],  # no catalog synced yet: nothing to compare against
    }
    again = node_client.post("/v1/events", json=events, headers=key).json()
    assert again["inserted"] == 0 and again["duplicates"] == 20
    assert node_client.get("/v1/status").json()["event_count"] == 20


def test_unknown_item_ids_are_reported(node_client: TestClient) -> None:
    from shared.schemas import CatalogItem, CatalogOut

    node_client.app.state.runtime.catalog = CatalogOut(  # type: ignore[attr-defined]
        catalog_version=1, items=[CatalogItem(item_id="I000"), CatalogItem(item_id="I001")]
    )
    ev = tiny_events("eu", users=1, material="gold", seed=3)[0]
    batch = [{**ev, "item_id": "I000"}, {**ev, "item_id": "NOPE-2"}, {**ev, "item_id": "NOPE-1"}]
    r = node_client.post("/v1/events", json=batch, headers={"X-API-Key": "key-one"})
    assert r.status_code == 200
    assert r.json()["unknown_item_ids"] == ["NOPE-1", "NOPE-2"]


def test_node_refuses_to_start_without_keys(tmp_path: Path) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("NODE_") and not k.startswith("COORDINATOR_")
    }
    env["NODE_DATABASE_URL"] = f"sqlite:///{tmp_path / 'n.db'}"
    proc = subprocess.run(
        [sys.executable, "-m", "regional_node", "--port", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "NODE_API_KEYS" in proc.stderr and "NODE_ALLOW_ANONYMOUS" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_coordinator_verifies_stored_weights_when_loading(sqlite_url: str) -> None:
    from sqlalchemy import update

    from coordinator.db import Database
    from coordinator.models import ModelVersionChunk
    from coordinator.models_registry.service import load_state
    from coordinator.rounds.service import bootstrap_model_if_needed

    settings = CoordinatorSettings(database_url=sqlite_url, embedding_dim=4)
    db = Database(sqlite_url)
    db.migrate()
    try:
        with db.sessions() as session:
            bootstrap_model_if_needed(session, settings, num_items=5)
            session.commit()
            state, _ = load_state(session, 1)
            assert state  # intact weights load
            chunk = session.get(ModelVersionChunk, (1, 0))
            assert chunk is not None
            flipped = bytearray(chunk.data)
            flipped[-1] ^= 0x01
            session.execute(
                update(ModelVersionChunk)
                .where(ModelVersionChunk.version == 1, ModelVersionChunk.seq == 0)
                .values(data=bytes(flipped))
            )
            session.commit()
            with pytest.raises(RuntimeError, match="sha256"):
                load_state(session, 1)
    finally:
        db.dispose()


def test_an_aggregate_that_overflows_makes_no_version_and_the_round_is_redone(
    sqlite_url: str,
) -> None:
    """Each update is finite, but n_k x delta_k summed in float32 is not: that version was
    made active (and, scoring every item Inf, reported HR@10 = 1)."""
    for client, _ in _coordinator(sqlite_url, min_updates=1, max_num_examples=100_000_000):
        node = _register(client, "eu-1")
        huge = state_to_bytes(
            {k: torch.full_like(v, 1e31) for k, v in bytes_to_state(_weights(client)).items()}
        )
        r = submit(client, node, huge, num_examples=100_000_000)
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 20
        while client.get("/v1/rounds/1").json()["state"] == "open":
            assert time.monotonic() < deadline, "round 1 never closed"
            time.sleep(0.05)
        assert [m["version"] for m in client.get("/v1/models").json()] == [1]
        current = client.get("/v1/rounds/current").json()
        assert current["round_id"] == 2 and current["base_version"] == 1
        summary = client.get("/v1/dashboard/summary", headers=ADMIN).json()
        assert [r["close_reason"] for r in summary["rounds"] if r["round_id"] == 1] == [
            "not_finite"
        ]
