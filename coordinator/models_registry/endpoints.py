from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse

from coordinator.deps import (
    AdminDep,
    ReaderDep,
    SessionDep,
    SettingsDep,
    VersionPath,
    etag_matches,
)
from coordinator.models_registry import service
from coordinator.nodes.service import touch_node
from coordinator.rounds.service import promote_version
from shared.errors import NotFound, error_responses
from shared.schemas import ModelVersionOut

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get(
    "",
    summary="List model versions",
    description="Newest first, with status (candidate / active / retired), sha256 and the "
    "aggregate metrics of the round that produced each version.",
    responses=error_responses(422),
)
def list_models(
    session: SessionDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> list[ModelVersionOut]:
    return [service.to_out(v) for v in service.list_versions(session, limit)]


@router.get(
    "/latest",
    summary="The active model version",
    description="The version nodes should serve (the newest active one).",
    responses=error_responses(404),
)
def latest_model(session: SessionDep) -> ModelVersionOut:
    row = service.active_version(session)
    if row is None:
        raise NotFound("no model yet: upload a catalog first")
    return service.to_out(row)


@router.get(
    "/{version}",
    summary="One model version's metadata",
    description="Status, sha256 and size of the weights, model config, the round that "
    "produced it and the aggregate metrics the nodes reported in that round.",
    responses=error_responses(404, 422),
)
def get_model(version: VersionPath, session: SessionDep) -> ModelVersionOut:
    return service.to_out(service.get_version(session, version))


@router.get(
    "/{version}/weights",
    summary="Download a version's weights",
    description=(
        "Safetensors bytes keyed by parameter name. `ETag` is the sha256 of the body; "
        "a matching `If-None-Match` answers 304. Needs a node or the admin token."
    ),
    response_class=Response,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "Safetensors."},
        304: {"description": "Not modified."},
        **error_responses(401, 403, 404, 422),
    },
)
def get_weights(
    version: VersionPath,
    request: Request,
    session: SessionDep,
    reader: ReaderDep,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    row = service.get_version(session, version)
    if reader is not None:  # a node: record when it was seen and what it fetched
        touch_node(session, reader, version)
    etag = f'"{row.sha256}"'
    if etag_matches(if_none_match, etag, row.sha256):
        return Response(status_code=304, headers={"ETag": etag})
    headers = {"ETag": etag, "X-Model-Version": str(version)}
    if row.size_bytes <= service.WEIGHT_CHUNK_BYTES:
        data = service.weights_bytes(session, version)
        return Response(content=data, media_type="application/octet-stream", headers=headers)
    # Large models stream in slices straight from the database: memory stays at one chunk
    # per download. The request's own connection goes back to the pool first, so a burst
    # of downloads queues for connections instead of holding one each while waiting.
    session.close()
    return StreamingResponse(
        service.iter_weights(
            request.app.state.db.engine, version, row.size_bytes, service.WEIGHT_CHUNK_BYTES
        ),
        media_type="application/octet-stream",
        headers={**headers, "Content-Length": str(row.size_bytes)},
    )


@router.post(
    "/{version}/promote",
    summary="Promote or roll back to a version",
    description="Admin only. Makes the version active; nodes follow the active version. "
    "The open round is rebased on it (its updates, made against another base, are dropped).",
    responses=error_responses(401, 403, 404, 409, 422),
)
def promote(
    version: VersionPath, _: AdminDep, session: SessionDep, settings: SettingsDep
) -> ModelVersionOut:
    return service.to_out(promote_version(session, settings, version))
