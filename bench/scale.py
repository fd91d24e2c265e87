"""Scale: 5, 10 and 20 nodes on one machine complete rounds; round time against node count.

Each node is a real uvicorn process with its own database and its own training
worker process, holding one region of a synthetic market (a tiny model and a
few hundred events per node, so the machine is not the only thing measured).
Every round waits for all nodes.

`python -m bench.scale [--nodes 5,10,20] [--rounds 3] [--json out.json]`
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.common import BenchResult, run_main
from bench.federation import run_rounds, start_federation, steady


def _body(args: argparse.Namespace, workdir: Path) -> BenchResult:
    counts = [2, 3] if args.quick else [int(n) for n in args.nodes.split(",")]
    rounds = 2 if args.quick else args.rounds
    result = BenchResult(
        "scale",
        {"nodes": counts, "rounds": rounds, "users_per_node": args.users_per_node, "dim": args.dim},
    )
    times: dict[int, float] = {}
    for n in counts:
        cluster, _market = start_federation(
            workdir / f"n{n}",
            nodes=n,
            users=args.users_per_node * n,
            items=args.items,
            dim=args.dim,
            node_env={"poll_seconds": "0.5", "holdout_eval": "false"},
        )
        try:
            seconds = run_rounds(cluster, rounds + 1, timeout=args.timeout)
            rss = [rss_of(p.proc.pid) for p in cluster.procs() if p.proc is not None]
        finally:
            cluster.stop()
        times[n] = steady(seconds)
        result.rows.append({"nodes": n, "round_seconds": seconds, "service_rss_mb": rss})
        result.add(f"{n} nodes: round time", times[n], "s", note=f"{rounds} rounds completed")
    if len(counts) >= 2:
        lo, hi = counts[0], counts[-1]
        result.add(
            f"round time {hi} nodes ÷ {lo} nodes",
            times[hi] / times[lo],
            note=f"node count x{hi / lo:g}",
        )
    return result


def rss_of(pid: int) -> float:
    from bench.common import rss_mb

    try:
        return round(rss_mb(pid), 1)
    except OSError:
        return 0.0


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", default="5,10,20")
    p.add_argument("--rounds", type=int, default=2, help="rounds after the first")
    p.add_argument("--users-per-node", type=int, default=40)
    p.add_argument("--items", type=int, default=300)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--timeout", type=float, default=600)


def main(argv: list[str] | None = None) -> BenchResult:
    return run_main("scale", __doc__ or "", _body, argv, add_args)


if __name__ == "__main__":
    main()
