"""Turning behaviour events into training examples, local training and evaluation.

Pure functions over tensors: the node's trainer, `fedjewel simulate` and the
benchmarks all call these, so what is evaluated is exactly what is deployed.

A user's *interaction sequence* is the list of distinct items the user touched,
in order of first contact, each with the strongest event type seen for it.
Training predicts each next new item from the items before it, each of them with
the strongest type seen *before* that next item was first touched: a purchase made
later is not known yet (and serving builds its history by the same rule,
`UserSequence.add`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn import functional as F

from shared.features import ItemFeatures, country_bucket
from shared.metrics import summarize_ranks
from shared.model import EVENT_TYPE_IDS, HybridTwoTower, blend_states, sampled_softmax_loss


@dataclass
class UserSequence:
    items: list[int] = field(default_factory=list)  # catalog rows, first-contact order
    types: list[int] = field(default_factory=list)  # strongest event type id per item
    country: int = 0  # country bucket of the latest event
    # When each item was first touched; empty for a sequence made without times (then
    # `types` and `country` are all that is known, at every position).
    first_seen: list[float] = field(default_factory=list, compare=False)
    # Position -> (time, type id) of the item's first contact and of each later event
    # that raised its strongest type; only items whose type rose are here.
    upgrades: dict[int, list[tuple[float, int]]] = field(default_factory=dict, compare=False)
    # (time, bucket) each time the user's country changed; empty: `country` throughout.
    countries: list[tuple[float, int]] = field(default_factory=list, compare=False)
    _position: dict[int, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def add(self, item: int, type_id: int, ts: float, country: int | None = None) -> None:
        """One event, in time order: a new item is appended, a known one may get a
        stronger type. The one rule for training sequences and serving histories."""
        had_items = bool(self.items)
        if len(self._position) != len(self.items):  # made from lists, or compacted
            self._position = {row: i for i, row in enumerate(self.items)}
            if len(self.first_seen) != len(self.items):  # its types known from the start
                self.first_seen = [-math.inf] * len(self.items)
        pos = self._position.get(item)
        if pos is None:
            self._position[item] = len(self.items)
            self.items.append(item)
            self.types.append(type_id)
            self.first_seen.append(ts)
        elif type_id > self.types[pos]:
            log = self.upgrades.get(pos)
            if log is None:
                log = self.upgrades[pos] = [(self.first_seen[pos], self.types[pos])]
            log.append((ts, type_id))
            self.types[pos] = type_id
        if country is not None and country != self.country:
            if not self.countries and had_items:  # the country before this one
                self.countries.append((-math.inf, self.country))
            self.countries.append((ts, country))
            self.country = country

    def compact(self) -> None:
        """Drop the item -> position index `add` keeps (rebuilt if `add` is called again)."""
        self._position = {}

    def _cutoff(self, t: int) -> float | None:
        """When items[t] was first touched; None when unknown (no times, or no items[t])."""
        if t >= len(self.items) or len(self.first_seen) != len(self.items):
            return None
        return self.first_seen[t]

    def types_window(self, lo: int, t: int) -> list[int]:
        """Types of items[lo:t] as they stood when items[t] was first touched (events
        at that same instant or later not counted)."""
        out = self.types[lo:t]
        cutoff = self._cutoff(t)
        if cutoff is None or not self.upgrades:
            return out
        if len(self.upgrades) <= t - lo:
            for pos, log in self.upgrades.items():
                if lo <= pos < t:
                    out[pos - lo] = _type_before(log, cutoff)
        else:  # many upgraded items, a short window: look up the window's own
            for pos in range(lo, t):
                upgraded = self.upgrades.get(pos)
                if upgraded is not None:
                    out[pos - lo] = _type_before(upgraded, cutoff)
        return out

    def country_at(self, t: int) -> int:
        """The country bucket of the user's newest event before items[t] was first touched."""
        cutoff = self._cutoff(t)
        if cutoff is None or not self.countries:
            return self.country
        bucket = self.countries[0][1]
        for ts, changed in self.countries:
            if ts >= cutoff:
                break
            bucket = changed
        return bucket

    def before(self, t: int) -> UserSequence:
        """items[:t] with only what was known when items[t] was first touched."""
        cutoff = self._cutoff(t)
        if cutoff is None:
            return UserSequence(self.items[:t], self.types[:t], self.country)
        upgrades = {}
        for pos, log in self.upgrades.items():
            kept = [e for i, e in enumerate(log) if i == 0 or e[0] < cutoff]
            if pos < t and len(kept) > 1:
                upgrades[pos] = kept
        return UserSequence(
            self.items[:t],
            self.types_window(0, t),
            self.country_at(t),
            self.first_seen[:t],
            upgrades,
            [c for i, c in enumerate(self.countries) if i == 0 or c[0] < cutoff],
        )


