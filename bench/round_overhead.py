"""Round overhead: a full round through the real services vs the same training in-process.

One region's node against a real coordinator (HTTP + databases): a round is
open → node notices (polling) → syncs the version → trains in its worker
process → uploads the delta → the coordinator validates, stores, aggregates
and opens the next round. The same training job (`run_train_job`: read the
node's events, build features, train, serialize the delta) is then timed in
this process on the same data and weights. Overhead = round time - training
time; goal: overhead ÷ round time ≤ 10%.

The worker runs at the same priority as this process here (NODE_TRAIN_NICE=0),
so both sides train at the same speed.

`python -m bench.round_overhead [--users 6000] [--rounds 4] [--json out.json]`
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from bench.common import BenchResult, run_main
from bench.federation import run_rounds, start_federation, steady


def _in_process_seconds(
    node_db_url: str,
    catalog: list[dict[str, object]],
    config: dict[str, object],
    weights: bytes,
    repeats: int,
) -> list[float]:
    import torch

    from regional_node.settings import NodeSettings
    from regional_node.trainer import TrainJob, run_train_job
    from shared.training import TrainConfig

    s = NodeSettings(allow_anonymous=True)
    torch.set_num_threads(1)
    out = []
    for i in range(repeats):
        job = TrainJob(
            database_url=node_db_url,
            catalog=catalog,
            base_weights=weights,
            model_config=config,
            train_config=TrainConfig(
                epochs=1,
                lr=s.learning_rate,
                batch_size=s.batch_size,
                num_negatives=s.num_negatives,
                seed=i,
            ),
            holdout_eval=s.holdout_eval,
            min_users_for_metrics=5,
            threads=1,
        )
        t0 = time.perf_counter()
        run_train_job(job)
        out.append(time.perf_counter() - t0)
    return out


def _body(args: argparse.Namespace, workdir: Path) -> BenchResult:
    users = 1200 if args.quick else args.users
    items = 300 if args.quick else args.items
    rounds = 2 if args.quick else args.rounds
    result = BenchResult(
        "round_overhead",
        {"users_in_market": users, "items": items, "rounds": rounds, "dim": args.dim},
    )
    # One node holding the whole (one-region) market.
    cluster, market = start_federation(
        workdir,
        nodes=1,
        users=users,
        items=items,
        dim=args.dim,
        node_env={"train_nice": "0"},
    )
    try:
        round_s = run_rounds(cluster, rounds + 1, timeout=args.timeout)
        version = cluster.latest_version()
        assert cluster.admin is not None
        config = cluster.admin.get(f"/v1/models/{version}").json()["config"]
        weights = cluster.admin.get(f"/v1/models/{version}/weights").content
        node_db = f"sqlite:///{workdir / (cluster.nodes[0].name + '.db')}"
        status = cluster.node_status(cluster.nodes[0])
        catalog = [c.model_dump() for c in market.catalog]
    finally:
        cluster.stop()
    # The first run pays one-time costs (as the worker's first job, in round 1): dropped.
    train_s = _in_process_seconds(node_db, catalog, config, weights, repeats=max(3, rounds))[1:]
    service = steady(round_s)
    training = statistics.median(train_s)
    overhead = service - training
    result.config["node_events"] = status["event_count"]
    result.rows.append({"round_seconds": round_s, "in_process_seconds": train_s})
    result.add("round time through the services", service, "s", note="median, rounds 2..")
    result.add("same training in-process", training, "s", note="median, after a warm-up run")
    result.add("overhead ÷ round time", overhead / service, goal="<= 0.1")
    return result


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--users", type=int, default=6000, help="market users (one region of six)")
    p.add_argument("--items", type=int, default=2500)
    p.add_argument("--dim", type=int, default=48)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--timeout", type=float, default=900)


def main(argv: list[str] | None = None) -> BenchResult:
    return run_main("round_overhead", __doc__ or "", _body, argv, add_args)


if __name__ == "__main__":
    main()
