"""The coordinator's app factory and lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from coordinator.catalog.endpoints import router as catalog_router
from coordinator.db import Database
from coordinator.insights.endpoints import router as insights_router
from coordinator.models_registry.endpoints import router as models_router
from coordinator.models_registry.service import WeightCache
from coordinator.nodes.bootstrap import bootstrap_from_settings
from coordinator.nodes.endpoints import router as nodes_router
from coordinator.operator_tools import install_operator_tools
from coordinator.rounds.endpoints import router as rounds_router
from coordinator.rounds.service import resume_rounds, try_close_current_round
from coordinator.rounds.waiting import RoundSignal
from coordinator.secagg.endpoints import router as secagg_router
from coordinator.settings import CoordinatorSettings
from shared.aio import wait_event
from shared.db import database_ready
from shared.errors import error_responses, install_error_handlers
from shared.memory import use_mmap_for_large_blocks

log = logging.getLogger("fedjewel.coordinator")


def _close_ready_round(app: FastAPI) -> int | None:
    db: Database = app.state.db
    started = time.perf_counter()
    with db.sessions() as session:
        version = try_close_current_round(session, app.state.settings, app.state.weight_cache)
        if version is not None:
            app.state.coordinator_metrics.round_closed(
                session, version, time.perf_counter() - started
            )
        return version


async def _round_closer(app: FastAPI) -> None:
    """Closes rounds when they reach their target or their deadline; never on the event loop."""
    settings: CoordinatorSettings = app.state.settings
    wakeup: asyncio.Event = app.state.round_wakeup
    resumed = False  # once per start, here rather than in start-up: the database may be down
    while True:
        await wait_event(wakeup, settings.round_check_seconds)
        wakeup.clear()
        if not resumed:
            try:
                if await asyncio.to_thread(_resume_rounds, app.state.db, settings):
                    app.state.round_signal.notify()
                resumed = True
            except Exception:  # tried again next pass; closing goes on meanwhile
                log.exception("resuming rounds failed; will retry")
        try:
            version = await asyncio.to_thread(_close_ready_round, app)
        except Exception:  # keep closing future rounds; the failure is logged
            log.exception("closing the round failed; will retry")
            continue
        if version is not None:
            app.state.round_signal.notify()  # long-polling nodes learn of the new round now


def _resume_rounds(db: Database, settings: CoordinatorSettings) -> bool:
    with db.sessions() as session:
        return resume_rounds(session, settings) is not None


def create_app(settings: CoordinatorSettings | None = None) -> FastAPI:
    settings = settings or CoordinatorSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        use_mmap_for_large_blocks()  # model-sized buffers go back to the OS when freed
        db = Database(settings.database_url)
        if settings.migrate_on_start:
            await asyncio.to_thread(db.migrate)
        await asyncio.to_thread(bootstrap_from_settings, db, settings.bootstrap_nodes)
        app.state.db = db
        app.state.round_wakeup = asyncio.Event()
        app.state.round_signal = RoundSignal()
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
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.weight_cache = WeightCache(maxsize=2)
    install_error_handlers(app)
    for router in (
        nodes_router,
        catalog_router,
        models_router,
        rounds_router,
        secagg_router,
        insights_router,
    ):
        app.include_router(router)
    install_operator_tools(app)

    @app.get(
        "/readyz",
        tags=["health"],
        summary="Readiness: the database answers",
        description="200 once the database answers a query (migrations ran at start-up); "
        "503 while it does not. Use it as the load balancer's and compose's healthcheck.",
        responses={
            200: {"content": {"application/json": {"example": {"status": "ready"}}}},
            **error_responses(503),
        },
    )
    def readyz() -> dict[str, str]:
        db: Database = app.state.db
        database_ready(db.engine)
        return {"status": "ready"}

    return app
