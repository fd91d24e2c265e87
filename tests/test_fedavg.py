"""Sample-weighted FedAvg, checked exactly on hand-made tensors."""

from __future__ import annotations

import pytest
import torch

from coordinator.aggregation import (
    UpdateMismatchError,
    WeightedMeanAccumulator,
    aggregate_weighted_mean,
    apply_delta,
    check_compatible,
    compute_delta,
    weighted_metrics,
)


def test_weighted_mean_is_exact() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0]])}
    b = {"w": torch.tensor([4.0, 8.0]), "b": torch.tensor([[3.0]])}
    # n = 1 + 2: w = 1/3 * a + 2/3 * b
    out = aggregate_weighted_mean([(a, 1), (b, 2)])
    assert torch.equal(out["w"], torch.tensor([3.0, 6.0]))
    assert torch.equal(out["b"], torch.tensor([[2.0]]))
    assert out["w"].dtype == torch.float32


def test_keyed_by_name_not_position() -> None:
    a = {"x": torch.tensor([1.0]), "y": torch.tensor([10.0])}
    b = {"y": torch.tensor([30.0]), "x": torch.tensor([3.0])}  # other insertion order
    out = aggregate_weighted_mean([(a, 1), (b, 1)])
    assert torch.equal(out["x"], torch.tensor([2.0]))
    assert torch.equal(out["y"], torch.tensor([20.0]))


def test_accumulator_counts() -> None:
    acc = WeightedMeanAccumulator()
    acc.add({"w": torch.ones(3)}, 5)
    acc.add({"w": torch.zeros(3)}, 15)
    assert acc.total_examples == 20 and acc.count == 2
    assert torch.allclose(acc.result()["w"], torch.full((3,), 0.25))


@pytest.mark.parametrize(
    ("other", "message"),
    [
        ({"w": torch.ones(3)}, "shape"),
        ({"w": torch.ones(2), "extra": torch.ones(1)}, "unexpected"),
        ({}, "missing"),
        ({"w": torch.ones(2, dtype=torch.float64)}, "dtype"),
        ({"w": torch.tensor([1.0, float("nan")])}, "NaN"),
        ({"w": torch.tensor([float("inf"), 1.0])}, "NaN or Inf"),
    ],
)
def test_mismatched_updates_rejected(other: dict[str, torch.Tensor], message: str) -> None:
    with pytest.raises(UpdateMismatchError, match=message):
        aggregate_weighted_mean([({"w": torch.ones(2)}, 1), (other, 1)])
    with pytest.raises(UpdateMismatchError, match=message):
        check_compatible(other, {"w": torch.ones(2)})


def test_no_updates_and_bad_counts() -> None:
    with pytest.raises(ValueError, match="no updates"):
        aggregate_weighted_mean([])
    with pytest.raises(ValueError, match="positive"):
        aggregate_weighted_mean([({"w": torch.ones(1)}, 0)])


def test_delta_round_trip() -> None:
    base = {"w": torch.tensor([1.0, 2.0])}
    new = {"w": torch.tensor([1.5, 1.0])}
    delta = compute_delta(new, base)
    assert torch.equal(delta["w"], torch.tensor([0.5, -1.0]))
    assert torch.equal(apply_delta(base, delta)["w"], new["w"])


def test_weighted_metrics() -> None:
    out = weighted_metrics([({"loss": 1.0, "hr@10": 0.5}, 1), ({"loss": 4.0}, 3)])
    assert out == {"loss": 3.25, "hr@10": 0.5}
