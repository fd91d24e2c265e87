"""Content features of catalog items, hashed into fixed buckets.

Hashing (instead of a vocabulary) means a new material or style tag never
changes a parameter's shape: only the item-id table grows with the catalog.
The hash is crc32, stable across processes and machines.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from shared.schemas import CatalogItem

# Price bands on a log scale: <50, 50-100, 100-200, ... each band doubles.
_PRICE_BAND_BASE = 50.0
NUM_PRICE_BANDS = 10


def price_band(price_usd: float | None) -> int | None:
    if price_usd is None or price_usd <= 0:
        return None
    band = math.floor(math.log2(max(price_usd, 1e-9) / _PRICE_BAND_BASE)) + 1
    return max(0, min(NUM_PRICE_BANDS - 1, band))


def price_band_label(band: int) -> str:
    low = 0 if band == 0 else int(_PRICE_BAND_BASE * 2 ** (band - 1))
    if band == NUM_PRICE_BANDS - 1:
        return f"${low}+"
    high = int(_PRICE_BAND_BASE * 2**band)
    return f"${low}-{high}"


def item_tokens(item: CatalogItem) -> list[str]:
    """The content tokens of an item; missing attributes simply contribute nothing."""
    tokens: list[str] = []
    if item.category:
        tokens.append(f"category={item.category}")
    if item.material:
        tokens.append(f"material={item.material}")
    if item.gemstone:
        tokens.append(f"gemstone={item.gemstone}")
    tokens.extend(f"style={tag}" for tag in item.style_tags)
    band = price_band(item.price_usd)
    if band is not None:
        tokens.append(f"price_band={band}")
        if item.category:
            # Price means different things per category (a cheap ring vs a cheap watch).
            tokens.append(f"category_price={item.category}:{band}")
    return tokens


def bucket(token: str, num_buckets: int) -> int:
    return zlib.crc32(token.encode("utf-8")) % num_buckets


def country_bucket(country: str | None, num_buckets: int) -> int:
    """Bucket 0 is reserved for an unknown country."""
    if not country:
        return 0
    return 1 + zlib.crc32(country.upper().encode("utf-8")) % (num_buckets - 1)


@dataclass(frozen=True)
class ItemFeatures:
    """Flattened bags of content-token buckets, one bag per catalog row (EmbeddingBag input)."""

    token_ids: torch.Tensor  # (total_tokens,) int64
    offsets: torch.Tensor  # (num_items,) int64, start of each item's bag
    num_items: int

    def subset(self, rows: torch.Tensor) -> ItemFeatures:
        """The bags of the given rows, in that order."""
        ends = torch.cat([self.offsets[1:], torch.tensor([self.token_ids.numel()])])
        starts = self.offsets[rows]
        lengths = ends[rows] - starts
        if lengths.numel() == 0:
            return ItemFeatures(
                token_ids=torch.zeros(0, dtype=torch.long),
                offsets=torch.zeros(0, dtype=torch.long),
                num_items=0,
            )
        # Build gather indices for the concatenated bags without a Python loop.
        new_offsets = torch.zeros_like(lengths)
        new_offsets[1:] = torch.cumsum(lengths, 0)[:-1]
        total = int(lengths.sum())
        idx = torch.arange(total) - torch.repeat_interleave(new_offsets, lengths)
        idx = idx + torch.repeat_interleave(starts, lengths)
        return ItemFeatures(
            token_ids=self.token_ids[idx], offsets=new_offsets, num_items=int(rows.numel())
        )


def build_item_features(items: Sequence[CatalogItem], num_buckets: int) -> ItemFeatures:
    token_ids: list[int] = []
    offsets: list[int] = []
    for item in items:
        offsets.append(len(token_ids))
        token_ids.extend(bucket(t, num_buckets) for t in item_tokens(item))
    return ItemFeatures(
        token_ids=torch.tensor(token_ids, dtype=torch.long),
        offsets=torch.tensor(offsets, dtype=torch.long),
        num_items=len(items),
    )
