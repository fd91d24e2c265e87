from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from coordinator.deps import NodeDep, ReaderDep, RoundIdPath, SessionDep, SettingsDep
from coordinator.secagg import service
from shared.errors import error_responses
from shared.privacy_schemas import PublicKeyIn, SecAggState, SeedRevealIn

router = APIRouter(prefix="/v1/rounds", tags=["secure aggregation"])


@router.get(
    "/{round_id}/secagg",
    summary="Secure-aggregation state of a round",
    description="The cohort's public keys once sealed, who submitted, who dropped, who revealed.",
    responses=error_responses(401, 403, 404, 422),
)
def get_state(round_id: RoundIdPath, _: ReaderDep, session: SessionDep) -> SecAggState:
    return service.state_out(session, round_id)


@router.post(
    "/{round_id}/secagg/keys",
    summary="Publish this node's X25519 public key for the round",
    description="Node token only. Idempotent for the same key; the cohort seals when "
    "TARGET_UPDATES nodes have published.",
    responses=error_responses(400, 401, 403, 404, 409, 422),
)
async def publish_key(
    round_id: RoundIdPath,
    body: PublicKeyIn,
    request: Request,
    node: NodeDep,
    session: SessionDep,
    settings: SettingsDep,
) -> SecAggState:
    return await _apply_and_wake(
        request, service.publish_key, session, settings, node, round_id, body.public_key
    )


@router.post(
    "/{round_id}/secagg/reveals",
    summary="Reveal pairwise seeds with dropped nodes",
    description="Node token only; a surviving cohort member sends its seeds with exactly the "
    "dropped nodes so the coordinator can remove their masks from the sum.",
    responses=error_responses(400, 401, 403, 404, 409, 422),
)
async def reveal(
    round_id: RoundIdPath,
    body: SeedRevealIn,
    request: Request,
    node: NodeDep,
    session: SessionDep,
    settings: SettingsDep,
) -> SecAggState:
    return await _apply_and_wake(
        request, service.reveal_seeds, session, settings, node, round_id, body.seeds
    )


async def _apply_and_wake(
    request: Request, change: Callable[..., SecAggState], *args: object
) -> SecAggState:
    """Apply a secure-aggregation state change off the event loop, then wake the round
    checker: a seal or a complete set of reveals may let the round close."""
    state = await run_in_threadpool(change, *args)
    request.app.state.round_wakeup.set()
    return state
