"""Model transfer: a ~100 MB model up to and down from the coordinator, over loopback.

A real coordinator (PostgreSQL by default) holds a model of about 28M
parameters (50k items x 512 dims, ~112 MB as safetensors). The benchmark
process downloads the weights (`GET /v1/models/1/weights`, streamed from the
database in slices) and uploads a dense update of the same size
(`POST /v1/rounds/1/updates`, read into one preallocated buffer, parsed
without a copy). For each it reports MB/s and the coordinator's peak RSS
increase ÷ model size (how many whole-body copies the service made).

`python -m bench.transfer [--items 50000] [--dim 512] [--sqlite] [--json out.json]`
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import httpx

from bench.aggregation import PgDatabase, synthetic_catalog
from bench.cluster import ADMIN_TOKEN, Cluster, post_update, register_node
from bench.common import BenchResult, hwm_mb, reset_hwm, rss_mb, run_main


def _download(url: str, token: str) -> tuple[int, float]:
    size = 0
    t0 = time.perf_counter()
    with httpx.stream(
        "GET", url, headers={"Authorization": f"Bearer {token}"}, timeout=600
    ) as resp:
        resp.raise_for_status()
        for chunk in resp.iter_bytes(1 << 20):
            size += len(chunk)
    return size, time.perf_counter() - t0


def measure(workdir: Path, db_url: str, items: int, dim: int, repeats: int) -> dict[str, Any]:
    import torch

    from shared.serialization import bytes_to_state, state_to_bytes

    with Cluster(workdir) as cluster:
        coord = cluster.start_coordinator(
            db_url, min_updates="2", round_deadline_seconds="86400", embedding_dim=str(dim)
        )
        cluster.put_catalog(synthetic_catalog(items))
        assert coord.proc is not None and cluster.admin is not None
        pid = coord.proc.pid
        url = f"{coord.url}/v1/models/1/weights"
        _download(url, ADMIN_TOKEN)  # warm: the first request pays imports and connections
        downloads = []
        time.sleep(0.5)
        base_rss = rss_mb(pid)
        reset_hwm(pid)
        for _ in range(repeats):
            downloads.append(_download(url, ADMIN_TOKEN))
        down_peak = hwm_mb(pid) - base_rss
        size = downloads[0][0]

        # An update of the same shapes (dense float32), as a node sends it.
        state = bytes_to_state(cluster.admin.get(url).content)
        payload = state_to_bytes({k: torch.full_like(v, 1e-3) for k, v in state.items()})
        del state
        # One upload: a second update would close the round (min_updates=2).
        token = register_node(cluster.admin, "uploader")
        time.sleep(0.5)
        before = rss_mb(pid)
        reset_hwm(pid)
        t0 = time.perf_counter()
        r = post_update(coord.url, token, 1, base_version=1, payload=payload)
        upload_s = time.perf_counter() - t0
        r.raise_for_status()
        up_peak = hwm_mb(pid) - before
    return {
        "model_bytes": size,
        "payload_bytes": len(payload),
        "download_s": [s for _, s in downloads],
        "upload_s": [upload_s],
        "download_peak_increase_mb": down_peak,
        "upload_peak_increase_mb": up_peak,
    }


def _body(args: argparse.Namespace, workdir: Path) -> BenchResult:
    items = 2000 if args.quick else args.items
    dim = 32 if args.quick else args.dim
    sqlite = args.sqlite or args.quick
    result = BenchResult(
        "transfer", {"items": items, "dim": dim, "database": "sqlite" if sqlite else "postgresql"}
    )
    if sqlite:
        figures = measure(
            workdir, f"sqlite:///{workdir / 'coordinator.db'}", items, dim, args.repeats
        )
    else:
        with PgDatabase() as pg:
            figures = measure(workdir, pg.url, items, dim, args.repeats)
    mb = figures["model_bytes"] / 1e6
    model_mib = figures["model_bytes"] / 2**20
    result.config["model_mb"] = round(mb, 1)
    result.rows.append(figures)
    down = mb / min(figures["download_s"])
    up = figures["payload_bytes"] / 1e6 / min(figures["upload_s"])
    result.add("download (GET weights)", down, "MB/s", note="best of runs")
    result.add("upload (POST update)", up, "MB/s", note="incl. validation + DB insert")
    result.add(
        "download: coordinator peak RSS increase ÷ model",
        figures["download_peak_increase_mb"] / model_mib,
        goal="<= 1",
        note="streamed in 4 MiB slices",
    )
    result.add(
        "upload: coordinator peak RSS increase ÷ model",
        figures["upload_peak_increase_mb"] / model_mib,
        note="body buffer + DB driver copy",
    )
    return result


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--items", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=512, help="512 x 50k items: ~112 MB of weights")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--sqlite", action="store_true", help="coordinator on SQLite, not PostgreSQL")


def main(argv: list[str] | None = None) -> BenchResult:
    return run_main("transfer", __doc__ or "", _body, argv, add_args)


if __name__ == "__main__":
    main()
