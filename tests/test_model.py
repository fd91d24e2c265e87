"""The hybrid two-tower model: shapes, seeded determinism, cold items, catalog growth."""

from __future__ import annotations

import pytest
import torch

from shared.features import build_item_features
from shared.model import (
    HybridTwoTower,
    ModelConfig,
    blend_states,
    grow_state,
    init_state,
    load_model,
)
from shared.schemas import CatalogItem
from shared.training import TrainConfig, UserSequence, make_examples, train_local
from tests.conftest import tiny_catalog

D = 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _catalog(n: int = 40) -> list[CatalogItem]:
    return [CatalogItem.model_validate(d) for d in tiny_catalog(n)]


def _sequences(num_items: int) -> list[UserSequence]:
    """Users who walk through items of one material (rows i, i+12, i+24, ...)."""
    seqs = []
    for u in range(30):
        start = u % 12
        items = list(range(start, min(num_items, 36), 12))
        seqs.append(UserSequence(items=items, types=[1, 2, 1, 4][: len(items)], country=1 + u % 3))
    return seqs


def _trained(seed: int, num_items: int = 40) -> tuple[HybridTwoTower, torch.Tensor]:
    catalog = _catalog(num_items)
    config = ModelConfig(num_items=num_items, embedding_dim=D, content_buckets=256, seed=seed)
    model = load_model(config, init_state(config))
    features = build_item_features(catalog, config.content_buckets)
    examples = make_examples(_sequences(num_items), config.max_history)
    train_local(model, features, examples, TrainConfig(epochs=2, batch_size=16, seed=seed))
    with torch.no_grad():
        return model, model.item_vectors(features)


def test_shapes() -> None:
    config = ModelConfig(num_items=40, embedding_dim=D, content_buckets=256, max_history=7)
    model = HybridTwoTower(config)
    features = build_item_features(_catalog(40), config.content_buckets)
    items = model.item_vectors(features)
    # The last column is the item bias; users end with a matching constant 1.
    assert items.shape == (40, D + 1)
    assert model.item_vectors(features, torch.tensor([3, 0, 39])).shape == (3, D + 1)
    hist = items[torch.randint(0, 40, (5, 7))]  # (b, L, d + 1)
    types = torch.randint(0, 5, (5, 7))
    users = model.user_vectors(hist, types, torch.tensor([0, 1, 2, 3, 4]))
    assert users.shape == (5, D + 1)
    assert torch.equal(users[:, -1], torch.ones(5))
    # No parameter is per user: every tensor is sized by items, buckets or the dimension.
    assert set(model.state_dict()) == set(init_state(config))


def test_same_seed_same_model_different_seed_different_model() -> None:
    a, vecs_a = _trained(seed=3)
    b, vecs_b = _trained(seed=3)
    _, vecs_c = _trained(seed=4)
    for name, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[name]), name
    assert torch.equal(vecs_a, vecs_b)
    assert not torch.allclose(vecs_a, vecs_c)


def test_items_without_interactions_get_finite_distinct_scores() -> None:
    # Rows 36..39 never occur in a training sequence (sequences stop at row 35).
    model, vecs = _trained(seed=0)
    seen = {r for s in _sequences(40) for r in s.items}
    cold = [r for r in range(40) if r not in seen]
    assert cold, "the fixture must leave some items untouched"
    hist = vecs[torch.tensor([[0, 12, 24]])]
    user = model.user_vectors(hist, torch.tensor([[1, 2, 4]]), torch.tensor([1]))
    scores = (vecs @ user[0])[torch.tensor(cold)]
    assert torch.isfinite(scores).all()
    assert len(set(scores.tolist())) == len(cold)


def test_grow_state_keeps_trained_rows_and_adds_content_only_rows() -> None:
    model, _ = _trained(seed=0, num_items=36)
    state = model.state_dict()
    grown, config = grow_state(state, model.config, 40)
    assert config.num_items == 40
    for table in ("item_id.weight", "item_bias.weight"):
        assert torch.equal(grown[table][:36], state[table])
        assert torch.count_nonzero(grown[table][36:]) == 0
    for name in state:
        if name not in ("item_id.weight", "item_bias.weight"):
            assert torch.equal(grown[name], state[name])
    # The grown model loads and scores the new items by their content.
    big = load_model(config, grown)
    features = build_item_features(_catalog(40), config.content_buckets)
    with torch.no_grad():
        vecs = big.item_vectors(features)
    assert torch.isfinite(vecs).all()
    assert not torch.allclose(vecs[36], vecs[37])
    # Growing to the same size or smaller changes nothing.
    assert grow_state(state, model.config, 36)[0] is state


def test_id_keep_mask_leaves_the_content_vector() -> None:
    model, _ = _trained(seed=0)
    features = build_item_features(_catalog(40), model.config.content_buckets)
    rows = torch.tensor([0, 5, 12])
    with torch.no_grad():
        full = model.item_vectors(features, rows)
        content_only = model.item_vectors(features, rows, id_keep=torch.zeros(3, dtype=torch.bool))
        mixed = model.item_vectors(features, rows, id_keep=torch.tensor([True, False, True]))
        # Dropping the id removes both the id vector and the id bias (last column).
        ids = torch.cat([model.item_id(rows), model.item_bias(rows)], dim=1)
    assert torch.allclose(content_only, full - ids, atol=1e-6)
    assert torch.equal(mixed[0], full[0]) and torch.equal(mixed[2], full[2])
    assert torch.equal(mixed[1], content_only[1])


def test_blend_states_interpolates_floats_and_keeps_the_rest() -> None:
    local = {"w": torch.tensor([1.0, 3.0]), "steps": torch.tensor([7])}
    base = {"w": torch.tensor([0.0, -1.0]), "steps": torch.tensor([2])}
    out = blend_states(local, base, 0.25)
    # 0.75 * local + 0.25 * base, by hand: [0.75, 2.0]
    assert torch.allclose(out["w"], torch.tensor([0.75, 2.0]))
    assert out["steps"].tolist() == [7]
    assert torch.equal(blend_states(local, base, 0.0)["w"], local["w"])
    assert torch.equal(blend_states(local, base, 1.0)["w"], base["w"])


@pytest.mark.parametrize(
    ("base", "share", "message"),
    [
        ({"w": torch.zeros(2)}, 1.5, "base_share"),
        ({"v": torch.zeros(2)}, 0.5, "same tensors"),
        ({"w": torch.zeros(3)}, 0.5, "shapes"),
    ],
)
def test_blend_states_refuses_mismatches(
    base: dict[str, torch.Tensor], share: float, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        blend_states({"w": torch.ones(2)}, base, share)
