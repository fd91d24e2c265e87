"""Synthetic cross-border jewelry market: a catalog plus 16 weeks of behaviour events.

The generator is deterministic for a seed (seeded `numpy.random.Generator`s, no
hash-ordered iteration, no BLAS reductions over floats) and vectorised so the
default scale (12k users, 2.5k items, ~200k events) takes a few seconds.
Every modelling assumption is documented in docs/market.md.

Model in one paragraph: each item has content attributes and a long-tailed base
popularity. Each user belongs to a region and draws a personal taste around the
region's taste (global trend + regional deviation). User->item affinity is
log popularity + taste match on category, material, gemstone, style tags and
price band (learnable from content) + a match of latent design vectors that no
catalog column records (learnable only from behaviour). Each user draws a small consideration
pool by affinity, then browses it in sessions where the next item tends to share
attributes and design with the previous one; every view may go down the funnel
click -> add_to_cart -> purchase with probabilities rising with taste match.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import numpy.typing as npt

from shared.data import EventRecord, write_catalog_csv, write_events_csv
from shared.schemas import EVENT_TYPES, CatalogItem

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

# --------------------------------------------------------------------------- vocabulary

CATEGORIES: tuple[str, ...] = (
    "ring",
    "necklace",
    "earrings",
    "bracelet",
    "pendant",
    "brooch",
    "anklet",
    "watch",
)
MATERIALS: tuple[str, ...] = (
    "gold",
    "rose_gold",
    "white_gold",
    "silver",
    "platinum",
    "titanium",
    "jade",
    "stainless_steel",
)
# Index 0 is "no gemstone"; it is written as an empty cell.
GEMSTONES: tuple[str, ...] = (
    "none",
    "diamond",
    "ruby",
    "sapphire",
    "emerald",
    "pearl",
    "jade",
    "opal",
    "amethyst",
)
STYLES: tuple[str, ...] = (
    "minimalist",
    "vintage",
    "bridal",
    "bohemian",
    "statement",
    "classic",
    "modern",
    "floral",
    "geometric",
    "art_deco",
    "romantic",
    "ethnic",
)

# Assortment mix of the catalog (what is sold, not what is liked).
_CATEGORY_FREQ = (0.24, 0.18, 0.17, 0.13, 0.10, 0.04, 0.04, 0.10)
_MATERIAL_FREQ = (0.22, 0.10, 0.12, 0.26, 0.07, 0.05, 0.06, 0.12)
_GEMSTONE_FREQ = (0.35, 0.20, 0.07, 0.08, 0.06, 0.09, 0.04, 0.05, 0.06)
_STYLE_FREQ = (0.14, 0.10, 0.07, 0.06, 0.08, 0.12, 0.11, 0.07, 0.07, 0.05, 0.08, 0.05)

# log(USD) price model: category base + material premium + gemstone premium + noise.
_PRICE_CATEGORY = (5.4, 5.3, 5.0, 5.1, 4.9, 4.8, 4.2, 6.0)
_PRICE_MATERIAL = (0.6, 0.5, 0.6, -0.9, 1.1, -0.5, 0.3, -1.1)
_PRICE_GEMSTONE = (0.0, 1.3, 0.8, 0.8, 0.9, 0.3, 0.4, 0.2, 0.0)
_PRICE_NOISE = 0.35

# --------------------------------------------------------------------------- tastes

# Shared preference of every market ("category:ring" -> log-weight), before regions deviate.
GLOBAL_TREND: Mapping[str, float] = {
    "category:ring": 0.4,
    "category:necklace": 0.35,
    "category:earrings": 0.3,
    "category:bracelet": 0.1,
    "category:brooch": -0.7,
    "category:anklet": -0.5,
    "category:watch": -0.1,
    "material:gold": 0.3,
    "material:rose_gold": 0.25,
    "material:white_gold": 0.1,
    "material:silver": 0.2,
    "material:titanium": -0.4,
    "material:jade": -0.5,
    "material:stainless_steel": -0.3,
    "gemstone:diamond": 0.4,
    "gemstone:sapphire": 0.1,
    "gemstone:pearl": 0.1,
    "gemstone:jade": -0.4,
    "gemstone:opal": -0.2,
    "gemstone:amethyst": -0.2,
    "style:minimalist": 0.4,
    "style:classic": 0.3,
    "style:modern": 0.25,
    "style:vintage": 0.1,
    "style:romantic": 0.1,
    "style:statement": -0.1,
    "style:bohemian": -0.1,
    "style:art_deco": -0.2,
    "style:ethnic": -0.3,
}
GLOBAL_PRICE_TOLERANCE = 0.85  # std-dev of the price band a user accepts, in log(USD)


@dataclass(frozen=True)
class RegionSpec:
    code: str
    share: float  # share of users before renormalising over the regions in use
    countries: tuple[str, ...]
    country_weights: tuple[float, ...]
    typical_price_usd: float  # centre of the region's price band
    taste: Mapping[str, float] = field(default_factory=dict)  # deviation from GLOBAL_TREND


REGIONS: tuple[RegionSpec, ...] = (
    RegionSpec(
        "EU",
        0.34,
        ("DE", "FR", "IT", "ES"),
        (0.35, 0.28, 0.20, 0.17),
        220.0,
        {
            "material:silver": 0.9,
            "material:gold": -0.4,
            "style:minimalist": 0.7,
            "style:vintage": 0.7,
            "style:art_deco": 0.4,
            "style:statement": -0.5,
        },
    ),
    RegionSpec(
        "NA",
        0.26,
        ("US", "CA"),
        (0.86, 0.14),
        350.0,
        {
            "gemstone:diamond": 0.6,
            "material:white_gold": 0.5,
            "style:bridal": 0.7,
            "style:classic": 0.3,
            "style:modern": 0.3,
            "category:watch": 0.4,
        },
    ),
    RegionSpec(
        "ME",
        0.15,
        ("AE", "SA", "QA"),
        (0.45, 0.42, 0.13),
        600.0,
        {
            "material:gold": 1.5,
            "style:statement": 1.2,
            "gemstone:diamond": 0.4,
            "gemstone:emerald": 0.5,
            "material:silver": -1.0,
            "style:minimalist": -0.7,
            "category:necklace": 0.3,
            "category:bracelet": 0.4,
        },
    ),
    RegionSpec(
        "EA",
        0.12,
        ("JP", "KR", "CN"),
        (0.38, 0.22, 0.40),
        300.0,
        {
            "material:jade": 1.6,
            "gemstone:jade": 1.2,
            "material:platinum": 1.0,
            "style:minimalist": 0.9,
            "gemstone:pearl": 0.5,
            "category:earrings": 0.3,
            "style:statement": -0.6,
            "material:gold": -0.3,
        },
    ),
    RegionSpec(
        "SEA",
        0.08,
        ("SG", "TH", "MY", "ID"),
        (0.30, 0.25, 0.20, 0.25),
        150.0,
        {
            "material:gold": 0.7,
            "material:rose_gold": 0.6,
            "style:floral": 0.7,
            "gemstone:pearl": 0.4,
            "style:romantic": 0.3,
        },
    ),
    RegionSpec(
        "LATAM",
        0.05,
        ("BR", "MX", "AR"),
        (0.50, 0.32, 0.18),
        90.0,
        {
            "gemstone:ruby": 0.8,
            "gemstone:emerald": 0.9,
            "gemstone:amethyst": 0.9,
            "gemstone:opal": 0.7,
            "gemstone:sapphire": 0.4,
            "gemstone:none": -0.6,
            "style:bohemian": 0.9,
            "style:floral": 0.5,
            "style:statement": 0.4,
            "material:silver": 0.4,
            "material:platinum": -0.8,
        },
    ),
)

# --------------------------------------------------------------------------- constants

MARKET_END = datetime(2026, 11, 1, tzinfo=UTC)
WINDOW = timedelta(weeks=16)
COLD_ITEM_WINDOW = timedelta(days=14)
COLD_ITEM_SHARE = 0.10
COLD_USER_SHARE = 0.15  # drawn as cold; brief regular users bring those with <= 2 events to ~20%
MISSING_CELL_RATE = 0.03

_POPULARITY_SIGMA = 1.0  # lognormal base popularity: a few items dominate
_NOVELTY_BOOST = 0.5  # new launches get promoted, so they are not all invisible
_TASTE_SCALE = 1.6  # taste vs popularity in affinity (see docs/market.md "Calibration")
_PERSONAL_NOISE = 0.4  # per-user deviation around the region taste
_FAVOURITE_BOOST = 0.8  # each user has a favourite category, material and style
_PERSONAL_PRICE_SIGMA = 0.45
_POOL_SIZE = 64  # consideration set per user: heavy users re-visit items
_POOL_AFFINITY = 0.5  # weight of affinity when choosing within the pool
_SIMILARITY_WEIGHT = 1.5  # pull towards items sharing attributes with the previous view
_LATENT_DIM = 8  # design qualities no catalog column records (silhouette, finish, ...)
DEFAULT_DESIGN_WEIGHT = 1.0  # latent design match in affinity (and in browsing similarity)
_LATENT_REGION_SIGMA = 0.5  # regional deviation of the latent taste
_DESIGN_STREAM = 0xDE5  # second seed word of the design vectors' random stream
_MAX_SESSIONS = 40
_MAX_VIEWS_PER_SESSION = 30
_SLOT_PER_VIEW_S = 1000  # every view + its funnel fits in this many seconds
_MIN_SESSION_GAP_S = 1800
_FUNNEL_BASE = (0.30, 0.30, 0.40)  # click | view, cart | click, purchase | cart
_FUNNEL_TASTE = (0.9, 0.6, 0.5)  # how strongly taste match moves each step
_USER_BATCH = 512


@dataclass(frozen=True)
class MarketSummary:
    out_dir: Path
    catalog_path: Path
    events_path: Path
    seed: int
    regions: tuple[str, ...]
    users: int
    items: int
    events: int
    users_per_region: dict[str, int]
    events_per_region: dict[str, int]
    event_types: dict[str, int]
    cold_item_ids: tuple[str, ...]  # launched in the last COLD_ITEM_WINDOW
    cold_user_ids: tuple[str, ...]  # users with at most 2 events
    start: datetime
    end: datetime
    cold_items_since: datetime

    @property
    def cold_items(self) -> int:
        return len(self.cold_item_ids)

    @property
    def cold_users(self) -> int:
        return len(self.cold_user_ids)

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly overview (ids left out: they are long)."""
        return {
            "out_dir": str(self.out_dir),
            "catalog_path": str(self.catalog_path),
            "events_path": str(self.events_path),
            "seed": self.seed,
            "regions": list(self.regions),
            "users": self.users,
            "items": self.items,
            "events": self.events,
            "users_per_region": dict(self.users_per_region),
            "events_per_region": dict(self.events_per_region),
            "event_types": dict(self.event_types),
            "cold_items": self.cold_items,
            "cold_users": self.cold_users,
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "cold_items_since": self.cold_items_since.isoformat(),
        }


