"""HR@10 against epsilon: federated training of the market's regions with DP-FedAvg.

`python -m shared.dp_experiment --data DIR --epsilons 1,4,8,inf`

Each region of the market is one node. Every round each node either trains
plainly (epsilon = inf: the non-private FedAvg the nodes run today) or computes
its DP-FedAvg contribution (shared/dp_training.py) with the noise multiplier the
RDP accountant needs for the target epsilon after all rounds at `--delta`.
The coordinator side is `coordinator.aggregation` (example-weighted mean of the
deltas). HR@10 is leave-last-out on every user's last new item, ranked by the
final global model. A market is generated into DIR when DIR has no catalog.csv.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pickle
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from coordinator.aggregation import apply_delta, compute_delta, make_strategy
from coordinator.settings import DEFAULT_AGGREGATION
from regional_node.settings import NodeSettings
from shared.data import DataFormatError, read_catalog_csv, read_events_csv
from shared.dp_sgd import DPSGDConfig, PerUserGradients, dp_sgd_update, pack_users
from shared.dp_training import DPConfig, ServerAdam, ServerMomentum, dp_fedavg_update
from shared.errors import below_minimum
from shared.features import ItemFeatures, build_item_features
from shared.market import generate_market
from shared.metrics import summarize_ranks
from shared.model import (
    DEFAULT_PERSONAL_GLOBAL_SHARE,
    HybridTwoTower,
    ModelConfig,
    init_state,
)
from shared.privacy import dp_epsilon, noise_multiplier_for_epsilon
from shared.training import (
    TrainConfig,
    UserSequence,
    build_sequences,
    make_examples,
    rank_fine_tuned_regions,
    rank_held_out,
    select_fine_tune_epochs,
    split_leave_last_out,
    train_local,
)

# Named settings (`--recipe`): a recipe only changes defaults, so any flag given
# explicitly still wins. "fedsgd" is the best measured at epsilon 8 on the default market
# (docs/privacy.md, section 2b): DP-FedSGD, one noisy mean gradient a round with the noise
# split over the nodes under secure aggregation, FedAdam on the coordinator; the
# non-private arm keeps the plain FedAvg schedule it is measured with (30 rounds).
RECIPES: dict[str, dict[str, object]] = {
    "fedsgd": {
        "algorithm": "dpsgd",
        "dp_steps": 1,
        "dp_optimizer": "sgd",
        "dp_lr": 1.0,
        "server_optimizer": "adam",
        "server_adam_lr": 0.01,
        "server_adam_tau": 1e-8,
        "distributed_noise": True,
        "dp_negatives": 1024,
        "sampling_rate": 0.1,
        "rounds": 300,
        "plain_rounds": 30,
    },
}


@dataclass(frozen=True)
class ServeRecipe:
    """How a node fine-tunes the global version it serves: `tune` (NODE_PERSONALIZE_EPOCHS,
    NODE_PERSONALIZE_LEARNING_RATE, NODE_NUM_NEGATIVES), the length picked on a validation
    split (`select`, NODE_PERSONALIZE_SELECT) and the mean of `soup` fine-tunes
    (NODE_PERSONALIZE_SOUP); a DP node's NODE_DP_PERSONALIZE_* counterparts."""

    tune: TrainConfig
    select: bool = False
    soup: int = 1

    def describe(self) -> str:
        return (
            f"{'1 to ' if self.select else ''}{self.tune.epochs} epochs"
            f"{', picked per region' if self.select else ''}"
            f"{f', a soup of {self.soup}' if self.soup > 1 else ''}"
        )


