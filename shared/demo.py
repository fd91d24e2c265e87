"""`make demo`: a coordinator and three regional nodes federating on this machine.

    python -m shared.demo            # run the demo, leave the services running
    python -m shared.demo --stop     # stop them (what `make demo-stop` calls)
    python -m shared.demo --quick    # tiny market, 2 rounds (tests)

Steps: generate a synthetic market, start the services as real processes
(SQLite, loopback ports, everything under `.demo/`), register the nodes, upload
the catalog, post each region's events to its own node, follow the rounds live,
then judge the result: held-out HR@10 per region before vs after federation,
a recommendation for a brand-new shopper, and a convergence plot.

The evaluation reads the generated files in this process, which only a demo
may do: in production no process outside a region sees its events.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import torch
from rich.console import Console
from rich.live import Live
from rich.progress import Progress
from rich.table import Table

from shared.client import NodeClient
from shared.data import EventRecord, read_catalog_csv, read_events_csv
from shared.devservers import ServiceProcess, free_port
from shared.features import build_item_features
from shared.market import generate_market
from shared.metrics import summarize_ranks
from shared.model import HybridTwoTower, ModelConfig
from shared.schemas import CatalogItem, EventIn, ModelVersionOut, RoundOut
from shared.serialization import bytes_to_state
from shared.training import UserSequence, build_sequences, rank_held_out, split_leave_last_out

PIDS_FILE = "pids.json"
COORDINATOR_PORT = 8000
NODE_PORT_BASE = 8101


@dataclass(frozen=True)
class DemoConfig:
    workdir: Path = Path(".demo")
    seed: int = 7
    regions: int = 3
    users: int = 3600
    items: int = 1200
    rounds: int = 6
    local_epochs: int = 2
    learning_rate: float = 0.01
    embedding_dim: int = 32
    min_users_for_metrics: int = 20
    time_budget_seconds: float = 270.0  # the whole demo, start to summary
    fixed_ports: bool = True
    keep_running: bool = True

    @classmethod
    def quick(cls, workdir: Path) -> DemoConfig:
        return cls(
            workdir=workdir,
            users=360,
            items=150,
            rounds=2,
            local_epochs=1,
            embedding_dim=16,
            min_users_for_metrics=5,
            time_budget_seconds=110.0,
            fixed_ports=False,
        )


@dataclass
class RegionResult:
    region: str
    node_id: str
    url: str
    events: int
    held_out_users: int
    hr_popularity: float
    hr_by_version: dict[int, float] = field(default_factory=dict)


@dataclass
class DemoResult:
    versions: list[ModelVersionOut]
    regions: list[RegionResult]
    plot_path: Path
    elapsed_seconds: float


# --------------------------------------------------------------------------- processes


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _pick_port(preferred: int, fixed: bool) -> int:
    return preferred if fixed and _port_free(preferred) else free_port()


def _is_our_process(pid: int, module: str) -> bool:
    """Guard against a recycled pid: the process must still be `python -m <module>`."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"-m" in cmdline and module.encode() in cmdline


def stop_demo(workdir: Path, console: Console, timeout: float = 15.0) -> int:
    """Stop the services listed in `<workdir>/pids.json`; returns how many were running."""
    pids_path = workdir / PIDS_FILE
    if not pids_path.exists():
        console.print(f"no demo running (no {pids_path})")
        return 0
    try:
        listed = json.loads(pids_path.read_text())["services"]
        # A service that never started is listed with no pid.
        services = [
            (str(s["name"]), str(s["module"]), int(s["pid"]))
            for s in listed
            if s.get("pid") is not None
        ]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        console.print(
            f"[red]cannot read {pids_path} ({type(exc).__name__}: {exc}); stop the demo's "
            "services by hand (their command lines hold `-m coordinator` or `-m regional_node`)"
            " and remove the file"
        )
        return 0
    alive = [(name, module, pid) for name, module, pid in services if _is_our_process(pid, module)]
    for _, _, pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)  # each service leads its own group
    deadline = time.monotonic() + timeout
    for name, module, pid in alive:
        while _is_our_process(pid, module) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _is_our_process(pid, module):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        console.print(f"stopped {name} (pid {pid})")
    pids_path.unlink()
    return len(alive)


