"""Ranking metrics for leave-last-out evaluation: HR@K and NDCG@K with one held-out item."""

from __future__ import annotations

import math
from collections.abc import Iterable


def hit_rate_at_k(rank: int, k: int) -> float:
    """`rank` is 0-based position of the held-out item in the ranked list (-1: not ranked)."""
    return 1.0 if 0 <= rank < k else 0.0


def ndcg_at_k(rank: int, k: int) -> float:
    """With a single relevant item the ideal DCG is 1, so NDCG = 1 / log2(rank + 2)."""
    return 1.0 / math.log2(rank + 2) if 0 <= rank < k else 0.0


def summarize_ranks(ranks: Iterable[int], k: int = 10) -> dict[str, float]:
    """Mean HR@k and NDCG@k over users; `users` is how many ranks were averaged."""
    hr = 0.0
    ndcg = 0.0
    n = 0
    for rank in ranks:
        hr += hit_rate_at_k(rank, k)
        ndcg += ndcg_at_k(rank, k)
        n += 1
    if n == 0:
        return {f"hr@{k}": 0.0, f"ndcg@{k}": 0.0, "users": 0}
    return {f"hr@{k}": hr / n, f"ndcg@{k}": ndcg / n, "users": n}
