"""`fedjewel simulate`: federated vs. the alternatives a retailer has, on one split.

Every method sees the same leave-last-out split of the same data and is ranked
the same way (full catalog minus the user's training items, see
`shared.training.rank_with_scores`), so the numbers are comparable:

* ``popularity``  - the user's region's most-interacted items (training data only);
* ``local_only``  - each region trains the hybrid model alone on its own data;
* ``federated``   - the regions as nodes: every round each trains from the global
  weights and sends a delta; deltas are combined with the coordinator's own
  aggregation (`coordinator.aggregation`, default strategy ``fedavg``). Each
  region's users are ranked by what its node serves (`NODE_PERSONALIZE`): the model
  it trained in the last round from the global weights, blended with those global
  weights (`NODE_PERSONALIZE_GLOBAL_SHARE`); no extra training beyond the rounds;
* ``federated_global`` - the same run's final global model, served unchanged to
  every region (reported beside ``federated``; not one of the issue's five methods);
* ``centralized`` - all regions' data pooled (the privacy-free upper reference);
* ``als``         - implicit-feedback ALS from the `implicit` library (0.7.x), trained
  centrally: the off-the-shelf alternative.

The neural methods get the same training budget: `rounds x local_epochs` passes over
their data. See docs/evaluation.md for the protocol and measured results.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coordinator.aggregation import StateDict, apply_delta, compute_delta, make_strategy
from coordinator.settings import DEFAULT_AGGREGATION
from regional_node.settings import NodeSettings
from shared.data import read_catalog_csv, read_events_csv
from shared.features import ItemFeatures, build_item_features
from shared.metrics import summarize_ranks
from shared.model import (
    DEFAULT_PERSONAL_GLOBAL_SHARE,
    HybridTwoTower,
    ModelConfig,
    blend_states,
    init_state,
    load_model,
)
from shared.schemas import CatalogItem
from shared.training import (
    Examples,
    TrainConfig,
    UserSequence,
    build_sequences,
    make_examples,
    rank_fine_tuned_regions,
    rank_held_out,
    rank_with_scores,
    split_leave_last_out,
    train_local,
)

_NODE = NodeSettings.model_fields  # what a node does by default

METHODS: tuple[str, ...] = ("popularity", "local_only", "federated", "centralized", "als")
# Computed from the same training run as "federated" when both are asked for.
EXTRA_METHODS: tuple[str, ...] = ("federated_global",)
ALL_METHODS: tuple[str, ...] = METHODS + EXTRA_METHODS
NO_REGION = "all"  # region of every user when events.csv has no region column

# Confidence per event type for ALS (implicit feedback: stronger events weigh more).
_ALS_EVENT_CONFIDENCE = {1: 1.0, 2: 2.0, 3: 4.0, 4: 8.0}

# Callback: (stage name, done, total). Used for progress bars; stages may repeat.
ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class SimulationConfig:
    rounds: int = 5
    local_epochs: int = 3
    seed: int = 0
    k: int = 10
    cold_user_max_events: int = 2
    embedding_dim: int = ModelConfig.model_fields["embedding_dim"].default
    lr: float = TrainConfig.lr
    batch_size: int = TrainConfig.batch_size
    num_negatives: int = TrainConfig.num_negatives
    fedprox_mu: float = TrainConfig.fedprox_mu
    aggregation: str = DEFAULT_AGGREGATION  # the coordinator's default strategy
    personalize: bool = True  # rank each region with what its node serves (below) ...
    # ... blended with the global weights it was tuned from, like NODE_PERSONALIZE_GLOBAL_SHARE
    personal_global_share: float = DEFAULT_PERSONAL_GLOBAL_SHARE
    # Each region serves its own fine-tune of the final global model, like a node once the
    # rounds stop: NODE_PERSONALIZE_EPOCHS at NODE_PERSONALIZE_LEARNING_RATE. None: its
    # last round's local model instead (what a node serves right after a round, and all
    # nodes served before 2026-11-26; no training beyond the rounds).
    personal_epochs: int | None = _NODE["personalize_epochs"].default
    personal_lr: float = _NODE["personalize_learning_rate"].default
    # Best of a small grid on the default market (factors 8-64, regularization 0.05-5,
    # alpha 1-40), chosen on the evaluation split itself: a generous reference.
    als_factors: int = 8
    als_iterations: int = 15
    als_regularization: float = 0.1
    als_alpha: float = 2.0
    methods: tuple[str, ...] = ALL_METHODS
    threads: int | None = None

    def train_config(self, epochs: int, seed: int, *, fedprox: bool = False) -> TrainConfig:
        return TrainConfig(
            epochs=epochs,
            lr=self.lr,
            batch_size=self.batch_size,
            num_negatives=self.num_negatives,
            fedprox_mu=self.fedprox_mu if fedprox else 0.0,
            seed=seed,
        )

    def model_config(self, num_items: int) -> ModelConfig:
        return ModelConfig(num_items=num_items, embedding_dim=self.embedding_dim, seed=self.seed)


@dataclass
class Dataset:
    """A catalog plus behaviour, split leave-last-out, with the facts the report slices by."""

    items: list[CatalogItem]
    features: ItemFeatures
    train: dict[str, UserSequence]
    held_out: dict[str, int]  # user -> catalog row of the held-out item
    user_region: dict[str, str]
    train_events: dict[str, int]  # user -> raw events in the training part
    cold_items: frozenset[int]  # rows without any training interaction
    regions: list[str]  # largest first
    skipped_events: int = 0  # rows whose item is not in the catalog

    @property
    def num_items(self) -> int:
        return len(self.items)

    def users_of(self, region: str) -> list[str]:
        return [u for u, r in self.user_region.items() if r == region]

    def region_sizes(self) -> dict[str, int]:
        return dict(Counter(self.user_region.values()))


def load_dataset(data_dir: Path, *, country_buckets: int | None = None) -> Dataset:
    """Read `catalog.csv` and `events.csv` from `data_dir` and split them leave-last-out.

    Events of items missing from the catalog are skipped (counted in `skipped_events`).
    A user's region is the region of their latest event; without a region column
    every user is in one region called "all".
    """
    buckets = country_buckets or ModelConfig.model_fields["country_buckets"].default
    items = read_catalog_csv(Path(data_dir) / "catalog.csv")
    records = read_events_csv(Path(data_dir) / "events.csv")
    row_of = {item.item_id: i for i, item in enumerate(items)}
    known = [r for r in records if r.item_id in row_of]
    skipped = len(records) - len(known)

    user_region: dict[str, str] = {}
    latest: dict[str, float] = {}
    for r in known:
        ts = r.timestamp.timestamp()
        if r.user_id not in latest or ts >= latest[r.user_id]:
            latest[r.user_id] = ts
            user_region[r.user_id] = r.region or NO_REGION

    sequences = build_sequences(
        (
            (r.user_id, row_of[r.item_id], r.event_type, r.timestamp.timestamp(), r.country)
            for r in known
        ),
        country_buckets=buckets,
    )
    train, held_out = split_leave_last_out(sequences)
    # Training events: every event of the user except those on the held-out item.
    train_events: Counter[str] = Counter()
    for r in known:
        target = held_out.get(r.user_id)
        if target is None or row_of[r.item_id] != target:
            train_events[r.user_id] += 1
    seen_rows = {row for seq in train.values() for row in seq.items}
    sizes = Counter(user_region.values())
    return Dataset(
        items=items,
        features=build_item_features(items, ModelConfig.model_fields["content_buckets"].default),
        train=train,
        held_out=held_out,
        user_region=user_region,
        train_events={u: train_events.get(u, 0) for u in train},
        cold_items=frozenset(set(range(len(items))) - seen_rows),
        regions=sorted(sizes, key=lambda r: (-sizes[r], r)),
        skipped_events=skipped,
    )


# --------------------------------------------------------------------------- reporting


def summarize(ranks: Mapping[str, int], data: Dataset, config: SimulationConfig) -> dict[str, Any]:
    """Metrics overall, for cold items, cold users and per region, from per-user ranks."""
    k = config.k

    def over(users: Iterable[str]) -> dict[str, float]:
        return summarize_ranks((ranks[u] for u in users if u in ranks), k=k)

    evaluated = [u for u in data.held_out if u in ranks]
    return {
        "overall": over(evaluated),
        "cold_items": over(u for u in evaluated if data.held_out[u] in data.cold_items),
        "cold_users": over(
            u for u in evaluated if data.train_events[u] <= config.cold_user_max_events
        ),
        "regions": {
            region: over(u for u in evaluated if data.user_region[u] == region)
            for region in data.regions
        },
    }


# --------------------------------------------------------------------------- methods


def _subset(data: Dataset, users: Iterable[str]) -> tuple[dict[str, UserSequence], dict[str, int]]:
    users = list(users)
    return (
        {u: data.train[u] for u in users},
        {u: data.held_out[u] for u in users if u in data.held_out},
    )


def rank_popularity(data: Dataset) -> dict[str, int]:
    """Each region's items by number of training interactions there (ties: global count)."""
    n = data.num_items
    global_counts = torch.zeros(n, dtype=torch.float64)
    region_counts = {r: torch.zeros(n, dtype=torch.float64) for r in data.regions}
    for user, seq in data.train.items():
        rows = torch.tensor(seq.items, dtype=torch.long)
        region_counts[data.user_region[user]].index_add_(
            0, rows, torch.ones(len(rows), dtype=torch.float64)
        )
        global_counts.index_add_(0, rows, torch.ones(len(rows), dtype=torch.float64))
    tie_break = global_counts / (global_counts.max() + 1.0)
    scores = {r: c + tie_break for r, c in region_counts.items()}

    def scorer(users: Sequence[str]) -> torch.Tensor:
        return torch.stack([scores[data.user_region[u]] for u in users])

    return rank_with_scores(scorer, data.train, data.held_out)