def _write_pids(workdir: Path, procs: Sequence[ServiceProcess], admin_token: str) -> None:
    payload = {
        "admin_token": admin_token,
        "services": [
            {
                "name": p.name,
                "module": p.module,
                "pid": p.proc.pid if p.proc else None,
                "url": p.url,
                "log": str(p.log_path),
            }
            for p in procs
        ],
    }
    (workdir / PIDS_FILE).write_text(json.dumps(payload, indent=2) + "\n")


class _Interrupted(Exception):
    pass


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise _Interrupted(signal.Signals(signum).name)


# --------------------------------------------------------------------------- evaluation


def _region_sequences(
    events: Sequence[EventRecord], row_of: dict[str, int], country_buckets: int
) -> dict[str, UserSequence]:
    return build_sequences(
        (
            (e.user_id, row_of[e.item_id], e.event_type, e.timestamp.timestamp(), e.country)
            for e in events
            if e.item_id in row_of
        ),
        country_buckets=country_buckets,
    )


def popularity_hr10(
    train: dict[str, UserSequence], held_out: dict[str, int], num_rows: int
) -> float:
    """HR@10 of 'most touched items in this region', same protocol as the model."""
    counts = torch.zeros(num_rows)
    for seq in train.values():
        counts[torch.tensor(seq.items, dtype=torch.long)] += 1
    hits = 0
    for user, target in held_out.items():
        scores = counts.clone()
        scores[torch.tensor(train[user].items, dtype=torch.long)] = float("-inf")
        hits += int((scores > scores[target]).sum()) < 10
    return hits / max(len(held_out), 1)


def _load_version(http: httpx.Client, version: int) -> HybridTwoTower:
    meta = ModelVersionOut.model_validate(
        http.get(f"/v1/models/{version}").raise_for_status().json()
    )
    data = http.get(f"/v1/models/{version}/weights").raise_for_status().content
    model = HybridTwoTower(ModelConfig.model_validate(meta.config))
    model.load_state_dict(bytes_to_state(data))
    model.eval()
    return model


# --------------------------------------------------------------------------- display


def _rounds_table(
    rounds: Sequence[RoundOut], versions: dict[int, ModelVersionOut], n_nodes: int, target: int
) -> Table:
    table = Table(title=f"Federated rounds (target {target})", expand=False)
    for col in ("round", "state", "nodes reporting", "train loss", "held-out HR@10", "seconds"):
        table.add_column(col, justify="right")
    for r in sorted(rounds, key=lambda r: r.round_id):
        produced = versions.get(r.result_version or -1)
        loss = produced.metrics.get("train_loss") if produced else None
        hr = produced.metrics.get("hr@10") if produced else None
        end = r.closed_at or r.created_at
        seconds = (end - r.created_at).total_seconds() if r.closed_at else None
        table.add_row(
            str(r.round_id),
            r.state,
            f"{r.updates_received}/{n_nodes}",
            f"{loss:.3f}" if loss is not None else "…",
            f"{hr:.3f}" if hr is not None else "…",
            f"{seconds:.1f}" if seconds is not None else "…",
        )
    table.caption = "HR@10 is the nodes' held-out score of the round's base model, example-weighted"
    return table


def _describe(item: CatalogItem) -> str:
    parts = [item.category or "?", item.material or "?"]
    if item.gemstone:
        parts.append(item.gemstone)
    price = f"${item.price_usd:,.0f}" if item.price_usd is not None else ""
    return f"{' · '.join(parts)} {price}".strip()