# --------------------------------------------------------------------------- helpers


def _gumbel(rng: np.random.Generator, shape: tuple[int, ...]) -> FloatArray:
    return -np.log(-np.log(rng.random(shape) + 1e-300) + 1e-300)


def _log(freqs: tuple[float, ...]) -> FloatArray:
    return np.log(np.asarray(freqs, dtype=np.float64))


def _taste_vector(taste: Mapping[str, float], kind: str, values: tuple[str, ...]) -> FloatArray:
    return np.array([taste.get(f"{kind}:{v}", 0.0) for v in values], dtype=np.float64)


def _region_specs(n: int, rng: np.random.Generator) -> list[RegionSpec]:
    specs = list(REGIONS[:n])
    keys = (
        [f"category:{v}" for v in CATEGORIES]
        + [f"material:{v}" for v in MATERIALS]
        + [f"gemstone:{v}" for v in GEMSTONES]
        + [f"style:{v}" for v in STYLES]
    )
    for k in range(len(REGIONS) + 1, n + 1):
        # Synthetic small markets with random (but seeded) taste deviations.
        dev = rng.normal(0.0, 0.6, len(keys))
        specs.append(
            RegionSpec(
                code=f"R{k}",
                share=0.04 * 0.85 ** (k - len(REGIONS) - 1),
                countries=(f"R{k}A", f"R{k}B"),
                country_weights=(0.6, 0.4),
                typical_price_usd=float(np.exp(np.log(200.0) + rng.normal(0.0, 0.4))),
                taste=dict(zip(keys, dev.tolist(), strict=True)),
            )
        )
    return specs


