"""Regional insights computed inside the region (federated analytics).

Counts views and purchases by category, material, gemstone and price band, per
week over the most recent `weeks` weeks (ending at the region's latest event),
suppresses every cell with fewer than `min_users` distinct users, optionally
adds Laplace noise to the counts that remain, and derives shares and trends.
Only the resulting report leaves the node.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta

from shared.features import price_band, price_band_label
from shared.insights_schemas import (
    INSIGHT_DIMENSIONS,
    INSIGHT_KINDS,
    DimensionInsight,
    InsightCell,
    RegionReport,
)
from shared.schemas import CatalogItem

Event = tuple[str, str, str, float]  # (user_id, item_id, event_type, unix_time)


def week_start(ts: datetime) -> datetime:
    """Monday 00:00 UTC of the week holding ts."""
    day = ts.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return day - timedelta(days=day.weekday())


def item_attributes(item: CatalogItem) -> dict[str, str]:
    band = price_band(item.price_usd)
    return {
        "category": item.category or "unknown",
        "material": item.material or "unknown",
        "gemstone": item.gemstone or "none",
        "price_band": price_band_label(band) if band is not None else "unknown",
    }


def least_squares_slope(points: Sequence[tuple[int, float]]) -> float | None:
    """Slope of y on x; None with fewer than two distinct x."""
    if len({x for x, _ in points}) < 2:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    sxy = sum((x - mx) * (y - my) for x, y in points)
    return sxy / sxx


def _laplace(rng: random.Random, scale: float) -> float:
    u = rng.random() - 0.5
    return -scale * math.copysign(1.0, u) * math.log(1 - 2 * abs(u))


def compute_report(
    events: Iterable[Event],
    catalog: Sequence[CatalogItem],
    *,
    region: str,
    weeks: int,
    min_users: int,
    noise_scale: float = 0.0,
    rng: random.Random | None = None,
    now: datetime | None = None,
) -> RegionReport | None:
    """The region's report; None when the region has no events of a counted kind."""
    attrs = {item.item_id: item_attributes(item) for item in catalog}
    rows = [(u, attrs[i], k, t) for u, i, k, t in events if k in INSIGHT_KINDS and i in attrs]
    if not rows:
        return None
    as_of = datetime.fromtimestamp(max(t for *_, t in rows), UTC)
    last = week_start(as_of)
    starts = [last - timedelta(weeks=weeks - 1 - w) for w in range(weeks)]
    first = starts[0]
    rng = rng or random.Random()
    # (kind, dimension, value) -> per week event count and distinct users; window users too.
    counts: dict[tuple[str, str, str], list[int]] = {}  # (kind, dimension, value)
    users: dict[tuple[str, str, str], list[set[str]]] = {}
    window_users: dict[tuple[str, str, str], set[str]] = {}
    for user, a, kind, t in rows:
        ts = datetime.fromtimestamp(t, UTC)
        if ts < first:
            continue
        w = (week_start(ts) - first).days // 7
        for dim in INSIGHT_DIMENSIONS:
            key = (kind, dim, a[dim])
            if key not in counts:
                counts[key] = [0] * weeks
                users[key] = [set() for _ in range(weeks)]
                window_users[key] = set()
            counts[key][w] += 1
            users[key][w].add(user)
            window_users[key].add(user)

    def noised(n: int) -> int:
        return max(0, round(n + _laplace(rng, noise_scale))) if noise_scale > 0 else n

    kinds: dict[str, dict[str, DimensionInsight]] = {}
    for kind in INSIGHT_KINDS:
        kinds[kind] = {}
        for dim in INSIGHT_DIMENSIONS:
            keys = sorted(k for k in counts if k[0] == kind and k[1] == dim)
            suppressed = 0
            window: dict[str, int] = {}
            weekly: dict[str, list[int | None]] = {}
            for cell in keys:
                if len(window_users[cell]) < min_users:
                    suppressed += 1
                    continue
                window[cell[2]] = noised(sum(counts[cell]))
                weekly[cell[2]] = [
                    noised(c) if len(u) >= min_users else None
                    for c, u in zip(counts[cell], users[cell], strict=True)
                ]
            total = sum(window.values())
            week_totals = [sum(v[w] or 0 for v in weekly.values()) for w in range(weeks)]
            values: dict[str, InsightCell] = {}
            for value, n in window.items():
                shares: list[float | None] = [
                    (c / week_totals[w]) if c is not None and week_totals[w] > 0 else None
                    for w, c in enumerate(weekly[value])
                ]
                points = [(w, s) for w, s in enumerate(shares) if s is not None]
                values[value] = InsightCell(
                    events=n,
                    share=n / total if total else 0.0,
                    weekly_share=shares,
                    trend_per_week=least_squares_slope(points),
                )
            kinds[kind][dim] = DimensionInsight(
                reported_events=total,
                weekly_reported_events=week_totals,
                suppressed_cells=suppressed,
                values=values,
            )
    return RegionReport.model_validate(
        {
            "region": region,
            "generated_at": now or datetime.now(UTC),
            "as_of": as_of,
            "weeks": [s.date().isoformat() for s in starts],
            "min_users": min_users,
            "noise_scale": noise_scale,
            "kinds": kinds,
        }
    )
