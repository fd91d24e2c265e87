from __future__ import annotations

from fastapi import APIRouter, status

from coordinator.deps import AdminDep, NodeIdPath, SessionDep, SettingsDep
from coordinator.nodes import service
from shared.errors import error_responses
from shared.schemas import NodeCredentials, NodeInfo, NodeRegistration

router = APIRouter(prefix="/v1/nodes", tags=["nodes"])


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Register a regional node",
    description="Admin only. Answers with the node's bearer token; it is shown once and "
    "only its hash is stored.",
    responses=error_responses(400, 401, 403, 409, 422),
)
def register_node(body: NodeRegistration, _: AdminDep, session: SessionDep) -> NodeCredentials:
    return service.register_node(session, body)


@router.get(
    "",
    summary="List registered nodes",
    description="Admin only. Node health: last seen, model version fetched, revoked.",
    responses=error_responses(401, 403),
)
def list_nodes(_: AdminDep, session: SessionDep) -> list[NodeInfo]:
    return service.list_nodes(session)


@router.post(
    "/{node_id}/revoke",
    summary="Revoke a node",
    description="Admin only. A revoked node's token is refused from then on, and its "
    "update to the open round, if any, is dropped (with secure aggregation, a round "
    "whose sealed cohort holds the node is redone: its masks cannot be removed without it).",
    responses=error_responses(401, 403, 404, 422),
)
def revoke_node(
    node_id: NodeIdPath, _: AdminDep, session: SessionDep, settings: SettingsDep
) -> NodeInfo:
    return service.revoke_node(session, settings, node_id)