def _fresh_model(data: Dataset, config: SimulationConfig) -> HybridTwoTower:
    model = HybridTwoTower(config.model_config(data.num_items))
    model.load_state_dict(init_state(model.config))
    return model


def _examples(data: Dataset, users: Iterable[str], max_history: int):  # type: ignore[no-untyped-def]
    return make_examples((data.train[u] for u in users), max_history)


def rank_trained_alone(
    data: Dataset,
    config: SimulationConfig,
    users: Sequence[str],
    *,
    seed: int,
    progress: ProgressFn | None = None,
    stage: str = "",
) -> dict[str, int]:
    """Train one model on `users`' data for rounds x local_epochs epochs; rank those users."""
    model = _fresh_model(data, config)
    examples = _examples(data, users, model.config.max_history)
    epochs = config.rounds * config.local_epochs
    if len(examples):
        train_local(
            model,
            data.features,
            examples,
            config.train_config(epochs, seed),
            progress=(lambda s, t, _loss: progress(stage, s, t)) if progress else None,
        )
    train, held = _subset(data, users)
    return rank_held_out(model, data.features, train, held)


def rank_local_only(
    data: Dataset, config: SimulationConfig, progress: ProgressFn | None = None
) -> dict[str, int]:
    ranks: dict[str, int] = {}
    for i, region in enumerate(data.regions):
        ranks.update(
            rank_trained_alone(
                data,
                config,
                data.users_of(region),
                seed=config.seed * 1000 + i,
                progress=progress,
                stage=f"local_only {region}",
            )
        )
    return ranks


