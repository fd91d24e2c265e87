from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Header, Query, Response

from coordinator.catalog import service
from coordinator.deps import AdminDep, SessionDep, SettingsDep, etag_matches
from coordinator.rounds.service import bootstrap_model_if_needed
from shared.errors import error_responses
from shared.schemas import CatalogInfo, CatalogItem, CatalogOut

router = APIRouter(prefix="/v1/catalog", tags=["catalog"])


@router.put(
    "",
    summary="Upload the product catalog",
    description=(
        "Admin only. A JSON list of items. New item ids are appended (their model rows "
        "are added at the next round), changed items are updated. With "
        "`deactivate_missing=true`, items absent from the list stop being recommended. "
        "The first upload creates model version 1 (a seeded initialization) and round 1. "
        "All or nothing: an invalid item rejects the whole upload."
    ),
    responses=error_responses(400, 401, 403, 409, 422),
)
def put_catalog(
    items: Annotated[list[CatalogItem], Body(max_length=1_000_000)],
    _: AdminDep,
    session: SessionDep,
    settings: SettingsDep,
    deactivate_missing: Annotated[bool, Query()] = False,
) -> CatalogInfo:
    info = service.upsert_catalog(session, items, deactivate_missing=deactivate_missing)
    bootstrap_model_if_needed(session, settings, info.items)
    session.commit()
    return info


@router.get(
    "",
    summary="The product catalog",
    description="Public product data, in model-row order (an item's position is its row). "
    "Supports `If-None-Match` with the catalog version as ETag.",
    response_model=CatalogOut,
    responses={304: {"description": "Not modified."}, **error_responses(422)},
)
def get_catalog(
    session: SessionDep,
    response: Response,
    if_none_match: Annotated[str | None, Header()] = None,
) -> CatalogOut | Response:
    version = service.catalog_version(session)
    etag = f'"catalog-{version}"'
    if etag_matches(if_none_match, etag):
        return Response(status_code=304, headers={"ETag": etag})
    response.headers["ETag"] = etag
    return service.get_catalog(session)
