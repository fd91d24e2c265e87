"""Model-poisoning experiment: one hostile region against each aggregation strategy.

Federated training over the regions of a market (`catalog.csv` + `events.csv`
with a region column), exactly as the coordinator aggregates: every round each
region trains from the global weights and sends its delta; one region's delta
is replaced by an attack (`scale:F` multiplies it by F, `signflip[:F]` by -F);
the strategy combines the deltas. HR@10 on each user's held-out last item is
reported for the clean FedAvg run, the attacked FedAvg run, and the attacked
run under each robust strategy.

    python -m shared.poisoning --data DIR [--attack scale:100] [--rounds 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from coordinator.aggregation import STRATEGY_NAMES
from shared.data import read_catalog_csv, read_events_csv
from shared.features import ItemFeatures, build_item_features
from shared.metrics import summarize_ranks
from shared.model import HybridTwoTower, ModelConfig, init_state
from shared.simulate import run_rounds
from shared.training import (
    Examples,
    TrainConfig,
    UserSequence,
    build_sequences,
    make_examples,
    rank_held_out,
    split_leave_last_out,
)

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Attack:
    """What the hostile region sends instead of its honest delta Δ: factor x Δ."""

    name: str  # "none", "scale" or "signflip"
    factor: float

    @property
    def label(self) -> str:
        if self.name == "none":
            return "none"
        if self.name == "signflip" and self.factor == -1.0:
            return "signflip"
        return f"{self.name}:{abs(self.factor):g}"


NO_ATTACK = Attack("none", 1.0)


def parse_attack(spec: str) -> Attack:
    """`none`, `scale:F` (Δ x F) or `signflip` / `signflip:F` (Δ x -F)."""
    name, _, value = spec.strip().lower().partition(":")
    if name == "none" and not value:
        return NO_ATTACK
    if name not in ("scale", "signflip"):
        raise ValueError(f"unknown attack {spec!r}: use scale:F or signflip[:F]")
    if name == "scale" and not value:
        raise ValueError("scale needs a factor, e.g. scale:100")
    try:
        factor = float(value) if value else 1.0
    except ValueError as exc:
        raise ValueError(f"attack factor {value!r} is not a number") from exc
    if factor <= 0:
        raise ValueError("the attack factor must be positive")
    return Attack(name, -factor if name == "signflip" else factor)


def poison_update(delta: Mapping[str, torch.Tensor], attack: Attack) -> StateDict:
    """The hostile region's delta (pure)."""
    return {k: (v * attack.factor).to(v.dtype) for k, v in delta.items()}


@dataclass
class RegionData:
    region: str
    examples: Examples


@dataclass
class Market:
    features: ItemFeatures
    num_items: int
    regions: list[RegionData]  # largest first
    train: dict[str, UserSequence]
    held_out: dict[str, int]


def load_market(data_dir: Path, *, max_history: int, country_buckets: int) -> Market:
    """Leave-last-out split of every user; each region's training examples."""
    items = read_catalog_csv(Path(data_dir) / "catalog.csv")
    records = read_events_csv(Path(data_dir) / "events.csv")
    row_of = {item.item_id: i for i, item in enumerate(items)}
    known = [r for r in records if r.item_id in row_of]
    region_of: dict[str, str] = {}
    for r in sorted(known, key=lambda r: r.timestamp):
        region_of[r.user_id] = r.region or "all"
    sequences = build_sequences(
        (
            (r.user_id, row_of[r.item_id], r.event_type, r.timestamp.timestamp(), r.country)
            for r in known
        ),
        country_buckets=country_buckets,
    )
    train, held_out = split_leave_last_out(sequences)
    sizes = Counter(region_of.values())
    regions = [
        RegionData(
            region,
            make_examples((s for u, s in train.items() if region_of[u] == region), max_history),
        )
        for region in sorted(sizes, key=lambda r: (-sizes[r], r))
    ]
    return Market(
        features=build_item_features(items, ModelConfig.model_fields["content_buckets"].default),
        num_items=len(items),
        regions=regions,
        train=train,
        held_out=held_out,
    )


@dataclass(frozen=True)
class PoisoningRun:
    strategy: str
    attack: str
    hr_at_10: float
    ndcg_at_10: float
    seconds: float


@dataclass(frozen=True)
class PoisoningReport:
    attacked_region: str
    rounds: int
    users: int
    runs: list[PoisoningRun]

    @property
    def clean(self) -> PoisoningRun:
        return next(r for r in self.runs if r.attack == "none")

    def table(self) -> str:
        clean = self.clean.hr_at_10
        lines = [
            f"poisoning: attacked region {self.attacked_region}, {self.rounds} rounds, "
            f"{self.users} held-out users",
            f"{'strategy':<14}{'attack':<12}{'HR@10':>8}{'NDCG@10':>9}{'x clean':>9}{'s':>7}",
        ]
        for r in self.runs:
            ratio = r.hr_at_10 / clean if clean > 0 else float("nan")
            lines.append(
                f"{r.strategy:<14}{r.attack:<12}{r.hr_at_10:>8.4f}{r.ndcg_at_10:>9.4f}"
                f"{ratio:>9.3f}{r.seconds:>7.0f}"
            )
        return "\n".join(lines)


