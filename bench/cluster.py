"""Real services for the benchmarks: a coordinator and regional nodes as uvicorn processes.

The realistic path throughout: the admin uploads the catalog to the coordinator
(which makes version 1), nodes register and sync the catalog and the active
model from the coordinator, storefront events arrive at the node over HTTP.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from shared.data import EventRecord, read_catalog_csv, read_events_csv
from shared.devservers import ServiceProcess
from shared.market import MarketSummary, generate_market
from shared.schemas import CatalogItem

ADMIN_TOKEN = "bench-admin-token"
API_KEY = "bench-storefront-key"


@dataclass
class Market:
    summary: MarketSummary
    catalog: list[CatalogItem]
    events: list[EventRecord]

    def region_events(self, region: str) -> list[EventRecord]:
        return [e for e in self.events if e.region == region]


def make_market(
    workdir: Path,
    *,
    items: int,
    users: int,
    regions: int = 6,
    seed: int = 1,
    market_items: int = 2500,
) -> Market:
    """A synthetic market with a catalog of `items` items.

    The generator's cost grows with users x items, so a 50k-item catalog is the
    market's `market_items` items (the ones with behaviour) plus synthetic
    long-tail items with the same kinds of attributes and no events yet.
    """
    market_items = min(items, market_items)
    name = f"market-s{seed}-r{regions}-u{users}-i{market_items}"
    # `python -m bench` shares generated markets between benchmarks (same arguments,
    # same market: the generator is deterministic).
    shared = os.environ.get("FEDJEWEL_BENCH_MARKETS")
    out = (Path(shared) if shared else workdir) / name
    saved = out / "summary.pickle"
    if shared and saved.exists():
        summary = pickle.loads(saved.read_bytes())
    else:
        summary = generate_market(out, seed=seed, regions=regions, users=users, items=market_items)
        if shared:
            saved.write_bytes(pickle.dumps(summary))
    catalog = read_catalog_csv(summary.catalog_path)
    catalog += long_tail(catalog, items - len(catalog), seed=seed)
    events = read_events_csv(summary.events_path)
    return Market(summary=summary, catalog=catalog, events=events)


def long_tail(like: Sequence[CatalogItem], n: int, *, seed: int) -> list[CatalogItem]:
    """`n` new items whose attributes are drawn from the existing ones (deterministic)."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b, c = rng.choice(like), rng.choice(like), rng.choice(like)
        out.append(
            CatalogItem(
                item_id=f"T{i:06d}",
                title=f"{a.material or ''} {b.category or 'jewel'}".strip(),
                category=b.category,
                material=a.material,
                gemstone=c.gemstone,
                style_tags=list(c.style_tags),
                price_usd=round((a.price_usd or 100.0) * rng.uniform(0.6, 1.6), 2),
            )
        )
    return out


def event_json(records: Iterable[EventRecord]) -> list[dict[str, Any]]:
    return [
        {
            "user_id": e.user_id,
            "item_id": e.item_id,
            "event_type": e.event_type,
            "timestamp": e.timestamp.isoformat(),
            "country": e.country,
        }
        for e in records
    ]


