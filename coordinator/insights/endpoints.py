from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from coordinator.deps import (
    BearerDep,
    NodeDep,
    NodeIdPath,
    SessionDep,
    SettingsDep,
    require_reader,
)
from coordinator.insights import service
from shared.errors import error_responses
from shared.insights_schemas import InsightsOut, RegionReport

router = APIRouter(prefix="/v1/insights", tags=["insights"])


def require_insights_reader(creds: BearerDep, settings: SettingsDep, session: SessionDep) -> None:
    """Insights are as visible as the dashboard that shows them (COORDINATOR_DASHBOARD_PUBLIC);
    when the dashboard is private, the admin token or a node token is needed."""
    if not settings.dashboard_public:
        require_reader(creds, settings, session)


@router.get(
    "",
    summary="Regional insights (aggregate, thresholded on each node)",
    description="The latest report of every node: shares of views and purchases by category, "
    "material, gemstone and price band with weekly trends, plus cross-region highlights. "
    "Public while the dashboard is public (`COORDINATOR_DASHBOARD_PUBLIC`, the default); "
    "otherwise the admin token or any node token. Every figure is already thresholded on "
    "the node (cells over fewer than `NODE_INSIGHTS_MIN_USERS` users are suppressed).",
    responses=error_responses(401, 403),
)
def get_insights(
    _: Annotated[None, Depends(require_insights_reader)], session: SessionDep
) -> InsightsOut:
    return service.list_insights(session)


@router.post(
    "/{node_id}",
    status_code=204,
    summary="Push this node's regional report",
    description="Node token only, for its own node id. Replaces the node's previous report.",
    responses=error_responses(400, 401, 403, 422),
)
def post_insights(
    node_id: NodeIdPath, report: RegionReport, node: NodeDep, session: SessionDep
) -> None:
    service.store_report(session, node, node_id, report)
