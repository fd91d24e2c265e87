"""COORDINATOR_SERVER_OPTIMIZER=adam: FedAdam on each round's aggregate, its moments
stored per version so that rounds continue across a restart (real rounds over HTTP)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from coordinator.app import create_app
from coordinator.models import ServerOptimizerState
from coordinator.server_optimizer import _fit
from coordinator.settings import CoordinatorSettings
from shared.dp_training import ServerAdam
from shared.serialization import bytes_to_state, state_to_bytes
from tests.conftest import tiny_catalog
from tests.test_api_coordinator import ADMIN, _register, _submit

SETTINGS = {
    "admin_token": "admin-secret",
    "min_updates": 2,
    "round_check_seconds": 0.05,
    "embedding_dim": 8,
    "server_optimizer": "adam",
    "server_lr": 0.05,
    "server_adam_tau": 1e-3,
}


def _app(db_url: str) -> TestClient:
    return TestClient(create_app(CoordinatorSettings(database_url=db_url, **SETTINGS)))


def _wait_version(client: TestClient, version: int) -> None:
    deadline = time.monotonic() + 20
    while client.get("/v1/models/latest").json()["version"] != version:
        assert time.monotonic() < deadline, "round did not close"
        time.sleep(0.05)


def _random(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.01 for k, v in state.items()}


@pytest.fixture
def nodes(db_url: str) -> Iterator[tuple[str, dict[str, str], dict[str, str]]]:
    with _app(db_url) as client:
        client.put("/v1/catalog", json=tiny_catalog(10), headers=ADMIN)
        a, b = _register(client, "a"), _register(client, "b")
    yield db_url, a, b


def test_rounds_take_fedadam_steps_that_survive_a_restart(
    nodes: tuple[str, dict[str, str], dict[str, str]],
) -> None:
    db_url, a, b = nodes
    adam = ServerAdam(lr=0.05, tau=1e-3)
    expected: dict[str, torch.Tensor] = {}
    for rnd in (1, 2):
        # A fresh app each round: the moments must come from the database.
        with _app(db_url) as client:
            base = bytes_to_state(client.get(f"/v1/models/{rnd}/weights", headers=a).content)
            da, db = _random(base, 10 * rnd), _random(base, 10 * rnd + 1)
            for headers, delta, n in ((a, da, 30), (b, db, 10)):
                r = _submit(
                    client,
                    headers,
                    state_to_bytes(delta),
                    round_id=rnd,
                    base_version=rnd,
                    num_examples=n,
                )
                assert r.status_code == 200, r.text
            _wait_version(client, rnd + 1)
            new = bytes_to_state(client.get(f"/v1/models/{rnd + 1}/weights", headers=a).content)
        mean = {k: (30 * da[k] + 10 * db[k]) / 40 for k in base}
        step = adam.step(mean)
        expected = {k: base[k] + step[k] for k in base}
        for k in base:
            torch.testing.assert_close(new[k], expected[k], atol=1e-5, rtol=1e-4)
            # Not the plain FedAvg version: the step is Adam's.
            assert rnd == 2 or not torch.allclose(new[k], base[k] + mean[k], atol=1e-6)
    engine = create_engine(db_url)
    try:
        with Session(engine) as session:
            stored = session.scalars(select(ServerOptimizerState.version)).all()
        assert sorted(stored) == [2, 3]
    finally:
        engine.dispose()


def test_moments_grow_with_the_item_table() -> None:
    like = torch.ones(5, 3)
    assert torch.equal(_fit(None, like), torch.zeros(5, 3))
    grown = _fit(torch.full((3, 3), 2.0), like)
    assert torch.equal(grown[:3], torch.full((3, 3), 2.0)) and torch.equal(
        grown[3:], torch.zeros(2, 3)
    )


def test_server_optimizer_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        CoordinatorSettings(server_optimizer="sgdm")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        CoordinatorSettings(server_lr=0)
