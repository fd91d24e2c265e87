"""The coordinator's app factory and lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy import text

from coordinator.catalog.endpoints import router as catalog_router
from coordinator.db import Database
from coordinator.models_registry.endpoints import router as models_router
from coordinator.models_registry.service import WeightCache
from coordinator.nodes.endpoints import router as nodes_router
from coordinator.rounds.endpoints import router as rounds_router
from coordinator.rounds.service import try_close_current_round
from coordinator.settings import CoordinatorSettings
from shared.errors import ServiceUnavailable, error_responses, install_error_handlers
from shared.memory import use_mmap_for_large_blocks

log = logging.getLogger("fedjewel.coordinator")


def _close_ready_round(app: FastAPI) -> int | None:
    db: Database = app.state.db
    with db.sessions() as session:
        return try_close_current_round(session, app.state.settings, app.state.weight_cache)


async def _round_closer(app: FastAPI) -> None:
    """Closes rounds when they reach their target or their deadline; never on the event loop."""
    settings: CoordinatorSettings = app.state.settings
    wakeup: asyncio.Event = app.state.round_wakeup
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wakeup.wait(), timeout=settings.round_check_seconds)
        wakeup.clear()
        try:
            await asyncio.to_thread(_close_ready_round, app)
        except Exception:  # keep closing future rounds; the failure is logged
            log.exception("closing the round failed; will retry")


def create_app(settings: CoordinatorSettings | None = None) -> FastAPI:
    settings = settings or CoordinatorSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        use_mmap_for_large_blocks()  # model-sized buffers go back to the OS when freed
        db = Database(settings.database_url)
        if settings.migrate_on_start:
            await asyncio.to_thread(db.migrate)
        app.state.db = db
        app.state.round_wakeup = asyncio.Event()
        task = asyncio.create_task(_round_closer(app))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            db.dispose()

    app = FastAPI(
        title="fedjewel coordinator",
        version="0.1.0",
        summary="Global model versions, training rounds, node registry and product catalog.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.weight_cache = WeightCache(maxsize=2)
    install_error_handlers(app)
    for router in (nodes_router, catalog_router, models_router, rounds_router):
        app.include_router(router)

    @app.get("/healthz", tags=["health"], summary="Liveness: the process is up")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["health"],
        summary="Readiness: the database answers",
        responses=error_responses(503),
    )
    def readyz() -> dict[str, str]:
        db: Database = app.state.db
        try:
            with db.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:
            raise ServiceUnavailable(f"database unreachable: {type(exc).__name__}") from exc
        return {"status": "ready"}

    return app