def _allocate(total: int, shares: FloatArray) -> IntArray:
    """Largest-remainder split of `total` by `shares`, at least 1 each."""
    shares = shares / shares.sum()
    raw = shares * (total - len(shares))
    counts = np.floor(raw).astype(np.int64) + 1
    rest = total - int(counts.sum())
    order = np.argsort(-(raw - np.floor(raw)), kind="stable")
    counts[order[:rest]] += 1
    return counts


def _segment_starts(lengths: IntArray) -> IntArray:
    starts = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1], out=starts[1:])
    return starts


def _segment_cumsum(values: IntArray, lengths: IntArray) -> IntArray:
    """Cumulative sum restarting at each segment (segments are contiguous, in order)."""
    total = np.cumsum(values)
    before = np.concatenate(([0], total))[_segment_starts(lengths)]
    return total - np.repeat(before, lengths)


# --------------------------------------------------------------------------- catalog


@dataclass
class _Catalog:
    ids: list[str]
    cat: IntArray
    mat: IntArray
    gem: IntArray
    styles: IntArray  # (N, 3), -1 = no tag
    n_styles: IntArray
    log_price: FloatArray
    log_pop: FloatArray
    launch_s: IntArray  # seconds from window start; < 0 means on sale before the window
    cold: npt.NDArray[np.bool_]
    items: list[CatalogItem]


def _title(word: str) -> str:
    return " ".join(part.capitalize() for part in word.split("_"))


