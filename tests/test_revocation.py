"""Revoking a node while a round runs: its update never counts, and never half-counts."""

from __future__ import annotations

import base64
import time

import pytest
import torch
from fastapi.testclient import TestClient

from coordinator.app import create_app
from coordinator.db import Database
from coordinator.models import Node
from coordinator.nodes.service import revoke_node
from coordinator.secagg.service import publish_key
from shared.errors import Forbidden
from shared.secagg import generate_keypair, pairwise_seed
from shared.serialization import bytes_to_state, sha256_hex, state_to_bytes
from tests.conftest import tiny_catalog
from tests.test_api_coordinator import ADMIN, small_coordinator
from tests.test_secagg import ADMIN as SECAGG_ADMIN
from tests.test_secagg import (
    _c_drops,
    _coordinator,
    _fedavg,
    _setup,
    _survivors_reveal_c,
    _wait_version,
)


def test_a_node_revoked_while_its_update_streams_in_is_refused(db_url: str) -> None:
    # The token was checked before the body streamed and never again: the revoked
    # node's update was stored and aggregated into the next version.
    settings = small_coordinator(db_url, min_updates=1)
    with TestClient(create_app(settings)) as c:
        c.put("/v1/catalog", json=tiny_catalog(20), headers=ADMIN)
        node = c.post("/v1/nodes", json={"node_id": "evil", "region": "EU"}, headers=ADMIN)
        auth = {"Authorization": f"Bearer {node.json()['token']}"}
        base = bytes_to_state(c.get("/v1/models/1/weights", headers=auth).content)
        body = state_to_bytes({k: torch.full_like(v, 0.5) for k, v in base.items()})

        def slow_body():  # type: ignore[no-untyped-def]
            yield body[:1000]
            db = Database(db_url)  # the admin revokes while the upload streams
            with db.sessions() as session:
                assert revoke_node(session, settings, "evil").revoked
            db.dispose()
            yield body[1000:]

        r = c.post(
            "/v1/rounds/1/updates",
            params={"num_examples": 5, "base_version": 1},
            content=slow_body(),
            headers={**auth, "X-Content-SHA256": sha256_hex(body)},
        )
        assert r.status_code == 403 and "revoked" in r.json()["detail"], r.text
        time.sleep(0.3)
        rnd = c.get("/v1/rounds/1").json()
        assert (rnd["state"], rnd["participants"]) == ("open", [])


def test_revoking_a_survivor_during_secure_recovery_redoes_the_round(tmp_path: object) -> None:
    # Cohort a, b, c; c drops, a and b submitted; b is revoked and its masked update
    # deleted, but its masks stayed in a's: the round closed on a alone (below
    # MIN_UPDATES 2) into an active version wrong by about 1e10.
    url = f"sqlite:///{tmp_path}/c.db"
    with _coordinator(url, deadline=2.0) as client:
        dropout = _c_drops(client)
        tokens, private, state = dropout.tokens, dropout.private, dropout.state
        admin = {"Authorization": f"Bearer {SECAGG_ADMIN}"}
        assert client.post("/v1/nodes/b/revoke", headers=admin).status_code == 200
        rnd = client.get("/v1/rounds/1").json()
        assert (rnd["state"], rnd["result_version"]) == ("closed", None)  # redone
        cohort = {m.node_id: m.public_key for m in state.cohort}
        seed = pairwise_seed(
            private["a"], base64.b64decode(cohort["c"]), round_id=1, node_a="a", node_b="c"
        )
        r = client.post(
            "/v1/rounds/1/secagg/reveals",
            json={"seeds": {"c": seed.hex()}},
            headers={"Authorization": f"Bearer {tokens['a']}"},
        )
        assert r.status_code == 409, r.text
        current = client.get("/v1/rounds/current").json()
        assert current["round_id"] == 2 and current["base_version"] == 1
        versions = client.get("/v1/models", headers=admin).json()
        assert [v["version"] for v in versions] == [1]


def test_revoking_the_dropped_node_does_not_redo_the_recovery(tmp_path: object) -> None:
    # c dropped and stored no update; the survivors' reveals take its masks out. Revoking
    # it redid the round anyway, throwing away a and b's updates.
    url = f"sqlite:///{tmp_path}/c.db"
    with _coordinator(url, deadline=2.0) as client:
        dropout = _c_drops(client)
        admin = {"Authorization": f"Bearer {SECAGG_ADMIN}"}
        assert client.post("/v1/nodes/c/revoke", headers=admin).status_code == 200
        assert client.get("/v1/rounds/1").json()["state"] == "open"
        _survivors_reveal_c(client, dropout)
        new = _wait_version(client, 2)
        expected = _fedavg(dropout.base, dropout.deltas, ["a", "b"])
        for k in dropout.base:
            assert torch.allclose(new[k], expected[k], atol=1e-6), k


def test_a_key_upload_of_a_node_revoked_meanwhile_is_refused(tmp_path: object) -> None:
    # The token was checked before the round lock was taken; a revoke committed in
    # between still let the key into the cohort (so the round waited on a node that
    # can never submit).
    url = f"sqlite:///{tmp_path}/c.db"
    with _coordinator(url, deadline=30.0) as client:
        _setup(client)
        db = Database(url)
        with db.sessions() as session:
            stale = session.get(Node, "a")  # as the token check loaded it
            assert stale is not None
            session.expunge(stale)
        with db.sessions() as session:
            revoke_node(session, client.app.state.settings, "a")  # type: ignore[attr-defined]
        _, public = generate_keypair()
        with db.sessions() as session, pytest.raises(Forbidden, match="revoked"):
            publish_key(
                session,
                client.app.state.settings,  # type: ignore[attr-defined]
                stale,
                1,
                base64.b64encode(public).decode(),
            )
        db.dispose()
        state = client.get(
            "/v1/rounds/1/secagg", headers={"Authorization": f"Bearer {SECAGG_ADMIN}"}
        )
        assert state.json()["keys_received"] == 0
