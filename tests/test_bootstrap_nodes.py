"""COORDINATOR_BOOTSTRAP_NODES: pre-shared node credentials for declarative deployments."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from coordinator.app import create_app
from coordinator.db import Database
from coordinator.models import Node
from coordinator.nodes.bootstrap import (
    BootstrapNode,
    bootstrap_from_settings,
    parse_bootstrap_nodes,
)
from coordinator.security import token_matches
from coordinator.settings import CoordinatorSettings
from tests.conftest import tiny_catalog

SECRET_EU = "eu-secret-0123456789"
SECRET_NA = "na-secret-0123456789"


def test_parse_entries() -> None:
    assert parse_bootstrap_nodes("") == []
    assert parse_bootstrap_nodes(f" eu-1:EU:{SECRET_EU} ,\n na-1:NA:{SECRET_NA}, ") == [
        BootstrapNode("eu-1", "EU", SECRET_EU),
        BootstrapNode("na-1", "NA", SECRET_NA),
    ]
    # The secret may itself contain ':'.
    assert parse_bootstrap_nodes("eu-1:EU:a:b:c:d:e:f:g:h:i")[0].secret == "a:b:c:d:e:f:g:h:i"
    # ... and inner blanks: a passphrase travels whole in "Authorization: Bearer <token>".
    phrase = "correct horse battery staple"
    assert parse_bootstrap_nodes(f"eu-1:EU:{phrase}")[0].secret == phrase
    assert BootstrapNode("eu-1", "EU", SECRET_EU).token == f"eu-1.{SECRET_EU}"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("eu-1:EU", "expected node_id:region:secret"),
        ("eu-1:EU:short", "shorter than 16"),
        # The token "<id>.<secret>" is split at its last '.': this one could never log in.
        ("eu-9:EU:my.long.secret.value.123", "other than '.'"),
        ("eu-9:EU:s\u00e9cret-s\u00e9cret-s\u00e9cret", "printable ASCII"),
        (f"eu-1:EU:{SECRET_EU},eu-1:EU:{SECRET_NA}", "listed twice"),
        (f"eu 1:EU:{SECRET_EU}", "node_id"),
    ],
)
def test_malformed_entries_fail_the_settings(spec: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        CoordinatorSettings(bootstrap_nodes=spec)


def test_apply_is_idempotent_rotates_and_keeps_revocations(sqlite_url: str) -> None:
    db = Database(sqlite_url)
    db.migrate()
    try:
        bootstrap_from_settings(db, f"eu-1:EU:{SECRET_EU},na-1:NA:{SECRET_NA}")
        bootstrap_from_settings(db, f"eu-1:EU:{SECRET_EU},na-1:NA:{SECRET_NA}")
        with db.sessions() as s:
            eu = s.get(Node, "eu-1")
            assert eu is not None and s.query(Node).count() == 2
            assert token_matches(f"eu-1.{SECRET_EU}", eu.token_hash)
            created = eu.created_at
            na = s.get(Node, "na-1")
            assert na is not None
            na.revoked_at = created
            s.commit()
        rotated = "eu-rotated-0123456789"
        bootstrap_from_settings(db, f"eu-1:EU-WEST:{rotated},na-1:NA:{SECRET_NA}")
        with db.sessions() as s:
            eu, na = s.get(Node, "eu-1"), s.get(Node, "na-1")
            assert eu is not None and na is not None
            assert token_matches(f"eu-1.{rotated}", eu.token_hash)
            assert not token_matches(f"eu-1.{SECRET_EU}", eu.token_hash)
            assert eu.region == "EU-WEST" and eu.created_at == created
            assert na.revoked_at is not None  # configuration never un-revokes a node
    finally:
        db.dispose()


def test_a_bootstrap_token_authenticates_the_node(sqlite_url: str) -> None:
    settings = CoordinatorSettings(
        database_url=sqlite_url,
        admin_token="admin-token",
        bootstrap_nodes=f"eu-1:EU:{SECRET_EU},na-1:NA:correct horse battery staple",
        embedding_dim=8,
    )
    with TestClient(create_app(settings)) as client:
        admin = {"Authorization": "Bearer admin-token"}
        assert client.put("/v1/catalog", json=tiny_catalog(8), headers=admin).status_code == 200
        good = {"Authorization": f"Bearer eu-1.{SECRET_EU}"}
        bad = {"Authorization": "Bearer eu-1.not-the-secret-at-all"}
        assert client.get("/v1/models/1/weights", headers=good).status_code == 200
        assert client.get("/v1/models/1/weights", headers=bad).status_code == 401
        phrase = {"Authorization": "Bearer na-1.correct horse battery staple"}
        assert client.get("/v1/models/1/weights", headers=phrase).status_code == 200
        nodes = client.get("/v1/nodes", headers=admin).json()
        registered = sorted((n["node_id"], n["region"]) for n in nodes)
        assert registered == [("eu-1", "EU"), ("na-1", "NA")]