def train_federated_with_attack(
    market: Market,
    *,
    strategy: str,
    attack: Attack,
    attacked_region: str,
    rounds: int,
    config: ModelConfig,
    train_config: TrainConfig,
    progress: Callable[[str], None] | None = None,
) -> HybridTwoTower:
    """Rounds of local training + the coordinator's aggregation; one region attacks."""

    def attack_delta(region: str, delta: StateDict) -> StateDict:
        if region == attacked_region and attack.name != "none":
            return poison_update(delta, attack)
        return delta

    def round_done(rnd: int, _state: StateDict) -> None:
        if progress is not None:
            progress(f"{strategy}/{attack.label}: round {rnd}/{rounds}")

    state, _locals, _base = run_rounds(
        config,
        init_state(config),
        market.features,
        [(r.region, r.examples) for r in market.regions],
        rounds=rounds,
        strategy=strategy,
        train_config=lambda rnd, i: dataclasses.replace(
            train_config, seed=train_config.seed * 1000 + rnd * 100 + i
        ),
        tamper=attack_delta,
        on_round=round_done,
    )
    model = HybridTwoTower(config)
    model.load_state_dict(state)
    model.eval()
    return model


def run_poisoning_experiment(
    data_dir: Path,
    *,
    rounds: int = 4,
    seed: int = 0,
    attack: str = "scale:100",
    strategies: Sequence[str] = STRATEGY_NAMES,
    attacked_region: str | None = None,
    local_epochs: int = 1,
    embedding_dim: int = 32,
    progress: Callable[[str], None] | None = None,
) -> PoisoningReport:
    """Clean FedAvg, then `attack` from one region under each strategy; HR@10 of each."""
    parsed = parse_attack(attack)
    base = ModelConfig(num_items=1, embedding_dim=embedding_dim, seed=seed)
    market = load_market(
        data_dir, max_history=base.max_history, country_buckets=base.country_buckets
    )
    config = base.model_copy(update={"num_items": market.num_items})
    region = attacked_region or market.regions[0].region
    if region not in {r.region for r in market.regions}:
        raise ValueError(f"no region {region!r} in {data_dir}")
    train_config = TrainConfig(epochs=local_epochs, seed=seed)
    plan = [("fedavg", NO_ATTACK)] + [(s, parsed) for s in strategies]
    runs: list[PoisoningRun] = []
    for strategy, att in plan:
        started = time.perf_counter()
        model = train_federated_with_attack(
            market,
            strategy=strategy,
            attack=att,
            attacked_region=region,
            rounds=rounds,
            config=config,
            train_config=train_config,
            progress=progress,
        )
        ranks = rank_held_out(model, market.features, market.train, market.held_out)
        summary = summarize_ranks(ranks.values(), k=10)
        runs.append(
            PoisoningRun(
                strategy=strategy,
                attack=att.label,
                hr_at_10=float(summary["hr@10"]),
                ndcg_at_10=float(summary["ndcg@10"]),
                seconds=time.perf_counter() - started,
            )
        )
    return PoisoningReport(
        attacked_region=region, rounds=rounds, users=len(market.held_out), runs=runs
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m shared.poisoning",
        description="HR@10 of federated training with one hostile region, per strategy.",
    )
    parser.add_argument("--data", type=Path, required=True, help="folder with catalog/events.csv")
    parser.add_argument("--attack", default="scale:100", help="scale:F or signflip[:F]")
    parser.add_argument(
        "--aggregation",
        default=",".join(STRATEGY_NAMES),
        help="comma-separated strategies run under attack (clean FedAvg always runs)",
    )
    parser.add_argument("--attacked-region", default=None, help="default: the largest region")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--embedding-dim", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args(argv)
    strategies = [s.strip() for s in args.aggregation.split(",") if s.strip()]
    for s in strategies:
        if s not in STRATEGY_NAMES:
            parser.error(f"unknown strategy {s!r}; choose from {', '.join(STRATEGY_NAMES)}")
    try:
        parse_attack(args.attack)
    except ValueError as exc:
        parser.error(str(exc))
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run_poisoning_experiment(
        args.data,
        rounds=args.rounds,
        seed=args.seed,
        attack=args.attack,
        strategies=strategies,
        attacked_region=args.attacked_region,
        local_epochs=args.local_epochs,
        embedding_dim=args.embedding_dim,
        progress=lambda msg: print(msg, flush=True),
    )
    print(report.table())


if __name__ == "__main__":
    main()
