"""HR@K and NDCG@K against hand-computed cases."""

from __future__ import annotations

import math

import pytest

from shared.metrics import hit_rate_at_k, ndcg_at_k, summarize_ranks


@pytest.mark.parametrize(
    ("rank", "k", "hit", "ndcg"),
    [
        (0, 10, 1.0, 1.0),  # first place: 1 / log2(2)
        (1, 10, 1.0, 1 / math.log2(3)),  # 0.6309...
        (2, 10, 1.0, 0.5),  # 1 / log2(4)
        (6, 10, 1.0, 1 / 3),  # 1 / log2(8)
        (9, 10, 1.0, 1 / math.log2(11)),  # last slot still counts
        (10, 10, 0.0, 0.0),  # just outside the top 10
        (0, 1, 1.0, 1.0),
        (1, 1, 0.0, 0.0),
        (-1, 10, 0.0, 0.0),  # not ranked at all
    ],
)
def test_single_rank(rank: int, k: int, hit: float, ndcg: float) -> None:
    assert hit_rate_at_k(rank, k) == hit
    assert ndcg_at_k(rank, k) == pytest.approx(ndcg, abs=1e-12)


def test_summary_is_the_mean_over_users() -> None:
    # Ranks 0, 2, 6, 40: three hits of four; NDCG (1 + 1/2 + 1/3 + 0) / 4 = 11/24.
    summary = summarize_ranks([0, 2, 6, 40], k=10)
    assert summary == {"hr@10": 0.75, "ndcg@10": pytest.approx(11 / 24), "users": 4}
    # With k=3 only ranks 0 and 2 count: HR 2/4, NDCG (1 + 1/2) / 4.
    assert summarize_ranks([0, 2, 6, 40], k=3) == {
        "hr@3": 0.5,
        "ndcg@3": pytest.approx(0.375),
        "users": 4,
    }


def test_summary_of_nobody_is_zero_with_zero_users() -> None:
    assert summarize_ranks([], k=10) == {"hr@10": 0.0, "ndcg@10": 0.0, "users": 0}


@pytest.mark.parametrize(
    ("scores", "rank"),
    [
        ([0.5, 0.5, 0.5, 0.5, 0.5], 3),  # a tie with every other item counts against it
        ([0.9, 0.5, 0.5, 0.1, 0.1], 1),  # row 0 is excluded; one tie
        ([0.1, 0.5, 0.9, 0.5, 0.1], 2),  # one strictly higher, one tied
        ([0.1, 0.5, 0.2, 0.1, 0.1], 0),
        ([0.1, float("nan"), 0.9, 0.1, 0.1], 5),  # NaN held-out score: never a hit
        ([0.1, 0.5, float("nan"), 0.1, 0.1], 1),  # NaN elsewhere ranks above it
        ([0.1, float("inf"), 0.2, 0.1, 0.1], 5),
    ],
)
def test_held_out_rank_counts_ties_and_nan_against_the_item(scores: list[float], rank: int) -> None:
    """The held-out item is row 1; row 0 is the user's training item (excluded). A
    constant or diverged scorer once ranked every held-out item first: HR@10 = 1."""
    import torch

    from shared.training import UserSequence, rank_with_scores

    ranks = rank_with_scores(
        lambda users: torch.tensor([scores] * len(users)),
        {"u": UserSequence([0], [1], 0)},
        {"u": 1},
    )
    assert ranks == {"u": rank}