@dataclass
class Cluster:
    """A coordinator plus nodes; stop() ends every process it started."""

    workdir: Path
    coordinator: ServiceProcess | None = None
    nodes: list[ServiceProcess] = field(default_factory=list)
    admin: httpx.Client | None = None

    def start_coordinator(self, database_url: str | None = None, **env: str) -> ServiceProcess:
        if database_url is None:
            _remove_sqlite(self.workdir / "coordinator.db")  # every run starts empty
        url = database_url or f"sqlite:///{self.workdir / 'coordinator.db'}"
        coord = ServiceProcess(
            name="coordinator",
            module="coordinator",
            env={
                "COORDINATOR_DATABASE_URL": url,
                "COORDINATOR_ADMIN_TOKEN": ADMIN_TOKEN,
                "COORDINATOR_ROUND_CHECK_SECONDS": "0.1",
                **{f"COORDINATOR_{k.upper()}": v for k, v in env.items()},
            },
            log_path=self.workdir / "coordinator.log",
        ).start()
        self.coordinator = coord
        coord.wait_ready(timeout=120)
        self.admin = httpx.Client(
            base_url=coord.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=300
        )
        return coord

    def put_catalog(self, catalog: Sequence[CatalogItem]) -> dict[str, Any]:
        assert self.admin is not None
        body = json.dumps([c.model_dump() for c in catalog])
        resp = self.admin.put(
            "/v1/catalog", content=body, headers={"Content-Type": "application/json"}
        )
        resp.raise_for_status()
        return dict(resp.json())

    def start_node(
        self, node_id: str, region: str, token: str | None = None, **env: str
    ) -> ServiceProcess:
        """Start a node (registering it unless `token` is given); does not wait for it."""
        assert self.admin is not None and self.coordinator is not None
        token = token or register_node(self.admin, node_id, region)
        _remove_sqlite(self.workdir / f"{node_id}.db")
        node = ServiceProcess(
            name=node_id,
            module="regional_node",
            env={
                "NODE_ID": node_id,
                "NODE_REGION": region,
                "NODE_COORDINATOR_URL": self.coordinator.url,
                "NODE_TOKEN": token,
                "NODE_DATABASE_URL": f"sqlite:///{self.workdir / (node_id + '.db')}",
                "NODE_API_KEYS": API_KEY,
                "NODE_MIN_USERS_FOR_METRICS": "5",
                **{f"NODE_{k.upper()}": v for k, v in env.items()},
            },
            log_path=self.workdir / f"{node_id}.log",
        ).start()
        self.nodes.append(node)
        return node

    def post_events(self, node: ServiceProcess, records: Sequence[EventRecord]) -> int:
        inserted = 0
        with httpx.Client(base_url=node.url, headers={"X-API-Key": API_KEY}, timeout=300) as c:
            for start in range(0, len(records), 10_000):
                resp = c.post("/v1/events", json=event_json(records[start : start + 10_000]))
                resp.raise_for_status()
                inserted += int(resp.json()["inserted"])
        return inserted

    def node_status(self, node: ServiceProcess) -> dict[str, Any]:
        return dict(httpx.get(node.url + "/v1/status", timeout=30).json())

    def latest_version(self) -> int:
        assert self.admin is not None
        resp = self.admin.get("/v1/models/latest")
        return int(resp.json()["version"]) if resp.status_code == 200 else 0

    def procs(self) -> list[ServiceProcess]:
        return [p for p in [self.coordinator, *self.nodes] if p is not None]

    def stop(self) -> None:
        for p in reversed(self.procs()):
            p.stop()
        if self.admin is not None:
            self.admin.close()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _remove_sqlite(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)


def register_node(admin: httpx.Client, node_id: str, region: str = "bench") -> str:
    """Register a node; returns its token."""
    resp = admin.post("/v1/nodes", json={"node_id": node_id, "region": region})
    resp.raise_for_status()
    return str(resp.json()["token"])


def post_update(
    base_url: str,
    token: str,
    round_id: int,
    *,
    base_version: int,
    payload: bytes,
    num_examples: int = 100,
    encoding: str = "dense",
    timeout: float = 600,
) -> httpx.Response:
    from shared.serialization import sha256_hex

    return httpx.post(
        f"{base_url}/v1/rounds/{round_id}/updates",
        params={"num_examples": num_examples, "base_version": base_version},
        content=payload,
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/octet-stream",
            "X-Content-SHA256": sha256_hex(payload),
            "X-Update-Encoding": encoding,
        },
        timeout=timeout,
    )


def zero_update(admin: httpx.Client, version: int) -> bytes:
    """A delta of zeros against `version` (a participant that learned nothing)."""
    import torch

    from shared.serialization import bytes_to_state, state_to_bytes

    resp = admin.get(f"/v1/models/{version}/weights")
    resp.raise_for_status()
    state = bytes_to_state(resp.content)
    return state_to_bytes({k: torch.zeros_like(v) for k, v in state.items()})
