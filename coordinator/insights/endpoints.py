from __future__ import annotations

from fastapi import APIRouter

from coordinator.deps import NodeDep, ReaderDep, SessionDep
from coordinator.insights import service
from shared.errors import error_responses
from shared.insights_schemas import InsightsOut, RegionReport

router = APIRouter(prefix="/v1/insights", tags=["insights"])


@router.get(
    "",
    summary="Regional insights (aggregate, thresholded on each node)",
    description="The latest report of every node: shares of views and purchases by category, "
    "material, gemstone and price band with weekly trends, plus cross-region highlights. "
    "Admin token or any node token.",
    responses=error_responses(401, 403),
)
def get_insights(_: ReaderDep, session: SessionDep) -> InsightsOut:
    return service.list_insights(session)


@router.post(
    "/{node_id}",
    status_code=204,
    summary="Push this node's regional report",
    description="Node token only, for its own node id. Replaces the node's previous report.",
    responses=error_responses(400, 401, 403, 404, 422),
)
def post_insights(node_id: str, report: RegionReport, node: NodeDep, session: SessionDep) -> None:
    service.store_report(session, node, node_id, report)
