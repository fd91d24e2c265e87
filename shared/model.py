"""The hybrid two-tower recommendation model shared by the coordinator and the nodes.

Item tower: an item-id embedding plus a bag of hashed content tokens (category,
material, gemstone, style tags, price band), so an item with no interactions
still has a meaningful vector.

User side: no per-user parameter exists. A user's vector is computed from the
user's recent history (item vectors weighted by a learned event-type weight and
a learned recency weight) plus a country context embedding. Everything in the
state dict is global; user ids never touch the model.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn import functional as F

from shared.features import ItemFeatures
from shared.schemas import EVENT_TYPES

# Event type ids: 0 is padding, then view, click, add_to_cart, purchase.
EVENT_TYPE_IDS: dict[str, int] = {name: i + 1 for i, name in enumerate(EVENT_TYPES)}
NUM_EVENT_TYPES = len(EVENT_TYPES) + 1


class ModelConfig(BaseModel):
    """Shape-defining hyperparameters; stored with every model version."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_items: int = Field(ge=1, description="Rows of the item-id table (catalog size).")
    embedding_dim: int = Field(default=48, ge=4, le=1024)
    content_buckets: int = Field(default=4096, ge=16)
    country_buckets: int = Field(default=64, ge=2)
    max_history: int = Field(default=30, ge=1, le=512)
    seed: int = 0


