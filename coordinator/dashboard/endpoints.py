"""GET /dashboard (the page), its static files, and GET /v1/dashboard/summary (its data)."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Query
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from coordinator.dashboard import service
from coordinator.dashboard.schemas import DashboardSummary
from coordinator.deps import BearerDep, SessionDep, SettingsDep, require_admin
from shared.errors import error_responses

STATIC_DIR = Path(__file__).parent / "static"

router = APIRouter(tags=["dashboard"])


def require_dashboard_reader(creds: BearerDep, settings: SettingsDep, session: SessionDep) -> None:
    """Public unless COORDINATOR_DASHBOARD_PUBLIC=false; then the admin token is needed."""
    if not settings.dashboard_public:
        require_admin(creds, settings, session)


@cache
def _page() -> str:
    return (STATIC_DIR / "index.html").read_text(encoding="utf-8")


@router.get(
    "/dashboard",
    summary="Operator dashboard (HTML)",
    description=(
        "A single page for operators and data people: model versions with their metrics, "
        "rounds with participants and durations, a metrics-over-rounds chart and node health. "
        "Self-contained (no CDN): it reads `/v1/dashboard/summary` and refreshes every few "
        "seconds. When the summary needs the admin token, the page asks for it and keeps "
        "it in the tab's session storage only."
    ),
    response_class=HTMLResponse,
    responses={200: {"content": {"text/html": {"example": "<!doctype html>..."}}}},
)
def dashboard_page() -> HTMLResponse:
    return HTMLResponse(_page(), headers={"Cache-Control": "no-cache"})


@router.get(
    "/v1/dashboard/summary",
    summary="Everything the dashboard shows, in one read",
    description=(
        "Model versions (status, metrics), rounds (participants, example counts, durations, "
        "why they closed) and node health (last seen, last version downloaded), newest "
        "first. Public and read-only by default: it carries ids, counts and aggregate "
        "metrics that `/v1/models` and `/v1/rounds` already publish, never tokens or token "
        "hashes. With `COORDINATOR_DASHBOARD_PUBLIC=false` it needs the admin token."
    ),
    responses=error_responses(401, 403, 422),
)
def dashboard_summary(
    _: Annotated[None, Depends(require_dashboard_reader)],
    session: SessionDep,
    settings: SettingsDep,
    limit: Annotated[
        int, Query(ge=1, le=1000, description="Most versions and rounds to return.")
    ] = 200,
) -> DashboardSummary:
    return service.build_summary(session, settings, limit=limit)


def install_dashboard(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/dashboard/static", StaticFiles(directory=STATIC_DIR), name="dashboard-static")
