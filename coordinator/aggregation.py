"""Aggregation math: pure functions over `dict[str, Tensor]`, keyed by parameter name.

`aggregate_weighted_mean` streams: it holds one running sum the size of the
model and reads updates one at a time, so memory is O(model), not
O(model x updates). The robust strategies (norm clipping, coordinate-wise
trimmed mean and median, Multi-Krum) need all of a round's updates at once.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence

import torch

StateDict = dict[str, torch.Tensor]


class UpdateMismatchError(ValueError):
    """An update does not fit the model it claims to update."""


_FINITE_CHUNK = 1 << 20


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in `t`, checked a million entries at a time.

    `torch.isfinite` on a whole tensor allocates an `abs()` copy as large as the
    tensor itself: for a model-sized update, one more model of memory.
    """
    return all(bool(torch.isfinite(c).all()) for c in t.reshape(-1).split(_FINITE_CHUNK))


def check_compatible(
    update: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]
) -> None:
    """Same parameter names, shapes and dtypes as the reference; every value finite."""
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing parameters {missing[:5]}")
        if extra:
            parts.append(f"unexpected parameters {extra[:5]}")
        raise UpdateMismatchError("; ".join(parts))
    for name, ref in reference.items():
        t = update[name]
        if tuple(t.shape) != tuple(ref.shape):
            raise UpdateMismatchError(
                f"parameter {name!r} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}"
            )
        if t.dtype != ref.dtype:
            raise UpdateMismatchError(
                f"parameter {name!r} has dtype {t.dtype}, expected {ref.dtype}"
            )
        if t.is_floating_point() and not all_finite(t):
            raise UpdateMismatchError(f"parameter {name!r} contains NaN or Inf")


_ROW_CHUNK = 4096


def touched_rows(t: torch.Tensor) -> torch.Tensor:
    """(rows,) bool: which rows (first axis) of `t` hold any non-zero value.

    Computed a few thousand rows at a time, so the temporary is small even for a
    50k-row embedding table.
    """
    flat = t.reshape(t.shape[0], -1)
    return torch.cat(
        [chunk.ne(0).any(dim=1) for chunk in flat.split(_ROW_CHUNK)]
        or [torch.zeros(0, dtype=torch.bool)]
    )


class WeightedMeanAccumulator:
    """Running Σ n_k · Δ_k and Σ n_k; `result()` gives Σ n_k/n · Δ_k.

    `dtype` is the running sum's dtype: float64 (default) for exactness in
    tests, or None to sum in each parameter's own dtype, which halves the
    aggregator's memory (the coordinator's choice: float32 over 50 updates
    loses about 50 ulp, far below the noise of training).

    `rowwise=True` is FedAvg per row ("fedavg_rows"): each row of a tensor with
    two or more dimensions is divided by the examples of the updates that changed
    that row, not by every update's. Embedding tables are sparse: the rows of a
    region's countries, or of items only one region's shoppers touched, are left
    exactly unchanged by the other nodes, and the plain mean shrinks such a row's
    step by n_k/n (a 5% region moves its own country vector 5% of the way).
    Dense layers are changed in every row by every node, so for them, and for
    1-D tensors, it is plain FedAvg. A row no update changed stays unchanged.

    `add(..., sparse=True)` (an update in a sparse encoding such as top-k, whose
    zeros mean "not sent") counts that update per row in either mode: the plain
    mean then divides each row by the examples of every dense update plus those of
    the sparse updates that sent the row. With dense updates only, plain FedAvg is
    unchanged; with sparse updates only, it equals `rowwise=True`.
    """

    def __init__(self, *, dtype: torch.dtype | None = torch.float64, rowwise: bool = False) -> None:
        self._sum: StateDict | None = None
        self._reference: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None
        self._dtype = dtype
        self._rowwise = rowwise
        self._row_examples: dict[str, torch.Tensor] = {}  # name -> (rows,) float64
        self._every_row_examples = 0  # examples of updates counted in every row
        self.total_examples = 0
        self.count = 0

    def add(
        self, update: Mapping[str, torch.Tensor], num_examples: int, *, sparse: bool = False
    ) -> None:
        if num_examples <= 0:
            raise ValueError("num_examples must be positive")
        if self._sum is None:
            self._sum = {
                k: v.to(self._dtype or v.dtype, copy=True).mul_(num_examples)
                for k, v in update.items()
            }
            # Only names, shapes and dtypes: keeping the first update alive would cost a model.
            self._reference = {k: (tuple(v.shape), v.dtype) for k, v in update.items()}
        else:
            assert self._reference is not None
            check_compatible(
                update,
                {k: torch.empty((), dtype=d).expand(s) for k, (s, d) in self._reference.items()},
            )
            for name, value in update.items():
                self._sum[name].add_(value.to(self._sum[name].dtype), alpha=num_examples)
        if self._rowwise or sparse:
            for name, value in update.items():
                if value.dim() >= 2:
                    rows = touched_rows(value).to(torch.float64).mul_(num_examples)
                    seen = self._row_examples.get(name)
                    self._row_examples[name] = rows if seen is None else seen.add_(rows)
        else:
            self._every_row_examples += num_examples
        self.total_examples += num_examples
        self.count += 1

    def _divide_(self, name: str, total: torch.Tensor) -> torch.Tensor:
        """Σ n_k·Δ_k ÷ (Σ n_k, or per row the examples of the updates counted in the row)."""
        rows = self._row_examples.get(name)
        if rows is None:
            return total.div_(float(self.total_examples))
        # Untouched rows have a zero sum; dividing them by 1 keeps them zero.
        div = rows.add(float(self._every_row_examples)).clamp_(min=1.0).to(total.dtype)
        return total.div_(div.reshape(-1, *([1] * (total.dim() - 1))))

    def result(self) -> StateDict:
        if self._sum is None or self._reference is None:
            raise ValueError("no updates to aggregate")
        return {
            k: self._divide_(k, v.clone()).to(self._reference[k][1]) for k, v in self._sum.items()
        }

    def take_result(self) -> StateDict:
        """`result()` computed in place: no second model-sized buffer; the accumulator is spent."""
        if self._sum is None or self._reference is None:
            raise ValueError("no updates to aggregate")
        out = {k: self._divide_(k, v).to(self._reference[k][1]) for k, v in self._sum.items()}
        self._sum = None
        return out