def _make_catalog(rng: np.random.Generator, n: int, window_s: int) -> _Catalog:
    n_cat, n_mat, n_gem, n_sty = len(CATEGORIES), len(MATERIALS), len(GEMSTONES), len(STYLES)
    cat = rng.choice(n_cat, size=n, p=np.asarray(_CATEGORY_FREQ) / sum(_CATEGORY_FREQ))

    watch = CATEGORIES.index("watch")
    mat_logits = np.tile(_log(_MATERIAL_FREQ), (n, 1))
    is_watch = cat == watch
    mat_logits[is_watch, MATERIALS.index("stainless_steel")] += np.log(4.0)
    mat_logits[is_watch, MATERIALS.index("titanium")] += np.log(3.0)
    mat_logits[is_watch, MATERIALS.index("jade")] = -np.inf  # no jade watches
    mat_logits[cat == CATEGORIES.index("anklet"), MATERIALS.index("platinum")] += np.log(0.3)
    mat = np.argmax(mat_logits + _gumbel(rng, (n, n_mat)), axis=1)

    gem_logits = np.tile(_log(_GEMSTONE_FREQ), (n, 1))
    gem_logits[is_watch, 2:] = -np.inf  # watches: plain or diamond-set
    gem_logits[is_watch, 0] += np.log(3.0)
    gem = np.argmax(gem_logits + _gumbel(rng, (n, n_gem)), axis=1)
    gem[mat == MATERIALS.index("jade")] = 0  # jade pieces are the stone themselves

    sty_logits = np.tile(_log(_STYLE_FREQ), (n, 1))
    s = STYLES.index
    sty_logits[cat == CATEGORIES.index("ring"), s("bridal")] += 1.5
    sty_logits[gem == GEMSTONES.index("diamond"), s("bridal")] += 0.8
    sty_logits[
        np.isin(mat, [MATERIALS.index("platinum"), MATERIALS.index("white_gold")]), s("bridal")
    ] += 0.5
    sty_logits[cat == CATEGORIES.index("brooch"), s("floral")] += 1.0
    sty_logits[
        np.isin(cat, [CATEGORIES.index("necklace"), CATEGORIES.index("brooch")]), s("statement")
    ] += 0.7
    sty_logits[mat == MATERIALS.index("gold"), s("statement")] += 0.5
    plain_metal = np.isin(
        mat, [MATERIALS.index(m) for m in ("silver", "titanium", "stainless_steel")]
    )
    sty_logits[plain_metal, s("minimalist")] += 0.6
    sty_logits[mat == MATERIALS.index("jade"), s("ethnic")] += 1.2
    sty_logits[cat == CATEGORIES.index("anklet"), s("bohemian")] += 0.6
    sty_logits[gem == GEMSTONES.index("pearl"), s("classic")] += 0.6
    sty_logits[is_watch, s("modern")] += 0.8
    ranked = np.argsort(-(sty_logits + _gumbel(rng, (n, n_sty))), axis=1, kind="stable")[:, :3]
    n_styles = rng.choice(3, size=n, p=[0.35, 0.40, 0.25]) + 1
    styles = np.where(np.arange(3)[None, :] < n_styles[:, None], ranked, -1)

    log_price = (
        np.asarray(_PRICE_CATEGORY)[cat]
        + np.asarray(_PRICE_MATERIAL)[mat]
        + np.asarray(_PRICE_GEMSTONE)[gem]
        + rng.normal(0.0, _PRICE_NOISE, n)
    )
    price = np.maximum(np.round(np.exp(log_price)), 5.0)  # whole dollars, as shops price

    cold = rng.random(n) < COLD_ITEM_SHARE
    cold_window = int(COLD_ITEM_WINDOW.total_seconds())
    launch = rng.integers(window_s - cold_window, window_s - 12 * 3600, n)
    launch_s = np.where(cold, launch, -1).astype(np.int64)
    log_pop = rng.normal(0.0, _POPULARITY_SIGMA, n) + np.where(cold, _NOVELTY_BOOST, 0.0)

    # Published catalog is incomplete: ~3% of each attribute cell is blank.
    missing = rng.random((n, 6)) < MISSING_CELL_RATE
    width = max(5, len(str(n)))
    ids = [f"J{i + 1:0{width}d}" for i in range(n)]
    items: list[CatalogItem] = []
    cat_l, mat_l, gem_l = cat.tolist(), mat.tolist(), gem.tolist()
    styles_l, price_l, miss_l = styles.tolist(), price.tolist(), missing.tolist()
    for i in range(n):
        c, m, g = CATEGORIES[cat_l[i]], MATERIALS[mat_l[i]], GEMSTONES[gem_l[i]]
        tags = [STYLES[t] for t in styles_l[i] if t >= 0]
        gem_word = f"{_title(g)} " if g != "none" else ""
        title = f"{_title(tags[0])} {_title(m)} {gem_word}{_title(c)}"
        miss = miss_l[i]
        items.append(
            CatalogItem(
                item_id=ids[i],
                title=None if miss[0] else title,
                category=None if miss[1] else c,
                material=None if miss[2] else m,
                gemstone=None if (miss[3] or g == "none") else g,
                style_tags=[] if miss[4] else tags,
                price_usd=None if miss[5] else price_l[i],
            )
        )
    return _Catalog(
        ids=ids,
        cat=cat.astype(np.int64),
        mat=mat.astype(np.int64),
        gem=gem.astype(np.int64),
        styles=styles.astype(np.int64),
        n_styles=n_styles.astype(np.int64),
        log_price=np.log(price),
        log_pop=log_pop,
        launch_s=launch_s,
        cold=cold,
        items=items,
    )


