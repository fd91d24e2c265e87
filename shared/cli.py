"""The `fedjewel` command line: market data, simulation, imports, and the two services.

fedjewel generate-market --out DIR --seed S [--regions 6 --users N --items M]
fedjewel simulate --data DIR --rounds N --seed S [--local-epochs E] [--json OUT]
fedjewel import catalog.csv --url URL --admin-token TOKEN
fedjewel import events.csv [--database-url URL] [--region R]
fedjewel coordinator [--host H --port P]      (settings: COORDINATOR_* variables)
fedjewel node [serve|import-events ...]         (settings: NODE_* variables)
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

if TYPE_CHECKING:
    import httpx

console = Console(stderr=True)
# Off a terminal (logs, CI, `| tee`) rich would wrap the results table at 80 columns.
out = Console() if Console().is_terminal else Console(width=160)


@contextmanager
def _progress() -> Iterator[Any]:
    """A rich progress display; `update(stage, done, total)` drives one bar per stage."""
    with Progress(
        TextColumn("{task.description:<24}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    ) as bars:
        tasks: dict[str, Any] = {}

        def update(stage: str, done: int, total: int) -> None:
            if not console.is_terminal:
                # Logs and CI: one line per finished stage instead of a live bar.
                if done >= total and stage not in tasks:
                    tasks[stage] = None
                    console.print(f"{stage}: done ({total} steps)")
                return
            task = tasks.get(stage)
            if task is None:
                task = tasks[stage] = bars.add_task(stage, total=total)
            bars.update(task, completed=done, total=total)

        yield update


# --------------------------------------------------------------------------- generate-market


def cmd_generate_market(args: argparse.Namespace) -> int:
    from shared.market import generate_market

    start = time.perf_counter()
    try:
        with console.status(f"generating market (seed {args.seed}) into {args.out} ..."):
            summary = generate_market(
                Path(args.out),
                seed=args.seed,
                regions=args.regions,
                users=args.users,
                items=args.items,
                design_weight=args.design_weight,
            )
    except (ValueError, OSError) as exc:
        console.print(f"[red]cannot generate the market into {args.out}: {exc}")
        return 2
    elapsed = time.perf_counter() - start
    table = Table(title=f"market in {summary.out_dir} ({elapsed:.1f} s)")
    table.add_column("region")
    table.add_column("users", justify="right")
    table.add_column("events", justify="right")
    for region in summary.regions:
        table.add_row(
            region,
            str(summary.users_per_region[region]),
            str(summary.events_per_region[region]),
        )
    table.add_row("total", str(summary.users), str(summary.events))
    out.print(table)
    out.print(
        f"{summary.items} items ({summary.cold_items} launched late), "
        f"{summary.cold_users} users with <= 2 events; events by type: "
        + ", ".join(f"{k} {v}" for k, v in summary.event_types.items())
    )
    return 0


# --------------------------------------------------------------------------- simulate


def _fmt(cell: dict[str, Any], key: str) -> str:
    if not cell.get("users"):
        return "-"
    return f"{cell[key]:.3f}"


def results_table(results: dict[str, dict[str, Any]], k: int) -> Table:
    """One row per method: overall, cold items, cold users and each region's HR@k."""
    first = next(iter(results.values()))
    regions = list(first["regions"])
    table = Table(title=f"HR@{k} / NDCG@{k} (users)")
    table.add_column("method")
    table.add_column("overall HR", justify="right")
    table.add_column("NDCG", justify="right")
    table.add_column("cold items", justify="right")
    table.add_column("cold users", justify="right")
    for region in regions:
        n = first["regions"][region]["users"]
        table.add_column(f"{region} ({n})", justify="right")
    hr, ndcg = f"hr@{k}", f"ndcg@{k}"
    table.add_row(
        "users",
        str(first["overall"]["users"]),
        "",
        str(first["cold_items"]["users"]),
        str(first["cold_users"]["users"]),
        *["" for _ in regions],
    )
    for method, res in results.items():
        table.add_row(
            method,
            _fmt(res["overall"], hr),
            _fmt(res["overall"], ndcg),
            _fmt(res["cold_items"], hr),
            _fmt(res["cold_users"], hr),
            *[_fmt(res["regions"][r], hr) for r in regions],
        )
    return table


