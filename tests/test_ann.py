"""The IVF index (regional_node/ann.py): exact when every cluster is probed, honest otherwise."""

from __future__ import annotations

import dataclasses
import itertools
import random

import pytest
import torch

from regional_node.ann import build_ivf, ivf_search, ivf_view
from regional_node.recommender import Filters, build_serving_model, recommend
from shared.model import ModelConfig, init_state
from shared.schemas import CatalogItem
from tests.conftest import tiny_catalog


def _exact(
    vecs: torch.Tensor, user: torch.Tensor, k: int, blocked: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    scores = vecs @ user
    scores.masked_fill_(blocked, float("-inf"))
    top = torch.topk(scores, k)
    return top.values, top.indices


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_probing_every_cluster_gives_the_exact_top_k(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    vecs = torch.randn(3000, 17, generator=g)
    index = build_ivf(vecs, 40, seed=seed)
    assert int(index.sizes.sum()) == 3000 and sorted(index.rows.tolist()) == list(range(3000))
    blocked = torch.rand(3000, generator=g) < 0.3
    view = ivf_view(index, blocked)
    assert int(view.sizes.sum()) == int((~blocked).sum())
    assert not blocked[index.rows[view.positions]].any()
    for _ in range(5):
        user = torch.randn(17, generator=g)
        values, rows, exhausted = ivf_search(index, view, user, 10, 3000)
        want_values, want_rows = _exact(vecs, user, 10, blocked)
        assert exhausted
        assert torch.equal(rows, want_rows) and torch.allclose(values, want_values)


def test_probing_few_clusters_scores_fewer_items_and_keeps_filters() -> None:
    g = torch.Generator().manual_seed(7)
    # Clustered data: 30 well separated groups.
    centers = torch.randn(30, 12, generator=g) * 5
    vecs = centers.repeat_interleave(100, 0) + torch.randn(3000, 12, generator=g) * 0.3
    index = build_ivf(vecs, 30, seed=0)
    blocked = torch.zeros(3000, dtype=torch.bool)
    blocked[::2] = True
    view = ivf_view(index, blocked)
    hits = 0
    for _ in range(20):
        user = torch.randn(12, generator=g)
        values, rows, exhausted = ivf_search(index, view, user, 10, 200)
        assert not exhausted and len(rows) == 10
        assert not blocked[rows].any()  # never a filtered-out item
        assert torch.allclose(values, vecs[rows] @ user)  # candidates are scored exactly
        _, want = _exact(vecs, user, 10, blocked)
        hits += len(set(rows.tolist()) & set(want.tolist()))
    # recall@10 far above what 200 of the 1,500 allowed items taken at random give (0.13)
    assert hits / 200 >= 0.7


def _catalog(n: int) -> list[CatalogItem]:
    base = tiny_catalog(60)
    rng = random.Random(0)
    items = []
    for i in range(n):
        like = dict(rng.choice(base))
        like["item_id"] = f"X{i:05d}"
        items.append(CatalogItem.model_validate(like))
    return items


def test_recommend_with_an_index_probing_everything_equals_exact_search() -> None:
    items = _catalog(2500)
    config = ModelConfig(num_items=2500, embedding_dim=8)
    state = init_state(config)
    everything = build_serving_model(
        1, "x", config, state, items, ivf_clusters=25, ivf_candidates=600
    )
    assert everything.ivf is not None and everything.ivf.num_clusters <= 25
    rng = random.Random(1)
    for _ in range(20):
        history = [(it.item_id, "view") for it in rng.sample(items, 3)]
        exclude = [history[0][0]]
        for filters in (Filters(), Filters(max_price=1000.0)):
            exact = recommend(everything, history, "DE", 10, filters, exclude, exact=True)
            # 600 candidates of 2500: approximate, but only allowed, unexcluded items.
            approx = recommend(everything, history, "DE", 10, filters, exclude)
            assert len(approx) == len(exact) == 10
            assert history[0][0] not in {i for i, _ in approx}
            assert all(s1 >= s2 for (_, s1), (_, s2) in itertools.pairwise(approx))
    probe_all = build_serving_model(
        1, "x", config, state, items, ivf_clusters=25, ivf_candidates=2500
    )
    assert probe_all.ivf is None  # a catalog of at most 4 x candidates is scored exactly
    # Probing every cluster through the index itself gives the exact answer.
    forced = dataclasses.replace(everything, ivf_candidates=10**9)
    for _ in range(20):
        history = [(it.item_id, "click") for it in rng.sample(items, 2)]
        exclude = [history[0][0], items[0].item_id]
        for filters in (Filters(), Filters(category="ring"), Filters(max_price=900.0)):
            got = recommend(forced, history, "FR", 10, filters, exclude)
            want = recommend(forced, history, "FR", 10, filters, exclude, exact=True)
            _same_ranking(got, want)


def _same_ranking(got: list[tuple[str, float]], want: list[tuple[str, float]]) -> None:
    """Equal up to float rounding (the index sums in another order) and exact ties."""
    assert len(got) == len(want)
    assert torch.allclose(torch.tensor([s for _, s in got]), torch.tensor([s for _, s in want]))
    last = want[-1][1]
    clear = {i for i, s in want if s > last + 1e-5}  # not tied with the k-th item
    assert clear <= {i for i, _ in got}


def test_filters_that_leave_a_quarter_of_the_catalog_or_less_are_scored_exactly() -> None:
    items = _catalog(2500)
    config = ModelConfig(num_items=2500, embedding_dim=8)
    serving = build_serving_model(
        1, "x", config, init_state(config), items, ivf_clusters=25, ivf_candidates=50
    )
    assert serving.ivf is not None  # 50 candidates of 2500: the index is approximate
    rng = random.Random(2)
    narrow = Filters(category="ring", max_price=2000.0)
    allowed = sum(
        1
        for it in items
        if it.category == "ring" and it.price_usd is not None and it.price_usd <= 2000.0
    )
    assert 50 < allowed <= 2500 // 4  # more than the index would score, few enough
    for _ in range(20):
        history = [(it.item_id, "view") for it in rng.sample(items, 3)]
        exclude = [history[0][0]]
        got = recommend(serving, history, "DE", 10, narrow, exclude)
        want = recommend(serving, history, "DE", 10, narrow, exclude, exact=True)
        assert got == want


def test_more_clusters_than_the_k_means_sample_still_builds() -> None:
    # NODE_IVF_CLUSTERS above the 20,000-vector sample crashed the build (IndexError:
    # the centroids came from the sample, the counts from the setting), so the node
    # never swapped in the version.
    vecs = torch.randn(300, 5, generator=torch.Generator().manual_seed(0))
    index = build_ivf(vecs, 250, sample=200, iterations=2)
    assert index.num_clusters <= 200
    assert int(index.sizes.sum()) == 300
