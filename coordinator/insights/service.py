"""Store the latest report of each node and serve them with cross-region highlights."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.models import Node, RegionInsight
from shared.errors import Forbidden
from shared.insights_schemas import (
    Highlight,
    InsightDimension,
    InsightsOut,
    RegionInsightOut,
    RegionReport,
)
from shared.schemas import utcnow

HIGHLIGHT_DIMENSIONS: tuple[InsightDimension, ...] = ("material", "category", "gemstone")


def store_report(session: Session, node: Node, node_id: str, report: RegionReport) -> None:
    """Replace the node's report (a node writes only its own)."""
    if node.node_id != node_id:
        raise Forbidden(f"this token belongs to node {node.node_id!r}, not {node_id!r}")
    row = session.get(RegionInsight, node_id)
    # Shown under the region the node was registered with, whatever the report calls it:
    # a node cannot publish figures as another region's.
    payload = report.model_copy(update={"region": node.region}).model_dump(mode="json")
    if row is None:
        session.add(
            RegionInsight(node_id=node_id, region=node.region, received_at=utcnow(), report=payload)
        )
    else:
        row.region = node.region
        row.received_at = utcnow()
        row.report = payload
    session.commit()


def highlights(regions: list[RegionInsightOut]) -> list[Highlight]:
    """Fastest rising and falling value per region, kind and dimension (pure)."""
    out: list[Highlight] = []
    for r in regions:
        for kind, dims in sorted(r.report.kinds.items()):
            for dim in HIGHLIGHT_DIMENSIONS:
                d = dims.get(dim)
                if d is None:
                    continue
                trended = [(v, c) for v, c in sorted(d.values.items()) if c.trend_per_week]
                if not trended:
                    continue
                rising = max(trended, key=lambda vc: vc[1].trend_per_week or 0.0)
                falling = min(trended, key=lambda vc: vc[1].trend_per_week or 0.0)
                for value, cell in {rising[0]: rising[1], falling[0]: falling[1]}.items():
                    out.append(
                        Highlight(
                            region=r.report.region,
                            node_id=r.node_id,
                            kind=kind,
                            dimension=dim,
                            value=value,
                            share=cell.share,
                            trend_per_week=cell.trend_per_week or 0.0,
                        )
                    )
    return out


def list_insights(session: Session) -> InsightsOut:
    rows = session.scalars(select(RegionInsight).order_by(RegionInsight.node_id)).all()
    regions = [
        RegionInsightOut(
            node_id=row.node_id,
            received_at=row.received_at,
            report=RegionReport.model_validate(row.report),
        )
        for row in rows
    ]
    return InsightsOut(regions=regions, highlights=highlights(regions))
