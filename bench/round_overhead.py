"""Round overhead: a full round through the real services vs the same training in-process.

One region's node against a real coordinator (HTTP + databases): a round is
open → node learns of it (long poll) → downloads the base version → trains in
its worker process (the serving model for the version is rebuilt beside it) →
uploads the delta → the coordinator validates, stores, aggregates and opens the
next round. A round's time is from its opening to the opening of the next one
(aggregation and commit included). Only rounds opened after all events are in
the node count.

Side by side: the node logs how long `run_train_job` (read the node's events,
build features, train, serialize the delta) took inside its worker in that very
round; overhead = round time - that training time, per round; goal: the median
of overhead ÷ round time ≤ 10%. As a check that the worker trains no slower than
a plain process, the same job is then timed in this process on the same data and
weights (a later phase, so machine load may differ).

The worker runs at the same priority as this process here (NODE_TRAIN_NICE=0),
so both sides train at the same speed.

`python -m bench.round_overhead [--users 6000] [--rounds 6] [--json out.json]`
"""

from __future__ import annotations

import argparse
import pickle
import re
import statistics
import time
from pathlib import Path

from bench.cluster import Cluster
from bench.common import BenchResult, run_main
from bench.federation import round_periods, run_rounds, start_federation


def _in_process_seconds(
    node_db_url: str,
    catalog: bytes,
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


def next_round_id(cluster: Cluster) -> int:
    """Id of the first round to open from now on (the open one has already begun)."""
    assert cluster.admin is not None
    rounds = cluster.admin.get("/v1/rounds", params={"limit": 1}).json()
    return int(rounds[0]["round_id"]) + 1 if rounds else 1


TRAINED = re.compile(r"submitted update to round (\d+) \(\d+ examples; trained in ([0-9.]+)s")


def worker_seconds(node_log: Path) -> dict[int, float]:
    """Round id -> seconds `run_train_job` took in the node's worker (from the node's log)."""
    return {
        int(m.group(1)): float(m.group(2))
        for m in TRAINED.finditer(node_log.read_text(errors="replace"))
    }


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
        # Only rounds opened after every event is in the node train on the data the
        # in-process runs train on (earlier ones ran while events were still arriving).
        first = next_round_id(cluster)
        # Checked once a second: the observer's own requests compete with the round.
        run_rounds(cluster, first - 1 + rounds, timeout=args.timeout, poll=1.0)
        round_s = round_periods(cluster, first - 1 + rounds)[first - 1 :]
        version = cluster.latest_version()
        assert cluster.admin is not None
        config = cluster.admin.get(f"/v1/models/{version}").json()["config"]
        weights = cluster.admin.get(f"/v1/models/{version}/weights").content
        node_db = f"sqlite:///{workdir / (cluster.nodes[0].name + '.db')}"
        status = cluster.node_status(cluster.nodes[0])
        # As the node hands it to its worker: pickled once per catalog.
        catalog = pickle.dumps([c.model_dump() for c in market.catalog], protocol=5)
    finally:
        cluster.stop()
    trained = worker_seconds(cluster.nodes[0].log_path)
    worker_s = [trained[first + i] for i in range(rounds)]
    # The first run pays one-time costs (as the worker's first job, in round 1): dropped.
    train_s = _in_process_seconds(node_db, catalog, config, weights, repeats=rounds + 1)[1:]
    # Side by side: each round's own training time, measured inside the worker.
    ratios = [(r - w) / r for r, w in zip(round_s, worker_s, strict=True)]
    service = statistics.median(round_s)
    in_worker = statistics.median(worker_s)
    training = statistics.median(train_s)
    result.config["node_events"] = status["event_count"]
    result.config["first_round_measured"] = first
    result.rows.append(
        {
            "round_seconds": round_s,
            "worker_train_seconds": worker_s,
            "overhead_ratios": ratios,
            "in_process_seconds": train_s,
        }
    )
    result.add(
        "round time through the services",
        service,
        "s",
        note=f"median of {rounds}; open to next open",
    )
    result.add(
        "its training (run_train_job in the worker)",
        in_worker,
        "s",
        note="median; the same rounds",
    )
    result.add(
        "overhead ÷ round time",
        statistics.median(ratios),
        goal="<= 0.1",
        note="median per round: (round - its training) ÷ round",
    )
    result.add(
        "same training in-process, after the rounds",
        training,
        "s",
        note="median, after a warm-up run; check on the worker's figure",
    )
    result.add(
        "overhead ÷ round time against the in-process median",
        (service - training) / service,
        note="not side by side: load drifts between the phases",
    )
    return result


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--users", type=int, default=6000, help="market users (one region of six)")
    p.add_argument("--items", type=int, default=2500)
    p.add_argument("--dim", type=int, default=48)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--timeout", type=float, default=900)


def main(argv: list[str] | None = None) -> BenchResult:
    return run_main("round_overhead", __doc__ or "", _body, argv, add_args)


if __name__ == "__main__":
    main()