def _type_before(log: list[tuple[float, int]], cutoff: float) -> int:
    type_id = log[0][1]
    for ts, upgraded in log[1:]:
        if ts >= cutoff:
            break
        type_id = upgraded
    return type_id


def build_sequences(
    events: Iterable[tuple[str, int, str, float, str | None]],
    *,
    country_buckets: int,
) -> dict[str, UserSequence]:
    """Events are (user_key, item_row, event_type, unix_time, country), in any order."""
    rows = sorted(events, key=lambda e: (e[0], e[3]))
    out: dict[str, UserSequence] = {}
    for user, item, etype, ts, country in rows:
        seq = out.get(user)
        if seq is None:
            seq = out[user] = UserSequence()
        bucket = country_bucket(country, country_buckets) if country else None
        seq.add(item, EVENT_TYPE_IDS[etype], ts, bucket)
    for seq in out.values():
        seq.compact()
    return out


@dataclass(frozen=True)
class Examples:
    """Next-item examples, histories left-padded so the last column is the newest."""

    history: torch.Tensor  # (n, L) item rows, 0 where padded
    history_types: torch.Tensor  # (n, L) event type ids, 0 = padding
    country: torch.Tensor  # (n,)
    target: torch.Tensor  # (n,)

    def __len__(self) -> int:
        return int(self.target.shape[0])


def _pack(
    histories: Sequence[tuple[Sequence[int], Sequence[int]]], max_history: int
) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(histories)
    hist = np.zeros((n, max_history), dtype=np.int64)
    types = np.zeros((n, max_history), dtype=np.int64)
    for i, (items, tys) in enumerate(histories):
        items = items[-max_history:]
        tys = tys[-max_history:]
        if items:
            hist[i, -len(items) :] = items
            types[i, -len(tys) :] = tys
    return torch.from_numpy(hist), torch.from_numpy(types)


def make_examples(sequences: Iterable[UserSequence], max_history: int) -> Examples:
    """Every position after the first becomes a target predicted from what came before."""
    histories: list[tuple[Sequence[int], Sequence[int]]] = []
    countries: list[int] = []
    targets: list[int] = []
    for seq in sequences:
        for t in range(1, len(seq.items)):
            lo = max(0, t - max_history)
            histories.append((seq.items[lo:t], seq.types_window(lo, t)))
            countries.append(seq.country_at(t))
            targets.append(seq.items[t])
    hist, types = _pack(histories, max_history)
    return Examples(
        history=hist,
        history_types=types,
        country=torch.tensor(countries, dtype=torch.long),
        target=torch.tensor(targets, dtype=torch.long),
    )


def split_leave_last_out(
    sequences: dict[str, UserSequence],
) -> tuple[dict[str, UserSequence], dict[str, int]]:
    """Hold out each user's last new item (users with at least two items)."""
    train: dict[str, UserSequence] = {}
    held_out: dict[str, int] = {}
    for user, seq in sequences.items():
        if len(seq.items) >= 2:
            train[user] = seq.before(len(seq.items) - 1)
            held_out[user] = seq.items[-1]
        else:
            train[user] = seq
    return train, held_out


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    lr: float = 0.01
    batch_size: int = 256
    num_negatives: int = 1024  # shared uniform negatives per batch; >= catalog: full softmax
    fedprox_mu: float = 0.0  # proximal term towards the round's base weights
    weight_decay: float = 0.0
    # Share of item rows whose id embedding is dropped per step, so the content tower
    # learns to rank alone: the vector a brand-new item gets. 0 disables it.
    id_dropout: float = 0.4
    seed: int = 0
    max_steps: int | None = None
    # Catalogs up to this size compute every item vector once per step instead of
    # gathering the batch's rows (faster on CPU below ~10k items; same gradients).
    full_catalog_rows: int = 10_000
    # Where sampled negatives come from: "seen" = items that occur in this node's
    # examples (an item nobody interacted with is never pushed down, so a new item
    # keeps the content-only score its id-less vector gives it), "catalog" = every row.
    negatives_from: str = "seen"
    optimizer: str = "adam"  # or "sgd" (plain gradient steps: DP user units, docs/privacy.md)