def aggregate_weighted_mean(
    updates: Iterable[tuple[Mapping[str, torch.Tensor], int]], *, rowwise: bool = False
) -> StateDict:
    """Sample-weighted FedAvg: Σ n_k/n · w_k over (weights, num_examples) pairs.

    `rowwise=True`: per row, over the updates that changed the row (see
    `WeightedMeanAccumulator`)."""
    acc = WeightedMeanAccumulator(rowwise=rowwise)
    for update, num_examples in updates:
        acc.add(update, num_examples)
    return acc.result()


def apply_delta(base: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> StateDict:
    check_compatible(delta, base)
    return {name: base[name] + delta[name] for name in base}


def apply_delta_in_place(
    delta: dict[str, torch.Tensor], base: Mapping[str, torch.Tensor]
) -> StateDict:
    """`apply_delta` that writes base + delta into the delta's own tensors (no new model)."""
    check_compatible(delta, base)
    for name, value in delta.items():
        value.add_(base[name])
    return delta


def compute_delta(new: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> StateDict:
    check_compatible(new, base)
    return {name: new[name] - base[name] for name in base}


def weighted_metrics(metrics: Iterable[tuple[Mapping[str, float], int]]) -> dict[str, float]:
    """Example-weighted mean of each metric name over the updates that report it."""
    sums: dict[str, float] = {}
    weights: dict[str, int] = {}
    for values, n in metrics:
        for name, value in values.items():
            sums[name] = sums.get(name, 0.0) + float(value) * n
            weights[name] = weights.get(name, 0) + n
    means = {name: sums[name] / weights[name] for name in sums if weights[name] > 0}
    return {name: v for name, v in means.items() if math.isfinite(v)}  # JSON holds no inf


# Robust aggregation ------------------------------------------------------------------------
#
# FedAvg streams (O(model) memory). The robust rules below compare updates with each
# other, so they need every update of the round in memory at once: O(model x updates).
# All of them compute in float64 and cast back to each parameter's dtype.

WeightedUpdate = tuple[Mapping[str, torch.Tensor], int]


def _checked(updates: Sequence[WeightedUpdate]) -> list[WeightedUpdate]:
    items = list(updates)
    if not items:
        raise ValueError("no updates to aggregate")
    reference = items[0][0]
    for update, num_examples in items:
        if num_examples <= 0:
            raise ValueError("num_examples must be positive")
        check_compatible(update, reference)
    return items


def update_norm(update: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of the whole update, all parameters flattened together."""
    total = 0.0
    for value in update.values():
        total += float(value.to(torch.float64).pow(2).sum())
    return math.sqrt(total)


def clip_update(update: Mapping[str, torch.Tensor], max_norm: float) -> StateDict:
    """Scale the update down to L2 norm `max_norm` when it is longer; shorter ones unchanged."""
    norm = update_norm(update)
    scale = 1.0 if norm <= max_norm or norm == 0.0 else max_norm / norm
    return {k: (v.to(torch.float64) * scale).to(v.dtype) for k, v in update.items()}


def aggregate_clipped(
    updates: Sequence[WeightedUpdate], *, max_norm: float | None = None
) -> StateDict:
    """Norm clipping, then the sample-weighted mean with each weight capped at the
    round's median count.

    `max_norm=None` clips to the median update norm of the round, so no update
    can weigh in with more than a typical update's length (scale attacks). The
    cap does the same for the weights: a sample count is a claim a hostile node
    controls, and one claiming 1e8 examples made the mean its own update. Both
    medians are the lower middle value, so with two nodes the smaller one counts.
    """
    items = _checked(updates)
    if max_norm is None:
        max_norm = float(statistics.median_low(update_norm(u) for u, _ in items))
    elif max_norm <= 0:
        raise ValueError("max_norm must be positive")
    cap = statistics.median_low(n for _, n in items)
    return aggregate_weighted_mean((clip_update(u, max_norm), min(n, cap)) for u, n in items)


def _stacked(items: Sequence[WeightedUpdate], name: str) -> torch.Tensor:
    return torch.stack([u[name].to(torch.float64) for u, _ in items])  # (k, *shape)


def trim_count(num_updates: int, trim_fraction: float) -> int:
    """Updates dropped at *each* end: floor(fraction x k), leaving at least one."""
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError("trim_fraction must be in [0, 0.5)")
    return min(math.floor(trim_fraction * num_updates), (num_updates - 1) // 2)


def aggregate_trimmed_mean(
    updates: Sequence[WeightedUpdate], *, trim_fraction: float = 0.2
) -> StateDict:
    """Coordinate-wise trimmed mean: per coordinate drop the b largest and b smallest values,
    average the rest (unweighted: a sample count is a claim an attacker controls)."""
    items = _checked(updates)
    b = trim_count(len(items), trim_fraction)
    reference = items[0][0]
    out: StateDict = {}
    for name, ref in reference.items():
        values, _ = torch.sort(_stacked(items, name), dim=0)
        kept = values[b : len(items) - b]
        out[name] = kept.mean(dim=0).to(ref.dtype)
    return out


def aggregate_median(updates: Sequence[WeightedUpdate]) -> StateDict:
    """Coordinate-wise median (the mean of the two middle values for an even count)."""
    items = _checked(updates)
    k = len(items)
    reference = items[0][0]
    out: StateDict = {}
    for name, ref in reference.items():
        values, _ = torch.sort(_stacked(items, name), dim=0)
        mid = values[(k - 1) // 2 : k // 2 + 1]  # one row (odd k) or the two middle rows
        out[name] = mid.mean(dim=0).to(ref.dtype)
    return out


def krum_scores(updates: Sequence[Mapping[str, torch.Tensor]], num_byzantine: int) -> list[float]:
    """Krum score of each update: the sum of squared distances to its k - f - 2 nearest
    other updates (at least one neighbour; all others when there are too few)."""
    k = len(updates)
    if k == 1:
        return [0.0]
    flat = torch.stack(
        [torch.cat([u[n].to(torch.float64).reshape(-1) for n in sorted(u)]) for u in updates]
    )  # (k, params)
    dist = torch.zeros(k, k, dtype=torch.float64)  # squared Euclidean, computed exactly
    for i in range(k):
        for j in range(i + 1, k):
            dist[i, j] = dist[j, i] = (flat[i] - flat[j]).pow(2).sum()
    neighbours = min(max(k - num_byzantine - 2, 1), k - 1)
    scores: list[float] = []
    for i in range(k):
        others = torch.cat([dist[i, :i], dist[i, i + 1 :]])
        scores.append(float(torch.sort(others).values[:neighbours].sum()))
    return scores


def aggregate_krum(
    updates: Sequence[WeightedUpdate], *, num_byzantine: int = 1, num_selected: int | None = None
) -> StateDict:
    """Multi-Krum: keep the `num_selected` updates with the lowest Krum scores (default
    k - f; 1 is classic Krum) and return their sample-weighted mean. Ties keep input order."""
    items = _checked(updates)
    if num_byzantine < 0:
        raise ValueError("num_byzantine must be >= 0")
    k = len(items)
    m = k - num_byzantine if num_selected is None else num_selected
    m = max(1, min(m, k))
    scores = krum_scores([u for u, _ in items], num_byzantine)
    chosen = sorted(range(k), key=lambda i: (scores[i], i))[:m]
    return aggregate_weighted_mean(items[i] for i in sorted(chosen))


class AggregationStrategy:
    """How a round turns its updates into one delta (Flower-style: one hook per variant).

    `streaming` strategies receive the updates as a one-pass iterator; the others
    get a list with every update of the round in memory.
    """

    name = "base"
    streaming = False

    def aggregate(self, updates: Iterable[WeightedUpdate]) -> StateDict:
        raise NotImplementedError


class FedAvg(AggregationStrategy):
    name = "fedavg"
    streaming = True

    def aggregate(self, updates: Iterable[WeightedUpdate]) -> StateDict:
        return aggregate_weighted_mean(updates)


class RowwiseFedAvg(AggregationStrategy):
    name = "fedavg_rows"
    streaming = True

    def aggregate(self, updates: Iterable[WeightedUpdate]) -> StateDict:
        return aggregate_weighted_mean(updates, rowwise=True)


class ClippedFedAvg(AggregationStrategy):
    name = "clipped"

    def __init__(self, *, max_norm: float | None = None) -> None:
        self.max_norm = max_norm

    def aggregate(self, updates: Iterable[WeightedUpdate]) -> StateDict:
        return aggregate_clipped(list(updates), max_norm=self.max_norm)


class TrimmedMean(AggregationStrategy):
    name = "trimmed_mean"

    def __init__(self, *, trim_fraction: float = 0.2) -> None:
        trim_count(1, trim_fraction)  # validates
        self.trim_fraction = trim_fraction

    def aggregate(self, updates: Iterable[WeightedUpdate]) -> StateDict:
        return aggregate_trimmed_mean(list(updates), trim_fraction=self.trim_fraction)


class Median(AggregationStrategy):
    name = "median"

    def aggregate(self, updates: Iterable[WeightedUpdate]) -> StateDict:
        return aggregate_median(list(updates))


class MultiKrum(AggregationStrategy):
    name = "krum"

    def __init__(self, *, num_byzantine: int = 1, num_selected: int | None = None) -> None:
        self.num_byzantine = num_byzantine
        self.num_selected = num_selected

    def aggregate(self, updates: Iterable[WeightedUpdate]) -> StateDict:
        return aggregate_krum(
            list(updates), num_byzantine=self.num_byzantine, num_selected=self.num_selected
        )


STRATEGY_NAMES: tuple[str, ...] = (
    "fedavg",
    "fedavg_rows",
    "clipped",
    "trimmed_mean",
    "median",
    "krum",
)


def make_strategy(
    name: str,
    *,
    clip_norm: float | None = None,
    trim_fraction: float = 0.2,
    krum_byzantine: int = 1,
    krum_selected: int | None = None,
) -> AggregationStrategy:
    if name == "fedavg":
        return FedAvg()
    if name == "fedavg_rows":
        return RowwiseFedAvg()
    if name == "clipped":
        return ClippedFedAvg(max_norm=clip_norm)
    if name == "trimmed_mean":
        return TrimmedMean(trim_fraction=trim_fraction)
    if name == "median":
        return Median()
    if name == "krum":
        return MultiKrum(num_byzantine=krum_byzantine, num_selected=krum_selected)
    raise ValueError(f"unknown aggregation strategy {name!r}; choose from {STRATEGY_NAMES}")


# Metrics whose aggregate is the maximum over updates (privacy loss: the worst node counts).
MAX_AGGREGATED_METRICS: tuple[str, ...] = ("dp_epsilon",)


def max_metrics(metrics: Iterable[Mapping[str, float]], names: Iterable[str]) -> dict[str, float]:
    """The maximum of each named metric over the updates that report it."""
    wanted = set(names)
    out: dict[str, float] = {}
    for values in metrics:
        for name, value in values.items():
            if name in wanted:
                out[name] = max(out.get(name, float("-inf")), float(value))
    return out