# --------------------------------------------------------------------------- users


@dataclass
class _Users:
    region: IntArray
    country: list[str]
    w_cat: FloatArray  # (U, n_categories) log-weights
    w_mat: FloatArray
    w_gem: FloatArray
    w_sty: FloatArray
    price_mu: FloatArray  # preferred log(price)
    cold: npt.NDArray[np.bool_]


def _make_users(rng: np.random.Generator, n: int, specs: list[RegionSpec]) -> _Users:
    counts = _allocate(n, np.array([r.share for r in specs]))
    region = rng.permutation(np.repeat(np.arange(len(specs)), counts))
    country_idx = np.zeros(n, dtype=np.int64)
    for r, spec in enumerate(specs):
        members = np.flatnonzero(region == r)
        p = np.asarray(spec.country_weights) / sum(spec.country_weights)
        country_idx[members] = rng.choice(len(spec.countries), size=len(members), p=p)
    country = [
        specs[r].countries[c] for r, c in zip(region.tolist(), country_idx.tolist(), strict=True)
    ]

    def personal(kind: str, values: tuple[str, ...], favourite: bool) -> FloatArray:
        base = _taste_vector(GLOBAL_TREND, kind, values)
        regional = np.stack([base + _taste_vector(s.taste, kind, values) for s in specs])
        w = regional[region] + rng.normal(0.0, _PERSONAL_NOISE, (n, len(values)))
        if favourite:
            # Favourite drawn from the region's own preference, so it reinforces the region.
            fav = np.argmax(regional[region] + _gumbel(rng, (n, len(values))), axis=1)
            w[np.arange(n), fav] += _FAVOURITE_BOOST
        return w

    w_cat = personal("category", CATEGORIES, True)
    w_mat = personal("material", MATERIALS, True)
    w_gem = personal("gemstone", GEMSTONES, False)
    w_sty = personal("style", STYLES, True)
    region_mu = np.log(np.array([s.typical_price_usd for s in specs]))
    price_mu = region_mu[region] + rng.normal(0.0, _PERSONAL_PRICE_SIGMA, n)
    cold = rng.random(n) < COLD_USER_SHARE
    return _Users(region, country, w_cat, w_mat, w_gem, w_sty, price_mu, cold)


@dataclass
class _Design:
    """Latent design: never published, learnable only from behaviour."""

    items: FloatArray  # (N, _LATENT_DIM) design vector of each item
    users: FloatArray  # (U, _LATENT_DIM) design taste of each user
    weight: float  # of the design match in affinity and in browsing similarity


def _draw_design(
    seed: int, user_region: IntArray, n_regions: int, n_items: int, weight: float
) -> _Design:
    """Design vectors and tastes from their own random stream: the main stream, and so
    a market generated with weight 0, is the same as before latent design existed."""
    rng = np.random.default_rng([seed, _DESIGN_STREAM])
    items = rng.normal(0.0, 1.0, (n_items, _LATENT_DIM)) / np.sqrt(_LATENT_DIM)
    region_mean = rng.normal(0.0, _LATENT_REGION_SIGMA, (n_regions, _LATENT_DIM))
    users = region_mean[user_region] + rng.normal(0.0, 1.0, (len(user_region), _LATENT_DIM))
    return _Design(items, users, weight)


def _taste(users: _Users, rows: slice, cat: _Catalog, items: IntArray) -> FloatArray:
    """Content taste match of users[rows] for `items`: shape (rows, len(items))."""
    t = users.w_cat[rows][:, cat.cat[items]]
    t += users.w_mat[rows][:, cat.mat[items]]
    t += users.w_gem[rows][:, cat.gem[items]]
    styles = cat.styles[items]
    w_sty = users.w_sty[rows]
    sty_sum = np.zeros_like(t)
    for k in range(styles.shape[1]):
        valid = styles[:, k] >= 0
        sty_sum += np.where(valid[None, :], w_sty[:, np.maximum(styles[:, k], 0)], 0.0)
    t += sty_sum / cat.n_styles[items][None, :]
    diff = cat.log_price[items][None, :] - users.price_mu[rows][:, None]
    t -= diff * diff / (2.0 * GLOBAL_PRICE_TOLERANCE**2)
    return t