def _experiment_argv(
    args: argparse.Namespace, extra: list[str], *, default_rounds: int | None
) -> list[str]:
    """The experiment's argv; `--rounds` given, else `default_rounds` (None: the
    experiment's own default, e.g. a DP recipe's)."""
    rounds = args.rounds if args.rounds is not None else default_rounds
    argv = ["--data", str(args.data), "--seed", str(args.seed)]
    if rounds is not None:
        argv += ["--rounds", str(rounds)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    return argv + extra


def cmd_simulate(args: argparse.Namespace) -> int:
    from coordinator.aggregation import STRATEGY_NAMES
    from shared.simulate import ALL_METHODS, SimulationConfig, load_dataset, run_simulation

    rounds = args.rounds if args.rounds is not None else SimulationConfig().rounds
    problem = _simulate_argument_problem(args, rounds)
    if problem:
        console.print(f"[red]{problem}")
        return 2
    if args.attack:
        # Poisoning experiment: one hostile region, clean vs attacked, per strategy.
        from shared import poisoning

        extra = ["--attack", args.attack, "--local-epochs", str(args.local_epochs)]
        if args.aggregation:
            extra += ["--aggregation", args.aggregation]
        poisoning.main(_experiment_argv(args, extra, default_rounds=rounds))
        return 0
    if args.dp_epsilon:
        # DP-FedAvg or DP-SGD: HR@10 against epsilon (delta 1e-5) next to the non-private run.
        from shared import dp_experiment

        extra = ["--epsilons", args.dp_epsilon]
        if args.dp_sampling_rate is not None:
            extra += ["--sampling-rate", str(args.dp_sampling_rate)]
        if args.dp_server_lr is not None:
            extra += ["--server-lr", str(args.dp_server_lr)]
        recipe = args.dp_algorithm in dp_experiment.RECIPES
        if recipe:  # a named setting: its own rounds unless --rounds is given
            extra += ["--recipe", args.dp_algorithm]
        elif args.dp_algorithm is not None:
            extra += ["--algorithm", args.dp_algorithm]
        if args.dp_steps is not None:
            extra += ["--dp-steps", str(args.dp_steps)]
        dp_experiment.main(_experiment_argv(args, extra, default_rounds=None if recipe else rounds))
        return 0

    overrides: dict[str, Any] = {}
    for name in ("embedding_dim", "lr", "num_negatives", "fedprox_mu", "batch_size", "threads"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    if args.aggregation:
        if args.aggregation not in STRATEGY_NAMES:
            console.print(
                f"[red]unknown aggregation {args.aggregation!r}; choose one of "
                + ", ".join(STRATEGY_NAMES)
            )
            return 2
        overrides["aggregation"] = args.aggregation
    if args.no_personalize:
        overrides["personalize"] = False
    if args.personal_global_share is not None:
        if not 0.0 <= args.personal_global_share <= 1.0:
            console.print("[red]--personal-global-share must be between 0 and 1")
            return 2
        overrides["personal_global_share"] = args.personal_global_share
    if args.personal_epochs is not None:
        if args.personal_epochs < 0:
            console.print("[red]--personal-epochs must be 0 or more")
            return 2
        overrides["personal_epochs"] = args.personal_epochs or None
    if args.personal_lr is not None:
        overrides["personal_lr"] = args.personal_lr
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in ALL_METHODS]
    if not methods:
        console.print(f"[red]--methods names none; choose from {', '.join(ALL_METHODS)}")
        return 2
    if unknown:
        console.print(f"[red]unknown methods {unknown}; choose from {', '.join(ALL_METHODS)}")
        return 2
    try:
        config = SimulationConfig(
            rounds=rounds,
            local_epochs=args.local_epochs,
            seed=args.seed,
            methods=methods,
            **overrides,
        )
    except ValueError as exc:  # pydantic's ValidationError is one
        console.print(f"[red]invalid simulation settings: {exc}")
        return 2
    start = time.perf_counter()
    data_dir = Path(args.data)
    from shared.data import DataFormatError

    try:
        with console.status(f"loading {data_dir} ..."):
            data = load_dataset(data_dir)
    except (DataFormatError, OSError, UnicodeDecodeError) as exc:
        console.print(f"[red]cannot load {data_dir}: {exc}")
        return 2
    if not data.held_out:
        console.print(f"[red]{data_dir} has no user with a held-out event to evaluate")
        return 2
    console.print(
        f"{len(data.train)} users ({len(data.held_out)} evaluated), {data.num_items} items "
        f"({len(data.cold_items)} without training interactions), regions: "
        + ", ".join(f"{r} {n}" for r, n in data.region_sizes().items())
    )
    if data.skipped_events:
        console.print(f"note: skipped {data.skipped_events} events of items not in the catalog")
    with _progress() as update:
        report = run_simulation(data_dir, config, progress=update, data=data)
    elapsed = time.perf_counter() - start
    out.print(results_table(report.results, config.k))
    out.print(
        "seconds per method: "
        + ", ".join(f"{m} {s:.1f}" for m, s in report.seconds.items())
        + f"; total {elapsed:.1f}"
    )
    if args.json:
        payload = report.as_json()
        payload["config"]["seconds"] = {m: round(s, 2) for m, s in report.seconds.items()}
        payload["config"]["wall_seconds"] = round(elapsed, 2)
        from shared.data import atomic_text_file

        with atomic_text_file(args.json) as fh:
            fh.write(json.dumps(payload, indent=2) + "\n")
        console.print(f"wrote {args.json}")
    return 0


def _simulate_argument_problem(args: argparse.Namespace, rounds: int) -> str | None:
    """What is wrong with simulate's arguments, checked before any work (or None)."""
    from shared.errors import below_minimum  # (fastapi: not on every command's path)

    too_small = below_minimum(
        [
            ("--rounds", rounds, 1),
            ("--local-epochs", args.local_epochs, 1),
            ("--batch-size", args.batch_size, 1),
            ("--threads", args.threads, 1),
            ("--num-negatives", args.num_negatives, 1),
            ("--embedding-dim", args.embedding_dim, 4),
        ]
    )
    if too_small:
        return too_small
    for flag, value in (
        ("--lr", args.lr),
        ("--personal-lr", args.personal_lr),
        ("--dp-server-lr", args.dp_server_lr),
    ):
        if value is not None and not (value > 0 and math.isfinite(value)):
            return f"{flag} must be a positive number, not {value}"
    if args.fedprox_mu is not None and not (
        args.fedprox_mu >= 0 and math.isfinite(args.fedprox_mu)
    ):
        return f"--fedprox-mu must be 0 or a positive number, not {args.fedprox_mu}"
    if args.dp_sampling_rate is not None and not 0 < args.dp_sampling_rate <= 1:
        return f"--dp-sampling-rate must be in (0, 1], not {args.dp_sampling_rate}"
    if args.dp_epsilon:
        for text in args.dp_epsilon.split(","):
            try:
                eps = float(text)
            except ValueError:
                return f"--dp-epsilon takes numbers or inf, e.g. 1,4,8,inf, not {text!r}"
            if not eps > 0:
                return f"--dp-epsilon values must be positive, not {text!r}"
    if args.json:
        folder = Path(args.json).resolve().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            return f"--json: cannot write into {folder} (checked before the run)"
        if Path(args.json).is_dir():
            return f"--json: {args.json} is a directory; name a file"
    return _experiment_flag_problem(args)


def _experiment_flag_problem(args: argparse.Namespace) -> str | None:
    """--attack and --dp-epsilon run experiments of their own: flags they would ignore, or
    a data folder they cannot read, are refused before any work (or None)."""
    from shared.simulate import ALL_METHODS

    dp_flags = {
        "--dp-sampling-rate": args.dp_sampling_rate is not None,
        "--dp-server-lr": args.dp_server_lr is not None,
        "--dp-algorithm": args.dp_algorithm is not None,
        "--dp-steps": args.dp_steps is not None,
    }
    if not args.dp_epsilon:
        given = [f for f, on in dp_flags.items() if on]
        if given:
            return f"{', '.join(given)} only apply with --dp-epsilon"
    if not (args.attack or args.dp_epsilon):
        return None
    if args.attack and args.dp_epsilon:
        return "--attack and --dp-epsilon are two experiments; run one at a time"
    mode = "--attack" if args.attack else "--dp-epsilon"
    ignored = {
        "--json": args.json is not None,
        "--methods": args.methods != ",".join(ALL_METHODS),
        "--embedding-dim": args.embedding_dim is not None,
        "--lr": args.lr is not None,
        "--num-negatives": args.num_negatives is not None,
        "--batch-size": args.batch_size is not None,
        "--fedprox-mu": args.fedprox_mu is not None,
        "--no-personalize": args.no_personalize,
        "--personal-global-share": args.personal_global_share is not None,
        "--personal-epochs": args.personal_epochs is not None,
        "--personal-lr": args.personal_lr is not None,
        "--aggregation": args.dp_epsilon is not None and args.aggregation is not None,
    }
    given = [f for f, on in ignored.items() if on]
    if given:
        return f"{mode} runs its own experiment, which does not take {', '.join(given)}"
    catalog = Path(args.data) / "catalog.csv"
    if not catalog.is_file():
        return f"cannot load {args.data}: no catalog.csv there (generate-market makes one)"
    return None


# --------------------------------------------------------------------------- import


def _detect_kind(path: Path) -> str | None:
    with path.open(encoding="utf-8-sig", newline="") as fh:
        header = {h.strip().lower() for h in next(csv.reader(fh), [])}
    if {"user_id", "event_type"} <= header:
        return "events"
    if "item_id" in header:
        return "catalog"
    return None


def import_catalog(
    path: Path,
    url: str,
    admin_token: str,
    *,
    timeout: float = 60.0,
    client: httpx.Client | None = None,
) -> int:
    """Validate the whole file, then PUT it as the coordinator's catalog (all or nothing).

    `client` lets a caller (tests) supply its own transport, e.g. a FastAPI TestClient.
    """
    import httpx

    from shared.data import DataFormatError, read_catalog_csv

    try:
        items = read_catalog_csv(path)
    except DataFormatError as exc:
        console.print(f"[red]rejected {path}: nothing imported[/red]\n{exc}", highlight=False)
        return 2
    body = [item.model_dump(mode="json") for item in items]
    if not admin_token.isascii() or not admin_token.isprintable():
        console.print("[red]--admin-token must be printable ASCII (it goes in an HTTP header)")
        return 2
    try:
        with console.status(f"uploading {len(items)} items to {url} ..."):
            resp = (client or httpx).put(
                url.rstrip("/") + "/v1/catalog",
                json=body,
                headers={"Authorization": f"Bearer {admin_token}"},
                timeout=timeout,
            )
    except httpx.InvalidURL as exc:
        console.print(f"[red]--url {url!r} is not a usable URL: {exc}")
        return 2
    except httpx.HTTPError as exc:
        console.print(f"[red]coordinator unreachable at {url}: {exc}")
        return 1
    if resp.status_code >= 400:
        try:
            detail = resp.json().get("detail", resp.text)
        except ValueError:
            detail = resp.text
        console.print(f"[red]coordinator refused the catalog ({resp.status_code}): {detail}")
        return 1
    try:
        info = resp.json()
    except ValueError:  # a proxy's page, say: the upload went through, its answer is not ours
        console.print(
            f"[red]the answer from {url} is not the coordinator's JSON: {resp.text[:200]}"
        )
        return 1
    out.print(
        f"catalog imported from {path}: {len(items)} items in the file, "
        f"{info.get('added', 0)} added, {info.get('updated', 0)} updated; the coordinator now "
        f"has {info.get('items')} items (catalog version {info.get('catalog_version')})"
    )
    return 0


def import_events(path: Path, database_url: str | None, region: str | None) -> int:
    """Import events.csv into a node's store (the node's own `import-events`)."""
    from regional_node.__main__ import import_events as node_import
    from regional_node.settings import NodeSettings

    overrides: dict[str, Any] = {"allow_anonymous": True}
    if database_url:
        overrides["database_url"] = database_url
    if region:
        overrides["region"] = region
    try:
        settings = NodeSettings(**overrides)
    except ValueError as exc:  # pydantic's ValidationError is one
        console.print(f"[red]invalid node settings: {exc}")
        return 2
    return node_import(str(path), settings)


def cmd_import(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        console.print(f"[red]no such file: {path}")
        return 2
    try:
        kind = args.kind or _detect_kind(path)
    except (OSError, UnicodeDecodeError) as exc:
        console.print(f"[red]{path}: cannot read it as a UTF-8 CSV file: {exc}")
        return 2
    if kind is None:
        console.print(
            f"[red]{path}: cannot tell a catalog from an events file by its header; "
            "pass --kind catalog|events"
        )
        return 2
    if kind == "catalog":
        if not args.url or not args.admin_token:
            console.print("[red]importing a catalog needs --url and --admin-token")
            return 2
        return import_catalog(path, args.url, args.admin_token)
    return import_events(path, args.database_url, args.region)


# --------------------------------------------------------------------------- services


def cmd_coordinator(args: argparse.Namespace) -> int:
    from coordinator.__main__ import main as coordinator_main

    coordinator_main(args.rest)
    return 0


def cmd_node(args: argparse.Namespace) -> int:
    from regional_node.__main__ import main as node_main

    node_main(args.rest)
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from shared.market import DEFAULT_DESIGN_WEIGHT
    from shared.simulate import ALL_METHODS, SimulationConfig

    defaults = SimulationConfig()
    parser = argparse.ArgumentParser(
        prog="fedjewel",
        description="Federated jewelry recommendations: market data, evaluation, services.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser(
        "generate-market",
        help="write a synthetic catalog.csv + events.csv",
        description="Write a deterministic synthetic jewelry market (see docs/market.md).",
    )
    gen.add_argument("--out", required=True, help="output directory")
    gen.add_argument("--seed", type=int, default=1)
    gen.add_argument("--regions", type=int, default=6)
    gen.add_argument("--users", type=int, default=12000)
    gen.add_argument("--items", type=int, default=2500)
    gen.add_argument(
        "--design-weight",
        type=float,
        default=DEFAULT_DESIGN_WEIGHT,
        help="weight of the unpublished latent design taste (docs/market.md); 0 gives the "
        "earlier market whose preferences all follow catalog attributes",
    )
    gen.set_defaults(func=cmd_generate_market)

    sim = sub.add_parser(
        "simulate",
        help="compare popularity, local-only, federated, centralized and ALS",
        description="Train and evaluate every method on one leave-last-out split of DIR "
        "(catalog.csv + events.csv; see docs/evaluation.md).",
    )
    sim.add_argument("--data", required=True, help="directory with catalog.csv and events.csv")
    sim.add_argument(
        "--rounds",
        type=int,
        help=f"federated rounds (default {defaults.rounds}; --dp-algorithm fedsgd: 300 DP rounds)",
    )
    sim.add_argument("--seed", type=int, default=defaults.seed)
    sim.add_argument(
        "--local-epochs",
        type=int,
        default=defaults.local_epochs,
        help="epochs per round; local-only and centralized train rounds x this many epochs",
    )
    sim.add_argument("--json", help="write results as JSON to this file")
    sim.add_argument(
        "--methods",
        default=",".join(ALL_METHODS),
        help=f"comma-separated subset of {','.join(ALL_METHODS)}",
    )
    sim.add_argument("--embedding-dim", type=int, dest="embedding_dim")
    sim.add_argument("--lr", type=float)
    sim.add_argument("--num-negatives", type=int, dest="num_negatives")
    sim.add_argument("--batch-size", type=int, dest="batch_size")
    sim.add_argument("--fedprox-mu", type=float, dest="fedprox_mu")
    sim.add_argument("--threads", type=int, help="torch / ALS threads (default: all cores)")
    sim.add_argument(
        "--attack",
        help="poisoning experiment instead: scale:F or signflip[:F] from the largest region "
        "(see docs/security.md)",
    )
    sim.add_argument(
        "--aggregation",
        help="the coordinator strategy the federated method uses (default "
        f"{defaults.aggregation}); with --attack: a comma-separated list to compare",
    )
    sim.add_argument(
        "--no-personalize",
        action="store_true",
        help="rank every region with the global model (federated = federated_global)",
    )
    sim.add_argument(
        "--personal-global-share",
        type=float,
        dest="personal_global_share",
        help="share of the global weights blended into each region's personalized model "
        f"(NODE_PERSONALIZE_GLOBAL_SHARE; default {defaults.personal_global_share})",
    )
    sim.add_argument(
        "--personal-epochs",
        type=int,
        dest="personal_epochs",
        help="epochs of each region's fine-tune of the final global model, what its node "
        f"serves (NODE_PERSONALIZE_EPOCHS; default {defaults.personal_epochs}); 0: serve the "
        "region's last round's local model instead (no training beyond the rounds)",
    )
    sim.add_argument(
        "--personal-lr",
        type=float,
        dest="personal_lr",
        help="learning rate of that fine-tune (NODE_PERSONALIZE_LEARNING_RATE; default "
        f"{defaults.personal_lr})",
    )
    sim.add_argument(
        "--dp-epsilon",
        help="differential-privacy experiment instead: comma-separated epsilons, e.g. 1,4,8,inf "
        "(see docs/privacy.md)",
    )
    sim.add_argument(
        "--dp-sampling-rate",
        type=float,
        help="with --dp-epsilon: Poisson sampling rate of users per round (default 1; fedsgd 0.1)",
    )
    sim.add_argument(
        "--dp-server-lr",
        type=float,
        help="with --dp-epsilon: server learning rate of the DP runs (fedavg 5, dpsgd 1)",
    )
    sim.add_argument(
        "--dp-algorithm",
        choices=("fedavg", "dpsgd", "fedsgd"),
        help="with --dp-epsilon: DP-FedAvg (default) or node-side DP-SGD (NODE_DP_ALGORITHM); "
        "fedsgd: the best measured setting, DP-FedSGD with distributed noise and FedAdam, "
        "300 DP rounds at q 0.1 against 30 non-private ones (docs/privacy.md)",
    )
    sim.add_argument(
        "--dp-steps",
        type=int,
        help="with --dp-epsilon --dp-algorithm dpsgd: noisy steps per round (default 20)",
    )
    sim.set_defaults(func=cmd_simulate)

    imp = sub.add_parser(
        "import",
        help="import catalog.csv into a coordinator or events.csv into a node's store",
        description="A catalog goes to a running coordinator (PUT /v1/catalog, needs --url and "
        "--admin-token); events go into a regional node's database (NODE_DATABASE_URL or "
        "--database-url; rows of other regions are skipped, and a file with none of this "
        "region is refused). A file with any bad row is "
        "rejected whole, with line numbers; re-importing the same events adds nothing.",
    )
    imp.add_argument("file", help="catalog.csv or events.csv")
    imp.add_argument("--kind", choices=("catalog", "events"), help="default: from the header")
    imp.add_argument("--url", help="coordinator base URL (catalog)")
    imp.add_argument("--admin-token", help="coordinator admin token (catalog)")
    imp.add_argument("--database-url", help="node database URL (events)")
    imp.add_argument("--region", help="this node's region (events; default NODE_REGION)")
    imp.set_defaults(func=cmd_import)

    for name, func, what in (
        ("coordinator", cmd_coordinator, "run the coordinator service (COORDINATOR_* settings)"),
        ("node", cmd_node, "run a regional node service (NODE_* settings)"),
    ):
        p = sub.add_parser(
            name,
            help=what,
            description=what + "; remaining arguments go to the service's own parser.",
        )
        p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the service")
        p.set_defaults(func=func)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("coordinator", "node"):
        # Everything after the service name belongs to the service's own parser
        # (including --help), so `fedjewel node import-events FILE` works as documented.
        service = cmd_coordinator if argv[0] == "coordinator" else cmd_node
        sys.exit(service(argparse.Namespace(rest=argv[1:])))
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        console.print("[red]interrupted")
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
