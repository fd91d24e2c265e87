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


def test_rowwise_mean_divides_each_row_by_the_updates_that_changed_it() -> None:
    # Two "regions": each changes its own row of a table, both change row 1 and the bias.
    a = {"table": torch.tensor([[2.0, 4.0], [1.0, 1.0], [0.0, 0.0]]), "bias": torch.tensor([1.0])}
    b = {"table": torch.tensor([[0.0, 0.0], [4.0, 4.0], [6.0, 0.0]]), "bias": torch.tensor([4.0])}
    out = aggregate_weighted_mean([(a, 1), (b, 3)], rowwise=True)
    # Row 0: only a changed it -> a's value, undiluted (plain FedAvg: 1/4 of it).
    assert torch.equal(out["table"][0], torch.tensor([2.0, 4.0]))
    # Row 1: both -> (1 * 1 + 3 * 4) / 4.
    assert torch.equal(out["table"][1], torch.tensor([3.25, 3.25]))
    # Row 2: only b; a zero entry inside a changed row still counts as changed.
    assert torch.equal(out["table"][2], torch.tensor([6.0, 0.0]))
    # 1-D tensors are plain FedAvg.
    assert torch.equal(out["bias"], torch.tensor([3.25]))
    plain = aggregate_weighted_mean([(a, 1), (b, 3)])
    assert torch.equal(plain["table"][0], torch.tensor([0.5, 1.0]))


def test_plain_mean_counts_a_sparse_update_only_in_the_rows_it_sent() -> None:
    # A dense update (n=1) changes every row; a top-k update (n=3) sent rows 1 and 2 only.
    dense = {
        "table": torch.tensor([[2.0, 4.0], [1.0, 1.0], [0.0, 2.0]]),
        "bias": torch.tensor([1.0]),
    }
    topk = {
        "table": torch.tensor([[0.0, 0.0], [4.0, 4.0], [6.0, 0.0]]),
        "bias": torch.tensor([0.0]),
    }
    acc = WeightedMeanAccumulator()
    acc.add(dense, 1)
    acc.add(topk, 3, sparse=True)
    out = acc.result()
    # Row 0: the top-k update did not send it -> the dense update's value, not 1/4 of it.
    assert torch.equal(out["table"][0], torch.tensor([2.0, 4.0]))
    # Rows 1 and 2: both counted -> (1 * dense + 3 * topk) / 4.
    assert torch.equal(out["table"][1], torch.tensor([3.25, 3.25]))
    assert torch.equal(out["table"][2], torch.tensor([4.5, 0.5]))
    # 1-D tensors stay the plain mean over all examples.
    assert torch.equal(out["bias"], torch.tensor([0.25]))
    # Dense updates only: exactly plain FedAvg; sparse updates only: exactly row-wise.
    both = [(dense, 1), (topk, 3)]
    only_dense = WeightedMeanAccumulator()
    only_sparse = WeightedMeanAccumulator()
    for u, n in both:
        only_dense.add(u, n)
        only_sparse.add(u, n, sparse=True)
    assert torch.equal(only_dense.result()["table"], aggregate_weighted_mean(both)["table"])
    rowwise = aggregate_weighted_mean(both, rowwise=True)
    assert torch.equal(only_sparse.result()["table"], rowwise["table"])


def test_rowwise_untouched_rows_stay_zero_and_in_place_result_agrees() -> None:
    torch.manual_seed(0)
    updates = []
    for k in range(3):
        t = torch.zeros(50, 4)
        t[k * 10 : k * 10 + 15] = torch.randn(15, 4)  # overlapping row ranges, rows 35+ untouched
        updates.append(({"t": t, "w": torch.randn(4, 4)}, k + 1))
    acc = WeightedMeanAccumulator(dtype=None, rowwise=True)
    for u, n in updates:
        acc.add(u, n)
    expected = acc.result()
    assert torch.equal(expected["t"][35:], torch.zeros(15, 4))
    # Dense tensors (every row changed by every update) equal plain FedAvg.
    assert torch.allclose(expected["w"], aggregate_weighted_mean(updates)["w"])
    taken = acc.take_result()
    assert torch.allclose(taken["t"], expected["t"]) and torch.allclose(taken["w"], expected["w"])
    # Rows 10-14 were changed by updates 0 and 1 only: weights 1 and 2.
    want = (updates[0][0]["t"][10:15] * 1 + updates[1][0]["t"][10:15] * 2) / 3
    assert torch.allclose(expected["t"][10:15], want)