# --------------------------------------------------------------------------- behaviour


def _design_match(a: FloatArray, b: FloatArray) -> FloatArray:
    """a @ b.T over the last axis (batched), summed in a fixed order: no BLAS, so
    the result, and therefore the generated files, do not depend on the CPU."""
    out = a[..., :, None, 0] * b[..., None, :, 0]
    for k in range(1, a.shape[-1]):
        out = out + a[..., :, None, k] * b[..., None, :, k]
    return out


def _sessions(rng: np.random.Generator, users: _Users) -> tuple[IntArray, IntArray]:
    """Sessions per user and views per session (flattened, grouped by user)."""
    n = len(users.region)
    n_sessions = np.ceil(np.exp(rng.normal(0.9, 0.8, n))).astype(np.int64)
    n_sessions = np.clip(n_sessions, 1, _MAX_SESSIONS)
    n_sessions[users.cold] = 1
    sess_user = np.repeat(np.arange(n), n_sessions)
    views = np.minimum(rng.geometric(1.0 / 3.5, len(sess_user)), _MAX_VIEWS_PER_SESSION)
    cold_views = rng.choice([1, 2], size=n, p=[0.6, 0.4])
    cold_sess = users.cold[sess_user]
    views[cold_sess] = cold_views[sess_user[cold_sess]]
    return n_sessions, views.astype(np.int64)


def _session_starts(
    rng: np.random.Generator, n_sessions: IntArray, views: IntArray, window_s: int
) -> IntArray:
    """Non-overlapping session start times spread at random over the window."""
    reserved = views * _SLOT_PER_VIEW_S
    n_users = len(n_sessions)
    sess_user = np.repeat(np.arange(n_users), n_sessions)
    busy = np.bincount(sess_user, weights=reserved, minlength=n_users)
    free = np.maximum(window_s - busy - _MIN_SESSION_GAP_S * (n_sessions + 1), 0.0)
    # S+1 exponential spacings per user, normalised: uniform random placement.
    spacing = rng.exponential(1.0, len(sess_user) + n_users)
    sp_user = np.repeat(np.arange(n_users), n_sessions + 1)
    sp_total = np.bincount(sp_user, weights=spacing, minlength=n_users)
    # Drop each user's last spacing (time after the final session).
    keep = np.ones(len(spacing), dtype=bool)
    keep[_segment_starts(n_sessions + 1) + n_sessions] = False
    gaps = (spacing[keep] / sp_total[sess_user]) * free[sess_user]
    gaps = np.floor(gaps).astype(np.int64) + _MIN_SESSION_GAP_S
    before = _segment_cumsum(gaps, n_sessions) + _segment_cumsum(reserved, n_sessions) - reserved
    return before.astype(np.int64)