def _offset_progress(
    progress: ProgressFn | None, stage: str, offset: int, total: int
) -> Callable[[int, int, float], None] | None:
    """A `train_local` progress callback that reports into one bar shared by several runs."""
    if progress is None:
        return None
    return lambda step, _steps, _loss: progress(stage, offset + step, total)


@dataclass
class FederatedRun:
    """The final global model and each region's model from the last round."""

    global_model: HybridTwoTower
    local_states: dict[str, StateDict]  # region -> its last local weights
    # The global weights the last round trained from (what a node blends its fine-tuned
    # weights with while it serves them).
    local_base: StateDict


def run_rounds(
    model_config: ModelConfig,
    init: StateDict,
    features: ItemFeatures,
    regions: Sequence[tuple[str, Examples]],
    *,
    rounds: int,
    strategy: str,
    train_config: Callable[[int, int], TrainConfig],
    step_progress: Callable[[int, int], Callable[[int, int, float], None] | None] | None = None,
    tamper: Callable[[str, StateDict], StateDict] | None = None,
    on_round: Callable[[int, StateDict], None] | None = None,
) -> tuple[StateDict, dict[str, StateDict], StateDict]:
    """Federated rounds in one process: every region trains the global weights with
    `train_local` (the node's function) and sends a delta; the deltas are combined with
    the coordinator's own strategy. -> (final global state, each region's last local
    state, the global state those last local states were trained from)

    `train_config(round, region index)` gives each local run its config (and seed);
    `step_progress(round, steps done this round)` its progress callback; `tamper(region,
    delta)` may rewrite a delta before aggregation (the poisoning experiment);
    `on_round(round, state)` sees the global state after each round (1-based).
    """
    aggregator = make_strategy(strategy)
    state = base = init
    local_states: dict[str, StateDict] = {}
    for rnd in range(rounds):
        base = state
        done = 0
        updates: list[tuple[StateDict, int]] = []
        for i, (region, examples) in enumerate(regions):
            if not len(examples):
                continue
            local = HybridTwoTower(model_config)
            local.load_state_dict(state)
            result = train_local(
                local,
                features,
                examples,
                train_config(rnd, i),
                progress=step_progress(rnd, done) if step_progress is not None else None,
            )
            done += result.steps
            new_state = {k: v.detach().clone() for k, v in local.state_dict().items()}
            local_states[region] = new_state
            delta = compute_delta(new_state, state)
            if tamper is not None:
                delta = tamper(region, delta)
            updates.append((delta, result.num_examples))
        if updates:
            state = apply_delta(
                state,
                aggregator.aggregate(updates if not aggregator.streaming else iter(updates)),
            )
        if on_round is not None:
            on_round(rnd + 1, state)
    return state, local_states, base


