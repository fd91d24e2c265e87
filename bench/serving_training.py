"""Serving beside training: p99 of `/v1/recommend` while the node trains ÷ p99 when idle.

Same node as `bench.serving` (50k-item catalog, one region's events). First the
node is idle and the load runs; then the open round closes, the node syncs the
new version and trains the next round in its worker process (one torch thread,
lowered CPU priority), and the same load runs again while `training` is true.

`python -m bench.serving_training [--items 50000] [--duration 8] [--json out.json]`
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.cluster import API_KEY
from bench.common import BenchResult, run_main
from bench.load import run_load
from bench.serving import REGION, scenario_paths, start_serving_node, start_training
from shared.devservers import wait_for


def _body(args: argparse.Namespace, workdir: Path) -> BenchResult:
    items = 2000 if args.quick else args.items
    users = 300 if args.quick else args.users
    duration = 1.0 if args.quick else args.duration
    epochs = 1 if args.quick else args.epochs
    result = BenchResult(
        "serving_training",
        {
            "items": items,
            "users": users,
            "region": REGION,
            "duration_s": duration,
            "epochs": epochs,
        },
    )
    setup = start_serving_node(workdir, items=items, users=users, epochs=epochs)
    cluster, node = setup.cluster, setup.node
    headers = {"X-API-Key": API_KEY}
    try:
        paths = scenario_paths(setup.market)["history + filters + session"]
        run_load(node.url, paths, concurrency=1, duration=1, headers=headers, tool=args.tool)
        idle = run_load(
            node.url, paths, concurrency=1, duration=duration, headers=headers, tool=args.tool
        )
        start_training(setup)
        wait_for(
            lambda: bool(cluster.node_status(node)["training"]),
            300,
            "the node to start training",
            cluster.procs(),
        )
        busy = run_load(
            node.url, paths, concurrency=1, duration=duration, headers=headers, tool=args.tool
        )
        still_training = bool(cluster.node_status(node)["training"])
        idle_again = None
        if args.after:
            wait_for(
                lambda: not cluster.node_status(node)["training"],
                600,
                "training to end",
                cluster.procs(),
            )
            idle_again = run_load(
                node.url, paths, concurrency=1, duration=duration, headers=headers, tool=args.tool
            )
    finally:
        cluster.stop()
    result.rows.append({"idle": idle.as_dict(), "training": busy.as_dict()})
    result.add("p99 idle c=1", idle.p99_ms, "ms")
    result.add(
        "p99 while training c=1",
        busy.p99_ms,
        "ms",
        note="training spanned the whole run" if still_training else "training ENDED during run",
    )
    result.add("p99 training ÷ p99 idle", busy.p99_ms / idle.p99_ms, goal="<= 2")
    result.add("p50 training ÷ p50 idle", busy.p50_ms / idle.p50_ms)
    result.add("throughput training ÷ idle (c=1)", busy.rps / idle.rps)
    if idle_again is not None:
        result.rows[0]["idle_after"] = idle_again.as_dict()
        result.add("p99 idle after training", idle_again.p99_ms, "ms")
    return result


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--items", type=int, default=50_000)
    p.add_argument("--users", type=int, default=6000)
    p.add_argument("--duration", type=float, default=5.0, help="seconds per load run")
    p.add_argument(
        "--epochs", type=int, default=3, help="local epochs (training must outlast the run)"
    )
    p.add_argument("--after", action="store_true", help="also measure idle after training ends")
    p.add_argument("--tool", choices=["auto", "wrk", "httpx"], default="auto")


def main(argv: list[str] | None = None) -> BenchResult:
    return run_main("serving_training", __doc__ or "", _body, argv, add_args)


if __name__ == "__main__":
    main()
