"""A running federation for the round benchmarks: a coordinator and one node per region."""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.cluster import Cluster, Market, make_market
from shared.devservers import wait_for


def start_federation(
    workdir: Path,
    *,
    nodes: int,
    users: int,
    items: int,
    dim: int,
    node_env: dict[str, str] | None = None,
    database_url: str | None = None,
) -> tuple[Cluster, Market]:
    """Coordinator (rounds wait for every node) + `nodes` nodes, each with its region's events."""
    market = make_market(workdir, items=items, users=users, regions=nodes, seed=3)
    cluster = Cluster(workdir)
    try:
        cluster.start_coordinator(
            database_url,
            min_updates=str(nodes),
            round_deadline_seconds="3600",
            embedding_dim=str(dim),
        )
        cluster.put_catalog(market.catalog)
        procs = []
        for i, region in enumerate(market.summary.regions):
            env = {"poll_seconds": "0.3", "local_epochs": "1", **(node_env or {})}
            procs.append(cluster.start_node(f"node-{i:02d}-{region.lower()}", region, **env))
        for node, region in zip(procs, market.summary.regions, strict=True):
            node.wait_ready(timeout=300)
            cluster.post_events(node, market.region_events(region))
        return cluster, market
    except BaseException:
        cluster.stop()
        raise


def _ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def closed_rounds(cluster: Cluster) -> list[dict[str, Any]]:
    assert cluster.admin is not None
    resp = cluster.admin.get("/v1/rounds", params={"limit": 1000})
    resp.raise_for_status()  # an HTTP error is retried by wait_for
    rounds = resp.json()
    return sorted((r for r in rounds if r["state"] == "closed"), key=lambda r: r["round_id"])


def run_rounds(cluster: Cluster, rounds: int, timeout: float, poll: float = 0.2) -> list[float]:
    """Wait until `rounds` rounds have closed; seconds from open to close of each."""
    wait_for(
        lambda: len(closed_rounds(cluster)) >= rounds,
        timeout,
        f"{rounds} rounds to close",
        cluster.procs(),
        poll=poll,
    )
    return [
        (_ts(r["closed_at"]) - _ts(r["created_at"])).total_seconds()
        for r in closed_rounds(cluster)[:rounds]
    ]


def round_periods(cluster: Cluster, rounds: int) -> list[float]:
    """Seconds from the opening of each of the first `rounds` closed rounds to the opening
    of the next one: the whole cycle, the coordinator's aggregation and commit included
    (a round's own `closed_at` is taken before it aggregates)."""
    assert cluster.admin is not None
    resp = cluster.admin.get("/v1/rounds", params={"limit": 1000})
    resp.raise_for_status()
    opened = sorted((r["round_id"], _ts(r["created_at"])) for r in resp.json())
    return [
        (later - earlier).total_seconds() for (_, earlier), (_, later) in itertools.pairwise(opened)
    ][:rounds]


def steady(seconds: Sequence[float]) -> float:
    """Median round time without round 1 (which includes node start-up and first sync)."""
    rest = list(seconds[1:]) or list(seconds)
    return statistics.median(rest)