def train_federated(
    data: Dataset,
    config: SimulationConfig,
    progress: ProgressFn | None = None,
    *,
    on_round: Callable[[int, HybridTwoTower], None] | None = None,
) -> FederatedRun:
    """Rounds over the regions, aggregated with the coordinator's strategy `config.aggregation`."""
    global_model = _fresh_model(data, config)
    per_region = [
        (region, _examples(data, data.users_of(region), global_model.config.max_history))
        for region in data.regions
    ]
    total_steps = sum(
        math.ceil(len(ex) / config.batch_size) * config.local_epochs for _, ex in per_region
    )

    def round_done(rnd: int, state: StateDict) -> None:
        if on_round is not None:
            global_model.load_state_dict(state)
            on_round(rnd, global_model)

    state, local_states, last_base = run_rounds(
        global_model.config,
        {k: v.detach().clone() for k, v in global_model.state_dict().items()},
        data.features,
        per_region,
        rounds=config.rounds,
        strategy=config.aggregation,
        train_config=lambda rnd, i: config.train_config(
            config.local_epochs, config.seed * 1000 + rnd * 100 + i, fedprox=True
        ),
        step_progress=lambda rnd, done: _offset_progress(
            progress, f"federated round {rnd + 1}", done, total_steps
        ),
        on_round=round_done,
    )
    global_model.load_state_dict(state)
    global_model.eval()
    return FederatedRun(global_model, local_states, last_base)


