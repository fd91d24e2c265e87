"""Regional insights computed inside the region (federated analytics).

Counts views and purchases by category, material, gemstone and price band, per
week over the most recent `weeks` weeks (ending at the region's latest event),
suppresses every cell with fewer than `min_users` distinct users, adds Laplace
noise to the counts that remain (`noise_scale`; a node's default is 2), and derives
shares and trends. Only the resulting report leaves the node.

Suppression alone does not hide a small cell from subtraction: a dimension's total
against another's, or a cell's window count against its published weeks, leaves the
suppressed part. The noise makes every such difference noisy. It is drawn by the
cell-key method: each event has a pseudo-random key (an HMAC under a secret that
never leaves the node), a cell's key is the sum of its events' keys, and the noise
is a function of that sum. The same cell reported again gets the same noise, so
repeated reports cannot be averaged to remove it.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta

from shared.features import price_band, price_band_label
from shared.insights_schemas import (
    INSIGHT_DIMENSIONS,
    INSIGHT_KINDS,
    MAX_INSIGHT_VALUES,
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


_KEY_SPACE = 2**64


def event_key(secret: bytes, user: str, item: str, kind: str, t: float) -> int:
    """An event's pseudo-random key in [0, 2**64), fixed for the event and the secret."""
    message = f"{user}|{item}|{kind}|{t!r}".encode()
    return int.from_bytes(hmac.new(secret, message, hashlib.sha256).digest()[:8], "big")


def window_key(key_sum: int) -> int:
    """A window cell's key: its events' key sum, hashed, so that its noise is not its
    week's when all its events fall in one week (the difference would then be exact)."""
    digest = hashlib.sha256(b"window|" + (key_sum % _KEY_SPACE).to_bytes(8, "big")).digest()
    return int.from_bytes(digest[:8], "big")


def cell_noise(cell_key: int, scale: float) -> float:
    """Laplace(0, scale) noise at the quantile the cell's key gives (keys sum mod 2**64)."""
    u = ((cell_key % _KEY_SPACE) + 0.5) / _KEY_SPACE - 0.5  # in (-0.5, 0.5)
    return -scale * math.copysign(1.0, u) * math.log(1 - 2 * abs(u))


def compute_report(
    events: Iterable[Event],
    catalog: Sequence[CatalogItem],
    *,
    region: str,
    weeks: int,
    min_users: int,
    noise_scale: float = 0.0,
    noise_secret: bytes | None = None,
    now: datetime | None = None,
) -> RegionReport | None:
    """The region's report; None when the region has no events of a counted kind.

    `noise_secret` keys the cell-key noise (a node passes its own, kept in its database);
    without one the noise is fresh on every call.
    """
    attrs = {item.item_id: item_attributes(item) for item in catalog}
    secret = noise_secret if noise_secret is not None else os.urandom(32)
    rows = [(u, i, k, t) for u, i, k, t in events if k in INSIGHT_KINDS and i in attrs]
    if not rows:
        return None
    as_of = datetime.fromtimestamp(max(row[3] for row in rows), UTC)
    last = week_start(as_of)
    starts = [last - timedelta(weeks=weeks - 1 - w) for w in range(weeks)]
    first = starts[0]
    # (kind, dimension, value) -> per week event count, distinct users and cell key; window
    # users too.
    counts: dict[tuple[str, str, str], list[int]] = {}  # (kind, dimension, value)
    users: dict[tuple[str, str, str], list[set[str]]] = {}
    cell_keys: dict[tuple[str, str, str], list[int]] = {}
    window_users: dict[tuple[str, str, str], set[str]] = {}
    for user, item, kind, t in rows:
        ts = datetime.fromtimestamp(t, UTC)
        if ts < first:
            continue
        w = (week_start(ts) - first).days // 7
        a = attrs[item]
        key = event_key(secret, user, item, kind, t) if noise_scale > 0 else 0
        for dim in INSIGHT_DIMENSIONS:
            here = (kind, dim, a[dim])
            if here not in counts:
                counts[here] = [0] * weeks
                users[here] = [set() for _ in range(weeks)]
                cell_keys[here] = [0] * weeks
                window_users[here] = set()
            counts[here][w] += 1
            users[here][w].add(user)
            cell_keys[here][w] += key
            window_users[here].add(user)

    def noised(n: int, cell_key: int) -> int:
        return max(0, round(n + cell_noise(cell_key, noise_scale))) if noise_scale > 0 else n

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
                window[cell[2]] = noised(sum(counts[cell]), window_key(sum(cell_keys[cell])))
                weekly[cell[2]] = [
                    noised(c, k) if len(u) >= min_users else None
                    for c, u, k in zip(counts[cell], users[cell], cell_keys[cell], strict=True)
                ]
            if len(window) > MAX_INSIGHT_VALUES:  # the most events first, then by name
                kept = sorted(window, key=lambda v: (-window[v], v))[:MAX_INSIGHT_VALUES]
                suppressed += len(window) - len(kept)
                window = {v: window[v] for v in kept}
                weekly = {v: weekly[v] for v in kept}
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
