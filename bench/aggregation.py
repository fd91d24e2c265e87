"""Aggregation memory and time: N updates of a ≥5M-parameter model stored in PostgreSQL.

For N in (10, 50): a real coordinator on a fresh PostgreSQL database takes N
dense updates over HTTP (its round waits for N+1, so it never closes). Then
the round is closed by `try_close_current_round` — the function the
coordinator's closer runs — in a fresh process that, like the running
coordinator, already holds the base version in its weight cache. That process
reports its resident set before closing and its peak (VmHWM) during closing.

Figures: peak RSS increase ÷ model size (goal ≤ 3), and seconds per update
at N=10 and N=50 (roughly constant: the aggregation streams one payload at a time).

`python -m bench.aggregation [--items 50000] [--dim 96] [--counts 10,50] [--json out.json]`
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from bench.cluster import Cluster, post_update, register_node
from bench.common import BenchResult, hwm_mb, reset_hwm, rss_mb, run_main
from shared.schemas import CatalogItem

PG_ADMIN_DSN = os.environ.get(
    "FEDJEWEL_BENCH_PG_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
)
PG_URL_BASE = os.environ.get(
    "FEDJEWEL_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432"
)


def synthetic_catalog(n: int) -> list[CatalogItem]:
    cats = ["ring", "necklace", "earrings", "bracelet", "pendant", "watch"]
    mats = ["gold", "silver", "platinum", "rose_gold", "white_gold"]
    return [
        CatalogItem(
            item_id=f"J{i:06d}",
            category=cats[i % len(cats)],
            material=mats[(i // 7) % len(mats)],
            style_tags=["classic"] if i % 3 else ["modern"],
            price_usd=float(40 + (i * 37) % 3000),
        )
        for i in range(n)
    ]


class PgDatabase:
    """A fresh PostgreSQL database, dropped on exit."""

    def __init__(self) -> None:
        self.name = f"fedjewel_bench_{uuid.uuid4().hex[:10]}"
        self.url = f"{PG_URL_BASE}/{self.name}"

    def _admin(self):  # type: ignore[no-untyped-def]
        import psycopg

        return psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5)

    def __enter__(self) -> PgDatabase:
        with self._admin() as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        return self

    def __exit__(self, *exc: object) -> None:
        with self._admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def upload_updates(
    workdir: Path, db_url: str, catalog: list[CatalogItem], dim: int, count: int
) -> dict[str, Any]:
    """A real coordinator takes `count` dense updates; returns model size and upload speed."""
    import torch

    from bench.cluster import zero_update
    from shared.serialization import bytes_to_state, state_to_bytes

    with Cluster(workdir) as cluster:
        cluster.start_coordinator(
            db_url,
            min_updates=str(count + 1),
            round_deadline_seconds="86400",
            embedding_dim=str(dim),
        )
        cluster.put_catalog(catalog)
        assert cluster.admin is not None and cluster.coordinator is not None
        base = bytes_to_state(zero_update(cluster.admin, 1))
        params = sum(int(t.numel()) for t in base.values())
        g = torch.Generator().manual_seed(0)
        noise = {k: torch.randn(v.shape, generator=g) * 1e-3 for k, v in base.items()}
        del base
        seconds = 0.0
        size = 0
        for i in range(count):
            token = register_node(cluster.admin, f"node-{i:03d}")
            payload = state_to_bytes({k: v * (1 + i / count) for k, v in noise.items()})
            size = len(payload)
            t0 = time.perf_counter()
            resp = post_update(
                cluster.coordinator.url,
                token,
                1,
                base_version=1,
                payload=payload,
                num_examples=100 + i,
            )
            seconds += time.perf_counter() - t0
            resp.raise_for_status()
            del payload
        return {"params": params, "model_bytes": size, "upload_mb_s": size * count / seconds / 1e6}


def close_round_in_fresh_process(db_url: str, count: int, dim: int) -> dict[str, Any]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.aggregation",
            "--close-round",
            db_url,
            "--counts",
            str(count),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=1800,
        env={**os.environ, "COORDINATOR_EMBEDDING_DIM": str(dim)},
    ).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def _close_round(db_url: str, count: int) -> None:
    """Child process: close the round as the coordinator's closer does, measuring memory."""
    from coordinator.db import Database
    from coordinator.models_registry.service import WeightCache, load_state
    from coordinator.rounds.service import try_close_current_round
    from coordinator.settings import CoordinatorSettings
    from shared.memory import use_mmap_for_large_blocks

    use_mmap_for_large_blocks()  # as the coordinator's lifespan does
    settings = CoordinatorSettings(database_url=db_url, min_updates=count)
    db = Database(db_url)
    cache = WeightCache(maxsize=2)
    with db.sessions() as session:
        load_state(session, 1, cache)  # the running coordinator holds its base version
        session.rollback()
    gc.collect()
    pid = os.getpid()
    before = rss_mb(pid)
    hwm_reset = reset_hwm(pid)
    t0 = time.perf_counter()
    with db.sessions() as session:
        version = try_close_current_round(session, settings, cache)
    seconds = time.perf_counter() - t0
    peak = hwm_mb(pid)
    db.dispose()
    print(
        json.dumps(
            {
                "version": version,
                "seconds": seconds,
                "rss_before_mb": before,
                "peak_mb": peak,
                "hwm_reset": hwm_reset,
            }
        )
    )


