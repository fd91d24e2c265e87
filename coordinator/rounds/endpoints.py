from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.concurrency import run_in_threadpool

from coordinator.deps import (
    MAX_DB_ID,
    DatabaseDep,
    NodeDep,
    RoundIdPath,
    SessionDep,
    SettingsDep,
)
from coordinator.rounds import service
from coordinator.rounds.waiting import MAX_WAIT_SECONDS, wait_for_round
from shared.errors import NotFound, error_responses
from shared.schemas import RoundOut, UpdateReceipt
from shared.streaming import read_body_capped

router = APIRouter(prefix="/v1/rounds", tags=["rounds"])


@router.get(
    "/current",
    summary="The open training round",
    description=(
        "Round id, base version, deadline and how many updates it has. With `after`, a "
        "long poll: the answer comes as soon as a round newer than `after` is open, or "
        "after `wait` seconds with whatever is current then (a node that has sent its "
        "update learns of the next round at once instead of at its next poll)."
    ),
    responses=error_responses(404, 422),
)
async def current_round(
    request: Request,
    db: DatabaseDep,
    settings: SettingsDep,
    after: Annotated[
        int | None,
        Query(ge=0, le=MAX_DB_ID, description="Wait for a round newer than this id."),
    ] = None,
    wait: Annotated[
        float,
        Query(ge=0, le=MAX_WAIT_SECONDS, description="Longest wait in seconds (with `after`)."),
    ] = 0.0,
) -> RoundOut:
    rnd = await wait_for_round(db, settings, request.app.state.round_signal, after=after, wait=wait)
    if rnd is None:
        raise NotFound("no open round: no catalog uploaded yet, or COORDINATOR_MAX_ROUNDS reached")
    return rnd


@router.get(
    "",
    summary="List rounds",
    description="Newest first, with participants.",
    responses=error_responses(422),
)
def list_rounds(
    session: SessionDep,
    settings: SettingsDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[RoundOut]:
    return [service.round_out(session, r, settings) for r in service.list_rounds(session, limit)]


@router.get(
    "/{round_id}",
    summary="One round",
    description="State, base and result versions, deadline and the nodes that contributed.",
    responses=error_responses(404, 422),
)
def get_round(round_id: RoundIdPath, session: SessionDep, settings: SettingsDep) -> RoundOut:
    return service.round_out(session, service.get_round(session, round_id), settings)


@router.post(
    "/{round_id}/updates",
    summary="Submit a node's weight update",
    description=(
        "Node token only. The body is a safetensors file holding the node's weight **delta** "
        "against the round's base version, keyed by parameter name (same names, shapes and "
        "dtypes as the base; NaN/Inf refused). `num_examples` and `base_version` are query "
        "parameters; `X-Content-SHA256` (hex sha256 of the body) is required and verified; "
        "local metrics go in `X-Update-Metrics` as a JSON object of numbers. Retrying the "
        "same update returns the first receipt (`duplicate: true`); a different second "
        "update from the same node in the same round is a 409. "
        "The body size is capped while it streams."
    ),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
        }
    },
    responses=error_responses(401, 403, 404, 409, 413, 422),
)
async def submit_update(
    round_id: RoundIdPath,
    request: Request,
    node: NodeDep,
    session: SessionDep,
    settings: SettingsDep,
    num_examples: Annotated[int, Query(ge=1, description="Training examples behind the update.")],
    base_version: Annotated[int, Query(ge=1, description="The version the delta is against.")],
    x_content_sha256: Annotated[
        str, Header(pattern=r"^[0-9a-fA-F]{64}$", description="Hex sha256 of the body (required).")
    ],
    x_update_metrics: Annotated[
        str | None, Header(max_length=4096, description='e.g. {"train_loss": 3.2}')
    ] = None,
    x_update_encoding: Annotated[str, Header(max_length=32)] = "dense",
) -> UpdateReceipt:
    payload = await read_body_capped(request, settings.max_update_bytes)
    metrics = service.parse_metrics_header(x_update_metrics)
    receipt = await run_in_threadpool(
        service.submit_update,
        session,
        settings,
        request.app.state.weight_cache,
        node,
        round_id=round_id,
        base_version=base_version,
        num_examples=num_examples,
        payload=payload,
        sha256_claimed=x_content_sha256,
        metrics=metrics,
        encoding=x_update_encoding,
    )
    request.app.state.round_wakeup.set()
    return receipt
