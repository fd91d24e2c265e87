"""Wire schema of regional insights: aggregate shares a node computes and thresholds locally.

A report never holds a user id or an event: every number is a count of events
over at least `min_users` distinct users (smaller cells are left out), or a
share or trend derived from such counts.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.schemas import Text

InsightKind = Literal["view", "purchase"]
InsightDimension = Literal["category", "material", "gemstone", "price_band"]
INSIGHT_KINDS: tuple[InsightKind, ...] = ("view", "purchase")
INSIGHT_DIMENSIONS: tuple[InsightDimension, ...] = (
    "category",
    "material",
    "gemstone",
    "price_band",
)
# Bounds of a report, so that one node cannot bloat the public GET /v1/insights: the
# weeks a report spans (NODE_INSIGHTS_WEEKS is at most this) and the values reported per
# kind and dimension (a node reports the ones with the most events and counts the rest
# as suppressed).
MAX_INSIGHT_WEEKS = 104
MAX_INSIGHT_VALUES = 256
StoredName = Annotated[Text, Field(max_length=128)]


class InsightCell(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    events: int = Field(ge=0, description="Events in the whole window (noised if configured).")
    share: float = Field(ge=0, le=1, description="events / reported_events of the dimension.")
    weekly_share: list[float | None] = Field(
        max_length=MAX_INSIGHT_WEEKS,
        description="Share per week (oldest first); null where the week's cell was suppressed.",
    )
    trend_per_week: float | None = Field(
        description="Least-squares slope of weekly_share (share points per week)."
    )


class DimensionInsight(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    reported_events: int = Field(ge=0, description="Sum of the reported cells' events.")
    weekly_reported_events: list[int] = Field(max_length=MAX_INSIGHT_WEEKS)
    suppressed_cells: int = Field(
        ge=0,
        description="Values left out: fewer than min_users, or beyond the "
        f"{MAX_INSIGHT_VALUES} with the most events.",
    )
    values: dict[StoredName, InsightCell] = Field(max_length=MAX_INSIGHT_VALUES)


_EXAMPLE_REPORT: dict[str, Any] = {
    "region": "EA",
    "generated_at": "2026-11-25T22:10:00Z",
    "as_of": "2026-10-31T23:12:09Z",
    "weeks": ["2026-10-13", "2026-10-20", "2026-10-27"],
    "min_users": 20,
    "noise_scale": 0.0,
    "kinds": {
        "purchase": {
            "material": {
                "reported_events": 420,
                "weekly_reported_events": [130, 140, 150],
                "suppressed_cells": 2,
                "values": {
                    "jade": {
                        "events": 120,
                        "share": 0.2857,
                        "weekly_share": [0.25, 0.28, 0.32],
                        "trend_per_week": 0.035,
                    }
                },
            }
        }
    },
}


class RegionReport(BaseModel):
    model_config = ConfigDict(
        extra="forbid", allow_inf_nan=False, json_schema_extra={"examples": [_EXAMPLE_REPORT]}
    )

    region: StoredName
    generated_at: datetime
    as_of: datetime = Field(description="End of the window: the region's latest event.")
    weeks: list[Annotated[Text, Field(max_length=32)]] = Field(
        max_length=MAX_INSIGHT_WEEKS, description="Week start dates (Monday, UTC)."
    )
    min_users: int = Field(ge=1)
    noise_scale: float = Field(ge=0, description="Laplace scale added to counts; 0 = none.")
    kinds: dict[InsightKind, dict[InsightDimension, DimensionInsight]]

    @model_validator(mode="after")
    def _one_figure_a_week(self) -> RegionReport:
        weeks = len(self.weeks)
        for kind, dims in self.kinds.items():
            for dim, insight in dims.items():
                if len(insight.weekly_reported_events) != weeks:
                    raise ValueError(
                        f"kinds.{kind}.{dim}.weekly_reported_events has "
                        f"{len(insight.weekly_reported_events)} entries; weeks has {weeks}"
                    )
                for value, cell in insight.values.items():
                    if len(cell.weekly_share) != weeks:
                        raise ValueError(
                            f"kinds.{kind}.{dim}.values[{value!r}].weekly_share has "
                            f"{len(cell.weekly_share)} entries; weeks has {weeks}"
                        )
        return self


class RegionInsightOut(BaseModel):
    node_id: str
    received_at: datetime
    report: RegionReport


class Highlight(BaseModel):
    region: str
    node_id: str
    kind: InsightKind
    dimension: InsightDimension
    value: str
    share: float
    trend_per_week: float


class InsightsOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "regions": [
                        {
                            "node_id": "ea-1",
                            "received_at": "2026-11-25T22:10:01Z",
                            "report": _EXAMPLE_REPORT,
                        }
                    ],
                    "highlights": [
                        {
                            "region": "EA",
                            "node_id": "ea-1",
                            "kind": "purchase",
                            "dimension": "material",
                            "value": "jade",
                            "share": 0.2857,
                            "trend_per_week": 0.035,
                        }
                    ],
                }
            ]
        }
    )

    regions: list[RegionInsightOut]
    highlights: list[Highlight] = Field(
        description="Per region and kind, the fastest rising and falling material, category "
        "and gemstone (by trend_per_week)."
    )
