"""shared/client.py against a real regional node process (serve-only: no coordinator)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.client import (
    AsyncNodeClient,
    NodeApiError,
    NodeClient,
    RecommendFilters,
    recommend_params,
)
from shared.devservers import ServiceProcess
from tests.conftest import tiny_events

KEY = "storefront-test-key"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    tmp: Path = tmp_path_factory.mktemp("client-node")
    proc = ServiceProcess(
        name="node",
        module="regional_node",
        env={
            "NODE_ID": "eu-1",
            "NODE_REGION": "EU",
            "NODE_API_KEYS": KEY,
            "NODE_DATABASE_URL": f"sqlite:///{tmp / 'node.db'}",
            "NODE_MAX_EVENTS_PER_BATCH": "50",
        },
        log_path=tmp / "node.log",
    ).start()
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def test_recommend_params_carry_only_what_is_set() -> None:
    assert recommend_params(user_id=None, k=10, session_items=(), country=None, filters=None) == {
        "k": 10
    }
    assert recommend_params(
        user_id="u-1",
        k=3,
        session_items=["J1", "J2"],
        country="DE",
        filters=RecommendFilters(material="gold", max_price=500.0),
    ) == {
        "k": 3,
        "user_id": "u-1",
        "session_items": "J1,J2",
        "country": "DE",
        "material": "gold",
        "max_price": 500.0,
    }


@pytest.mark.e2e
def test_sync_client_events_recommend_status_and_errors(node: ServiceProcess) -> None:
    events = tiny_events("cli", users=12, material="gold", seed=3)
    assert len(events) > 50  # more than one node batch: the client must split
    with NodeClient(node.url, api_key=KEY) as client:
        first = client.send_events(events, batch_size=40)
        assert (first.received, first.inserted, first.duplicates) == (len(events), len(events), 0)
        again = client.send_events(events[:10])
        assert (again.inserted, again.duplicates) == (0, 10)

        status = client.status()
        assert status.node_id == "eu-1" and status.event_count == len(events)

        rec = client.recommend(user_id="cli-user-1", k=5)
        assert rec.strategy == "popularity" and rec.user_id == "cli-user-1"
        assert len(rec.items) == 5 and len({i.item_id for i in rec.items}) == 5

        with pytest.raises(NodeApiError) as err:
            client.recommend(k=0)
        assert err.value.status_code == 422
        assert any("k" in str(d.get("loc")) for d in err.value.detail)

        with pytest.raises(NodeApiError) as err:
            client.send_events(events[:60], batch_size=60)  # above NODE_MAX_EVENTS_PER_BATCH
        assert err.value.status_code == 413 and "exceeds" in err.value.detail

    with pytest.raises(ValueError):  # validated before anything is sent
        NodeClient(node.url, api_key=KEY).send_events([{**events[0], "event_type": "like"}])

    with NodeClient(node.url, api_key="wrong-key") as bad, pytest.raises(NodeApiError) as err:
        bad.recommend()
    assert err.value.status_code == 401 and isinstance(err.value.detail, str)


@pytest.mark.e2e
def test_async_client_matches_the_sync_one(node: ServiceProcess) -> None:
    async def scenario() -> None:
        async with AsyncNodeClient(node.url, api_key=KEY) as client:
            accepted = await client.send_events(
                tiny_events("acli", users=3, material="silver", seed=4)
            )
            assert accepted.inserted == accepted.received > 0
            rec = await client.recommend(session_items=["I001", "I002"], k=4)
            assert len(rec.items) == 4 and {"I001", "I002"}.isdisjoint(i.item_id for i in rec.items)
            assert (await client.status()).region == "EU"
            with pytest.raises(NodeApiError) as err:
                await client.recommend(k=500)
            assert err.value.status_code == 422

    asyncio.run(scenario())
