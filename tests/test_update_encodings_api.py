"""Update encodings through the coordinator's API: advertised, decoded, aggregated."""

from __future__ import annotations

import time

import pytest
import torch
from fastapi.testclient import TestClient

from coordinator.app import create_app
from coordinator.settings import CoordinatorSettings
from shared.compression import decode_update, encode_update
from shared.serialization import bytes_to_state, sha256_hex, state_to_bytes
from tests.conftest import tiny_catalog

ADMIN = {"Authorization": "Bearer enc-admin"}


def _settings(db_url: str, **overrides: object) -> CoordinatorSettings:
    return CoordinatorSettings.model_validate(
        {
            "database_url": db_url,
            "admin_token": "enc-admin",
            "embedding_dim": 8,
            "round_check_seconds": 0.1,
            **overrides,
        }
    )


@pytest.mark.parametrize("encoding", ["int8", "topk"])
def test_encoded_update_is_decoded_into_the_next_version(sqlite_url: str, encoding: str) -> None:
    settings = _settings(sqlite_url)
    with TestClient(create_app(settings)) as c:
        assert c.put("/v1/catalog", json=tiny_catalog(), headers=ADMIN).status_code == 200
        token = c.post("/v1/nodes", json={"node_id": "n1", "region": "EU"}, headers=ADMIN).json()[
            "token"
        ]
        node = {"Authorization": f"Bearer {token}"}
        current = c.get("/v1/rounds/current").json()
        assert {"dense", "float16", "int8", "topk"} <= set(current["supported_encodings"])

        base = bytes_to_state(c.get("/v1/models/1/weights", headers=node).content)
        g = torch.Generator().manual_seed(0)
        delta = {k: torch.randn(v.shape, generator=g) * 0.01 for k, v in base.items()}
        body = state_to_bytes(encode_update(delta, encoding, topk_fraction=0.05))
        assert len(body) < 0.4 * len(state_to_bytes(delta))  # int8 on 8-wide rows: 0.375

        def post(enc: str, payload: bytes):  # type: ignore[no-untyped-def]
            return c.post(
                f"/v1/rounds/{current['round_id']}/updates",
                params={"num_examples": 10, "base_version": 1},
                content=payload,
                headers={**node, "X-Content-SHA256": sha256_hex(payload), "X-Update-Encoding": enc},
            )

        unknown = post("zstd", body)
        assert unknown.status_code == 422 and "supported" in unknown.json()["detail"]
        wrong = post("float16", body)  # an int8/topk body is not a float16 one
        assert wrong.status_code == 422
        assert post(encoding, body).status_code == 200

        deadline = time.monotonic() + 30
        while c.get("/v1/models/latest").json()["version"] < 2:
            assert time.monotonic() < deadline, "the round did not close"
            time.sleep(0.1)
        new = bytes_to_state(c.get("/v1/models/2/weights", headers=node).content)
        sent = decode_update(bytes_to_state(body), base, encoding)
        for name, value in base.items():
            assert torch.allclose(new[name], value + sent[name], atol=1e-6), name


def test_weights_stream_in_slices_with_etag(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from coordinator.models_registry import service as registry

    monkeypatch.setattr(registry, "WEIGHT_CHUNK_BYTES", 4096)  # every model streams
    settings = CoordinatorSettings(
        database_url=sqlite_url, admin_token="enc-admin", embedding_dim=8
    )
    with TestClient(create_app(settings)) as c:
        assert c.put("/v1/catalog", json=tiny_catalog(), headers=ADMIN).status_code == 200
        meta = c.get("/v1/models/1").json()
        assert meta["size_bytes"] > 10 * 4096
        resp = c.get("/v1/models/1/weights", headers=ADMIN)
        assert resp.status_code == 200
        assert int(resp.headers["content-length"]) == meta["size_bytes"] == len(resp.content)
        assert sha256_hex(resp.content) == meta["sha256"] == resp.headers["etag"].strip('"')
        again = c.get(
            "/v1/models/1/weights", headers={**ADMIN, "If-None-Match": resp.headers["etag"]}
        )
        assert again.status_code == 304


def test_round_mean_counts_a_top_k_update_only_in_the_rows_it_sent(sqlite_url: str) -> None:
    settings = _settings(sqlite_url, min_updates=2)
    assert settings.aggregation == "fedavg"  # the default: plain sample-weighted mean
    with TestClient(create_app(settings)) as c:
        assert c.put("/v1/catalog", json=tiny_catalog(), headers=ADMIN).status_code == 200
        nodes = []
        for node_id, region in (("dense-node", "EU"), ("topk-node", "NA")):
            made = c.post("/v1/nodes", json={"node_id": node_id, "region": region}, headers=ADMIN)
            nodes.append({"Authorization": f"Bearer {made.json()['token']}"})
        current = c.get("/v1/rounds/current").json()
        base = bytes_to_state(c.get("/v1/models/1/weights", headers=nodes[0]).content)
        g = torch.Generator().manual_seed(1)
        dense = {k: torch.randn(v.shape, generator=g) * 0.01 for k, v in base.items()}
        # The top-k node changed only item rows 0-4 of the id table (and nothing else).
        sparse = {k: torch.zeros_like(v) for k, v in base.items()}
        sparse["item_id.weight"][:5] = torch.randn(5, 8, generator=g) * 0.01
        body = state_to_bytes(encode_update(sparse, "topk", topk_fraction=0.1))
        sent = decode_update(bytes_to_state(body), base, "topk")
        for headers, payload, enc, n in (
            (nodes[0], state_to_bytes(dense), "dense", 10),
            (nodes[1], body, "topk", 30),
        ):
            r = c.post(
                f"/v1/rounds/{current['round_id']}/updates",
                params={"num_examples": n, "base_version": 1},
                content=payload,
                headers={
                    **headers,
                    "X-Content-SHA256": sha256_hex(payload),
                    "X-Update-Encoding": enc,
                },
            )
            assert r.status_code == 200, r.text
        deadline = time.monotonic() + 30
        while c.get("/v1/models/latest").json()["version"] < 2:
            assert time.monotonic() < deadline, "the round did not close"
            time.sleep(0.1)
        new = bytes_to_state(c.get("/v1/models/2/weights", headers=nodes[0]).content)
    table = "item_id.weight"
    got = new[table] - base[table]
    # Rows the top-k update sent: (10 * dense + 30 * top-k) / 40.
    assert torch.allclose(got[:5], (10 * dense[table][:5] + 30 * sent[table][:5]) / 40, atol=1e-6)
    # Rows it did not send: the dense update alone, not diluted to 10/40 of it.
    assert torch.allclose(got[5:], dense[table][5:], atol=1e-6)
    # A matrix the top-k update sent no row of: the dense update alone as well.
    proj = "user_proj.weight"
    assert torch.allclose(new[proj] - base[proj], dense[proj], atol=1e-6)
    # 1-D tensors: the plain mean over all 40 examples (the top-k node's zeros count).
    for name in ("event_weight", "user_proj.bias"):
        want = (10 * dense[name] + 30 * sent[name]) / 40
        assert torch.allclose(new[name] - base[name], want, atol=1e-6), name