@dataclass(frozen=True)
class Setup:
    rounds: int  # of the DP runs
    delta: float
    clip_norm: float
    groups: int
    sampling_rate: float
    train: TrainConfig
    dp_train: TrainConfig
    seed: int
    # How a plain node fine-tunes the global model it serves (with
    # NODE_PERSONALIZE_GLOBAL_SHARE below); after DP runs, how a DP node does.
    serve: ServeRecipe
    dp_serve: ServeRecipe
    server_lr: float = 1.0
    server_momentum: float = 0.0
    # "adam": FedAdam on the coordinator (ServerAdam) with this lr and tau, applied to
    # the DP runs' mean (the node's server lr should then be 1).
    server_optimizer: str = "sgd"
    server_adam_lr: float = 0.1
    server_adam_tau: float = 1e-2
    frozen: tuple[str, ...] = ()
    # Set: every node runs `dpsgd.steps` DP-SGD steps a round (shared/dp_sgd.py) instead
    # of one DP-FedAvg release; the accountant counts rounds x steps releases.
    dpsgd: DPSGDConfig | None = None
    # Each node adds 1/sqrt(nodes) of the noise (distributed DP: only the sum of the
    # nodes' updates is private; needs secure aggregation and dpsgd.steps = 1).
    distributed_noise: bool = False
    server_adam_beta1: float = 0.9
    server_adam_beta2: float = 0.99
    # FedAdam subtracts the DP noise's known variance from its second moment (DP-AdamBC).
    server_adam_bias_correction: bool = False
    # Set: the evaluated model is this exponential moving average of the DP rounds'
    # global states (post-processing), not the last state.
    ema: float | None = None
    save_states: Path | None = None  # each epsilon's final global state goes here
    serve_global_share: float = DEFAULT_PERSONAL_GLOBAL_SHARE
    plain_rounds: int | None = None  # of the non-private run (None: `rounds`)

    def rounds_for(self, epsilon: float) -> int:
        if math.isinf(epsilon) and self.plain_rounds is not None:
            return self.plain_rounds
        return self.rounds

    @property
    def noisy_steps(self) -> int:
        return self.rounds * (self.dpsgd.steps if self.dpsgd is not None else 1)


@dataclass(frozen=True)
class Row:
    epsilon: float
    noise_multiplier: float
    epsilon_spent: float
    hr10: float
    ndcg10: float
    seconds: float
    # What each node serves (NODE_PERSONALIZE): the final global model fine-tuned for one
    # plain local epoch on the region's own events, blended with the global model
    # (NODE_PERSONALIZE_GLOBAL_SHARE). The fine-tuned weights never leave the
    # region, so this costs no privacy budget; the DP guarantee covers what crosses it.
    served_hr10: float = math.nan
    served_ndcg10: float = math.nan


@dataclass
class StateAverage:
    """Exponential moving average of the global states, bias-corrected (the first state
    alone, then `decay`-weighted): an average of released models, so post-processing."""

    decay: float
    state: dict[str, torch.Tensor] | None = None
    count: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.decay < 1:
            raise ValueError("the average's decay must be in [0, 1)")

    def update(self, new: dict[str, torch.Tensor]) -> None:
        self.count += 1
        w = (1 - self.decay) / (1 - self.decay**self.count)
        old = self.state
        self.state = {
            k: v.detach().clone() if old is None else old[k] * (1 - w) + v * w
            for k, v in new.items()
        }


def load_regions(
    data: Path, *, users: int, items: int, seed: int
) -> tuple[list, dict[str, dict[str, UserSequence]], dict[str, dict[str, int]], ModelConfig]:  # type: ignore[type-arg]
    if not (data / "catalog.csv").exists():
        generate_market(data, seed=seed, users=users, items=items)
    catalog = read_catalog_csv(data / "catalog.csv")
    events = read_events_csv(data / "events.csv")
    row_of = {item.item_id: i for i, item in enumerate(catalog)}
    config = ModelConfig(num_items=len(catalog))
    by_region: dict[str, list[tuple[str, int, str, float, str | None]]] = {}
    for e in events:
        if e.item_id in row_of:
            by_region.setdefault(e.region or "default", []).append(
                (e.user_id, row_of[e.item_id], e.event_type, e.timestamp.timestamp(), e.country)
            )
    train: dict[str, dict[str, UserSequence]] = {}
    held: dict[str, dict[str, int]] = {}
    for region, rows in sorted(by_region.items()):
        seqs = build_sequences(rows, country_buckets=config.country_buckets)
        train[region], held[region] = split_leave_last_out(seqs)
    return catalog, train, held, config


@dataclass(frozen=True)
class Market:
    """What every run ranks and trains on: the model's shape, the catalog's features and
    each region's training sequences and held-out items."""

    config: ModelConfig
    features: ItemFeatures
    train: dict[str, dict[str, UserSequence]]
    held: dict[str, dict[str, int]]


