"""An in-process stand-in for the coordinator's client, to drive a real `Participant`
(its worker process, store and agents) through situations a live coordinator rarely
produces on cue: a cohort sealed without this node, a cohort that never seals."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from regional_node.client import CoordinatorError, Weights
from regional_node.participation import NodeRuntime, Participant
from regional_node.settings import NodeSettings
from regional_node.store import EventStore
from shared.model import ModelConfig, init_state
from shared.privacy_schemas import SecAggState
from shared.schemas import CatalogOut, EventIn, ModelVersionOut, RoundOut, UpdateReceipt
from shared.serialization import sha256_hex, state_to_bytes
from tests.conftest import tiny_catalog

CONFIG = ModelConfig(num_items=30, embedding_dim=8)
WEIGHTS = state_to_bytes(init_state(CONFIG))


def open_round(round_id: int = 1, *, deadline_in: float = 300.0) -> RoundOut:
    now = datetime.now(UTC)
    return RoundOut(
        round_id=round_id,
        base_version=1,
        state="open",
        created_at=now,
        deadline=now + timedelta(seconds=deadline_in),
        closed_at=None,
        result_version=None,
        updates_received=0,
        min_updates=1,
        target_updates=2,
        participants=[],
        supported_encodings=["dense"],
    )


def secagg_state(**fields: Any) -> SecAggState:
    base: dict[str, Any] = {
        "round_id": 1,
        "round_state": "open",
        "sealed": False,
        "cohort": [],
        "keys_received": 1,
        "submitted": [],
        "dropped": [],
        "revealed_by": [],
    }
    return SecAggState(**{**base, **fields})


class FakeCoordinator:
    """Answers like the coordinator; `calls` records what the node asked for."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.round = open_round()
        self.publish_error: CoordinatorError | None = None
        self.secagg: Callable[[], SecAggState] = secagg_state
        self.keys: dict[str, str] = {}  # node id -> its published key (this round)
        self.catalog_items: list[dict[str, object]] = tiny_catalog(30)
        self.catalog_version = 1  # bump it with new `catalog_items`

    async def aclose(self) -> None:
        pass

    async def catalog(self, etag: str | None = None) -> tuple[CatalogOut | None, str]:
        current = f'"c{self.catalog_version}"'
        if etag == current:
            return None, current
        body = {"catalog_version": self.catalog_version, "items": self.catalog_items}
        return CatalogOut.model_validate(body), current

    async def current_round(self, *, after: int | None = None, wait: float = 0.0) -> RoundOut:
        if after is not None and self.round.round_id <= after:
            await asyncio.sleep(min(wait, 0.05))
        return self.round

    def _meta(self) -> ModelVersionOut:
        return ModelVersionOut(
            version=1,
            created_at=datetime.now(UTC),
            round_id=None,
            sha256=sha256_hex(WEIGHTS),
            size_bytes=len(WEIGHTS),
            status="active",
            config=CONFIG.model_dump(),
            metrics={},
            num_items=30,
        )

    async def active_model(self) -> ModelVersionOut:
        return self._meta()

    async def model(self, version: int) -> ModelVersionOut:
        return self._meta()

    async def weights(self, version: int, cached: Weights | None = None) -> Weights:
        return Weights(1, sha256_hex(WEIGHTS), WEIGHTS)

    async def submit_update(self, round_id: int, **kw: Any) -> UpdateReceipt:
        self.calls.append("submit_update")
        return UpdateReceipt(
            round_id=round_id,
            node_id="node-1",
            num_examples=kw["num_examples"],
            sha256=kw["sha256"],
            accepted_at=datetime.now(UTC),
            updates_received=1,
            duplicate=False,
        )

    async def publish_secagg_key(self, round_id: int, key: str) -> SecAggState:
        self.calls.append("publish_secagg_key")
        if self.publish_error is not None:
            raise self.publish_error
        self.keys["node-1"] = key
        return self.secagg()

    async def secagg_state(self, round_id: int) -> SecAggState:
        self.calls.append("secagg_state")
        return self.secagg()

    async def reveal_secagg_seeds(self, round_id: int, seeds: dict[str, str]) -> SecAggState:
        self.calls.append("reveal")
        return self.secagg()

    async def push_insights(self, node_id: str, report: Any) -> None:
        pass

    def sealed_cohort(self) -> SecAggState:
        """The cohort sealed with this node's published key alone."""
        cohort = [{"node_id": n, "public_key": k} for n, k in self.keys.items()]
        return secagg_state(sealed=True, cohort=cohort)


def participant(
    tmp: Path, events: list[dict[str, object]], **settings: Any
) -> tuple[Participant, FakeCoordinator, EventStore]:
    """A real Participant (worker process, SQLite store) talking to a FakeCoordinator."""
    s = NodeSettings(
        database_url=f"sqlite:///{tmp / 'node.db'}",
        coordinator_url="http://127.0.0.1:9",
        allow_anonymous=True,
        poll_seconds=0.05,
        insights_enabled=False,
        **settings,
    )
    store = EventStore(s.database_url)
    store.migrate()
    if events:
        store.add_events([EventIn.model_validate(e) for e in events])
    p = Participant(s, store, NodeRuntime())
    fake = FakeCoordinator()
    p.client = fake  # type: ignore[assignment]
    if p.secagg is not None:
        p.secagg.client = fake  # type: ignore[assignment]
    return p, fake, store
