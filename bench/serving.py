"""Serving: `/v1/recommend` on a node with a 50,000-item catalog, against `/healthz`.

Setup (the realistic path): a coordinator gets the 50k-item catalog and makes
version 1; a node syncs catalog and model from it, and receives one region's
storefront events over HTTP. The node is idle (it has already answered the
open round), so nothing but the load runs on it.

Figures, all from one run on one server, with load from a separate process:
* throughput of each recommend scenario ÷ throughput of `/healthz` at the same
  concurrency (goal ≥ 0.5);
* p99 latency at concurrency 1 (goal ≤ 20 ms).

`python -m bench.serving [--items 50000] [--duration 5] [--json out.json]`
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

from bench.cluster import (
    API_KEY,
    Cluster,
    Market,
    make_market,
    post_update,
    register_node,
    zero_update,
)
from bench.common import BenchResult, run_main
from bench.load import LoadResult, run_load
from shared.devservers import ServiceProcess, wait_for

REGION = "EU"


@dataclass
class ServingSetup:
    cluster: Cluster
    node: ServiceProcess
    market: Market
    helper_token: str


def start_serving_node(
    workdir: Path, *, items: int, users: int, epochs: int = 1, seed: int = 1
) -> ServingSetup:
    """Coordinator with the catalog, one idle node serving version 1 with a region's events.

    Round 1 waits for three updates; the node and a helper have sent (zero) ones,
    so the node has nothing to train until the round closes (see `start_training`).
    """
    market = make_market(workdir, items=items, users=users, seed=seed)
    cluster = Cluster(workdir)
    try:
        cluster.start_coordinator(min_updates="3", round_deadline_seconds="3600")
        cluster.put_catalog(market.catalog)
        assert cluster.admin is not None
        zero = zero_update(cluster.admin, 1)
        node_token = register_node(cluster.admin, "eu-1", REGION)
        helper_token = register_node(cluster.admin, "helper-1", "helper")
        for token in (node_token, register_node(cluster.admin, "helper-0", "helper")):
            post_update(cluster.coordinator.url, token, 1, base_version=1, payload=zero)  # type: ignore[union-attr]
        node = cluster.start_node(
            "eu-1",
            REGION,
            token=node_token,
            poll_seconds="1",
            local_epochs=str(epochs),
        )
        node.wait_ready(timeout=120)
        wait_for(
            lambda: cluster.node_status(node)["model_version"] == 1,
            300,
            "the node to serve version 1",
            cluster.procs(),
        )
        cluster.post_events(node, market.region_events(REGION))
        return ServingSetup(cluster, node, market, helper_token)
    except BaseException:
        cluster.stop()
        raise


def start_training(setup: ServingSetup) -> None:
    """Close round 1 with a third update; the node then trains round 2 on version 2."""
    cluster = setup.cluster
    assert cluster.admin is not None and cluster.coordinator is not None
    zero = zero_update(cluster.admin, 1)
    resp = post_update(cluster.coordinator.url, setup.helper_token, 1, base_version=1, payload=zero)
    resp.raise_for_status()


def scenario_paths(market: Market, *, n: int = 500, seed: int = 0) -> dict[str, list[str]]:
    """Request paths per scenario, drawn from the region's users and the catalog."""
    rng = random.Random(seed)
    events = market.region_events(REGION)
    users = sorted({e.user_id for e in events})
    item_ids = [c.item_id for c in market.catalog]
    rings = [c for c in market.catalog if c.category]
    categories = sorted({c.category for c in rings if c.category})
    materials = sorted({c.material for c in market.catalog if c.material})

    def path(**params: object) -> str:
        return "/v1/recommend?" + urlencode({k: v for k, v in params.items() if v is not None})

    def session() -> str:
        return ",".join(rng.sample(item_ids, rng.randint(1, 5)))

    out: dict[str, list[str]] = {"healthz": ["/healthz"]}
    out["user history"] = [path(user_id=rng.choice(users), k=10) for _ in range(n)]
    out["history + filters + session"] = [
        path(
            user_id=rng.choice(users),
            k=10,
            category=rng.choice(categories),
            material=rng.choice(materials) if rng.random() < 0.5 else None,
            max_price=rng.choice([200, 500, 1000, 5000]),
            session_items=session(),
        )
        for _ in range(n)
    ]
    out["new user, session only"] = [
        path(session_items=session(), k=10, country="DE") for _ in range(n)
    ]
    return out