@dataclass(frozen=True)
class TrainResult:
    loss: float
    num_examples: int
    steps: int


ProgressFn = Callable[[int, int, float], None]


def train_local(
    model: HybridTwoTower,
    features: ItemFeatures,
    examples: Examples,
    config: TrainConfig,
    *,
    progress: ProgressFn | None = None,
    epoch_end: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train in place with sampled softmax; returns the mean loss of the last epoch.

    `epoch_end(e)` is called after each epoch `e` (1-based; the last may be cut short by
    `max_steps`), the model in eval mode.
    """
    n = len(examples)
    if n == 0:
        return TrainResult(loss=float("nan"), num_examples=0, steps=0)
    g = torch.Generator().manual_seed(config.seed)
    base = (
        {k: v.detach().clone() for k, v in model.named_parameters()}
        if config.fedprox_mu > 0
        else None
    )
    params = [p for p in model.parameters() if p.requires_grad]
    opt: torch.optim.Optimizer = (
        torch.optim.SGD(params, lr=config.lr, weight_decay=config.weight_decay)
        if config.optimizer == "sgd"
        else torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    )
    model.train()
    num_rows = features.num_items
    neg_pool = _negative_pool(examples, num_rows, config.negatives_from)
    steps_per_epoch = math.ceil(n / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    step = 0
    epoch_loss = 0.0
    for _epoch in range(config.epochs):
        perm = torch.randperm(n, generator=g)
        epoch_loss = 0.0
        batches = 0
        for start in range(0, n, config.batch_size):
            if step >= total_steps:
                break
            idx = perm[start : start + config.batch_size]
            hist = examples.history[idx]
            types = examples.history_types[idx]
            target = examples.target[idx]
            countries = examples.country[idx]
            if num_rows <= config.full_catalog_rows:
                # Small catalog: one pass over every row is cheaper than unique + gather.
                keep = None
                if config.id_dropout > 0:
                    keep = torch.rand(num_rows, generator=g) >= config.id_dropout
                vecs = model.item_vectors(features, id_keep=keep)  # (num_rows, d)
                users = model.user_vectors(vecs[hist], types, countries)  # (b, d)
                if neg_pool is None and config.num_negatives >= num_rows:
                    loss = F.cross_entropy(users @ vecs.T, target)  # full softmax
                else:
                    neg = _sample_negatives(neg_pool, num_rows, config.num_negatives, g)
                    loss = sampled_softmax_loss(users, vecs[target], vecs[neg], target, neg)
            else:
                neg = _sample_negatives(neg_pool, num_rows, config.num_negatives, g)
                rows, inverse = torch.unique(
                    torch.cat([hist.reshape(-1), target, neg]), return_inverse=True
                )
                keep = None
                if config.id_dropout > 0:
                    keep = torch.rand(rows.numel(), generator=g) >= config.id_dropout
                vecs = model.item_vectors(features, rows, id_keep=keep)  # (u, d)
                nh = hist.numel()
                hist_vecs = vecs[inverse[:nh]].reshape(*hist.shape, -1)
                pos_vecs = vecs[inverse[nh : nh + target.numel()]]
                neg_vecs = vecs[inverse[nh + target.numel() :]]
                users = model.user_vectors(hist_vecs, types, countries)
                loss = sampled_softmax_loss(users, pos_vecs, neg_vecs, target, neg)
            if base is not None:
                prox = sum(((p - base[name]) ** 2).sum() for name, p in model.named_parameters())
                loss = loss + 0.5 * config.fedprox_mu * prox
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            batches += 1
            epoch_loss += float(loss.detach())
            if progress is not None:
                progress(step, total_steps, float(loss.detach()))
        epoch_loss = epoch_loss / max(batches, 1)
        if epoch_end is not None:
            model.eval()
            epoch_end(_epoch + 1)
            model.train()
        if step >= total_steps:
            break
    model.eval()
    return TrainResult(loss=epoch_loss, num_examples=n, steps=step)


SOUP_SEED_STRIDE = 1000  # fine-tune i of a soup is seeded config.seed + i * this


def mean_state(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The tensor-by-tensor mean of states of one model (a soup); integer tensors, which
    training does not change, are the first state's."""
    if not states:
        raise ValueError("no states to average")
    return {
        k: torch.stack([s[k] for s in states]).mean(0) if v.is_floating_point() else v
        for k, v in states[0].items()
    }


def fine_tuned_state(
    model: HybridTwoTower,
    state: dict[str, torch.Tensor],
    features: ItemFeatures,
    examples: Examples,
    config: TrainConfig,
    base_share: float,
    soup: int = 1,
) -> dict[str, torch.Tensor]:
    """What a personalizing node serves from the global `state`: `model` (of the state's
    config) fine-tuned on the region's `examples`, blended with `base_share` of `state`.

    `soup` > 1: the mean of that many fine-tunes from `state` that differ only in their
    seed (negatives and batch order), a "model soup" (Wortsman et al., 2022), blended.
    With no examples the global state itself. `model` is left holding the result.
    """
    if soup < 1:
        raise ValueError(f"soup must be at least 1, not {soup}")
    model.load_state_dict(state)
    if len(examples) == 0:
        return state
    tuned, _result = train_soup(model, state, features, examples, config, soup)
    served = blend_states(tuned, state, base_share)
    model.load_state_dict(served)
    return served


def train_soup(
    model: HybridTwoTower,
    state: dict[str, torch.Tensor],
    features: ItemFeatures,
    examples: Examples,
    config: TrainConfig,
    soup: int,
    progress: ProgressFn | None = None,
) -> tuple[dict[str, torch.Tensor], TrainResult]:
    """(the mean of `soup` trainings of `model` from `state`, seeded SOUP_SEED_STRIDE
    apart; the last training's result). A soup of 1 is one plain training."""
    if soup < 1:
        raise ValueError(f"soup must be at least 1, not {soup}")
    trained: list[dict[str, torch.Tensor]] = []
    for i in range(soup):
        model.load_state_dict(state)
        seeded = dataclasses.replace(config, seed=config.seed + i * SOUP_SEED_STRIDE)
        result = train_local(model, features, examples, seeded, progress=progress)
        trained.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return mean_state(trained), result


def select_fine_tune_epochs(
    model: HybridTwoTower,
    state: dict[str, torch.Tensor],
    features: ItemFeatures,
    sequences: dict[str, UserSequence],
    config: TrainConfig,
    base_share: float,
    progress: ProgressFn | None = None,
) -> tuple[int, list[float]]:
    """How many epochs (1 to `config.epochs`) of fine-tuning the global `state` serve a
    region best, judged on its own data: each user's last training item is held out, the
    rest fine-tuned, and HR@10 of the blended model measured after every epoch.

    Returns (best epochs, HR@10 after each epoch); ties go to fewer epochs. With no user
    to hold out, (config.epochs, []). `progress` is `train_local`'s (a node stops a
    preemptible fine-tune from it).
    """
    fit, val = split_leave_last_out(sequences)
    examples = make_examples(fit.values(), model.config.max_history)
    judge = HybridTwoTower(model.config)
    curve: list[float] = []

    def measure(_epoch: int) -> None:
        judge.load_state_dict(blend_states(model.state_dict(), state, base_share))
        ranks = rank_held_out(judge, features, fit, val)
        curve.append(summarize_ranks(ranks.values(), k=10)["hr@10"])

    model.load_state_dict(state)
    if len(examples) == 0 or not val:
        return config.epochs, curve
    train_local(model, features, examples, config, progress=progress, epoch_end=measure)
    if not curve:  # no epoch ran (0 epochs)
        return config.epochs, curve
    best = max(range(len(curve)), key=lambda i: (curve[i], -i))
    return best + 1, curve


def rank_fine_tuned_regions(
    state: dict[str, torch.Tensor],
    model: HybridTwoTower,
    features: ItemFeatures,
    regions: Iterable[tuple[Examples, dict[str, UserSequence], dict[str, int], TrainConfig]],
    base_share: float,
    soup: int = 1,
) -> dict[str, int]:
    """Each region's users ranked by what its node serves: the global `state` fine-tuned on
    the region's (examples, with its own config) and blended (`fine_tuned_state`).

    `regions`: (training examples, users' training sequences, held-out rows, fine-tune
    config) per region; `model` (of the state's config) is reused for each.
    """
    ranks: dict[str, int] = {}
    for examples, train, held, tune in regions:
        fine_tuned_state(model, state, features, examples, tune, base_share, soup)
        ranks.update(rank_held_out(model, features, train, held))
    return ranks


def _negative_pool(examples: Examples, num_rows: int, source: str) -> torch.Tensor | None:
    """Rows negatives are drawn from; None means the whole catalog."""
    if source == "catalog":
        return None
    if source != "seen":
        raise ValueError(f"negatives_from must be 'seen' or 'catalog', not {source!r}")
    rows = torch.cat([examples.target, examples.history[examples.history_types > 0]])
    pool = torch.unique(rows[rows < num_rows])
    return pool if pool.numel() < num_rows else None


def _sample_negatives(
    pool: torch.Tensor | None, num_rows: int, k: int, g: torch.Generator
) -> torch.Tensor:
    if pool is None:
        return torch.randint(0, num_rows, (min(k, num_rows),), generator=g)
    return pool[torch.randint(0, pool.numel(), (min(k, pool.numel()),), generator=g)]


@torch.no_grad()
def score_users(
    model: HybridTwoTower,
    item_vecs: torch.Tensor,  # (num_rows, d) precomputed
    histories: Sequence[tuple[Sequence[int], Sequence[int]]],
    countries: Sequence[int],
) -> torch.Tensor:
    """Scores of every catalog row for each user. -> (b, num_rows)"""
    hist, types = _pack(histories, model.config.max_history)
    users = model.user_vectors(item_vecs[hist], types, torch.tensor(countries, dtype=torch.long))
    return users @ item_vecs.T


@torch.no_grad()
def rank_held_out(
    model: HybridTwoTower,
    features: ItemFeatures,
    train: dict[str, UserSequence],
    held_out: dict[str, int],
    *,
    batch_size: int = 512,
) -> dict[str, int]:
    """0-based rank of each user's held-out item over the full catalog minus training items."""
    model.eval()
    item_vecs = model.item_vectors(features)
    users = list(held_out)
    ranks: dict[str, int] = {}
    for start in range(0, len(users), batch_size):
        chunk = users[start : start + batch_size]
        seqs = [train[u] for u in chunk]
        scores = score_users(
            model, item_vecs, [(s.items, s.types) for s in seqs], [s.country for s in seqs]
        )
        ranks.update(_ranks_from_scores(scores, chunk, seqs, held_out))
    return ranks


def _ranks_from_scores(
    scores: torch.Tensor,
    users: Sequence[str],
    seqs: Sequence[UserSequence],
    held_out: dict[str, int],
) -> dict[str, int]:
    out: dict[str, int] = {}
    for i, (user, seq) in enumerate(zip(users, seqs, strict=True)):
        row = scores[i].clone()
        if seq.items:
            row[torch.tensor(seq.items, dtype=torch.long)] = float("-inf")
        score = row[held_out[user]]
        if not bool(torch.isfinite(score)):
            out[user] = row.numel()  # a NaN or infinite score is never a hit
            continue
        # Ties count against the held-out item, and a NaN elsewhere ranks above it: a
        # constant (or diverged) scorer must not look perfect.
        row = torch.nan_to_num(row, nan=float("inf"))
        out[user] = int((row >= score).sum()) - 1
    return out


def rank_with_scores(
    scores_fn: Callable[[Sequence[str]], torch.Tensor],
    train: dict[str, UserSequence],
    held_out: dict[str, int],
    *,
    batch_size: int = 512,
) -> dict[str, int]:
    """Same protocol as `rank_held_out` for any scorer (popularity, ALS, ...)."""
    users = list(held_out)
    ranks: dict[str, int] = {}
    for start in range(0, len(users), batch_size):
        chunk = users[start : start + batch_size]
        scores = scores_fn(chunk)
        ranks.update(_ranks_from_scores(scores, chunk, [train[u] for u in chunk], held_out))
    return ranks