def evaluate(model: HybridTwoTower, market: Market) -> dict[str, float]:
    ranks: list[int] = []
    for region in sorted(market.train):
        ranks.extend(
            rank_held_out(
                model, market.features, market.train[region], market.held[region]
            ).values()
        )
    return summarize_ranks(ranks, k=10)


def evaluate_served(
    state: dict[str, torch.Tensor],
    market: Market,
    local: TrainConfig,
    seed: int,
    global_share: float = DEFAULT_PERSONAL_GLOBAL_SHARE,
    select: bool = False,
    soup: int = 1,
) -> dict[str, float]:
    """Each region fine-tunes the global weights on its own data, blends them like a node
    (`global_share` of the global weights) and ranks its own users."""
    config, train, held = market.config, market.train, market.held

    def tune_for(i: int, region: str) -> TrainConfig:
        tune = dataclasses.replace(local, seed=seed + i)
        if select:
            best, curve = select_fine_tune_epochs(
                HybridTwoTower(config), state, market.features, train[region], tune, global_share
            )
            print(
                f"{region}: {best} fine-tune epochs (validation HR@10 "
                + " ".join(f"{h:.4f}" for h in curve)
                + ")",
                file=sys.stderr,
            )
            tune = dataclasses.replace(tune, epochs=best)
        return tune

    regions = (
        (
            make_examples(train[region].values(), config.max_history),
            train[region],
            held[region],
            tune_for(i, region),
        )
        for i, region in enumerate(sorted(train))
    )
    ranks = rank_fine_tuned_regions(
        state, HybridTwoTower(config), market.features, regions, global_share, soup
    )
    return summarize_ranks(ranks.values(), k=10)


def score_state(
    state: dict[str, torch.Tensor],
    serve: ServeRecipe,
    setup: Setup,
    market: Market,
) -> tuple[dict[str, float], dict[str, float]]:
    """A global state's metrics as it is and as the nodes serve it after the `serve`
    fine-tune (seeded from `setup.seed` alone, so a saved state scores the same again)."""
    model = HybridTwoTower(market.config)
    model.load_state_dict(state)
    summary = evaluate(model, market)
    served = evaluate_served(
        state,
        market,
        serve.tune,
        setup.seed * 10_000 + 99,
        setup.serve_global_share,
        serve.select,
        serve.soup,
    )
    return summary, served