def measure_scenarios(
    base_url: str,
    scenarios: dict[str, list[str]],
    *,
    concurrency: int,
    duration: float,
    tool: str,
    names: Sequence[str] | None = None,
    warmup: float = 1.0,
) -> dict[str, dict[str, LoadResult]]:
    """{scenario: {"c1": LoadResult, "cN": LoadResult}}; healthz included."""
    headers = {"X-API-Key": API_KEY}
    out: dict[str, dict[str, LoadResult]] = {}
    for name in names or list(scenarios):
        paths = scenarios[name]
        if warmup > 0:
            run_load(
                base_url,
                paths,
                concurrency=concurrency,
                duration=warmup,
                headers=headers,
                tool=tool,
            )
        out[name] = {
            "c1": run_load(
                base_url, paths, concurrency=1, duration=duration, headers=headers, tool=tool
            ),
            f"c{concurrency}": run_load(
                base_url,
                paths,
                concurrency=concurrency,
                duration=duration,
                headers=headers,
                tool=tool,
            ),
        }
    return out


def _body(args: argparse.Namespace, workdir: Path) -> BenchResult:
    items = 2000 if args.quick else args.items
    users = 300 if args.quick else args.users
    duration = 1.0 if args.quick else args.duration
    c = args.concurrency
    result = BenchResult(
        "serving",
        {
            "items": items,
            "users": users,
            "region": REGION,
            "duration_s": duration,
            "concurrency": c,
        },
    )
    setup = start_serving_node(workdir, items=items, users=users)
    try:
        status = setup.cluster.node_status(setup.node)
        result.config["node_events"] = status["event_count"]
        measured = measure_scenarios(
            setup.node.url,
            scenario_paths(setup.market),
            concurrency=c,
            duration=duration,
            tool=args.tool,
            names=["healthz", "history + filters + session"] if args.quick else None,
            warmup=0 if args.quick else 1.0,
        )
    finally:
        setup.cluster.stop()
    health = measured["healthz"][f"c{c}"]
    result.add(f"healthz throughput c={c}", health.rps, "req/s")
    result.add("healthz p99 c=1", measured["healthz"]["c1"].p99_ms, "ms")
    for name, runs in measured.items():
        result.rows.append({"scenario": name, **{k: v.as_dict() for k, v in runs.items()}})
        errors = sum(r.errors for r in runs.values())
        if errors:
            result.add(f"{name}: errors", errors, goal="<= 0")
        if name == "healthz":
            continue
        result.add(
            f"{name}: throughput ÷ healthz (c={c})",
            runs[f"c{c}"].rps / health.rps,
            goal=">= 0.5",
            note=f"{runs[f'c{c}'].rps:,.0f} req/s",
        )
        result.add(f"{name}: p99 c=1", runs["c1"].p99_ms, "ms", goal="<= 20")
        result.add(f"{name}: p50 c=1", runs["c1"].p50_ms, "ms")
    result.config["load_tool"] = measured["healthz"]["c1"].tool
    return result


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--items", type=int, default=50_000)
    p.add_argument("--users", type=int, default=6000)
    p.add_argument("--duration", type=float, default=5.0, help="seconds per load run")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--tool", choices=["auto", "wrk", "httpx"], default="auto")


def main(argv: list[str] | None = None) -> BenchResult:
    return run_main("serving", __doc__ or "", _body, argv, add_args)


if __name__ == "__main__":
    main()
