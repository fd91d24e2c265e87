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
    search: str = "ivf"


def start_serving_node(
    workdir: Path,
    *,
    items: int,
    users: int,
    epochs: int = 1,
    seed: int = 1,
    search: str = "ivf",
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
            recommend_search=search,
        )
        node.wait_ready(timeout=120)
        wait_for(
            lambda: cluster.node_status(node)["model_version"] == 1,
            300,
            "the node to serve version 1",
            cluster.procs(),
        )
        cluster.post_events(node, market.region_events(REGION))
        return ServingSetup(cluster, node, market, helper_token, search)
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


def search_recall(
    setup: ServingSetup, scenarios: dict[str, list[str]], *, per_scenario: int = 300
) -> dict[str, float]:
    """Recall@10 of the node's search (IVF unless NODE_RECOMMEND_SEARCH=exact) against
    exact search, per scenario: the same serving model the node built (same catalog,
    weights, settings and seed), the same history from the node's own database."""
    from urllib.parse import parse_qs, urlparse

    from regional_node.recommender import Filters, build_serving_model, recommend
    from regional_node.settings import NodeSettings
    from regional_node.store import EventStore
    from shared.model import ModelConfig
    from shared.schemas import CatalogOut
    from shared.serialization import bytes_to_state

    admin = setup.cluster.admin
    assert admin is not None
    version = setup.cluster.node_status(setup.node)["model_version"]
    catalog = CatalogOut.model_validate(admin.get("/v1/catalog").json())
    meta = admin.get(f"/v1/models/{version}").json()
    weights = admin.get(f"/v1/models/{version}/weights").content
    s = NodeSettings(allow_anonymous=True, recommend_search=setup.search)
    serving = build_serving_model(
        version,
        meta["sha256"],
        ModelConfig.model_validate(meta["config"]),
        bytes_to_state(weights),
        catalog.items,
        catalog.inactive_item_ids,
        ivf_clusters=s.ivf_clusters if s.recommend_search == "ivf" else None,
        ivf_candidates=s.ivf_candidates,
    )
    store = EventStore(f"sqlite:///{setup.cluster.workdir / (setup.node.name + '.db')}")
    out: dict[str, float] = {}
    try:
        for name, paths in scenarios.items():
            if name == "healthz":
                continue
            hits = total = 0
            for path in paths[:per_scenario]:
                q = {k: v[0] for k, v in parse_qs(urlparse(path).query).items()}
                session = [i for i in q.get("session_items", "").split(",") if i]
                history: list[tuple[str, str]] = []
                purchased: set[str] = set()
                country = q.get("country")
                if "user_id" in q:
                    history, purchased, last = store.recommend_context(q["user_id"])
                    country = country or last
                history += [(i, "view") for i in session]
                filters = Filters(
                    category=q.get("category"),
                    material=q.get("material"),
                    max_price=float(q["max_price"]) if "max_price" in q else None,
                )
                exclude = sorted(purchased | set(session))
                k = int(q.get("k", 10))
                args = (serving, history, country, k, filters, exclude)
                exact = {i for i, _ in recommend(*args, exact=True)}
                found = {i for i, _ in recommend(*args)}
                hits += len(exact & found)
                total += len(exact)
            out[name] = hits / max(total, 1)
    finally:
        store.dispose()
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
    setup = start_serving_node(workdir, items=items, users=users, search=args.search)
    result.config["search"] = args.search
    try:
        status = setup.cluster.node_status(setup.node)
        result.config["node_events"] = status["event_count"]
        scenarios = scenario_paths(setup.market)
        measured = measure_scenarios(
            setup.node.url,
            scenarios,
            concurrency=c,
            duration=duration,
            tool=args.tool,
            names=["healthz", "history + filters + session"] if args.quick else None,
            warmup=0 if args.quick else 1.0,
        )
        recall = search_recall(setup, scenarios, per_scenario=50 if args.quick else 300)
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
        result.add(
            f"{name}: recall@10 against exact search",
            recall[name],
            note=f"search={args.search}; 1 = exact",
        )
    result.config["load_tool"] = measured["healthz"]["c1"].tool
    return result


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--items", type=int, default=50_000)
    p.add_argument("--users", type=int, default=6000)
    p.add_argument("--duration", type=float, default=5.0, help="seconds per load run")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--tool", choices=["auto", "wrk", "httpx"], default="auto")
    p.add_argument(
        "--search",
        choices=["ivf", "exact"],
        default="ivf",
        help="the node's NODE_RECOMMEND_SEARCH (ivf is the default)",
    )


def main(argv: list[str] | None = None) -> BenchResult:
    return run_main("serving", __doc__ or "", _body, argv, add_args)


if __name__ == "__main__":
    main()