def run_one(
    epsilon: float,
    setup: Setup,
    market: Market,
    threads: int = 1,
) -> Row:
    torch.set_num_threads(threads)
    config, features, train = market.config, market.features, market.train
    start = time.perf_counter()
    sigma = noise_multiplier_for_epsilon(
        epsilon=epsilon,
        delta=setup.delta,
        steps=setup.noisy_steps,
        sampling_rate=setup.sampling_rate,
    )
    engine = batches = None
    if setup.dpsgd is not None and not math.isinf(epsilon):
        engine = PerUserGradients(config, features, frozen=setup.frozen)
        batches = {
            r: pack_users(t, config.max_history, setup.dpsgd.max_examples) for r, t in train.items()
        }
    noise_share = 1 / math.sqrt(len(train)) if setup.distributed_noise else 1.0
    noise_variance = 0.0
    if setup.server_adam_bias_correction and not math.isinf(epsilon):
        # Noise of the example-weighted mean of the nodes' noisy sums / (q U_r): each node's
        # N(0, (share z C)^2) enters with weight 1 / (q sum U), so per coordinate
        # nodes x (share z C / (q sum U))^2 (DP-SGD's units: users with an example).
        if setup.dpsgd is None or batches is None:
            raise ValueError("FedAdam's bias correction is for the dpsgd runs")
        units = sum(len(b.users) for b in batches.values())
        noise_variance = (
            len(train)
            * (noise_share * sigma * setup.dpsgd.clip_norm / (setup.sampling_rate * units)) ** 2
        )
    state = init_state(config)
    model = HybridTwoTower(config)
    # The server lr is the node's (DPConfig.server_lr); momentum is a coordinator-side
    # step here (ServerMomentum), which a node could equally apply to its own means.
    server: ServerMomentum | ServerAdam = (
        ServerAdam(
            lr=setup.server_adam_lr,
            tau=setup.server_adam_tau,
            beta1=setup.server_adam_beta1,
            beta2=setup.server_adam_beta2,
            noise_variance=noise_variance,
        )
        if setup.server_optimizer == "adam"
        else ServerMomentum(momentum=setup.server_momentum)
    )
    aggregator = make_strategy(DEFAULT_AGGREGATION)
    average = StateAverage(setup.ema) if setup.ema is not None and not math.isinf(epsilon) else None
    rounds = setup.rounds_for(epsilon)
    for rnd in range(rounds):
        updates = []
        for i, region in enumerate(sorted(train)):
            seed = setup.seed * 10_000 + rnd * 100 + i
            if math.isinf(epsilon):
                model.load_state_dict(state)
                examples = make_examples(train[region].values(), config.max_history)
                cfg = dataclasses.replace(setup.train, seed=seed)
                result = train_local(model, features, examples, cfg)
                new = {k: v.detach().clone() for k, v in model.state_dict().items()}
                updates.append((compute_delta(new, state), result.num_examples))
            elif engine is not None and batches is not None and setup.dpsgd is not None:
                up = dp_sgd_update(
                    config,
                    state,
                    features,
                    train[region],
                    dataclasses.replace(
                        setup.dpsgd, noise_multiplier=sigma, noise_share=noise_share
                    ),
                    key=f"{setup.seed}-{region}-{rnd}".encode(),
                    engine=engine,
                    users=batches[region],
                )
                if up is not None:
                    # The server lr scales what was released: post-processing.
                    step = {k: v * setup.server_lr for k, v in up.delta.items()}
                    updates.append((step, up.num_units))
            else:
                dp = DPConfig(
                    clip_norm=setup.clip_norm,
                    noise_multiplier=sigma,
                    groups=setup.groups,
                    sampling_rate=setup.sampling_rate,
                    frozen=setup.frozen,
                    server_lr=setup.server_lr,
                )
                up = dp_fedavg_update(
                    config,
                    state,
                    features,
                    train[region],
                    setup.dp_train,
                    dp,
                    seed=seed,
                    unit_key=f"{setup.seed}-{region}-{rnd}".encode(),
                )
                if up is not None:
                    updates.append((up.delta, up.num_units))
        mean = aggregator.aggregate(updates)  # the coordinator's default strategy
        # The server optimizer applies to the DP runs only; inf is today's plain FedAvg.
        state = apply_delta(state, mean if math.isinf(epsilon) else server.step(mean))
        if average is not None:
            average.update(state)
        if (rnd + 1) % max(1, rounds // 10) == 0 or rnd + 1 == rounds:
            # Progress on stderr (the table goes to stdout): a DP run takes minutes.
            print(
                f"epsilon {epsilon:g}: round {rnd + 1}/{rounds} "
                f"({time.perf_counter() - start:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    if average is not None and average.state is not None:
        state = average.state
    if setup.save_states is not None:
        setup.save_states.mkdir(parents=True, exist_ok=True)
        torch.save(state, setup.save_states / f"global-eps-{epsilon:g}.pt")
    summary, served = score_state(
        state, setup.serve if math.isinf(epsilon) else setup.dp_serve, setup, market
    )
    spent = (
        math.inf
        if math.isinf(epsilon)
        else dp_epsilon(
            noise_multiplier=sigma,
            sampling_rate=setup.sampling_rate,
            steps=setup.noisy_steps,
            delta=setup.delta,
        )
    )
    return Row(
        epsilon=epsilon,
        noise_multiplier=sigma,
        epsilon_spent=spent,
        hr10=float(summary["hr@10"]),
        ndcg10=float(summary["ndcg@10"]),
        seconds=time.perf_counter() - start,
        served_hr10=float(served["hr@10"]),
        served_ndcg10=float(served["ndcg@10"]),
    )


def format_served_recipe(
    path: Path,
    setup: Setup,
    market: Market,
) -> str:
    """One saved global state ranked as it is and as the nodes serve it with `setup.serve`.

    The fine-tune's seed is `run_one`'s, so the recipe a run used reproduces its figure.
    """
    summary, served = score_state(torch.load(path), setup.serve, setup, market)
    return (
        f"{path}: global HR@10 {summary['hr@10']:.4f}; served "
        f"({setup.serve.describe()}, lr {setup.serve.tune.lr:g}, "
        f"{setup.serve.tune.num_negatives} negatives, global share "
        f"{setup.serve_global_share:g}) HR@10 {served['hr@10']:.4f}"
    )


def parse_epsilons(text: str) -> list[float]:
    """ "1,4,8,inf" -> [1.0, 4.0, 8.0, inf]; ValueError naming what is not a number."""
    out = []
    for t in text.split(","):
        try:
            out.append(math.inf if t.strip().lower() in ("inf", "∞") else float(t))
        except ValueError:
            raise ValueError(
                f"--epsilons takes numbers or inf, e.g. 1,4,8,inf, not {t!r}"
            ) from None
    return out


def format_table(rows: Sequence[Row]) -> str:
    plain = next((r for r in rows if math.isinf(r.epsilon)), None)
    lines = [
        "| epsilon | noise multiplier | epsilon spent | global HR@10 | NDCG@10 | vs non-private "
        "| served HR@10 (fine-tuned on the node) | vs non-private served | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r.hr10 / plain.hr10:.3f}" if plain and plain.hr10 else "-"
        served = f"{r.served_hr10 / plain.served_hr10:.3f}" if plain and plain.served_hr10 else "-"
        eps = "inf" if math.isinf(r.epsilon) else f"{r.epsilon:g}"
        spent = "inf" if math.isinf(r.epsilon_spent) else f"{r.epsilon_spent:.3f}"
        lines.append(
            f"| {eps} | {r.noise_multiplier:.4f} | {spent} | {r.hr10:.4f} | {r.ndcg10:.4f} "
            f"| {ratio} | {r.served_hr10:.4f} | {served} | {r.seconds:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m shared.dp_experiment", description=__doc__)
    p.add_argument("--data", type=Path, required=True, help="market dir (generated if empty)")
    p.add_argument("--epsilons", default="1,4,8,inf")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        help="a named setting's defaults (flags given explicitly win); fedsgd: the best "
        "measured at epsilon 8 (--algorithm dpsgd --dp-steps 1 --dp-optimizer sgd --dp-lr 1 "
        "--server-optimizer adam --server-adam-lr 0.01 --server-adam-tau 1e-8 "
        "--distributed-noise --dp-negatives 1024 --sampling-rate 0.1 --rounds 300 "
        "--plain-rounds 30)",
    )
    p.add_argument("--rounds", type=int, default=10, help="rounds of the DP runs")
    p.add_argument(
        "--plain-rounds",
        type=int,
        help="rounds of the non-private run (epsilon inf; default --rounds)",
    )
    p.add_argument(
        "--algorithm",
        choices=("fedavg", "dpsgd"),
        default="fedavg",
        help="DP runs: fedavg (one clipped step per user, one release a round) or dpsgd "
        "(--dp-steps noisy steps of per-user clipped gradients a round on every node)",
    )
    p.add_argument("--dp-steps", type=int, default=20, help="dpsgd: noisy steps per round")
    p.add_argument(
        "--distributed-noise",
        action="store_true",
        help="dpsgd with --dp-steps 1: each node adds 1/sqrt(nodes) of the noise "
        "(only the sum is private: secure aggregation)",
    )
    p.add_argument(
        "--clip-norm",
        type=float,
        help="L2 clip of a user's delta (fedavg, 5) / gradient (dpsgd, 1)",
    )
    p.add_argument("--groups", type=int, default=0, help="0: one unit per user")
    p.add_argument("--sampling-rate", type=float, default=1.0)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--dp-epochs", type=int, help="local epochs of one user unit (default --epochs)")
    p.add_argument(
        "--server-lr", type=float, help="DP runs: server learning rate (fedavg 5, dpsgd 1)"
    )
    p.add_argument(
        "--server-momentum", type=float, default=0.0, help="DP runs: server momentum (DP-FedAvgM)"
    )
    p.add_argument(
        "--server-optimizer",
        choices=("sgd", "adam"),
        default="sgd",
        help="DP runs: the coordinator's step on the noisy mean (adam: FedAdam)",
    )
    p.add_argument("--server-adam-lr", type=float, default=0.1, help="FedAdam's lr")
    p.add_argument("--server-adam-tau", type=float, default=1e-2, help="FedAdam's tau")
    p.add_argument("--server-adam-beta1", type=float, default=0.9, help="FedAdam's beta1")
    p.add_argument("--server-adam-beta2", type=float, default=0.99, help="FedAdam's beta2")
    p.add_argument(
        "--server-adam-bias-correction",
        action="store_true",
        help="dpsgd: FedAdam subtracts the DP noise's known variance from its second moment "
        "(DP-AdamBC)",
    )
    p.add_argument(
        "--ema",
        type=float,
        help="DP runs: evaluate the exponential moving average of the global states with "
        "this decay (post-processing) instead of the last state",
    )
    p.add_argument(
        "--dp-freeze", default="", help="comma-separated parameters the DP units do not train"
    )
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument(
        "--dp-lr",
        type=float,
        help="local lr of a user unit (fedavg, 10) / a node step (dpsgd, 0.01)",
    )
    p.add_argument("--dp-batch-size", type=int, default=64)
    p.add_argument(
        "--dp-optimizer", choices=("adam", "sgd"), help="local optimizer (fedavg sgd, dpsgd adam)"
    )
    p.add_argument("--dp-negatives", type=int, help="sampled negatives of a unit's step")
    p.add_argument("--num-negatives", type=int, default=256)
    p.add_argument(
        "--embedding-dim", type=int, help="model width of every run (default: the model's 48)"
    )
    node = NodeSettings.model_fields
    p.add_argument(
        "--serve-epochs",
        type=int,
        help="served, non-private and --from-state: epochs of each node's fine-tune, the most "
        "with --serve-select (default NODE_PERSONALIZE_EPOCHS, with --serve-select "
        "NODE_PERSONALIZE_MAX_EPOCHS)",
    )
    p.add_argument(
        "--dp-serve-epochs",
        type=int,
        help="served, DP runs: the same (default NODE_DP_PERSONALIZE_EPOCHS, with "
        "--dp-serve-select NODE_DP_PERSONALIZE_MAX_EPOCHS)",
    )
    p.add_argument(
        "--serve-negatives",
        type=int,
        default=node["num_negatives"].default,
        help="served: negatives of the fine-tune (NODE_NUM_NEGATIVES)",
    )
    p.add_argument(
        "--serve-lr",
        type=float,
        default=node["personalize_learning_rate"].default,
        help="served: learning rate of the fine-tune (NODE_PERSONALIZE_LEARNING_RATE)",
    )
    p.add_argument(
        "--serve-global-share",
        type=float,
        default=node["personalize_global_share"].default,
        help="served: share of the global weights (NODE_PERSONALIZE_GLOBAL_SHARE)",
    )
    p.add_argument(
        "--serve-select",
        action=argparse.BooleanOptionalAction,
        default=node["personalize_select"].default,
        help="served, non-private and --from-state: each region picks 1 to --serve-epochs "
        "on a validation split of its own data (NODE_PERSONALIZE_SELECT)",
    )
    p.add_argument(
        "--dp-serve-select",
        action=argparse.BooleanOptionalAction,
        default=node["dp_personalize_select"].default,
        help="served, DP runs: the same, 1 to --dp-serve-epochs (NODE_DP_PERSONALIZE_SELECT)",
    )
    p.add_argument(
        "--serve-soup",
        type=int,
        default=node["personalize_soup"].default,
        help="served, non-private and --from-state: each region serves the mean of this many "
        "fine-tunes that differ in their seed, a model soup (NODE_PERSONALIZE_SOUP)",
    )
    p.add_argument(
        "--dp-serve-soup",
        type=int,
        default=node["dp_personalize_soup"].default,
        help="served, DP runs: the same (NODE_DP_PERSONALIZE_SOUP)",
    )
    p.add_argument(
        "--save-states", type=Path, help="save each epsilon's final global state here (.pt)"
    )
    p.add_argument(
        "--from-state",
        type=Path,
        help="train nothing: rank with this saved global state (--save-states) and serve it "
        "with --serve-epochs, --serve-negatives, --serve-global-share (a recipe grid)",
    )
    p.add_argument("--users", type=int, default=6000, help="market size when generating")
    p.add_argument("--items", type=int, default=1200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="epsilons run in parallel processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads per job")
    args = p.parse_args(argv)
    if args.recipe is not None:
        p.set_defaults(**RECIPES[args.recipe])
        args = p.parse_args(argv)
    # A node that picks its fine-tune's length picks it up to its MAX_EPOCHS.
    if args.serve_epochs is None:
        args.serve_epochs = node[
            "personalize_max_epochs" if args.serve_select else "personalize_epochs"
        ].default
    if args.dp_serve_epochs is None:
        args.dp_serve_epochs = node[
            "dp_personalize_max_epochs" if args.dp_serve_select else "dp_personalize_epochs"
        ].default
    if args.rounds < 1 or (args.plain_rounds is not None and args.plain_rounds < 1):
        p.error("--rounds and --plain-rounds must be >= 1")
    sgd = args.algorithm == "dpsgd"
    defaults = {"clip_norm": (1.0, 5.0), "server_lr": (1.0, 5.0), "dp_lr": (0.01, 10.0)}
    for name, (for_sgd, for_fedavg) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, for_sgd if sgd else for_fedavg)
    args.dp_optimizer = args.dp_optimizer or ("adam" if sgd else "sgd")
    if args.server_adam_bias_correction and not (sgd and args.server_optimizer == "adam"):
        p.error("--server-adam-bias-correction needs --algorithm dpsgd --server-optimizer adam")
    if args.distributed_noise and not (sgd and args.dp_steps == 1):
        p.error("--distributed-noise needs --algorithm dpsgd --dp-steps 1 (a linear sum)")
    try:  # the server step's settings: refused here, before any market is loaded
        ServerAdam(
            lr=args.server_adam_lr,
            tau=args.server_adam_tau,
            beta1=args.server_adam_beta1,
            beta2=args.server_adam_beta2,
        )
        ServerMomentum(momentum=args.server_momentum)
        if args.ema is not None:
            StateAverage(args.ema)
        if args.serve_lr <= 0:
            raise ValueError("--serve-lr must be positive")
        if not 0 <= args.serve_global_share <= 1:
            raise ValueError("--serve-global-share must be in [0, 1]")
        if args.from_state is not None and not args.from_state.is_file():
            raise ValueError(f"--from-state {args.from_state}: no such file")
        epsilons = parse_epsilons(args.epsilons)
        if not all(e > 0 for e in epsilons):
            raise ValueError(f"--epsilons must all be positive, not {args.epsilons!r}")
        if not 0 < args.delta < 1:
            raise ValueError(f"--delta must be in (0, 1), not {args.delta}")
        too_small = below_minimum(
            [
                ("--threads", args.threads, 1),
                ("--jobs", args.jobs, 1),
                ("--epochs", args.epochs, 1),
                ("--dp-epochs", args.dp_epochs, 1),
                ("--groups", args.groups, 0),
                ("--serve-epochs", args.serve_epochs, 1),
                ("--dp-serve-epochs", args.dp_serve_epochs, 1),
                ("--serve-negatives", args.serve_negatives, 1),
                ("--serve-soup", args.serve_soup, 1),
                ("--dp-serve-soup", args.dp_serve_soup, 1),
            ]
        )
        if too_small:
            raise ValueError(too_small)
        if args.data.exists() and not args.data.is_dir():
            raise ValueError(f"--data {args.data} is a file; name a market folder")
        dpsgd = DPSGDConfig(
            clip_norm=args.clip_norm,
            noise_multiplier=0.0,  # each epsilon's run sets its own
            sampling_rate=args.sampling_rate,
            steps=args.dp_steps,
            lr=args.dp_lr,
            optimizer=args.dp_optimizer,
            num_negatives=args.dp_negatives or args.num_negatives,
        )
        if args.embedding_dim is not None:  # the model's own bounds, before any loading
            ModelConfig(num_items=1, embedding_dim=args.embedding_dim)
    except ValueError as exc:
        p.error(str(exc))

    try:
        catalog, train, held, config = load_regions(
            args.data, users=args.users, items=args.items, seed=args.seed
        )
    except (DataFormatError, OSError, UnicodeDecodeError) as exc:
        p.error(f"cannot load the market in {args.data}: {exc}")
    if args.embedding_dim is not None:
        config = ModelConfig.model_validate(
            config.model_dump() | {"embedding_dim": args.embedding_dim}
        )
    features = build_item_features(catalog, config.content_buckets)
    market = Market(config=config, features=features, train=train, held=held)
    serve = TrainConfig(
        epochs=args.serve_epochs,
        lr=args.serve_lr,
        batch_size=node["batch_size"].default,
        num_negatives=args.serve_negatives,
    )
    setup = Setup(
        rounds=args.rounds,
        delta=args.delta,
        clip_norm=args.clip_norm,
        groups=args.groups,
        sampling_rate=args.sampling_rate,
        train=TrainConfig(
            epochs=args.epochs, lr=args.lr, batch_size=256, num_negatives=args.num_negatives
        ),
        dp_train=TrainConfig(
            epochs=args.dp_epochs or args.epochs,
            lr=args.dp_lr,
            batch_size=args.dp_batch_size,
            num_negatives=args.dp_negatives or args.num_negatives,
            optimizer=args.dp_optimizer,
        ),
        seed=args.seed,
        server_lr=args.server_lr,
        server_momentum=args.server_momentum,
        server_optimizer=args.server_optimizer,
        server_adam_lr=args.server_adam_lr,
        server_adam_tau=args.server_adam_tau,
        frozen=tuple(f.strip() for f in args.dp_freeze.split(",") if f.strip()),
        distributed_noise=args.distributed_noise,
        dpsgd=dpsgd if sgd else None,
        server_adam_beta1=args.server_adam_beta1,
        server_adam_beta2=args.server_adam_beta2,
        server_adam_bias_correction=args.server_adam_bias_correction,
        ema=args.ema,
        save_states=args.save_states,
        serve=ServeRecipe(serve, select=args.serve_select, soup=args.serve_soup),
        dp_serve=ServeRecipe(
            dataclasses.replace(serve, epochs=args.dp_serve_epochs),
            select=args.dp_serve_select,
            soup=args.dp_serve_soup,
        ),
        serve_global_share=args.serve_global_share,
        plain_rounds=args.plain_rounds,
    )
    if args.from_state is not None:
        torch.set_num_threads(args.threads)
        try:
            print(format_served_recipe(args.from_state, setup, market))
        except (RuntimeError, EOFError, pickle.UnpicklingError) as exc:  # not a fitting state
            p.error(f"--from-state {args.from_state} does not fit this market and model: {exc}")
        return
    users = sum(len(t) for t in train.values())
    print(
        f"market: {len(train)} regions, {users} users, {len(catalog)} items; "
        f"embedding dim {config.embedding_dim}, "
        f"{args.rounds} rounds"
        + (f" ({args.plain_rounds} non-private)" if args.plain_rounds is not None else "")
        + f", delta {args.delta}, clip {args.clip_norm}, "
        f"units {'per user' if args.groups == 0 else f'{args.groups} groups'}, "
        f"q {args.sampling_rate}, server lr {args.server_lr} momentum {args.server_momentum} "
        f"optimizer {args.server_optimizer}"
        + (
            f" (lr {args.server_adam_lr}, tau {args.server_adam_tau})"
            if args.server_optimizer == "adam"
            else ""
        )
        + ", "
        f"algorithm {args.algorithm}"
        + (f" ({args.dp_steps} steps a round)" if sgd else f", dp epochs {setup.dp_train.epochs}")
        + f", dp lr {args.dp_lr} {args.dp_optimizer}, "
        f"frozen {list(setup.frozen)}; served: {setup.serve.describe()} "
        f"(after DP {setup.dp_serve.describe()}) at lr {args.serve_lr:g}, "
        f"{args.serve_negatives} negatives, global share {args.serve_global_share}",
        flush=True,
    )
    if args.jobs > 1:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(run_one, e, setup, market, args.threads) for e in epsilons]
            rows = [f.result() for f in futures]
    else:
        rows = [run_one(e, setup, market, args.threads) for e in epsilons]
    print(format_table(rows))


if __name__ == "__main__":
    main()