class HybridTwoTower(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d = config.embedding_dim
        self.item_id = nn.Embedding(config.num_items, d)
        # Popularity lives in a bias: per item id, plus one read off the content tower.
        self.item_bias = nn.Embedding(config.num_items, 1)
        self.content_bias = nn.Linear(d, 1)
        self.content = nn.EmbeddingBag(config.content_buckets, d, mode="mean")
        self.content_proj = nn.Linear(d, d)
        self.country = nn.Embedding(config.country_buckets, d)
        self.user_proj = nn.Linear(d, d)
        self.event_weight = nn.Parameter(torch.zeros(NUM_EVENT_TYPES))
        self.recency_weight = nn.Parameter(torch.zeros(config.max_history))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        g = torch.Generator().manual_seed(self.config.seed)
        with torch.no_grad():
            # Id vectors start small: content carries the signal until ids are learned.
            self.item_id.weight.normal_(0.0, 0.01, generator=g)
            self.content.weight.normal_(0.0, 0.1, generator=g)
            self.country.weight.normal_(0.0, 0.01, generator=g)
            for lin in (self.content_proj, self.user_proj):
                nn.init.eye_(lin.weight)
                lin.weight.add_(torch.randn(lin.weight.shape, generator=g) * 0.01)
                lin.bias.zero_()
            # Purchases and carts say more than views; recent events more than old ones.
            self.item_bias.weight.zero_()
            self.content_bias.weight.zero_()
            self.content_bias.bias.zero_()
            self.event_weight.copy_(torch.tensor([0.0, 0.0, 0.3, 0.6, 0.9]))
            self.recency_weight.copy_(torch.linspace(-1.0, 1.0, self.config.max_history))

    def item_vectors(
        self,
        features: ItemFeatures,
        rows: torch.Tensor | None = None,
        id_keep: torch.Tensor | None = None,  # (n,) bool: False drops the id part (training)
    ) -> torch.Tensor:
        """Vectors of catalog rows (all rows when `rows` is None). -> (n, d + 1)

        The last column is the item's bias; `user_vectors` ends with a matching
        constant 1, so a plain dot product scores `u·v + bias` everywhere.

        Rows beyond the id table (items added to the catalog after this version
        was made) get a content-only vector until the next version grows the table.
        `id_keep` lets training drop the id embedding of some rows so the content
        tower learns to score items alone (what a new item relies on).
        """
        if rows is None:
            rows = torch.arange(features.num_items)
            bags = features
        else:
            bags = features.subset(rows)
        content = self.content_proj(self.content(bags.token_ids, bags.offsets))  # (n, d)
        known = rows < self.config.num_items
        if id_keep is not None:
            known = known & id_keep
        safe_rows = torch.where(known, rows, torch.zeros_like(rows))
        keep = known.unsqueeze(1).to(content.dtype)  # (n, 1)
        vec = content + self.item_id(safe_rows) * keep  # (n, d)
        bias = self.content_bias(content) + self.item_bias(safe_rows) * keep  # (n, 1)
        return torch.cat([vec, bias], dim=1)

    def user_vectors(
        self,
        history_vecs: torch.Tensor,  # (b, L, d + 1) item vectors, oldest first, padding anywhere
        history_types: torch.Tensor,  # (b, L) event type ids, 0 = padding
        countries: torch.Tensor,  # (b,) country buckets
    ) -> torch.Tensor:
        """-> (b, d + 1), the last column 1 (it multiplies the item bias)."""
        d = self.config.embedding_dim
        history_vecs = history_vecs[..., :d]
        length = history_types.shape[1]
        # Recency weights are aligned to the right: the last column is the newest event.
        recency = self.recency_weight[-length:]  # (L,)
        logits = self.event_weight[history_types] + recency  # (b, L)
        logits = logits.masked_fill(history_types == 0, float("-inf"))
        weights = torch.softmax(logits, dim=1)
        weights = torch.nan_to_num(weights, nan=0.0)  # all-padding rows -> zero vector
        pooled = torch.einsum("bl,bld->bd", weights, history_vecs)  # (b, d)
        user = self.user_proj(pooled) + self.country(countries)  # (b, d)
        return torch.cat([user, torch.ones_like(user[:, :1])], dim=1)


def init_state(config: ModelConfig) -> dict[str, torch.Tensor]:
    """A seeded initialization (version 1 of a fresh deployment)."""
    return {k: v.detach().clone() for k, v in HybridTwoTower(config).state_dict().items()}


def load_model(config: ModelConfig, state: dict[str, torch.Tensor]) -> HybridTwoTower:
    model = HybridTwoTower(config)
    model.load_state_dict(state, strict=True)
    model.eval()
    return model


def grow_state(
    state: dict[str, torch.Tensor], config: ModelConfig, num_items: int
) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Grow the item-id table to `num_items` rows, keeping every trained row.

    New rows start at zero, so a new item is scored by its content until it is learned.
    """
    if num_items <= config.num_items:
        return state, config
    new_config = config.model_copy(update={"num_items": num_items})
    grown = dict(state)
    old = state["item_id.weight"]
    extra = torch.zeros(num_items - old.shape[0], old.shape[1], dtype=old.dtype)
    grown["item_id.weight"] = torch.cat([old, extra], dim=0)
    bias = state["item_bias.weight"]
    grown["item_bias.weight"] = torch.cat([bias, torch.zeros(extra.shape[0], 1, dtype=bias.dtype)])
    return grown, new_config


# What a personalizing node serves: this share of the global weights blended into its
# fine-tuned ones (NODE_PERSONALIZE_GLOBAL_SHARE; docs/evaluation.md "Personalization").
DEFAULT_PERSONAL_GLOBAL_SHARE = 0.2


def blend_states(
    local: dict[str, torch.Tensor], base: dict[str, torch.Tensor], base_share: float
) -> dict[str, torch.Tensor]:
    """(1 - base_share) * local + base_share * base, tensor by tensor.

    Personalization by model interpolation (Mansour et al., 2020): a node's fine-tuned
    weights pulled part of the way back to the global version they started from, which
    keeps what the other regions taught and what this region's own data adds.
    Both states must come from the same model config (same keys and shapes).
    """
    if not 0.0 <= base_share <= 1.0:
        raise ValueError(f"base_share must be in [0, 1], not {base_share}")
    if local.keys() != base.keys():
        raise ValueError("states to blend must have the same tensors")
    out: dict[str, torch.Tensor] = {}
    for name, t in local.items():
        b = base[name]
        if t.shape != b.shape:
            raise ValueError(f"{name}: shapes {tuple(t.shape)} and {tuple(b.shape)} differ")
        out[name] = torch.lerp(t, b.to(t.dtype), base_share) if t.is_floating_point() else t
    return out


def sampled_softmax_loss(
    user_vecs: torch.Tensor,  # (b, d)
    pos_vecs: torch.Tensor,  # (b, d)
    neg_vecs: torch.Tensor,  # (n, d) shared negatives
    pos_rows: torch.Tensor,  # (b,)
    neg_rows: torch.Tensor,  # (n,)
) -> torch.Tensor:
    """Softmax over the positive and shared sampled negatives; accidental hits are masked."""
    pos_logit = (user_vecs * pos_vecs).sum(dim=1, keepdim=True)  # (b, 1)
    neg_logits = user_vecs @ neg_vecs.T  # (b, n)
    neg_logits = neg_logits.masked_fill(pos_rows.unsqueeze(1) == neg_rows.unsqueeze(0), -1e9)
    logits = torch.cat([pos_logit, neg_logits], dim=1)
    target = torch.zeros(logits.shape[0], dtype=torch.long)
    return F.cross_entropy(logits, target)