def _body(args: argparse.Namespace, workdir: Path) -> BenchResult:
    items = 3000 if args.quick else args.items
    dim = 16 if args.quick else args.dim
    counts = [2] if args.quick else [int(c) for c in args.counts.split(",")]
    result = BenchResult("aggregation", {"items": items, "dim": dim, "counts": counts})
    catalog = synthetic_catalog(items)
    per_update: dict[int, float] = {}
    ratios: list[float] = []
    for count in counts:
        with PgDatabase() as pg:
            up = upload_updates(workdir / f"n{count}", pg.url, catalog, dim, count)
            closed = close_round_in_fresh_process(pg.url, count, dim)
        if closed["version"] != 2:
            raise RuntimeError(f"the round did not close: {closed}")
        model_mb = up["model_bytes"] / 2**20  # MiB, as RSS is
        ratio = (closed["peak_mb"] - closed["rss_before_mb"]) / model_mb
        ratios.append(ratio)
        per_update[count] = closed["seconds"] / count
        result.config["params"] = up["params"]
        result.config["model_mb"] = round(model_mb, 2)
        result.rows.append({"updates": count, **up, **closed, "rss_increase_over_model": ratio})
        result.add(f"N={count}: peak RSS increase ÷ model size", ratio, goal="<= 3")
        result.add(f"N={count}: aggregation seconds per update", per_update[count], "s")
        result.add(f"N={count}: upload throughput", up["upload_mb_s"], "MB/s")
    if len(counts) >= 2:
        first, last = counts[0], counts[-1]
        result.add(
            f"seconds per update N={last} ÷ N={first}",
            per_update[last] / per_update[first],
            goal="<= 1.5",
            note="roughly constant",
        )
    return result


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--items", type=int, default=50_000)
    p.add_argument(
        "--dim", type=int, default=96, help="embedding dim (96 x 50k items: 5.2M params)"
    )
    p.add_argument("--counts", default="10,50")
    p.add_argument("--close-round", metavar="DB_URL", help=argparse.SUPPRESS)


def main(argv: list[str] | None = None) -> BenchResult | None:
    args_seen = argv if argv is not None else sys.argv[1:]
    if "--close-round" in args_seen:
        p = argparse.ArgumentParser()
        add_args(p)
        args = p.parse_args(args_seen)
        _close_round(args.close_round, int(args.counts))
        return None
    return run_main("aggregation", __doc__ or "", _body, argv, add_args)


if __name__ == "__main__":
    main()
