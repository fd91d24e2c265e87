"""Scoring and filtering for `/v1/recommend`.

Everything that does not depend on the request is computed once per model
version and catalog: item vectors, row lookup, filter masks, prices. A
`ServingModel` is immutable; the node swaps the whole object atomically when a
new version arrives, so a request sees one version from start to end.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch

from regional_node.ann import (
    IvfIndex,
    IvfView,
    build_ivf,
    default_clusters,
    ivf_search,
    ivf_view,
)
from shared.features import ItemFeatures, build_item_features, country_bucket
from shared.model import EVENT_TYPE_IDS, HybridTwoTower, ModelConfig
from shared.schemas import CatalogItem, attribute_value
from shared.serialization import StateDict
from shared.training import UserSequence


@dataclass(frozen=True)
class CatalogIndex:
    """What serving needs from a catalog alone, shared by every model version on it.

    Built once per catalog (and content-bucket count): a new model version on the
    same catalog reuses the features, filter masks, prices and the cache of
    combined filter masks instead of rebuilding them.
    """

    content_buckets: int
    features: ItemFeatures
    item_ids: list[str]
    row_of: dict[str, int]
    active: torch.Tensor  # (n,) bool: recommendable
    price: torch.Tensor  # (n,) float, NaN when unknown
    masks: dict[str, dict[str, torch.Tensor]]  # field -> value -> mask
    blocked_cache: FilterCache[FilterPlan] = field(default_factory=lambda: FilterCache())


def build_catalog_index(
    catalog: Sequence[CatalogItem], inactive_item_ids: Sequence[str], content_buckets: int
) -> CatalogIndex:
    inactive = set(inactive_item_ids)
    active = torch.tensor([it.item_id not in inactive for it in catalog], dtype=torch.bool)
    price = torch.tensor(
        [float("nan") if it.price_usd is None else it.price_usd for it in catalog],
        dtype=torch.float32,
    )
    masks: dict[str, dict[str, torch.Tensor]] = {}
    for name in ("category", "material", "gemstone"):
        values: dict[str, list[int]] = {}
        for row, it in enumerate(catalog):
            value = getattr(it, name)
            if value:
                values.setdefault(value, []).append(row)
        per_value: dict[str, torch.Tensor] = {}
        for value, rows in values.items():
            mask = torch.zeros(len(catalog), dtype=torch.bool)
            mask[torch.tensor(rows)] = True
            per_value[value] = mask
        masks[name] = per_value
    return CatalogIndex(
        content_buckets=content_buckets,
        features=build_item_features(catalog, content_buckets),
        item_ids=[it.item_id for it in catalog],
        row_of={it.item_id: i for i, it in enumerate(catalog)},
        active=active,
        price=price,
        masks=masks,
    )


@dataclass(frozen=True)
class ServingModel:
    version: int
    sha256: str
    model: HybridTwoTower
    item_ids: list[str]
    row_of: dict[str, int]
    item_vecs: torch.Tensor  # (n, d + 1): the last column is the item bias
    active: torch.Tensor  # (n,) bool: recommendable
    price: torch.Tensor  # (n,) float, NaN when unknown
    masks: dict[str, dict[str, torch.Tensor]] = field(
        default_factory=dict
    )  # field -> value -> mask
    # (d, n) copy of item_vecs: u @ item_vecs_t reads memory in order, ~4x faster than
    # item_vecs @ u for a 50k-item catalog on one thread.
    item_vecs_t: torch.Tensor | None = None
    # True when the weights are the global version fine-tuned on this node's events ...
    personalized: bool = False
    # ... by the node's own fine-tune job (`Participant.personalize`), not a round's training.
    fine_tuned: bool = False
    blocked_cache: FilterCache[FilterPlan] = field(default_factory=lambda: FilterCache())
    catalog_index: CatalogIndex | None = None
    ivf: IvfIndex | None = None  # approximate search (regional_node/ann.py), None = exact
    ivf_candidates: int = 0  # allowed items scored exactly per request
    ivf_views: FilterCache[IvfView] = field(default_factory=lambda: FilterCache())

    @property
    def num_items(self) -> int:
        return len(self.item_ids)


def build_serving_model(
    version: int,
    sha256: str,
    config: ModelConfig,
    state: StateDict,
    catalog: Sequence[CatalogItem],
    inactive_item_ids: Sequence[str] = (),
    index: CatalogIndex | None = None,
    *,
    ivf_clusters: int | None = None,
    ivf_candidates: int = 2000,
    personalized: bool = False,
) -> ServingModel:
    """The serving form of a version; `index` (same catalog) skips the catalog work.

    `ivf_clusters` (0: about 2·sqrt(n)) builds an IVF index for approximate search,
    for catalogs of more than 4 x `ivf_candidates` items (smaller ones are scored
    exactly: that is as cheap). None: exact search only.
    """
    model = HybridTwoTower(config)
    model.load_state_dict(state, strict=True)
    model.eval()
    if (
        index is None
        or index.content_buckets != config.content_buckets
        or len(index.item_ids) != len(catalog)
    ):
        index = build_catalog_index(catalog, inactive_item_ids, config.content_buckets)
    with torch.no_grad():
        item_vecs = model.item_vectors(index.features).contiguous()
    ivf = None
    if ivf_clusters is not None and item_vecs.shape[0] > 4 * ivf_candidates:
        clusters = ivf_clusters or default_clusters(item_vecs.shape[0])
        ivf = build_ivf(item_vecs, clusters, seed=version)
    return ServingModel(
        personalized=personalized,
        ivf=ivf,
        ivf_candidates=ivf_candidates,
        item_vecs_t=item_vecs.T.contiguous(),
        version=version,
        sha256=sha256,
        model=model,
        item_ids=index.item_ids,
        row_of=index.row_of,
        item_vecs=item_vecs,
        active=index.active,
        price=index.price,
        masks=index.masks,
        blocked_cache=index.blocked_cache,
        catalog_index=index,
    )


V = TypeVar("V")


class FilterCache(Generic[V]):
    """LRU per filter combination: storefronts repeat a limited set of combinations."""

    def __init__(self, maxsize: int = 512) -> None:
        self._items: OrderedDict[Filters, V] = OrderedDict()
        self._maxsize = maxsize
        self._lock = threading.Lock()

    def get(self, key: Filters) -> V | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: Filters, value: V) -> None:
        with self._lock:
            self._items[key] = value
            while len(self._items) > self._maxsize:
                self._items.popitem(last=False)


@dataclass(frozen=True)
class FilterPlan:
    """What a filter combination leaves, computed once per catalog and combination."""

    blocked: torch.Tensor  # (n,) bool: rows never to recommend (inactive included)
    rows: torch.Tensor | None  # allowed rows when at most a quarter of the catalog, else None


@dataclass(frozen=True)
class Filters:
    """Attribute values are compared as the catalog stores them (`attribute_value`)."""

    category: str | None = None
    material: str | None = None
    gemstone: str | None = None
    max_price: float | None = None
    min_price: float | None = None

    def __post_init__(self) -> None:
        for name in ("category", "material", "gemstone"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, attribute_value(value))


def candidate_mask(serving: ServingModel, filters: Filters, exclude: Sequence[str]) -> torch.Tensor:
    mask = serving.active.clone()
    for name in ("category", "material", "gemstone"):
        value = getattr(filters, name)
        if value:
            value_mask = serving.masks[name].get(value)
            if value_mask is None:
                return torch.zeros_like(mask)
            mask &= value_mask
    if filters.max_price is not None:
        mask &= serving.price <= filters.max_price  # NaN compares False: unknown price excluded
    if filters.min_price is not None:
        mask &= serving.price >= filters.min_price
    rows = [serving.row_of[i] for i in exclude if i in serving.row_of]
    if rows:
        mask[torch.tensor(rows)] = False
    return mask


def user_vector(
    serving: ServingModel, known: Sequence[tuple[int, int]], country: int
) -> torch.Tensor:
    """`HybridTwoTower.user_vectors` for one user, without padding to max_history. -> (d + 1,)

    Padding positions get zero weight in the model, so dropping them gives the
    same vector with a third of the small tensor operations.
    """
    m = serving.model
    d = m.config.embedding_dim  # item vectors carry their bias in column d
    if known:
        rows = torch.tensor([r for r, _ in known])
        types = torch.tensor([t for _, t in known])
        logits = m.event_weight[types] + m.recency_weight[-len(known) :]  # (L,)
        pooled = torch.softmax(logits, dim=0) @ serving.item_vecs[rows, :d]  # (d,)
    else:
        pooled = torch.zeros(d)
    user = torch.addmv(m.user_proj.bias, m.user_proj.weight, pooled) + m.country.weight[country]
    return torch.cat([user, torch.ones(1)])  # the 1 multiplies the item bias


def filter_plan(serving: ServingModel, filters: Filters) -> FilterPlan:
    """The filter combination's blocked mask (and allowed rows, when few); cached, shared
    by every version on the catalog: do not modify."""
    cached = serving.blocked_cache.get(filters)
    if cached is None:
        allowed = candidate_mask(serving, filters, ())
        count = int(allowed.sum().item())
        rows = allowed.nonzero().flatten() if count <= serving.num_items // 4 else None
        cached = FilterPlan(blocked=~allowed, rows=rows)
        serving.blocked_cache.put(filters, cached)
    return cached


def blocked_mask(serving: ServingModel, filters: Filters) -> torch.Tensor:
    """Rows the filters rule out (inactive items included); cached, shared: do not modify."""
    return filter_plan(serving, filters).blocked


def history_rows(
    serving: ServingModel, history: Sequence[tuple[str, str]]
) -> list[tuple[int, int]]:
    """(row, event type id) of the newest `max_history` items the model knows, as
    training sees a history: the catalog's items only, distinct, in first-contact
    order, each with its strongest event type (`UserSequence.add`). `history` is raw
    events, oldest first, repeats included."""
    seq = UserSequence()
    for position, (item_id, event_type) in enumerate(history):
        row = serving.row_of.get(item_id)
        if row is not None:
            seq.add(row, EVENT_TYPE_IDS[event_type], position)
    return list(zip(seq.items, seq.types, strict=True))[-serving.model.config.max_history :]


@torch.no_grad()
def recommend(
    serving: ServingModel,
    history: Sequence[tuple[str, str]],  # (item_id, event_type), oldest first
    country: str | None,
    k: int,
    filters: Filters,
    exclude: Sequence[str],
    *,
    exact: bool = False,
) -> list[tuple[str, float]]:
    """Top-k items for a user vector built from the history; topk, never a full sort.

    With an IVF index on the serving model (NODE_RECOMMEND_SEARCH=ivf) only the items
    of the best clusters are scored; `exact` (or too few allowed items found there)
    scores every item.
    """
    cfg = serving.model.config
    known = history_rows(serving, history)
    user = user_vector(serving, known, country_bucket(country, cfg.country_buckets))  # (d,)
    plan = filter_plan(serving, filters)
    rows = [serving.row_of[i] for i in exclude if i in serving.row_of]
    ivf = None if exact else serving.ivf
    if plan.rows is not None:
        # Filters leave at most a quarter of the catalog: score exactly those (the same
        # answer as exact search; gathering them is cheaper than probing the index).
        scores = serving.item_vecs.index_select(0, plan.rows) @ user
        top = torch.topk(scores, min(k + len(rows), scores.numel()))
        return _ranked(serving, top.values, plan.rows[top.indices], rows, k)
    if ivf is not None:
        view = serving.ivf_views.get(filters)
        if view is None:
            view = ivf_view(ivf, plan.blocked)
            serving.ivf_views.put(filters, view)
        # k + exclusions best, then the excluded dropped: cheaper than masking them.
        values, found, exhausted = ivf_search(
            ivf, view, user, k + len(rows), serving.ivf_candidates
        )
        ranked = _ranked(serving, values, found, rows, k)
        if len(ranked) == k or exhausted:
            return ranked
    blocked = plan.blocked
    if serving.item_vecs_t is not None:
        scores = user @ serving.item_vecs_t  # (n,)
    else:
        scores = serving.item_vecs @ user
    scores.masked_fill_(blocked, float("-inf"))
    if rows:
        scores[torch.tensor(rows)] = float("-inf")
    top = torch.topk(scores, min(k, serving.num_items))
    return _ranked(serving, top.values, top.indices)


def _ranked(
    serving: ServingModel,
    values: torch.Tensor,
    rows: torch.Tensor,
    excluded: Sequence[int] = (),
    k: int | None = None,
) -> list[tuple[str, float]]:
    # Fewer candidates than k: the blocked rows come back as -inf and are dropped.
    skip = set(excluded)
    out = [
        (serving.item_ids[r], s)
        for s, r in zip(values.tolist(), rows.tolist(), strict=True)
        if s != float("-inf") and r not in skip
    ]
    return out if k is None else out[:k]