def _plot(
    result_regions: Sequence[RegionResult], versions: Sequence[ModelVersionOut], out: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_hr, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, reg in enumerate(result_regions):
        xs = sorted(reg.hr_by_version)
        color = colors[i % len(colors)]
        ax_hr.plot(
            xs, [reg.hr_by_version[x] for x in xs], marker="o", color=color, label=reg.region
        )
        ax_hr.axhline(reg.hr_popularity, color=color, linestyle=":", linewidth=1)
    ax_hr.set_xlabel("global model version (1 = initialization)")
    ax_hr.set_ylabel("held-out HR@10")
    ax_hr.set_title("Held-out HR@10 per region (dotted: regional popularity)")
    ax_hr.legend(loc="lower right")
    ax_hr.grid(alpha=0.3)
    losses = [
        (v.round_id, v.metrics["train_loss"])
        for v in versions
        if v.round_id is not None and "train_loss" in v.metrics
    ]
    losses.sort()
    ax_loss.plot([r for r, _ in losses], [loss for _, loss in losses], marker="o", color="black")
    ax_loss.set_xlabel("round")
    ax_loss.set_ylabel("mean local training loss")
    ax_loss.set_title("Training loss (example-weighted over nodes)")
    ax_loss.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- the demo


class Demo:
    def __init__(self, config: DemoConfig, console: Console) -> None:
        self.config = config
        self.console = console
        self.workdir = config.workdir.resolve()
        self.procs: list[ServiceProcess] = []
        self.admin_token = secrets.token_urlsafe(24)
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def run(self) -> DemoResult:
        cfg = self.config
        self._prepare_workdir()
        with self.console.status("generating the market …"):
            summary = generate_market(
                self.workdir / "data",
                seed=cfg.seed,
                regions=cfg.regions,
                users=cfg.users,
                items=cfg.items,
            )
        self.console.print(
            f"[bold]market[/]: {summary.users:,} shoppers, {summary.items:,} items, "
            f"{summary.events:,} events in regions {', '.join(summary.regions)} "
            f"({self.elapsed():.0f}s)"
        )
        catalog = read_catalog_csv(summary.catalog_path)
        events_by_region: dict[str, list[EventRecord]] = defaultdict(list)
        for e in read_events_csv(summary.events_path):
            events_by_region[e.region or "?"].append(e)
        regions = list(summary.regions)

        coordinator = self._start_coordinator()
        coordinator.wait_ready(timeout=120)
        http = httpx.Client(
            base_url=coordinator.url,
            headers={"Authorization": f"Bearer {self.admin_token}"},
            timeout=30,
        )
        nodes = self._start_nodes(http, coordinator.url, regions)
        _write_pids(self.workdir, self.procs, self.admin_token)
        for p in self.procs:
            p.wait_ready(timeout=120)
        self.console.print(f"[bold]services up[/] ({self.elapsed():.0f}s)")
        self._import_events(nodes, regions, events_by_region)
        # The first catalog upload makes version 1 and opens round 1: training starts now.
        http.put("/v1/catalog", json=[i.model_dump() for i in catalog]).raise_for_status()
        self._follow_rounds(http, len(nodes))
        self._wait_nodes_serve_latest(http, nodes)

        versions = [
            ModelVersionOut.model_validate(v)
            for v in http.get("/v1/models").raise_for_status().json()
        ]
        with self.console.status("evaluating every version on each region's held-out items …"):
            region_results = self._evaluate(http, regions, nodes, events_by_region, versions)
        self._print_results(region_results, versions)
        self._new_shopper(nodes[-1], regions[-1], catalog, events_by_region[regions[-1]])
        plot_path = self.workdir / "convergence.png"
        _plot(region_results, versions, plot_path)
        http.close()
        return DemoResult(
            versions=versions,
            regions=region_results,
            plot_path=plot_path,
            elapsed_seconds=self.elapsed(),
        )

    def _prepare_workdir(self) -> None:
        stop_demo(self.workdir, Console(quiet=True))
        for name in ("data", "logs", "db"):
            shutil.rmtree(self.workdir / name, ignore_errors=True)
        (self.workdir / "db").mkdir(parents=True)

    def _start_coordinator(self) -> ServiceProcess:
        cfg = self.config
        proc = ServiceProcess(
            name="coordinator",
            module="coordinator",
            env={
                "COORDINATOR_DATABASE_URL": f"sqlite:///{self.workdir / 'db' / 'coordinator.db'}",
                "COORDINATOR_ADMIN_TOKEN": self.admin_token,
                "COORDINATOR_MIN_UPDATES": str(cfg.regions),
                "COORDINATOR_ROUND_DEADLINE_SECONDS": "120",
                "COORDINATOR_ROUND_CHECK_SECONDS": "0.2",
                "COORDINATOR_EMBEDDING_DIM": str(cfg.embedding_dim),
                "COORDINATOR_MAX_ROUNDS": str(cfg.rounds),
            },
            log_path=self.workdir / "logs" / "coordinator.log",
            port=_pick_port(COORDINATOR_PORT, cfg.fixed_ports),
            cwd=self.workdir,
        ).start()
        self.procs.append(proc)
        return proc

    def _start_nodes(
        self, http: httpx.Client, coordinator_url: str, regions: Sequence[str]
    ) -> list[ServiceProcess]:
        nodes = []
        for i, region in enumerate(regions):
            node_id = f"{region.lower()}-1"
            creds = http.post("/v1/nodes", json={"node_id": node_id, "region": region})
            creds.raise_for_status()
            node = ServiceProcess(
                name=node_id,
                module="regional_node",
                env={
                    "NODE_ID": node_id,
                    "NODE_REGION": region,
                    "NODE_COORDINATOR_URL": coordinator_url,
                    "NODE_TOKEN": creds.json()["token"],
                    "NODE_DATABASE_URL": f"sqlite:///{self.workdir / 'db' / (node_id + '.db')}",
                    "NODE_POLL_SECONDS": "0.5",
                    "NODE_LOCAL_EPOCHS": str(self.config.local_epochs),
                    "NODE_LEARNING_RATE": str(self.config.learning_rate),
                    "NODE_ALLOW_ANONYMOUS": "true",
                    "NODE_MIN_USERS_FOR_METRICS": str(self.config.min_users_for_metrics),
                },
                log_path=self.workdir / "logs" / f"{node_id}.log",
                port=_pick_port(NODE_PORT_BASE + i, self.config.fixed_ports),
                cwd=self.workdir,
            ).start()
            self.procs.append(node)
            nodes.append(node)
        return nodes

    def _import_events(
        self,
        nodes: Sequence[ServiceProcess],
        regions: Sequence[str],
        events_by_region: dict[str, list[EventRecord]],
    ) -> None:
        batch = 2000

        def post_region(node: ServiceProcess, region: str, progress: Progress) -> None:
            events = events_by_region[region]
            task = progress.add_task(f"{region}: posting events to {node.name}", total=len(events))
            with NodeClient(node.url, timeout=120) as client:
                for start in range(0, len(events), batch):
                    chunk = [
                        EventIn(
                            user_id=e.user_id,
                            item_id=e.item_id,
                            event_type=e.event_type,  # type: ignore[arg-type]
                            timestamp=e.timestamp,
                            country=e.country,
                        )
                        for e in events[start : start + batch]
                    ]
                    client.send_events(chunk, batch_size=batch)
                    progress.advance(task, len(chunk))

        # One storefront per region, posting at the same time.
        with (
            Progress(console=self.console, transient=True) as progress,
            ThreadPoolExecutor(max_workers=len(nodes)) as pool,
        ):
            futures = [
                pool.submit(post_region, node, region, progress)
                for node, region in zip(nodes, regions, strict=True)
            ]
            for future in futures:
                future.result()
        counts = ", ".join(f"{r} {len(events_by_region[r]):,}" for r in regions)
        self.console.print(f"[bold]events imported[/] over HTTP: {counts} ({self.elapsed():.0f}s)")

    def _follow_rounds(self, http: httpx.Client, n_nodes: int) -> None:
        cfg = self.config
        # Leave time for the evaluation, the plot and the summary.
        deadline = self.started + cfg.time_budget_seconds - 25
        target_version = cfg.rounds + 1
        reported: set[int] = set()
        with Live(console=self.console, refresh_per_second=4, transient=False) as live:
            while True:
                versions = {
                    v["version"]: ModelVersionOut.model_validate(v)
                    for v in http.get("/v1/models").raise_for_status().json()
                }
                rounds = [
                    RoundOut.model_validate(r)
                    for r in http.get("/v1/rounds").raise_for_status().json()
                ]
                live.update(_rounds_table(rounds, versions, n_nodes, cfg.rounds))
                if not self.console.is_terminal:  # logs and CI: one line per closed round
                    for r in rounds:
                        v = versions.get(r.result_version or -1)
                        if v is not None and r.round_id not in reported:
                            reported.add(r.round_id)
                            loss = v.metrics.get("train_loss", float("nan"))
                            self.console.print(
                                f"round {r.round_id} closed: {r.updates_received}/{n_nodes} "
                                f"nodes -> version {v.version} (train loss {loss:.3f})"
                            )
                if max(versions, default=0) >= target_version:
                    break
                if time.monotonic() > deadline:
                    self.console.print(
                        f"[yellow]time budget reached after {len(versions) - 1} rounds; "
                        "evaluating what exists[/]"
                    )
                    break
                time.sleep(0.5)
        self.console.print()
        self.console.print(f"[bold]federation done[/] ({self.elapsed():.0f}s)")

    def _wait_nodes_serve_latest(self, http: httpx.Client, nodes: Sequence[ServiceProcess]) -> None:
        """Nodes swap to a new version within a poll; wait for that so what follows is final."""
        latest = int(http.get("/v1/models/latest").raise_for_status().json()["version"])
        deadline = time.monotonic() + 30
        lagging = list(nodes)
        while lagging and time.monotonic() < deadline:
            lagging = [
                n
                for n in lagging
                if (httpx.get(n.url + "/v1/status", timeout=10).json()["model_version"] or 0)
                < latest
            ]
            if lagging:
                time.sleep(0.2)
        if lagging:
            names = ", ".join(n.name for n in lagging)
            self.console.print(f"[yellow]{names} not yet serving version {latest}[/]")

    def _evaluate(
        self,
        http: httpx.Client,
        regions: Sequence[str],
        nodes: Sequence[ServiceProcess],
        events_by_region: dict[str, list[EventRecord]],
        versions: Sequence[ModelVersionOut],
    ) -> list[RegionResult]:
        catalog = [CatalogItem.model_validate(i) for i in http.get("/v1/catalog").json()["items"]]
        row_of = {item.item_id: row for row, item in enumerate(catalog)}
        torch.set_num_threads(1)
        models = {v.version: _load_version(http, v.version) for v in versions}
        config = models[min(models)].config
        features = build_item_features(catalog, config.content_buckets)
        results = []
        for region, node in zip(regions, nodes, strict=True):
            seqs = _region_sequences(events_by_region[region], row_of, config.country_buckets)
            train, held_out = split_leave_last_out(seqs)
            res = RegionResult(
                region=region,
                node_id=node.name,
                url=node.url,
                events=len(events_by_region[region]),
                held_out_users=len(held_out),
                hr_popularity=popularity_hr10(train, held_out, len(catalog)),
            )
            for version, model in sorted(models.items()):
                ranks = rank_held_out(model, features, train, held_out)
                res.hr_by_version[version] = float(summarize_ranks(ranks.values(), k=10)["hr@10"])
            results.append(res)
        return results

    def _print_results(
        self, regions: Sequence[RegionResult], versions: Sequence[ModelVersionOut]
    ) -> None:
        first, last = min(v.version for v in versions), max(v.version for v in versions)
        table = Table(title="Held-out HR@10 per region: before vs after federation")
        for col in ("region", "node", "events", "users", "popularity"):
            table.add_column(col, justify="right")
        table.add_column(f"v{first} (before)", justify="right")
        table.add_column(f"v{last} (after)", justify="right")
        table.add_column("change", justify="right")
        for r in regions:
            before, after = r.hr_by_version[first], r.hr_by_version[last]
            table.add_row(
                r.region,
                r.node_id,
                f"{r.events:,}",
                f"{r.held_out_users:,}",
                f"{r.hr_popularity:.3f}",
                f"{before:.3f}",
                f"{after:.3f}",
                f"{after - before:+.3f}",
            )
        table.caption = (
            "users: shoppers with a held-out item (their last new item; no node trained on "
            "it). HR@10: share of them whose held-out item is in the top 10."
        )
        self.console.print(table)

    def _new_shopper(
        self,
        node: ServiceProcess,
        region: str,
        catalog: Sequence[CatalogItem],
        events: Sequence[EventRecord],
    ) -> None:
        by_id = {i.item_id: i for i in catalog}
        popular = [item for item, _ in Counter(e.item_id for e in events).most_common()]
        first = by_id[popular[0]]
        second = next(
            (
                by_id[i]
                for i in popular[1:]
                if by_id[i].category == first.category and by_id[i].material == first.material
            ),
            by_id[popular[1]],
        )
        country = Counter(e.country for e in events if e.country).most_common(1)[0][0]
        with NodeClient(node.url) as client:
            rec = client.recommend(
                session_items=[first.item_id, second.item_id], country=country, k=5
            )
        table = Table(title=f"A brand-new shopper in {region} ({country}) viewed two items")
        table.add_column("", justify="left")
        table.add_column("item")
        table.add_column("what it is")
        table.add_column("score", justify="right")
        for label, item in (("viewed", first), ("viewed", second)):
            table.add_row(label, item.item_id, _describe(item), "")
        for n, it in enumerate(rec.items, 1):
            table.add_row(f"#{n}", it.item_id, _describe(by_id[it.item_id]), f"{it.score:.2f}")
        self.console.print(table)
        self.console.print(
            f"GET {node.url}/v1/recommend?session_items={first.item_id},{second.item_id}"
            f"&country={country}&k=5 -> strategy {rec.strategy}, model version "
            f"{rec.model_version}",
            markup=False,
            soft_wrap=True,
        )

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        with contextlib.suppress(OSError):  # also: the workdir is not a directory
            (self.workdir / PIDS_FILE).unlink()

    def print_where(self, result: DemoResult) -> None:
        coordinator, *nodes = self.procs
        lines = [
            f"[bold]Finished in {result.elapsed_seconds:.0f}s.[/]",
            f"  plot:        {result.plot_path}",
            f"  logs:        {self.workdir / 'logs'}/",
            f"  databases:   {self.workdir / 'db'}/  (each node's events stay in its own file)",
        ]
        if self.config.keep_running:
            dashboard = ""
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(coordinator.url + "/dashboard", timeout=5).status_code == 200:
                    dashboard = f", dashboard {coordinator.url}/dashboard"
            lines += [
                "[bold]Still running[/] (pids in " + str(self.workdir / PIDS_FILE) + "):",
                f"  coordinator  {coordinator.url}/docs{dashboard}",
                *(f"  {n.name:<12} {n.url}/docs   e.g. {n.url}/v1/status" for n in nodes),
                f"  admin token: {self.admin_token}",
                "Stop everything with [bold]make demo-stop[/].",
            ]
        self.console.print("\n".join(lines))


def _config_problem(config: DemoConfig) -> str | None:
    """What makes this demo impossible to run (or None)."""
    if config.rounds < 1 or config.local_epochs < 1:
        return "--rounds and --local-epochs must be at least 1"
    if not config.learning_rate > 0:
        return "--learning-rate must be positive"
    if config.users < 100:
        return "--users must be at least 100 (three regions, each with enough shoppers to train)"
    if config.workdir.exists() and not config.workdir.is_dir():
        return f"--workdir {config.workdir} exists and is not a directory"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shared.demo",
        description="Run the fedjewel demo: a coordinator and three regional nodes on this "
        "machine. Leaves the services running; stop them with --stop (make demo-stop).",
    )
    parser.add_argument("--stop", action="store_true", help="stop a running demo and exit")
    parser.add_argument("--quick", action="store_true", help="tiny market and 2 rounds (tests)")
    parser.add_argument("--workdir", type=Path, default=Path(".demo"))
    parser.add_argument("--rounds", type=int, help="federated rounds (default 6; quick: 2)")
    parser.add_argument("--users", type=int, help="shoppers in the generated market")
    parser.add_argument("--local-epochs", type=int, help="local epochs per round (default 2)")
    parser.add_argument("--learning-rate", type=float, help="nodes' learning rate (default 0.01)")
    parser.add_argument(
        "--no-keep", action="store_true", help="stop the services when the demo ends"
    )
    args = parser.parse_args(argv)
    console = Console()
    if not console.is_terminal:  # logs and CI: wide enough for the result tables
        console = Console(width=110)
    if args.stop:
        stop_demo(args.workdir, console)
        return 0
    config = DemoConfig.quick(args.workdir) if args.quick else DemoConfig(workdir=args.workdir)
    overrides: dict[str, Any] = {"keep_running": not args.no_keep}
    if args.rounds is not None:
        overrides["rounds"] = args.rounds
    if args.users is not None:
        overrides["users"] = args.users
    if args.local_epochs is not None:
        overrides["local_epochs"] = args.local_epochs
    if args.learning_rate is not None:
        overrides["learning_rate"] = args.learning_rate
    config = DemoConfig(**{**config.__dict__, **overrides})
    problem = _config_problem(config)
    if problem:
        parser.error(problem)  # one line and exit status 2, before anything starts
    demo = Demo(config, console)
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        result = demo.run()
    except (KeyboardInterrupt, _Interrupted):
        console.print("\n[yellow]interrupted: stopping the services[/]")
        demo.stop_all()
        return 130
    except BaseException:
        console.print("[red]the demo failed; stopping the services. Logs:[/]")
        for p in demo.procs:
            console.print(f"--- {p.name} ({p.log_path}) ---\n{p.tail_log(15)}", markup=False)
        demo.stop_all()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not config.keep_running:
        demo.stop_all()
    demo.print_where(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
