"""Aggregation math: pure functions over `dict[str, Tensor]`, keyed by parameter name.

`aggregate_weighted_mean` streams: it holds one running sum the size of the
model and reads updates one at a time, so memory is O(model), not
O(model x updates).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

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


class WeightedMeanAccumulator:
    """Running Σ n_k · Δ_k and Σ n_k; `result()` gives Σ n_k/n · Δ_k.

    `dtype` is the running sum's dtype: float64 (default) for exactness in
    tests, or None to sum in each parameter's own dtype, which halves the
    aggregator's memory (the coordinator's choice: float32 over 50 updates
    loses about 50 ulp, far below the noise of training).
    """

    def __init__(self, *, dtype: torch.dtype | None = torch.float64) -> None:
        self._sum: StateDict | None = None
        self._reference: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None
        self._dtype = dtype
        self.total_examples = 0
        self.count = 0

    def add(self, update: Mapping[str, torch.Tensor], num_examples: int) -> None:
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
        self.total_examples += num_examples
        self.count += 1

    def result(self) -> StateDict:
        if self._sum is None or self._reference is None:
            raise ValueError("no updates to aggregate")
        n = float(self.total_examples)
        return {k: (v / n).to(self._reference[k][1]) for k, v in self._sum.items()}

    def take_result(self) -> StateDict:
        """`result()` computed in place: no second model-sized buffer; the accumulator is spent."""
        if self._sum is None or self._reference is None:
            raise ValueError("no updates to aggregate")
        n = float(self.total_examples)
        out = {k: v.div_(n).to(self._reference[k][1]) for k, v in self._sum.items()}
        self._sum = None
        return out


def aggregate_weighted_mean(updates: Iterable[tuple[Mapping[str, torch.Tensor], int]]) -> StateDict:
    """Sample-weighted FedAvg: Σ n_k/n · w_k over (weights, num_examples) pairs."""
    acc = WeightedMeanAccumulator()
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
    return {name: sums[name] / weights[name] for name in sums if weights[name] > 0}
