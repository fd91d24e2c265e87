"""The memory-lean aggregation paths give the same answers as the plain ones."""

from __future__ import annotations

import pytest
import torch

from coordinator.aggregation import (
    WeightedMeanAccumulator,
    aggregate_weighted_mean,
    all_finite,
    apply_delta,
    apply_delta_in_place,
)


def test_all_finite_finds_a_nan_past_the_first_chunk() -> None:
    t = torch.zeros(3 * (1 << 20) + 5)
    assert all_finite(t)
    t[-1] = float("nan")
    assert not all_finite(t)
    t[-1] = float("-inf")
    assert not all_finite(t)


def test_float32_accumulation_in_place_matches_float64() -> None:
    g = torch.Generator().manual_seed(0)
    updates = [({"w": torch.randn(50, 4, generator=g)}, n) for n in (3, 1, 7)]
    exact = aggregate_weighted_mean(updates)
    acc = WeightedMeanAccumulator(dtype=None)
    for u, n in updates:
        acc.add(u, n)
    lean = acc.take_result()
    assert lean["w"].dtype == torch.float32
    assert torch.allclose(lean["w"], exact["w"], atol=1e-6)
    expected = (3 * updates[0][0]["w"] + updates[1][0]["w"] + 7 * updates[2][0]["w"]) / 11
    assert torch.allclose(lean["w"], expected, atol=1e-6)
    with pytest.raises(ValueError):
        acc.take_result()  # spent


def test_accumulator_does_not_write_into_the_updates() -> None:
    u = {"w": torch.ones(3)}
    acc = WeightedMeanAccumulator(dtype=None)
    acc.add(u, 2)
    acc.add(u, 2)
    assert acc.take_result()["w"].tolist() == [1.0, 1.0, 1.0]
    assert u["w"].tolist() == [1.0, 1.0, 1.0]


def test_apply_delta_in_place_equals_apply_delta() -> None:
    base = {"w": torch.tensor([1.0, 2.0])}
    delta = {"w": torch.tensor([0.5, -1.0])}
    expected = apply_delta(base, delta)
    out = apply_delta_in_place(delta, base)
    assert out is delta and torch.equal(out["w"], expected["w"])
    assert base["w"].tolist() == [1.0, 2.0]