def _browse(
    rng: np.random.Generator,
    users: _Users,
    cat: _Catalog,
    n_sessions: IntArray,
    views: IntArray,
    sess_start: IntArray,
    design: _Design,
) -> tuple[IntArray, FloatArray]:
    """Item and standardised taste match of every view, in (user, session, step) order."""
    n_users, n_items = len(n_sessions), len(cat.ids)
    pool_size = min(_POOL_SIZE, n_items)
    all_items = np.arange(n_items)
    first_sess = _segment_starts(n_sessions)
    first_view = _segment_starts(views)
    view_item = np.zeros(int(views.sum()), dtype=np.int64)
    view_z = np.zeros(int(views.sum()), dtype=np.float64)
    multi_hot = np.zeros((n_items, len(STYLES)), dtype=np.float32)
    for k in range(3):
        has = cat.styles[:, k] >= 0
        multi_hot[np.flatnonzero(has), cat.styles[has, k]] = 1.0

    for u0 in range(0, n_users, _USER_BATCH):
        u1 = min(u0 + _USER_BATCH, n_users)
        rows = slice(u0, u1)
        taste = _taste(users, rows, cat, all_items)
        affinity = cat.log_pop[None, :] + _TASTE_SCALE * taste
        affinity += design.weight * _design_match(design.users[rows], design.items)
        # Consideration pool: Gumbel top-k = sampling by affinity without replacement.
        keys = affinity + _gumbel(rng, affinity.shape)
        pool = np.argpartition(-keys, pool_size - 1, axis=1)[:, :pool_size]
        pool = np.take_along_axis(pool, np.argsort(pool, axis=1), axis=1)  # canonical order
        p_aff = np.take_along_axis(affinity, pool, axis=1)
        p_taste = np.take_along_axis(taste, pool, axis=1)
        p_z = (p_taste - p_taste.mean(1, keepdims=True)) / (p_taste.std(1, keepdims=True) + 1e-9)
        # Attribute overlap between pool items: exact small integers, so order-independent.
        pc, pm, pg = cat.cat[pool], cat.mat[pool], cat.gem[pool]
        sim = (pc[:, :, None] == pc[:, None, :]).astype(np.float32)
        sim += pm[:, :, None] == pm[:, None, :]
        sim += 0.5 * ((pg[:, :, None] == pg[:, None, :]) & (pg[:, :, None] > 0))
        mh = multi_hot[pool]
        sim += 0.5 * (mh @ mh.transpose(0, 2, 1))
        pd = design.items[pool]
        sim += design.weight * np.sqrt(_LATENT_DIM) * _design_match(pd, pd)
        diag = np.arange(pool_size)
        sim[:, diag, diag] = -3.0  # rarely re-view the item just seen

        s0, s1 = int(first_sess[u0]), int(first_sess[u1 - 1] + n_sessions[u1 - 1])
        sess_local_user = np.repeat(np.arange(u1 - u0), n_sessions[u0:u1])
        launch = cat.launch_s[pool][sess_local_user]  # (sessions, pool)
        available = launch <= sess_start[s0:s1, None]
        available[~available.any(axis=1)] = True
        base = np.where(available, _POOL_AFFINITY * p_aff[sess_local_user], -np.inf)
        sess_views = views[s0:s1]
        prev = np.zeros(s1 - s0, dtype=np.int64)
        for t in range(int(sess_views.max())):
            active = np.flatnonzero(sess_views > t)
            logits = base[active]
            if t > 0:
                logits = logits + _SIMILARITY_WEIGHT * sim[sess_local_user[active], prev[active]]
            choice = np.argmax(logits + _gumbel(rng, logits.shape), axis=1)
            prev[active] = choice
            out = first_view[s0 + active] + t
            lu = sess_local_user[active]
            view_item[out] = pool[lu, choice]
            view_z[out] = p_z[lu, choice]
    return view_item, view_z


def _funnel_depth(
    rng: np.random.Generator,
    view_z: FloatArray,
    cold_view: npt.NDArray[np.bool_],
    views_of_user: IntArray,
) -> IntArray:
    """0 = view only, 1 = click, 2 = add_to_cart, 3 = purchase."""
    depth = np.zeros(len(view_z), dtype=np.int64)
    going = np.ones(len(view_z), dtype=bool)
    for stage, (rate, slope) in enumerate(zip(_FUNNEL_BASE, _FUNNEL_TASTE, strict=True)):
        # Viewed items match taste better than average, so calibrate the intercept to
        # hit the target conversion rate among those still in the funnel.
        z = view_z[going]
        lo, hi = -12.0, 12.0
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            if float(np.mean(1.0 / (1.0 + np.exp(-(mid + slope * z))))) < rate:
                lo = mid
            else:
                hi = mid
        p = 1.0 / (1.0 + np.exp(-(0.5 * (lo + hi) + slope * view_z)))
        going &= rng.random(len(view_z)) < p
        depth[going] = stage + 1
    # Cold users stay at 1-2 events in total.
    depth[cold_view & (views_of_user >= 2)] = 0
    depth[cold_view] = np.minimum(depth[cold_view], 1)
    return depth


def _gap_seconds(
    rng: np.random.Generator, n: int, median: float, sigma: float, lo: int, hi: int
) -> IntArray:
    return np.clip(np.round(median * np.exp(rng.normal(0.0, sigma, n))), lo, hi).astype(np.int64)


# --------------------------------------------------------------------------- entry point


