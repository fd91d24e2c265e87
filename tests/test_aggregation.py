"""Aggregation rules, checked exactly on hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch

from coordinator.aggregation import (
    ClippedFedAvg,
    FedAvg,
    Median,
    MultiKrum,
    TrimmedMean,
    UpdateMismatchError,
    aggregate_clipped,
    aggregate_krum,
    aggregate_median,
    aggregate_trimmed_mean,
    aggregate_weighted_mean,
    clip_update,
    krum_scores,
    make_strategy,
    trim_count,
    update_norm,
)
from coordinator.settings import CoordinatorSettings


def upd(a: list[float], b: float) -> dict[str, torch.Tensor]:
    """A two-parameter update: `w` (vector) and `b` (scalar-ish, shape (1,))."""
    return {"w": torch.tensor(a, dtype=torch.float32), "b": torch.tensor([b], dtype=torch.float32)}


def test_fedavg_is_the_sample_weighted_mean() -> None:
    out = aggregate_weighted_mean([(upd([1, 2], 0), 1), (upd([4, 8], 3), 3)])
    assert torch.equal(out["w"], torch.tensor([3.25, 6.5]))
    assert torch.equal(out["b"], torch.tensor([2.25]))
    assert out["w"].dtype == torch.float32


def test_update_norm_and_clipping() -> None:
    u = upd([3, 0], 4)  # norm 5 over both parameters together
    assert update_norm(u) == 5.0
    clipped = clip_update(u, 2.5)
    assert torch.equal(clipped["w"], torch.tensor([1.5, 0.0]))
    assert torch.equal(clipped["b"], torch.tensor([2.0]))
    assert clip_update(u, 10.0)["w"].equal(u["w"])  # short updates are untouched


def test_clipped_bounds_a_scaled_update() -> None:
    honest = [(upd([1, 0], 0), 1), (upd([0, 1], 0), 1)]
    attacker = (upd([100, 0], 0), 2)
    out = aggregate_clipped([*honest, attacker], max_norm=1.0)
    # The attacker is cut to [1, 0] and its weight to the median count (1):
    # (1*[1,0] + 1*[0,1] + 1*[1,0]) / 3
    assert torch.allclose(out["w"], torch.tensor([2 / 3, 1 / 3]))
    # Default bound: the median norm (here 1.0), same answer.
    assert torch.equal(aggregate_clipped([*honest, attacker])["w"], out["w"])
    with pytest.raises(ValueError):
        aggregate_clipped(honest, max_norm=0.0)


def test_clipped_caps_a_claimed_sample_count_and_works_with_two_nodes() -> None:
    """A sign-flipped update of honest length claiming 1e8 examples once turned the
    mean into its own (-1 where the honest mean is +1); with two nodes the median
    norm was their average, so a scaled update was barely clipped."""
    honest = [(upd([1, 0], 0), 100), (upd([1, 0], 0), 120), (upd([1, 0], 0), 90)]
    flipped = (upd([-1, 0], 0), 100_000_000)
    out = aggregate_clipped([*honest, flipped])["w"]
    # Weights 100, 100 (capped at the lower median, 100), 90, 100: (290 - 100) / 390.
    assert torch.allclose(out, torch.tensor([190 / 390, 0.0]))
    two = aggregate_clipped([(upd([1, 0], 0), 10), (upd([1000, 0], 0), 10)])["w"]
    assert torch.allclose(two, torch.tensor([1.0, 0.0]))  # clipped to the smaller norm


def test_trim_count() -> None:
    assert trim_count(6, 0.2) == 1
    assert trim_count(10, 0.2) == 2
    assert trim_count(3, 0.4) == 1
    assert trim_count(2, 0.49) == 0  # always leaves at least one value
    assert trim_count(5, 0.0) == 0
    with pytest.raises(ValueError):
        trim_count(5, 0.5)


def test_trimmed_mean_drops_extremes_per_coordinate() -> None:
    ups = [
        (upd([1, 50], 0), 1),
        (upd([2, -7], 1), 1),
        (upd([3, 1], 2), 1),
        (upd([100, 2], 3), 1),
        (upd([4, 3], -9), 1),
    ]
    out = aggregate_trimmed_mean(ups, trim_fraction=0.2)  # drop 1 at each end of 5
    assert torch.equal(out["w"], torch.tensor([3.0, 2.0]))  # mean(2,3,4), mean(1,2,3)
    assert torch.equal(out["b"], torch.tensor([1.0]))  # mean(0,1,2)
    # trim 0 is the plain (unweighted) mean
    assert torch.allclose(
        aggregate_trimmed_mean(ups, trim_fraction=0.0)["w"], torch.tensor([22.0, 9.8])
    )


def test_median_odd_and_even() -> None:
    odd = [(upd([1, 9], 5), 1), (upd([3, -1], 7), 10), (upd([2, 4], -100), 1)]
    out = aggregate_median(odd)
    assert torch.equal(out["w"], torch.tensor([2.0, 4.0]))
    assert torch.equal(out["b"], torch.tensor([5.0]))
    even = [*odd, (upd([10, 10], 6), 1)]
    out = aggregate_median(even)
    assert torch.equal(out["w"], torch.tensor([2.5, 6.5]))  # mean of the two middle values
    assert torch.equal(out["b"], torch.tensor([5.5]))


def test_krum_scores_by_hand() -> None:
    a, b, c, d = upd([0, 0], 0), upd([1, 0], 0), upd([0, 1], 0), upd([10, 10], 0)
    # k=4, f=1 -> k - f - 2 = 1 nearest neighbour
    assert krum_scores([a, b, c, d], 1) == [1.0, 1.0, 1.0, 181.0]
    # f=0 -> 2 nearest neighbours: a: 1+1, b: 1+2, c: 1+2, d: 181+181
    assert krum_scores([a, b, c, d], 0) == [2.0, 3.0, 3.0, 362.0]
    assert krum_scores([a], 1) == [0.0]


def test_multi_krum_selects_the_close_updates() -> None:
    a, b, c, d = upd([0, 0], 0), upd([1, 0], 0), upd([0, 1], 0), upd([10, 10], 0)
    ups = [(a, 1), (b, 1), (c, 2), (d, 100)]
    out = aggregate_krum(ups, num_byzantine=1)  # m = k - f = 3: a, b, c weighted 1, 1, 2
    assert torch.equal(out["w"], torch.tensor([0.25, 0.5]))
    # classic Krum (m=1): the lowest score, ties broken by input order -> a
    assert torch.equal(aggregate_krum(ups, num_byzantine=1, num_selected=1)["w"], a["w"])


def test_strategies_share_validation() -> None:
    bad_shape = {"w": torch.zeros(3), "b": torch.zeros(1)}
    for strategy in (FedAvg(), ClippedFedAvg(), TrimmedMean(), Median(), MultiKrum()):
        with pytest.raises(UpdateMismatchError):
            strategy.aggregate([(upd([1, 2], 0), 1), (bad_shape, 1)])
        with pytest.raises(ValueError):
            strategy.aggregate([])
    nan = upd([math.nan, 0], 0)
    with pytest.raises(UpdateMismatchError):
        Median().aggregate([(upd([1, 2], 0), 1), (nan, 1)])


def test_all_strategies_agree_on_identical_updates() -> None:
    same = [(upd([1.5, -2], 0.25), n) for n in (1, 2, 3, 4, 5)]
    for name in ("fedavg", "fedavg_rows", "clipped", "trimmed_mean", "median", "krum"):
        out = make_strategy(name).aggregate(same)
        assert torch.equal(out["w"], torch.tensor([1.5, -2.0])), name
        assert torch.equal(out["b"], torch.tensor([0.25])), name


def test_strategy_from_settings() -> None:
    from coordinator.rounds.service import strategy_from_settings

    s = CoordinatorSettings(aggregation="trimmed_mean", trim_fraction=0.3)
    strategy = strategy_from_settings(s)
    assert isinstance(strategy, TrimmedMean) and strategy.trim_fraction == 0.3
    k = strategy_from_settings(CoordinatorSettings(aggregation="krum", krum_selected=1))
    assert isinstance(k, MultiKrum) and k.num_selected == 1 and not k.streaming
    assert strategy_from_settings(CoordinatorSettings()).streaming
    with pytest.raises(ValueError):
        make_strategy("mean-ish")


def test_secure_aggregation_refuses_rules_that_need_single_updates() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="only the sum is visible"):
        CoordinatorSettings(secure_aggregation=True, aggregation="krum")
    # The mean needs only the sum: allowed (fedavg_rows falls back to the plain mean).
    assert CoordinatorSettings(secure_aggregation=True).aggregation == "fedavg"
    assert CoordinatorSettings(
        secure_aggregation=True, aggregation="fedavg_rows"
    ).secure_aggregation


def test_weighted_metrics_never_returns_a_non_finite_mean() -> None:
    from coordinator.aggregation import weighted_metrics

    got = weighted_metrics([({"loss": 1e308, "hr@10": 0.2}, 5), ({"hr@10": 0.4}, 5)])
    assert got == {"hr@10": pytest.approx(0.3)}  # 1e308 x 5 overflowed: dropped, not inf
