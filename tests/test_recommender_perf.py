"""The serving fast paths give exactly what the model and the plain filters give."""

from __future__ import annotations

import torch

from regional_node.recommender import (
    Filters,
    build_serving_model,
    candidate_mask,
    recommend,
    user_vector,
)
from shared.features import country_bucket
from shared.model import EVENT_TYPE_IDS, ModelConfig, init_state
from shared.schemas import CatalogItem
from tests.conftest import tiny_catalog


def _serving():  # type: ignore[no-untyped-def]
    catalog = [CatalogItem.model_validate(c) for c in tiny_catalog(60)]
    config = ModelConfig(num_items=60, embedding_dim=8, max_history=5, seed=3)
    state = init_state(config)
    g = torch.Generator().manual_seed(1)
    state = {k: v + torch.randn(v.shape, generator=g) * 0.1 for k, v in state.items()}
    return build_serving_model(1, "sha", config, state, catalog, inactive_item_ids=["I007"])


@torch.no_grad()
def test_user_vector_matches_the_model() -> None:
    s = _serving()
    for known in ([], [(3, 1)], [(3, 1), (10, 4), (11, 2), (20, 3), (30, 1)]):
        hist = torch.zeros(1, 5, dtype=torch.long)
        types = torch.zeros(1, 5, dtype=torch.long)
        if known:
            hist[0, -len(known) :] = torch.tensor([r for r, _ in known])
            types[0, -len(known) :] = torch.tensor([t for _, t in known])
        expected = s.model.user_vectors(s.item_vecs[hist], types, torch.tensor([7]))[0]
        assert torch.allclose(user_vector(s, known, 7), expected, atol=1e-6)


@torch.no_grad()
def test_recommend_equals_a_full_sort_over_the_candidates() -> None:
    s = _serving()
    history = [("I001", "view"), ("I002", "purchase"), ("I013", "click")]
    filters = Filters(category="ring", max_price=1500.0)
    exclude = ["I004", "I008"]
    got = recommend(s, history, "DE", 5, filters, exclude)
    # Reference: the model's user vector, every candidate scored, fully sorted.
    rows = [s.row_of[i] for i, _ in history]
    types = [EVENT_TYPE_IDS[t] for _, t in history]
    user = user_vector(
        s, list(zip(rows, types, strict=True)), country_bucket("DE", s.model.config.country_buckets)
    )
    mask = candidate_mask(s, filters, exclude)
    scores = s.item_vecs @ user
    ranked = sorted((int(r) for r in mask.nonzero().flatten()), key=lambda r: -float(scores[r]))
    assert [i for i, _ in got] == [s.item_ids[r] for r in ranked[:5]]
    assert all(s.item_ids[r] not in exclude for r in ranked)


@torch.no_grad()
def test_fewer_candidates_than_k_and_cached_masks_stay_intact() -> None:
    s = _serving()
    filters = Filters(category="ring", material="gold", max_price=400.0)
    allowed = [s.item_ids[int(r)] for r in candidate_mask(s, filters, ()).nonzero().flatten()]
    assert 0 < len(allowed) < 10
    got = recommend(s, [("I001", "view")], None, 10, filters, [allowed[0]])
    assert sorted(i for i, _ in got) == sorted(allowed[1:])
    # The exclusion did not leak into the cached mask: the next request sees all of them.
    again = recommend(s, [("I001", "view")], None, 10, filters, [])
    assert sorted(i for i, _ in again) == sorted(allowed)
    assert recommend(s, [("I001", "view")], None, 10, Filters(category="tiara"), []) == []