def generate_market(
    out_dir: Path,
    *,
    seed: int,
    regions: int = 6,
    users: int = 12000,
    items: int = 2500,
    end: datetime = MARKET_END,
    design_weight: float = DEFAULT_DESIGN_WEIGHT,
) -> MarketSummary:
    """Write `catalog.csv` and `events.csv` (with region column) into `out_dir`.

    Same arguments -> byte-identical files.
    """
    if regions < 1:
        raise ValueError("regions must be >= 1")
    if users < regions:
        raise ValueError("users must be >= regions (every region needs a customer)")
    if items < 1:
        raise ValueError("items must be >= 1")
    if not (math.isfinite(design_weight) and design_weight >= 0):
        raise ValueError("design_weight must be a finite number >= 0")
    end = end.replace(tzinfo=UTC) if end.tzinfo is None else end.astimezone(UTC)
    start = end - WINDOW
    window_s = int(WINDOW.total_seconds())
    rng = np.random.default_rng(seed)

    specs = _region_specs(regions, rng)
    catalog = _make_catalog(rng, items, window_s)
    people = _make_users(rng, users, specs)
    design = _draw_design(seed, people.region, len(specs), items, design_weight)
    n_sessions, views = _sessions(rng, people)
    sess_start = _session_starts(rng, n_sessions, views, window_s)
    view_item, view_z = _browse(rng, people, catalog, n_sessions, views, sess_start, design)

    sess_user = np.repeat(np.arange(users), n_sessions)
    view_sess = np.repeat(np.arange(len(views)), views)
    view_user = sess_user[view_sess]
    views_of_user = np.bincount(view_user, minlength=users)
    depth = _funnel_depth(rng, view_z, people.cold[view_user], views_of_user[view_user])

    # One row per funnel stage reached; stage 0 is the view itself.
    per_view = depth + 1
    ev_view = np.repeat(np.arange(len(view_item)), per_view)
    stage = np.arange(len(ev_view)) - np.repeat(_segment_starts(per_view), per_view)
    n_ev = len(ev_view)
    gap = np.select(
        [stage == 0, stage == 1, stage == 2, stage == 3],
        [
            _gap_seconds(rng, n_ev, 60.0, 0.8, 5, 400),  # next view
            _gap_seconds(rng, n_ev, 12.0, 0.6, 2, 60),  # click
            _gap_seconds(rng, n_ev, 40.0, 0.6, 5, 200),  # add to cart
            _gap_seconds(rng, n_ev, 120.0, 0.7, 20, 330),  # checkout
        ],
    )
    ev_sess = view_sess[ev_view]
    first_in_sess = np.zeros(n_ev, dtype=bool)
    first_in_sess[_segment_starts(np.bincount(ev_sess, minlength=len(views)))] = True
    gap[first_in_sess] = 0
    ev_per_sess = np.bincount(ev_sess, minlength=len(views))
    ev_time = sess_start[ev_sess] + _segment_cumsum(gap, ev_per_sess)
    ev_user = sess_user[ev_sess]
    ev_item = view_item[ev_view]

    # Chronological log, as a shop would export it; per-user order is preserved.
    order = np.lexsort((np.arange(n_ev), ev_user, ev_time))
    width = max(5, len(str(users)))
    user_ids = [f"U{i + 1:0{width}d}" for i in range(users)]
    region_codes = [s.code for s in specs]
    user_region = people.region.tolist()
    records = [
        EventRecord(
            user_ids[u],
            catalog.ids[i],
            EVENT_TYPES[s],
            start + timedelta(seconds=t),
            people.country[u],
            region_codes[user_region[u]],
        )
        for u, i, s, t in zip(
            ev_user[order].tolist(),
            ev_item[order].tolist(),
            stage[order].tolist(),
            ev_time[order].tolist(),
            strict=True,
        )
    ]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    catalog_path, events_path = out_dir / "catalog.csv", out_dir / "events.csv"
    # Both files are written beside the old ones first and swapped in together at the
    # end: an interrupted run leaves the old pair (never a new catalog with old events).
    staged = [out_dir / f".{p.name}.{os.getpid()}.new" for p in (catalog_path, events_path)]
    try:
        write_catalog_csv(staged[0], catalog.items)
        write_events_csv(staged[1], records, include_region=True)
        os.replace(staged[0], catalog_path)
        os.replace(staged[1], events_path)
    finally:
        for path in staged:
            path.unlink(missing_ok=True)

    events_of_user = np.bincount(ev_user, minlength=users)
    ev_region = people.region[ev_user]
    return MarketSummary(
        out_dir=out_dir,
        catalog_path=catalog_path,
        events_path=events_path,
        seed=seed,
        regions=tuple(region_codes),
        users=users,
        items=items,
        events=n_ev,
        users_per_region={
            c: int(k)
            for c, k in zip(
                region_codes, np.bincount(people.region, minlength=regions), strict=True
            )
        },
        events_per_region={
            c: int(k)
            for c, k in zip(region_codes, np.bincount(ev_region, minlength=regions), strict=True)
        },
        event_types={
            name: int(k)
            for name, k in zip(
                EVENT_TYPES, np.bincount(stage, minlength=len(EVENT_TYPES)), strict=True
            )
        },
        cold_item_ids=tuple(catalog.ids[i] for i in np.flatnonzero(catalog.cold).tolist()),
        cold_user_ids=tuple(user_ids[u] for u in np.flatnonzero(events_of_user <= 2).tolist()),
        start=start,
        end=end,
        cold_items_since=end - COLD_ITEM_WINDOW,
    )