def rank_served(
    global_model: HybridTwoTower,
    features: ItemFeatures,
    local_states: Mapping[str, StateDict],
    local_base: StateDict,
    region_users: Iterable[tuple[str, dict[str, UserSequence], dict[str, int]]],
    global_share: float,
) -> dict[str, int]:
    """Each region's users (region, training sequences, held-out rows) ranked by what its
    node serves: its last local model blended with the global weights it was trained
    from (`global_share` of those, as `NODE_PERSONALIZE_GLOBAL_SHARE` does on a node), or
    the global model alone if the region had no local model."""
    ranks: dict[str, int] = {}
    for region, train, held in region_users:
        state = local_states.get(region)
        model = global_model
        if state is not None:
            model = load_model(global_model.config, blend_states(state, local_base, global_share))
        ranks.update(rank_held_out(model, features, train, held))
    return ranks


def rank_personalized(
    data: Dataset, run: FederatedRun, global_share: float = 0.0
) -> dict[str, int]:
    """`rank_served` for a simulation's regions and federated run."""
    return rank_served(
        run.global_model,
        data.features,
        run.local_states,
        run.local_base,
        ((region, *_subset(data, data.users_of(region))) for region in data.regions),
        global_share,
    )


def rank_fine_tuned(
    data: Dataset, run: FederatedRun, config: SimulationConfig, epochs: int
) -> dict[str, int]:
    """Each region's users ranked by its own fine-tune of the final global model
    (`epochs` at `personal_lr`, blended with `personal_global_share` of the global
    weights): what a node serves once the rounds stop (NODE_PERSONALIZE_EPOCHS at
    NODE_PERSONALIZE_LEARNING_RATE)."""
    global_state = {k: v.detach().clone() for k, v in run.global_model.state_dict().items()}
    model = HybridTwoTower(run.global_model.config)

    def regions() -> Iterator[
        tuple[Examples, dict[str, UserSequence], dict[str, int], TrainConfig]
    ]:
        for i, region in enumerate(data.regions):
            train, held = _subset(data, data.users_of(region))
            tune = replace(
                config.train_config(
                    epochs,
                    config.seed * 1000 + 999 - i,  # apart from the rounds' seeds
                ),
                lr=config.personal_lr,
            )
            yield make_examples(train.values(), model.config.max_history), train, held, tune

    return rank_fine_tuned_regions(
        global_state, model, data.features, regions(), config.personal_global_share
    )


class _FederatedRanker:
    """`federated` and `federated_global` from one training run (one per simulation)."""

    def __init__(self) -> None:
        self._run: FederatedRun | None = None

    def run(
        self, data: Dataset, config: SimulationConfig, progress: ProgressFn | None
    ) -> FederatedRun:
        if self._run is None:
            self._run = train_federated(data, config, progress)
        return self._run

    def personalized(
        self, data: Dataset, config: SimulationConfig, progress: ProgressFn | None = None
    ) -> dict[str, int]:
        if not config.personalize:
            return self.global_only(data, config, progress)
        run = self.run(data, config, progress)
        if config.personal_epochs is not None:
            return rank_fine_tuned(data, run, config, config.personal_epochs)
        return rank_personalized(data, run, config.personal_global_share)

    def global_only(
        self, data: Dataset, config: SimulationConfig, progress: ProgressFn | None = None
    ) -> dict[str, int]:
        run = self.run(data, config, progress)
        return rank_held_out(run.global_model, data.features, data.train, data.held_out)


def rank_federated(
    data: Dataset, config: SimulationConfig, progress: ProgressFn | None = None
) -> dict[str, int]:
    return _FederatedRanker().personalized(data, config, progress)


def rank_centralized(
    data: Dataset, config: SimulationConfig, progress: ProgressFn | None = None
) -> dict[str, int]:
    return rank_trained_alone(
        data, config, list(data.train), seed=config.seed, progress=progress, stage="centralized"
    )


def rank_als(
    data: Dataset, config: SimulationConfig, progress: ProgressFn | None = None
) -> dict[str, int]:
    """`implicit` ALS on the pooled training interactions, confidence by event type."""
    try:
        from implicit.als import AlternatingLeastSquares
        from scipy.sparse import csr_matrix
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "the als method needs the eval extra: pip install 'fedjewel[eval]'"
        ) from exc
    users = list(data.train)
    index = {u: i for i, u in enumerate(users)}
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    for u, seq in data.train.items():
        for item, etype in zip(seq.items, seq.types, strict=True):
            rows.append(index[u])
            cols.append(item)
            vals.append(_ALS_EVENT_CONFIDENCE.get(etype, 1.0))
    matrix = csr_matrix(
        (np.asarray(vals, dtype=np.float32), (rows, cols)),
        shape=(len(users), data.num_items),
    )
    als = AlternatingLeastSquares(
        factors=config.als_factors,
        regularization=config.als_regularization,
        alpha=config.als_alpha,
        iterations=config.als_iterations,
        random_state=config.seed,
        num_threads=config.threads or 0,
        calculate_training_loss=False,
    )
    done = 0

    def callback(_iteration: int, _elapsed: float, _loss: float) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress("als", done, config.als_iterations)

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - implicit depends on threadpoolctl
        als.fit(matrix, show_progress=False, callback=callback)
    else:
        # implicit parallelises itself; a multi-threaded BLAS underneath only oversubscribes.
        with threadpool_limits(1, "blas"):
            als.fit(matrix, show_progress=False, callback=callback)
    user_factors = torch.from_numpy(np.asarray(als.user_factors, dtype=np.float32))
    item_factors = torch.from_numpy(np.asarray(als.item_factors, dtype=np.float32))

    def scorer(chunk: Sequence[str]) -> torch.Tensor:
        idx = torch.tensor([index[u] for u in chunk], dtype=torch.long)
        return user_factors[idx] @ item_factors.T

    return rank_with_scores(scorer, data.train, data.held_out)


Ranker = Callable[[Dataset, SimulationConfig, ProgressFn | None], dict[str, int]]


def _rankers() -> dict[str, Ranker]:
    federated = _FederatedRanker()  # one training run serves both federated methods
    return {
        "popularity": lambda d, _c, _p: rank_popularity(d),
        "local_only": rank_local_only,
        "federated": federated.personalized,
        "federated_global": federated.global_only,
        "centralized": rank_centralized,
        "als": rank_als,
    }


@dataclass
class SimulationReport:
    config: dict[str, Any]
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"config": self.config, "results": self.results}


def run_simulation(
    data_dir: Path,
    config: SimulationConfig,
    *,
    progress: ProgressFn | None = None,
    data: Dataset | None = None,
) -> SimulationReport:
    rankers = _rankers()
    unknown = [m for m in config.methods if m not in rankers]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(ALL_METHODS)}")
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    data = data or load_dataset(data_dir)
    report = SimulationReport(
        config={
            **{k: v for k, v in asdict(config).items() if k != "methods"},
            "methods": list(config.methods),
            "data": str(data_dir),
            "items": data.num_items,
            "users": len(data.train),
            "evaluated_users": len(data.held_out),
            "cold_items": len(data.cold_items),
            "regions": data.region_sizes(),
            "skipped_events": data.skipped_events,
            "split": "leave-last-out (each user's last new item; users with >= 2 items)",
            "ranking": "full catalog minus the user's training items",
        }
    )
    for method in config.methods:
        start = time.perf_counter()
        ranks = rankers[method](data, config, progress)
        report.seconds[method] = time.perf_counter() - start
        report.results[method] = summarize(ranks, data, config)
    return report
